"""A quantized layer whose rounding and activation steps can be learned.

It computes what the fake-quant reference (`calib.fake_quant`) computes, per-tensor input
quantization and per-output-channel weights on the recipe's grid, but its weights can be
rounded five ways: float (off), nearest (the reference's round-to-nearest), soft (AdaRound's
h(V), while training), fixed (integers decided by reconstruction) and trained (QuEST's selective
fine-tuning: the float weight trained through floor with the fixed rounding offset kept, see
`start_weight_training`). A split-shortcut layer
has two parts, one per concat branch, each with its own input step, weight scale and rounding
variables: both halves are reconstructed, the rounding term covers both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qdiff.calib.reconstruct.adaround import hard_rounding, init_rounding_variable, rectified_sigmoid
from qdiff.calib.quant_math import INT8_MAX
from qdiff.calib.reconstruct.lsq import LearnedStep, floor_ste

WEIGHT_MODES = ("float", "nearest", "soft", "fixed", "trained")


@dataclass(frozen=True)
class PartSpec:
    """One input-channel slice of a layer's weight with its scales (the whole weight if unsplit)."""

    role: str  # "" for an unsplit layer, "a" / "b" for the branches of a split one
    start: int
    stop: int | None
    input_step: float
    weight_scale: torch.Tensor  # per output channel


class QuantPart(nn.Module):
    def __init__(self, weight: torch.Tensor, spec: PartSpec, weight_axis: int, weight_qmax: int, input_qmax: int = INT8_MAX) -> None:
        super().__init__()
        shape = [1] * weight.ndim
        shape[weight_axis] = -1
        self.role = spec.role
        self.qmax = weight_qmax
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("scale", spec.weight_scale.detach().float().reshape(shape).clone())
        # `fixed` holds grid integers (<= 8 bits), so int8: a reconstruction keeps one per weight
        # of every quantized layer for the whole run. AdaRound's floor and V exist only while
        # this part's unit is being reconstructed (`begin_rounding` .. `fix_rounding`): kept for
        # every layer they were ~4x the model's weights in FP32 (SD 1.5: ~14 GB of host memory).
        self.register_buffer("fixed", torch.clamp(torch.round(self.weight / self.scale), -weight_qmax - 1, weight_qmax).to(torch.int8))
        self.floor: torch.Tensor | None = None
        self.v: nn.Parameter | None = None
        self.input = LearnedStep(spec.input_step, input_qmax)

    @torch.no_grad()
    def begin_rounding(self) -> nn.Parameter:
        """Allocate AdaRound's floor(w / s) and V (h(V) = frac(w / s)) for this part's unit."""
        w_over_s = self.weight / self.scale
        self.floor = torch.floor(w_over_s)
        self.v = nn.Parameter(init_rounding_variable(w_over_s), requires_grad=False)
        return self.v

    def _clamp(self, q: torch.Tensor) -> torch.Tensor:
        return torch.clamp(q, -self.qmax - 1, self.qmax)

    def integer_weight(self, mode: str) -> torch.Tensor:
        if mode == "soft":
            if self.v is None:
                raise RuntimeError("soft rounding before begin_rounding()")
            return self._clamp(self.floor + rectified_sigmoid(self.v))
        if mode == "nearest":
            return self._clamp(torch.round(self.weight / self.scale))
        if mode == "trained":
            return self._clamp(floor_ste(self.weight / self.scale) + self.offset)
        return self.fixed.to(self.scale.dtype)

    def quantized_weight(self, mode: str) -> torch.Tensor:
        return self.weight if mode == "float" else self.integer_weight(mode) * self.scale

    @torch.no_grad()
    def start_weight_training(self) -> None:
        """Make the float weight trainable with today's integers as the starting point.

        QuEST's quantizer after AdaRound computes floor_ste(w / s) + 1[alpha >= 0]: the rounding
        decision stays, the float weight gets a straight-through gradient, and an integer moves
        only when w / s crosses a grid line. Here the decision is the offset fixed - floor(w / s)
        (0 or 1 after AdaRound or round-to-nearest), so "trained" mode starts at exactly the
        integers in `fixed`, whatever made them."""
        self.register_buffer("offset", self.fixed.to(self.weight.dtype) - torch.floor(self.weight / self.scale))
        self.weight.requires_grad_(True)

    @torch.no_grad()
    def fix_trained_weight(self) -> None:
        """Re-round: the integers the trained float weight gives, back in `fixed`."""
        self.fixed.copy_(self.integer_weight("trained"))
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def fix_rounding(self) -> None:
        """Hard rounding floor(w / s) + 1[V >= 0], clipped to the grid; frees floor and V."""
        if self.v is None:
            raise RuntimeError("fix_rounding before begin_rounding()")
        self.fixed.copy_(self._clamp(self.floor + hard_rounding(self.v)))
        self.floor = self.v = None


class ReconLayer(nn.Module):
    """Conv2d / ConvTranspose2d / Linear with quantized input(s) and weight(s)."""

    def __init__(self, layer: nn.Module, parts: list[PartSpec], weight_axis: int, weight_qmax: int, input_qmax: int = INT8_MAX) -> None:
        super().__init__()
        self.layer = layer
        for p in layer.parameters():
            p.requires_grad_(False)
        self.weight_axis = weight_axis
        self.parts = nn.ModuleList(QuantPart(layer.weight[:, p.start : p.stop] if p.role else layer.weight, p, weight_axis, weight_qmax, input_qmax) for p in parts)
        self.weight_mode = "nearest"
        self.act_quant = True
        if len(parts) > 1 and not (isinstance(layer, nn.Conv2d) and layer.groups == 1):
            raise TypeError(f"only an ungrouped Conv2d can be split, got {type(layer).__name__}")

    def begin_rounding(self) -> list[nn.Parameter]:
        """AdaRound's variables for this layer's parts, allocated now and freed by fix_rounding."""
        return [p.begin_rounding() for p in self.parts]

    def steps(self) -> list[LearnedStep]:
        return [p.input for p in self.parts]

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        if isinstance(layer, nn.ConvTranspose2d):
            output_padding = layer._output_padding(x, kwargs.get("output_size"), layer.stride, layer.padding, layer.kernel_size, 2, layer.dilation)
            return F.conv_transpose2d(x, weight, bias, layer.stride, layer.padding, output_padding, layer.groups, layer.dilation)
        return layer._conv_forward(x, weight, bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = None
        for i, part in enumerate(self.parts):
            xi = x[:, part_slice(self.parts, i, x.shape[1])] if len(self.parts) > 1 else x
            if self.act_quant:
                xi = part.input(xi)
            y = self._op(xi, part.quantized_weight(self.weight_mode), self.layer.bias if i == 0 else None, kwargs)
            out = y if out is None else out + y
        return out


def part_slice(parts: nn.ModuleList, index: int, channels: int) -> slice:
    """Input channels of part `index` (parts split the input channels in order)."""
    start = sum(p.weight.shape[1] for p in list(parts)[:index])
    return slice(start, start + parts[index].weight.shape[1])
