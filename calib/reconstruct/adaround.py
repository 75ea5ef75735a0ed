"""AdaRound's soft rounding (Nagel et al. 2020, as Q-Diffusion uses it).

Each weight w with scale s rounds to floor(w / s) + h(V), h(V) = clip(sigmoid(V) * 1.2 - 0.1,
0, 1): a rounding variable V per weight that gradient descent can move, stretched past [0, 1]
so that it can reach exactly 0 or 1. V starts where h(V) equals the fractional part of w / s
(the soft weight equals the float weight), and the regulariser sum(1 - |2h - 1|^beta), with
beta annealed from large (flat: free to move) to small (steep: pushed to 0 or 1), makes every
h end at 0 or 1. The hard rounding at the end is floor(w / s) + 1[V >= 0].
"""

from __future__ import annotations

import torch

ZETA, GAMMA = 1.1, -0.1  # stretch of the sigmoid: h spans [-0.1, 1.1] before clipping


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_rounding_variable(w_over_s: torch.Tensor) -> torch.Tensor:
    """V with h(V) = frac(w / s), so soft rounding starts at the float weight."""
    frac = w_over_s - torch.floor(w_over_s)
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)


def hard_rounding(v: torch.Tensor) -> torch.Tensor:
    """1 where the weight rounds up: 1[V >= 0], i.e. h(V) >= 0.5."""
    return (v >= 0).to(v.dtype)


def rounding_regulariser(v: torch.Tensor, beta: float) -> torch.Tensor:
    h = rectified_sigmoid(v)
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(iteration: int, iterations: int, warmup: float, beta_start: float, beta_end: float) -> float | None:
    """Beta of the regulariser at `iteration`, or None during the warm-up (no regulariser).

    After the warm-up beta falls linearly from `beta_start` to `beta_end` over the remaining
    iterations (Q-Diffusion's LinearTempDecay).
    """
    start = int(warmup * iterations)
    if iteration < start:
        return None
    progress = (iteration - start) / max(1, iterations - start)
    return beta_end + (beta_start - beta_end) * max(0.0, 1.0 - progress)
