"""Where a conditional denoiser's conditioning comes from, decided explicitly.

A UNet2DConditionModel needs `encoder_hidden_states` (and SDXL-style models `text_embeds` and
`time_ids`). They come from the model folder's own text encoder (prompts), from its class
embedding table (qdiff's class-conditional models), from a saved embeddings file, or from seeded
random tensors when the user asks for that with a flag. Never silently: a conditional model
with no source is an error that lists the options.

Classifier-free guidance needs the unconditional counterpart of each: the empty prompt, the
null class, the file's `uncond_*` tensors, or an independent random draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qdiff.core.errors import ConditioningError

COND_KEYS = ("encoder_hidden_states", "text_embeds", "time_ids")


@dataclass
class Conditioning:
    """Per-sample conditional and unconditional denoiser inputs (dicts keyed by input name)."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    source: str

    @property
    def num_samples(self) -> int:
        return int(self.cond["encoder_hidden_states"].shape[0])

    def select(self, start: int, stop: int) -> Conditioning:
        return Conditioning(
            {k: v[start:stop] for k, v in self.cond.items()},
            {k: v[start:stop] for k, v in self.uncond.items()},
            self.source,
        )


def added_condition_shapes(unet_config) -> dict[str, int] | None:
    """Feature sizes of SDXL-style added conditions (`addition_embed_type="text_time"`), if any."""
    if getattr(unet_config, "addition_embed_type", None) != "text_time":
        return None
    time_dim = int(unet_config.addition_time_embed_dim)
    total = int(unet_config.projection_class_embeddings_input_dim)
    return {"text_embeds": total - 6 * time_dim, "time_ids": 6}


def _repeat_to(x: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.ndim - 1)))[:n]


def _default_time_ids(unet_config, n: int) -> torch.Tensor:
    size = unet_config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    pixels = float(size) * 8.0  # latent models decode at 8x
    return torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]]).repeat(n, 1)


def random_conditioning(unet_config, num_samples: int, seed: int = 0, tokens: int = 77) -> Conditioning:
    """Seeded Gaussian conditioning, for calibrating or benchmarking a bare UNet on purpose."""
    gen = torch.Generator().manual_seed(seed)
    dim = int(unet_config.cross_attention_dim if not isinstance(unet_config.cross_attention_dim, (list, tuple)) else unet_config.cross_attention_dim[0])

    def draw() -> dict[str, torch.Tensor]:
        out = {"encoder_hidden_states": torch.randn(num_samples, tokens, dim, generator=gen)}
        added = added_condition_shapes(unet_config)
        if added:
            out["text_embeds"] = torch.randn(num_samples, added["text_embeds"], generator=gen)
            out["time_ids"] = _default_time_ids(unet_config, num_samples)
        return out

    return Conditioning(draw(), draw(), f"random (seed {seed}, {tokens} tokens)")


def from_embeddings_file(path: str | Path, unet_config, num_samples: int) -> Conditioning:
    """A safetensors file with `encoder_hidden_states` [N, tokens, dim] and optional
    `uncond_encoder_hidden_states`, `text_embeds`, `time_ids` (and their `uncond_` twins).
    Rows are cycled to `num_samples`; without `uncond_` tensors the unconditional input is zeros.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConditioningError(f"embeddings file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ConditioningError(f"{path} is not a readable safetensors file: {exc}") from exc
    if "encoder_hidden_states" not in tensors:
        raise ConditioningError(f"{path} has no tensor 'encoder_hidden_states'", hint=f"it holds: {', '.join(tensors) or 'nothing'}")
    nonfinite = sorted(name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if nonfinite:
        # NaN conditioning would only surface steps later as a NaN denoiser output.
        raise ConditioningError(f"{path}: tensor(s) {', '.join(nonfinite)} hold NaN or Inf values", hint="recompute the embeddings")
    states = tensors["encoder_hidden_states"].float()
    want_dim = unet_config.cross_attention_dim
    if states.ndim != 3 or states.shape[-1] != want_dim:
        raise ConditioningError(
            f"{path}: encoder_hidden_states has shape {tuple(states.shape)}; the UNet needs [N, tokens, {want_dim}]"
        )
    cond = {"encoder_hidden_states": _repeat_to(states, num_samples)}
    uncond_states = tensors.get("uncond_encoder_hidden_states")
    uncond = {"encoder_hidden_states": _repeat_to(uncond_states.float(), num_samples) if uncond_states is not None else torch.zeros_like(cond["encoder_hidden_states"])}
    added = added_condition_shapes(unet_config)
    if added:
        for key in ("text_embeds", "time_ids"):
            if key not in tensors:
                if key == "time_ids":
                    cond[key] = uncond[key] = _default_time_ids(unet_config, num_samples)
                    continue
                raise ConditioningError(f"{path} has no tensor {key!r}, which this SDXL-style UNet needs")
            cond[key] = _repeat_to(tensors[key].float(), num_samples)
            twin = tensors.get(f"uncond_{key}")
            uncond[key] = _repeat_to(twin.float(), num_samples) if twin is not None else torch.zeros_like(cond[key])
    return Conditioning(cond, uncond, f"embeddings file {path.name}")


def from_class_labels(class_embeddings: torch.Tensor, labels: list[int], class_names: list[str] | None = None) -> Conditioning:
    """Class-conditional models: row `label` of the table, the last row being the null class."""
    num_classes = class_embeddings.shape[0] - 1
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise ConditioningError(f"class label(s) {bad} out of range: the model has classes 0..{num_classes - 1}" + (f" ({', '.join(class_names)})" if class_names else ""))
    index = torch.tensor(labels, dtype=torch.long)
    cond = {"encoder_hidden_states": class_embeddings[index]}
    uncond = {"encoder_hidden_states": class_embeddings[-1:].repeat(len(labels), 1, 1)}
    return Conditioning(cond, uncond, "class embeddings")


@torch.no_grad()
def from_prompts(text_encoder, tokenizer, prompts: list[str], negative_prompt: str = "") -> Conditioning:
    """Prompts through the model folder's own CLIP text encoder (SD 1.x/2.x style)."""

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        return text_encoder(tokens.input_ids)[0].float()

    return Conditioning({"encoder_hidden_states": encode(prompts)}, {"encoder_hidden_states": encode([negative_prompt] * len(prompts))}, "text encoder")


def resolve_conditioning(
    bundle,
    num_samples: int,
    *,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    embeddings: str | Path | None = None,
    random: bool = False,
    seed: int = 0,
) -> Conditioning | None:
    """Pick the conditioning source for `bundle`, or explain which one the user must give."""
    config = bundle.unet.config
    if not bundle.is_conditional:
        if prompts or class_labels or embeddings or random:
            raise ConditioningError(f"{bundle.label} is an unconditional {bundle.unet_class}; it takes no prompts, classes or embeddings")
        return None
    if embeddings is not None:
        return from_embeddings_file(embeddings, config, num_samples)
    if prompts:
        if bundle.text_encoder is None or bundle.tokenizer is None:
            raise ConditioningError(
                f"{bundle.label} has no text_encoder/ and tokenizer/, so prompts cannot be encoded",
                hint="pass --embeddings FILE with saved encoder_hidden_states, or --random-conditioning",
            )
        if added_condition_shapes(config):
            raise ConditioningError(
                "prompt encoding for SDXL-style models (two text encoders) is not supported yet",
                hint="save text_embeds/encoder_hidden_states to a safetensors file and pass --embeddings",
            )
        return from_prompts(bundle.text_encoder, bundle.tokenizer, _repeat_list(prompts, num_samples))
    if bundle.class_embeddings is not None:
        num_classes = bundle.class_embeddings.shape[0] - 1
        labels = _repeat_list(class_labels, num_samples) if class_labels else [i % num_classes for i in range(num_samples)]
        return from_class_labels(bundle.class_embeddings, labels, bundle.class_names)
    if class_labels:
        raise ConditioningError(f"{bundle.label} has no conditioning/class_embeddings.safetensors, so class labels mean nothing to it")
    if random:
        return random_conditioning(config, num_samples, seed=seed)
    raise ConditioningError(
        f"{bundle.label} is a conditional UNet and nothing says where its conditioning comes from",
        hint="pass --prompt (pipeline folders with a text encoder), --embeddings FILE, or --random-conditioning",
    )


def _repeat_list(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def conditioning_key(cond: Conditioning | None) -> str:
    """A short fingerprint of the conditioning tensors, for manifests: artifacts calibrated on
    other prompts or embeddings are never silently reused."""
    if cond is None:
        return "none"
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(cond.cond):
        digest.update(cond.cond[key].numpy().tobytes())
        digest.update(cond.uncond[key].numpy().tobytes())
    return f"{cond.source}:{digest.hexdigest()[:16]}"
