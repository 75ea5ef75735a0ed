"""Learned activation step sizes (LSQ, Esser et al. 2020; Q-Diffusion learns them likewise).

Per tensor, symmetric, zero point 0: TensorRT's rule for activations, so a learned step is an
ordinary Q/DQ scale. Rounding passes gradients straight through; the step gets LSQ's gradient
(q - x / s inside the range, the clip value outside). The step is kept positive after every
optimiser step (`clamp_positive`), since QuantizeLinear divides by it.
"""

from __future__ import annotations

import torch
from torch import nn

from qdiff.calib.quant_math import INT8_MAX, MIN_AMAX


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass (as QuantizeLinear), identity gradient."""
    return (torch.round(x) - x).detach() + x


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """Floor in the forward pass, identity gradient (QuEST's `floor_ste` for trained weights)."""
    return (torch.floor(x) - x).detach() + x


def fake_quantize_ste(x: torch.Tensor, step: torch.Tensor, qmax: int = INT8_MAX) -> torch.Tensor:
    """Per-tensor symmetric fake quantization with gradients for both `x` and `step`."""
    return torch.clamp(round_ste(x / step), -qmax - 1, qmax) * step


class LearnedStep(nn.Module):
    """One activation quantizer's step, trainable or fixed."""

    def __init__(self, step: float, qmax: int = INT8_MAX) -> None:
        super().__init__()
        self.step = nn.Parameter(torch.tensor(float(step), dtype=torch.float32), requires_grad=False)
        self.qmax = qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_ste(x, self.step, self.qmax)

    @torch.no_grad()
    def clamp_positive(self) -> None:
        self.step.clamp_(min=MIN_AMAX / self.qmax)

    @property
    def amax(self) -> float:
        """The range a calibration table records for this step (scale = amax / qmax)."""
        return float(self.step.detach().double().item() * self.qmax)
