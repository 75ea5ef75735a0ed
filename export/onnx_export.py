"""Export a diffusers UNet to ONNX with the input names every qdiff backend uses.

Inputs: `sample` [B, C, H, W], `timestep` [B] (float32), and for conditional UNets
`encoder_hidden_states` [B, tokens, dim] plus, for SDXL-style added conditions, `text_embeds`
and `time_ids`. Output: `out_sample`. Batch, spatial size and token count are dynamic axes.

The TorchScript exporter is used on purpose: it names every node by its module scope
(`/unet/down_blocks.0/resnets.0/conv1/Conv`), which is how the Q/DQ pass finds the layer that
the calibration table names, without relying on initializer names that constant folding
rewrites (Linear weights become `onnx::MatMul_123` after their transpose is folded).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qdiff.core.conditioning import added_condition_shapes, random_conditioning
from qdiff.core.errors import ExportError
from qdiff.export.graph_index import SCOPE_ROOT  # noqa: F401  (defined there, torch-free; re-exported)
from qdiff.export.onnx_io import save_onnx

OPSET = 17
OUTPUT_NAME = "out_sample"


class DenoiserWrapper(torch.nn.Module):
    """Positional inputs in a fixed order, as the exporter needs them, mapped to the UNet call."""

    def __init__(self, unet: torch.nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.unet = unet
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names, inputs))
        kwargs = {}
        if "encoder_hidden_states" in named:
            kwargs["encoder_hidden_states"] = named["encoder_hidden_states"]
        added = {k: named[k] for k in ("text_embeds", "time_ids") if k in named}
        if added:
            kwargs["added_cond_kwargs"] = added
        return self.unet(named["sample"], named["timestep"], **kwargs, return_dict=False)[0]


@dataclass(frozen=True)
class DenoiserSignature:
    input_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def denoiser_signature(unet: torch.nn.Module) -> DenoiserSignature:
    names = ["sample", "timestep"]
    axes: dict[str, dict[int, str]] = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"}}
    if type(unet).__name__ == "UNet2DConditionModel":
        names.append("encoder_hidden_states")
        axes["encoder_hidden_states"] = {0: "batch", 1: "tokens"}
        if added_condition_shapes(unet.config):
            names += ["text_embeds", "time_ids"]
            axes["text_embeds"] = {0: "batch"}
            axes["time_ids"] = {0: "batch"}
    axes[OUTPUT_NAME] = {0: "batch", 2: "height", 3: "width"}
    return DenoiserSignature(names, axes)


def example_inputs(unet: torch.nn.Module, batch: int = 2, seed: int = 0, size: int | None = None, tokens: int = 77) -> dict[str, torch.Tensor]:
    """Seeded random denoiser inputs of the model's native shape (or `size`)."""
    config = unet.config
    sample_size = config.sample_size
    sample_size = size or (sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size)
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, config.in_channels, sample_size, sample_size, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen).float(),
    }
    if type(unet).__name__ == "UNet2DConditionModel":
        cond = random_conditioning(config, batch, seed=seed, tokens=tokens).cond
        inputs.update(cond)
    return inputs


def export_unet(unet: torch.nn.Module, out_path: str | Path, *, opset: int = OPSET, external_data: bool | None = None, batch: int = 2) -> Path:
    """Trace `unet` to ONNX at `out_path` (atomically). Returns the path written."""
    out_path = Path(out_path)
    signature = denoiser_signature(unet)
    wrapper = DenoiserWrapper(unet, signature.input_names).eval()
    inputs = example_inputs(unet, batch=batch)
    args = tuple(inputs[n] for n in signature.input_names)
    # Traced into the system temp folder: only the finished graph goes near `out_path`.
    with tempfile.TemporaryDirectory(prefix="qdiff-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper,
                    args,
                    str(raw),
                    input_names=signature.input_names,
                    output_names=[OUTPUT_NAME],
                    dynamic_axes=signature.dynamic_axes,
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed for {type(unet).__name__}: {type(exc).__name__}: {exc}") from exc
        import onnx

        model = onnx.load(str(raw), load_external_data=True)
        model.producer_name = "qdiff"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_onnx(model, out_path, external_data=external_data)
    return out_path
