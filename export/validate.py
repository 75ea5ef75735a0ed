"""Compare an ONNX graph under ONNX Runtime with a PyTorch model, polygraphy-style: statistics
per output (max/mean absolute error, relative L2, max relative error, NaN/Inf counts) rather
than a bare pass/fail, so a failure says how far off the export is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class ErrorStats:
    max_abs: float
    mean_abs: float
    rel_l2: float
    max_rel: float
    ref_max_abs: float
    nonfinite: int
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        obj = asdict(self)
        obj["shape"] = list(self.shape)
        return obj

    def __str__(self) -> str:
        return f"max|d|={self.max_abs:.3g} mean|d|={self.mean_abs:.3g} relL2={self.rel_l2:.3g} max rel={self.max_rel:.3g} (|ref|max={self.ref_max_abs:.3g}, non-finite={self.nonfinite}, shape={list(self.shape)})"


def error_stats(actual: torch.Tensor, reference: torch.Tensor) -> ErrorStats:
    actual = actual.detach().double().cpu()
    reference = reference.detach().double().cpu()
    diff = (actual - reference).abs()
    nonfinite = int((~torch.isfinite(actual)).sum())
    ref_abs = reference.abs()
    denom = ref_abs.clamp_min(1e-3 * float(ref_abs.max()) + 1e-12)
    return ErrorStats(
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        rel_l2=float(diff.norm() / reference.norm().clamp_min(1e-12)),
        max_rel=float((diff / denom).max()),
        ref_max_abs=float(ref_abs.max()),
        nonfinite=nonfinite,
        shape=tuple(actual.shape),
    )


@dataclass(frozen=True)
class Tolerance:
    """What an FP32 export must meet: relative L2 and max error scaled by the output's range."""

    rel_l2: float = 1e-4
    max_abs_fraction: float = 1e-3

    def violations(self, stats: ErrorStats) -> list[str]:
        problems = []
        if stats.nonfinite:
            problems.append(f"{stats.nonfinite} non-finite values")
        if stats.rel_l2 > self.rel_l2:
            problems.append(f"relative L2 error {stats.rel_l2:.3g} > {self.rel_l2:g}")
        if stats.max_abs > self.max_abs_fraction * max(1.0, stats.ref_max_abs):
            problems.append(f"max abs error {stats.max_abs:.3g} > {self.max_abs_fraction:g} x max(1, |ref|max)")
        return problems
