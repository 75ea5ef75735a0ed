"""The arithmetic of symmetric linear quantization, shared by the fake-quant reference model and
the Q/DQ graph pass so that both compute exactly the same scales.

ONNX QuantizeLinear rounds half to even and saturates to [-128, 127]; `torch.round` also rounds
half to even, so `fake_quantize` below is bit-for-bit what QuantizeLinear -> DequantizeLinear
does with zero point 0.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the ONNX-only quantize path needs no torch
    import torch

INT8_MIN, INT8_MAX = -128, 127
# A range this small or smaller cannot come from real data in float32; it is treated as
# "always zero" (see `scale_from_amax`).
MIN_AMAX = 1e-12


def scale_from_amax(amax: np.ndarray | float, qmax: int) -> np.ndarray:
    """Scale = amax / qmax, with the documented rule for degenerate ranges.

    A zero range (a channel that is always 0) would give scale 0, which QuantizeLinear divides
    by. Any positive scale reproduces zeros exactly, so such channels get scale 1 / qmax. The
    caller must have refused non-finite ranges before (see `calib.table`).
    """
    amax = np.asarray(amax, dtype=np.float64)
    if not np.all(np.isfinite(amax)):
        raise ValueError("non-finite amax reached scale_from_amax; sanitize the table first")
    safe = np.where(amax > MIN_AMAX, amax, 1.0)
    return (safe / qmax).astype(np.float32)


def scale_in_dtype(scale: np.ndarray | float, dtype: type = np.float32) -> np.ndarray:
    """A scale as an FP16 (or FP32) Q/DQ graph stores it: rounded to `dtype`, and never 0.

    FP16 graphs carry FP16 scales (ONNX opset >= 19); a range below ~8e-6 x qmax would round
    its scale to 0, which QuantizeLinear divides by, so such scales become FP16's smallest
    subnormal instead. The graph pass and the FP16 fake-quant reference both call this, so both
    quantize with the same stored scale.
    """
    stored = np.asarray(scale, dtype=np.float32).astype(dtype)
    if np.dtype(dtype) == np.float16:
        stored = np.maximum(stored, np.float16(np.finfo(np.float16).smallest_subnormal))
        if not np.all(np.isfinite(stored)):
            raise ValueError(f"a scale does not fit in FP16 (max {float(np.max(scale)):.3g})")
    return np.asarray(stored, dtype=dtype)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, axis: int | None = None, qmax: int = INT8_MAX
) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear (zero point 0) in float32.

    `scale` is a scalar for per-tensor quantization or a 1-D tensor along `axis`. `qmax` < 127
    gives narrower integer grids (7 for INT4 values), clamped to [-qmax - 1, qmax] as the
    Q/DQ pass clips such weights before they reach an INT8 QuantizeLinear.
    """
    import torch

    # In float32 whatever the tensor's type, as ONNX Runtime computes FP16 Q/DQ (x / scale and
    # q * scale in float32, the DequantizeLinear output rounded to FP16 once); for a float32 x
    # this is the same arithmetic as before.
    out_dtype = x.dtype
    x = x.float()
    scale = scale.to(dtype=torch.float32, device=x.device)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    q = torch.clamp(torch.round(x / scale), -qmax - 1, qmax)
    return (q * scale).to(out_dtype)


def is_finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0
