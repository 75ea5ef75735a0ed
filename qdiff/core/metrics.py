"""Image and tensor metrics for comparing a quantized model with its FP32 original."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5), averaged
    over channels and valid window positions, for HWC uint8 images (`ssim_batch` of one)."""
    return float(ssim_batch(torch.from_numpy(np.ascontiguousarray(a))[None], torch.from_numpy(np.ascontiguousarray(b))[None], data_range)[0])


def relative_l2(actual: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    return float((actual.double() - reference).norm() / reference.norm().clamp_min(1e-12))


def cosine(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float(F.cosine_similarity(actual.double().flatten(), reference.double().flatten(), dim=0))


# Batched forms for the evaluation harness: the same formulas on [N, H, W, C] uint8 tensors, on
# whatever device holds them, so a thousand images cost one call instead of a Python loop.


def psnr_batch(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """PSNR in dB per image ([N], float64; inf where identical) of two [N, H, W, C] uint8 tensors."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse 0 -> inf, as `psnr`


def ssim_batch(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """`ssim` per image ([N], float64) of two [N, H, W, C] uint8 tensors."""
    n, h, w, c = a.shape
    x = a.double().permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    y = b.double().permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    window = _gaussian_window(size=min(11, h, w)).to(x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    sxx = F.conv2d(x * x, window) - mu_x**2
    syy = F.conv2d(y * y, window) - mu_y**2
    sxy = F.conv2d(x * y, window) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return value.reshape(n, -1).mean(1)
