"""The selective fine-tuning section of a recipe (QuEST): every setting that changes its weights.

Serialised beside the recipe in the fine-tuning artifact's manifest, as the reconstruction
settings are (`calib.reconstruct.settings`). Defaults are QuEST's where it has one: Adam lr
1e-5 on the selected layers' weights, the time-embedding layers first, then the attention
layers (its `post_layer_recon*.py`: `pd_optimize_timeembed`, then `pd_optimize_timewise`).
QuEST counts epochs over its per-timestep calibration batches (200 for the time embedding, 20
for attention, batch 1 with gradient accumulation); qdiff counts iterations of `batch_size`
calibration samples drawn over all timesteps at once, which is the same data in another order
and lets one number bound the GPU time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from qdiff.core.errors import RecipeError, strict_fields

# Which quantized layers each stage trains: fnmatch patterns on module names, and exclusions.
# time-embedding: the timestep MLP and every resnet's projection of it (QuEST's "emb_layer").
# attention: q/k/v and the transformer feed-forward (QuEST: "qkv" for DDPM-style attention;
# for SD "to_q", "ff.net", and attn1's to_k/to_v: the cross-attention's k/v read the text
# conditioning, not the image, and stay as they are).
STAGE_LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "time-embedding": (("time_embedding.*", "*.time_emb_proj"), ()),
    "attention": (("*.to_q", "*.to_k", "*.to_v", "*.ff.net.*"), ("*attn2.to_k", "*attn2.to_v")),
}
STAGES = tuple(STAGE_LAYERS)


@dataclass(frozen=True)
class FinetuneSettings:
    """How to fine-tune a quantized model's selected layers on its calibration inputs.

    `iterations` is per stage: one number for every stage or one per entry of `stages`.
    `learn_activation_steps` also trains the input steps of the stage's layers (QuEST trains
    its activation deltas alongside); off by default, so the table's activation scales stay.
    """

    stages: tuple[str, ...] = STAGES
    iterations: int | tuple[int, ...] = 300
    batch_size: int = 32
    lr: float = 1e-5
    learn_activation_steps: bool = False
    activation_lr: float = 1e-5
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        unknown = [s for s in self.stages if s not in STAGE_LAYERS]
        if unknown or not self.stages or len(set(self.stages)) != len(self.stages):
            problems.append(f"stages={list(self.stages)} (distinct names from {', '.join(STAGES)})")
        iterations = self.stage_iterations() if not unknown else ()
        if isinstance(self.iterations, tuple) and len(self.iterations) != len(self.stages):
            problems.append(f"iterations={list(self.iterations)} (one number, or one per stage: {len(self.stages)})")
        elif any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in iterations):
            problems.append(f"iterations={self.iterations} (integers >= 1)")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} (must be >= 1)")
        if not (self.lr > 0 and self.activation_lr > 0):
            problems.append("lr and activation_lr must be > 0")
        if problems:
            raise RecipeError("fine-tuning settings are invalid: " + "; ".join(problems))

    def stage_iterations(self) -> tuple[int, ...]:
        if isinstance(self.iterations, tuple):
            return self.iterations
        return (self.iterations,) * len(self.stages)

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        obj["stages"] = list(self.stages)
        obj["iterations"] = list(self.stage_iterations())
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> FinetuneSettings:
        kwargs = strict_fields(cls, obj, error=RecipeError, what="fine-tuning", tuples=("stages",))
        if isinstance(kwargs.get("iterations"), list):
            kwargs["iterations"] = tuple(kwargs["iterations"])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise RecipeError(f"a fine-tuning setting has the wrong type: {exc}") from exc

    def with_overrides(self, **overrides: Any) -> FinetuneSettings:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return self.from_json({**self.to_json(), **overrides})
