"""Named Q/DQ placements: which of a calibrated graph's layers get INT8.

A calibration table holds ranges for every layer its recipe quantizes; a placement narrows that
set when the graph is quantized, because what is fast in TensorRT is not always "everything
INT8", and what a placement costs in quality is measured separately (tools/placement_quality.py).
The presets:

- ``all``: every Conv/ConvTranspose/Gemm/MatMul with a weight (the recipe's own set);
- ``conv``: convolutions only (ResNet convs, samplers, the shortcut convs with their split
  halves, 1x1 proj_in/proj_out); transformer blocks stay float;
- ``conv-ff``: convolutions plus the Linears outside attention (feed-forward, 19% of SD 1.5's
  MACs; timestep MLPs); attention projections (to_q/k/v/out) float.

What they measured on the SD 1.5 UNet with TensorRT 8.6 on an H200 (docs/int8-engines.md):
14.16 / 15.55 / 14.04 ms per batch-2 call, all slower than FP16 (9.29 ms), because 8.6 runs the
transformer blocks of any explicitly quantized network 2.6x slower, Q/DQ inside them or not.
Quality on the shipped models is the same within noise for the three.

A placement is not a new recipe: it resolves to the recipe fields ``quantize_ops`` and
``exclude``, which the quantized graph's manifest records, so the graph is reproducible from
the table and the placement name alone (onnx-graphsurgeon's habit: passes are data, not code).
"""

from __future__ import annotations

from dataclasses import dataclass

from qdiff.calib.recipe import Recipe
from qdiff.core.errors import RecipeError

CONV_OPS = ("Conv", "ConvTranspose")
LINEAR_OPS = ("Gemm", "MatMul")
# The projections of diffusers' `Attention` modules, wherever they sit: UNet2DModel's
# `attentions.N.to_q`, a transformer block's `attn1.to_q` (self) and `attn2.to_k` (cross).
ATTENTION_PATTERNS = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.*", "*.add_q_proj", "*.add_k_proj", "*.add_v_proj")


@dataclass(frozen=True)
class Placement:
    name: str
    quantize_ops: tuple[str, ...] | None  # None: the recipe's own
    extra_exclude: tuple[str, ...]  # added to the recipe's exclusions (conv_in/conv_out stay float)
    summary: str

    def apply(self, recipe: Recipe) -> Recipe:
        """The recipe narrowed to this placement, named `<recipe>-<placement>` (`all`: unchanged)."""
        if self.name == "all":
            return recipe
        ops = self.quantize_ops if self.quantize_ops is not None else recipe.quantize_ops
        missing = sorted(set(ops) - set(recipe.quantize_ops))
        if missing:
            raise RecipeError(
                f"placement {self.name!r} quantizes {', '.join(missing)}, which recipe {recipe.name!r} did not calibrate",
                hint="recalibrate with those ops in the recipe's quantize_ops, or pick a placement within them",
            )
        exclude = tuple(dict.fromkeys(recipe.exclude + self.extra_exclude))
        return recipe.with_overrides(name=f"{recipe.name}-{self.name}", quantize_ops=tuple(op for op in recipe.quantize_ops if op in ops), exclude=exclude)


PLACEMENTS: dict[str, Placement] = {
    p.name: p
    for p in (
        Placement("all", None, (), "every Conv/ConvTranspose/Gemm/MatMul with a weight (the recipe's own set)"),
        Placement("conv", CONV_OPS, (), "convolutions only; transformer blocks float"),
        Placement("conv-ff", CONV_OPS + LINEAR_OPS, ATTENTION_PATTERNS, "convolutions and feed-forward Linears; attention projections float"),
    )
}


def get_placement(name: str) -> Placement:
    try:
        return PLACEMENTS[name]
    except KeyError:
        raise RecipeError(f"unknown placement {name!r}", hint=f"choose one of {', '.join(PLACEMENTS)}") from None
