"""Which layers of a denoiser a recipe quantizes, and why the others stay in float.

Only weighted layers are quantized (Conv2d, ConvTranspose2d, Linear), because those are the
layers TensorRT runs as INT8 kernels when their inputs and weights carry Q/DQ. Every layer left
in float is reported with its reason, so a user never has to guess what coverage they got.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qdiff.calib.recipe import Recipe

# The ONNX op a PyTorch layer type becomes; Linear exports as Gemm (2-D input) or MatMul.
MODULE_ONNX_OPS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv2d: ("Conv",),
    nn.ConvTranspose2d: ("ConvTranspose",),
    nn.Linear: ("Gemm", "MatMul"),
}


@dataclass(frozen=True)
class Target:
    name: str
    module: nn.Module
    op: str  # "Conv", "ConvTranspose" or "Linear"

    @property
    def weight_axis(self) -> int:
        """The output-channel axis of the PyTorch weight (ConvTranspose stores [in, out, ...])."""
        return 1 if self.op == "ConvTranspose" else 0


@dataclass(frozen=True)
class Skipped:
    name: str
    op: str
    reason: str


def layer_op(module: nn.Module) -> str | None:
    for cls, _ in MODULE_ONNX_OPS.items():
        if type(module) is cls or isinstance(module, cls):
            return "Linear" if cls is nn.Linear else cls.__name__.replace("2d", "")
    return None


def select_targets(model: nn.Module, recipe: Recipe) -> tuple[list[Target], list[Skipped]]:
    """Split the model's weighted layers into those the recipe quantizes and those it skips."""
    targets: list[Target] = []
    skipped: list[Skipped] = []
    for name, module in model.named_modules():
        op = layer_op(module)
        if op is None:
            continue
        onnx_ops = MODULE_ONNX_OPS[nn.Linear] if op == "Linear" else (op,)
        pattern = recipe.is_excluded(name)
        if pattern is not None:
            skipped.append(Skipped(name, op, f"recipe excludes it (pattern {pattern!r})"))
        elif not any(o in recipe.quantize_ops for o in onnx_ops):
            skipped.append(Skipped(name, op, f"recipe does not quantize {'/'.join(onnx_ops)} layers"))
        else:
            targets.append(Target(name, module, op))
    return targets, skipped
