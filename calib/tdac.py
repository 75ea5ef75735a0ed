"""EDA-DM's Temporal Distribution Alignment Calibration (TDAC): how many calibration samples
each timestep gets.

Q-Diffusion spends its calibration budget evenly over evenly spaced timesteps. EDA-DM (Liu et
al. 2024, reference code `scripts/calibration.py`) argues that timesteps differ in how
representative their activations are, and spreads the budget by two scores of the mid-block
attention input F_t, recorded on one batch of trajectories at every step:

- density D_t: how many other steps t' have MSE(F_t, F_t') <= r (a step in a crowded part of
  the trajectory stands for many others);
- diversity V_t: sum over the other steps t', the batch and the spatial positions of
  1 - cos(F_t[b, :, p], F_t'[b, :, p]), the cosine taken over the channel axis.

  This is what the reference code computes, read literally: its `nn.CosineSimilarity(dim=1)`
  compares two [B, C, H, W] feature maps of *different timesteps* along dim 1 (channels), one
  cosine per sample and position, and sums `1 - cos` over those and over t' != t. It is neither
  a cosine to the batch mean nor per channel: a step whose features point elsewhere than every
  other step's gets a high V_t. Because the channel vectors are normalised first, the sum over
  all pairs is one Gram matrix: sum_{b,p} cos = <U_t, U_t'> with U the channel-normalised maps.

- weight w_t = minmax(D)_t + lambda * minmax(V)_t; step t gets a share of the budget
  proportional to w_t (largest remainder, total exact).

Deviations from the reference, each because the reference breaks or cannot transfer:

- r: an absolute MSE (3.0 on CIFAR, 0.3 on LSUN) means nothing for another model's feature
  scale. `tdac_r="auto"` takes the median of the off-diagonal pairwise MSEs: scale-free, and it
  puts the radius where a step's neighbour count can vary most (about half the other steps on
  average), so D carries information instead of being all 0 or all S-1 (which is what a foreign
  absolute r gives). A float r is used as given; the quantile it sits at is recorded either way.
- all-equal D (or V): the reference divides by max - min = 0 (NaN weights). A constant score
  says nothing about which step to prefer, so it contributes zeros; if both do, or w sums to 0,
  the weights are uniform.
- a cap: no step gets more samples than the recipe's `samples_per_timestep` trajectories, so
  calibration runs the same trajectory pool as uniform calibration (same seeds, conditioning,
  at most the same cost) and never observes a (trajectory, step) pair twice. The reference
  re-uses its one batch and can duplicate pairs. The capped shares are water-filled: quota above
  the cap goes to the other steps in proportion to their weights. The budget (num_timesteps x
  samples_per_timestep) is the uniform recipe's, so the two spend the same calibration data.
- steps: every step of the recipe's `timestep_window` of the `calibration_steps` loop (the
  reference: every step of its sampling loop).

The math here is pure tensor functions (unit-tested on hand-computable cases); `tdac_plan` runs
the probe batch through the caller's `TrajectorySampler` and returns the `TimestepPlan`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qdiff.calib.recipe import Recipe
from qdiff.calib.trajectories import TimestepPlan, TrajectorySampler, calibration_trajectories
from qdiff.core.errors import CalibrationError

__all__ = [
    "TdacResult",
    "allocate_counts",
    "auto_radius",
    "density",
    "diversity",
    "mid_block_attention",
    "minmax_normalise",
    "pairwise_mse",
    "tdac_plan",
    "tdac_weights",
    "window_steps",
]

COSINE_EPS = 1e-6  # as the reference's nn.CosineSimilarity(dim=1, eps=1e-6), applied per vector


# ----------------------------------------------------------------------------- the math


def pairwise_mse(features: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """[S, S] mean squared difference between the feature maps of every pair of steps.

    `features` is [S, ...] (one map per step, the batch included). Computed pair by pair in
    chunks of rows, not by the |a|^2 + |b|^2 - 2ab expansion, which cancels badly when maps are
    close, which is exactly when the density radius matters.
    """
    flat = features.reshape(features.shape[0], -1).double()
    out = torch.empty(flat.shape[0], flat.shape[0], dtype=torch.float64)
    for i in range(flat.shape[0]):
        for j in range(0, flat.shape[0], chunk):
            out[i, j : j + chunk] = (flat[j : j + chunk] - flat[i]).pow(2).mean(dim=1)
    return out


def density(mse: torch.Tensor, r: float) -> torch.Tensor:
    """D_t = number of steps t' != t with MSE(F_t, F_t') <= r (int64 [S])."""
    close = mse <= r
    close.fill_diagonal_(False)
    return close.sum(dim=1)


def diversity(features: torch.Tensor) -> torch.Tensor:
    """V_t = sum over t' != t, samples and positions of 1 - cos over channels (float64 [S]).

    `features` is [S, B, C, *spatial] (NCHW maps per step; a [S, B, C] vector per sample works
    too). Each channel vector is normalised, so sum_{b,p} cos(F_t, F_t') = <U_t, U_t'>.
    """
    if features.ndim < 3:
        raise CalibrationError(f"TDAC diversity needs [steps, batch, channels, ...] features, got shape {tuple(features.shape)}")
    x = features.double()
    units = x / x.norm(dim=2, keepdim=True).clamp_min(COSINE_EPS)
    flat = units.reshape(x.shape[0], -1)
    vectors = flat.shape[1] // x.shape[2]  # samples x positions
    cosine_sums = flat @ flat.T
    gaps = vectors - cosine_sums
    gaps.fill_diagonal_(0.0)
    return gaps.sum(dim=1)


def minmax_normalise(values: torch.Tensor) -> torch.Tensor:
    """(v - min) / (max - min); all zeros when every value is equal (a constant score carries
    no preference, and the reference's division by zero would give NaN weights)."""
    v = values.double()
    span = v.max() - v.min()
    if not span > 0:
        return torch.zeros_like(v)
    return (v - v.min()) / span


def tdac_weights(density_counts: torch.Tensor, diversity_sums: torch.Tensor, lam: float) -> torch.Tensor:
    """w_t = minmax(D)_t + lam * minmax(V)_t; uniform when that is all zero."""
    w = minmax_normalise(density_counts) + lam * minmax_normalise(diversity_sums)
    if not w.sum() > 0:
        return torch.ones_like(w)
    return w


def allocate_counts(weights: torch.Tensor | np.ndarray, budget: int, cap: int | None = None) -> list[int]:
    """Integer counts proportional to `weights` that sum to exactly `budget`, none above `cap`.

    Quotas above the cap are fixed at it and their excess is shared by the rest in proportion
    to their weights (repeated until nothing exceeds it); then largest remainder: every step
    gets the floor of its quota, and the leftover units go to the largest fractional parts
    (ties to the earlier step) among steps still below the cap.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or not np.isfinite(w).all() or not w.sum() > 0:
        raise CalibrationError(f"TDAC weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    if budget < 0:
        raise CalibrationError(f"the calibration budget must be >= 0, got {budget}")
    cap = budget if cap is None else cap
    if cap * len(w) < budget:
        raise CalibrationError(f"a budget of {budget} samples does not fit in {len(w)} steps of at most {cap} each", hint="lower num_timesteps x samples_per_timestep or widen the window")
    quota = np.zeros_like(w)
    fixed = np.zeros(len(w), dtype=bool)
    while True:
        free = ~fixed & (w > 0)
        left = budget - cap * fixed.sum()
        if not free.any():
            break
        quota[free] = left * w[free] / w[free].sum()
        over = free & (quota > cap)
        if not over.any():
            break
        fixed |= over
        quota[fixed] = cap
    if not (~fixed & (w > 0)).any() and cap * fixed.sum() < budget:  # only possible with zero weights left
        quota[~fixed] = (budget - cap * fixed.sum()) / (~fixed).sum()
    counts = np.minimum(np.floor(quota + 1e-9).astype(np.int64), cap)
    remainder = quota - counts
    short = budget - int(counts.sum())
    order = sorted((i for i in range(len(w)) if counts[i] < cap), key=lambda i: (-remainder[i], i))
    for i in order[:short]:
        counts[i] += 1
    assert counts.sum() == budget and counts.max(initial=0) <= cap
    return counts.tolist()


def auto_radius(mse: torch.Tensor) -> float:
    """The median of the off-diagonal pairwise MSEs (why the median: see the module docstring)."""
    s = mse.shape[0]
    off = mse[~torch.eye(s, dtype=torch.bool)]
    if off.numel() == 0:
        raise CalibrationError("TDAC needs at least two steps to compare")
    return float(off.median())


def window_steps(total_steps: int, window: tuple[float, float]) -> list[int]:
    """Every step index of `window` of a `total_steps` loop (the candidates TDAC weighs), with
    the rounding `calibration_step_indices` uses for the window's ends."""
    lo, hi = (int(np.round(f * (total_steps - 1))) for f in window)
    return list(range(lo, hi + 1))


# ----------------------------------------------------------------------------- on a model


def mid_block_attention(unet: nn.Module) -> tuple[str, nn.Module]:
    """The module whose input TDAC records: the mid block's first attention (UNet2DModel's
    `Attention`, UNet2DConditionModel's `Transformer2DModel`; both take NCHW maps)."""
    mid = getattr(unet, "mid_block", None)
    attentions = getattr(mid, "attentions", None)
    if mid is None or not attentions or attentions[0] is None:
        raise CalibrationError(
            f"TDAC records the mid block's attention input, and this {type(unet).__name__} has no mid-block attention"
            + (f" (its mid block is a {type(mid).__name__})" if mid is not None else " (no mid_block)"),
            hint="use timestep_sampling='uniform' for this model",
        )
    return "mid_block.attentions.0", attentions[0]


@dataclass
class TdacResult:
    """Everything TDAC decided and why, for the table's provenance and the report's plot."""

    step_indices: list[int]
    timesteps: list[float]
    density: list[int]
    diversity: list[float]
    weights: list[float]
    counts: list[int]
    r: float
    r_rule: str  # "auto (median pairwise MSE)" or "given"
    r_quantile: float  # share of off-diagonal pairwise MSEs <= r
    mse_quantiles: dict[str, float]  # min, q25, median, q75, max of the pairwise MSEs
    lam: float
    budget: int
    cap: int
    probe_trajectories: int
    hook: str
    feature_shape: list[int]

    def plan(self) -> TimestepPlan:
        return TimestepPlan({s: c for s, c in zip(self.step_indices, self.counts) if c > 0})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tdac_from_features(features: torch.Tensor, recipe: Recipe, step_indices: list[int], timesteps: list[float], **meta: Any) -> TdacResult:
    """TDAC's decision from the recorded features [S, B, C, ...] of the steps `step_indices`."""
    mse = pairwise_mse(features)
    r_rule = "auto (median pairwise MSE)" if recipe.tdac_r == "auto" else "given"
    r = auto_radius(mse) if recipe.tdac_r == "auto" else float(recipe.tdac_r)
    off = mse[~torch.eye(mse.shape[0], dtype=torch.bool)]
    d = density(mse, r)
    v = diversity(features)
    w = tdac_weights(d, v, recipe.tdac_lambda)
    budget = recipe.num_timesteps * recipe.samples_per_timestep
    counts = allocate_counts(w.numpy(), budget, cap=recipe.samples_per_timestep)
    quantiles = {name: float(off.quantile(q)) for name, q in (("min", 0.0), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("max", 1.0))}
    return TdacResult(
        step_indices=list(step_indices), timesteps=[float(t) for t in timesteps], density=d.tolist(), diversity=v.tolist(), weights=w.tolist(),
        counts=counts, r=r, r_rule=r_rule, r_quantile=float((off <= r).double().mean()), mse_quantiles=quantiles, lam=float(recipe.tdac_lambda),
        budget=budget, cap=recipe.samples_per_timestep, feature_shape=list(features.shape[1:]), **meta,
    )


def tdac_plan(unet: nn.Module, sampler: TrajectorySampler, recipe: Recipe, *, progress: Any = None) -> TdacResult:
    """Run one probe batch of calibration trajectories (the first batch of the pool: the same
    seeds and conditioning calibration then uses) over every step of the window, record the
    mid-block attention input at each, and decide the samples per step. `sampler`'s denoiser
    must call `unet`."""
    name, module = mid_block_attention(unet)
    steps = window_steps(recipe.calibration_steps, recipe.timestep_window)
    probe = min(recipe.batch_size, recipe.samples_per_timestep)
    features: dict[int, torch.Tensor] = {}
    timesteps: dict[int, float] = {}
    state = {"step": None}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if state["step"] is not None and isinstance(x, torch.Tensor):
            features[state["step"]] = x.detach().float().cpu()

    def on_step(i: int, t: float, kept: bool) -> None:
        state["step"] = i if kept else None
        if kept:
            timesteps[i] = t

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for _ in calibration_trajectories(sampler, recipe, on_step=on_step, progress=progress, plan=TimestepPlan({s: probe for s in steps})):
            pass
    finally:
        handle.remove()
    missing = [s for s in steps if s not in features]
    if missing:
        raise CalibrationError(f"TDAC: {name} ({type(module).__name__}) of {type(unet).__name__} did not run at steps {missing[:5]}", hint="the sampler's denoiser must call this UNet")
    stacked = torch.stack([features[s] for s in steps])
    return tdac_from_features(stacked, recipe, steps, [timesteps[s] for s in steps], probe_trajectories=probe, hook=f"{name} ({type(module).__name__}) input")
