"""The calibration trajectories: which denoiser calls calibration looks at, and a recorder of them.

Q-Diffusion calibrates on the inputs a denoiser sees along its own sampling trajectories, at
timesteps spread uniformly over them. qdiff's calibration (`collect_ranges`) observes those
calls through hooks; a peer quantizer (`qdiff.peers`) needs the same calls as plain input
tensors. Both drive the sampler through `calibration_trajectories` here, so they see the same
seeds per batch of trajectories, the same conditioning slices, the same classifier-free-guidance
batches and the same kept steps: a comparison of the two then measures the quantizers, not a
difference in calibration data.

Calibration decides *which* trajectories (the recipe's seeds, batches and kept steps); the caller
decides *how* one is sampled. It passes a `TrajectorySampler`: the sampling loop as a callable
(ModelOpt's `quantize(model, config, forward_loop)` in spirit), with the denoiser that drives it
and the shapes it needs. The API wires qdiff's own sampler in
(`qdiff.runtime.calibration_loop`), so calib imports nothing from runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from qdiff.calib.recipe import Recipe
from qdiff.core.conditioning import Conditioning
from qdiff.core.errors import CalibrationError

# Called before each denoiser call of a calibration trajectory: (step index, timestep, kept?).
StepHook = Callable[[int, float, bool], None]


class TrajectoryRunner(Protocol):
    """One denoising trajectory from `noise` with a bound scheduler: the sampling loop.

    `before_step(i, t)` runs before the denoiser call of step `i`; the loop stops after step
    `stop_after_step`. `qdiff.runtime.sampler.denoise` with its scheduler bound is one.
    """

    def __call__(
        self,
        denoiser: Callable[..., torch.Tensor],
        noise: torch.Tensor,
        num_inference_steps: int,
        *,
        conditioning: Conditioning | None,
        guidance_scale: float,
        seed: int,
        before_step: Callable[[int, float], None],
        stop_after_step: int,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class TrajectorySampler:
    """What calibration needs from the caller to run its trajectories: its forward loop.

    `run_trajectory` samples one batch of trajectories (see `TrajectoryRunner`), driven by
    `denoiser` (which must call the model being calibrated, whose hooks record). The scheduler
    names are only recorded in the table's provenance.
    """

    run_trajectory: TrajectoryRunner
    denoiser: Callable[..., torch.Tensor]
    sample_shape: tuple[int, int, int]
    conditioning: Conditioning | None
    scheduler_name: str
    scheduler_class: str

    def driven_by(self, denoiser: Callable[..., torch.Tensor]) -> TrajectorySampler:
        """The same loop driven by another denoiser (a recorder wrapping this one)."""
        return replace(self, denoiser=denoiser)


def calibration_step_indices(total_steps: int, num_timesteps: int, window: tuple[float, float] = (0.0, 1.0)) -> list[int]:
    """Step indices spread uniformly over `window` of a `total_steps` trajectory (0 = noisiest)."""
    lo, hi = window[0] * (total_steps - 1), window[1] * (total_steps - 1)
    indices = np.unique(np.round(np.linspace(lo, hi, num_timesteps)).astype(int))
    if len(indices) < num_timesteps:
        raise CalibrationError(
            f"the window {window} of a {total_steps}-step trajectory holds only {len(indices)} distinct steps, fewer than num_timesteps={num_timesteps}",
            hint="raise calibration_steps or lower num_timesteps",
        )
    return indices.tolist()


@dataclass(frozen=True)
class TrajectoryBatch:
    """Trajectories `start` .. `start + size - 1`, sampled together from one seeded noise draw."""

    start: int
    size: int


def trajectory_batches(recipe: Recipe) -> list[TrajectoryBatch]:
    total = recipe.samples_per_timestep
    return [TrajectoryBatch(start, min(recipe.batch_size, total - start)) for start in range(0, total, recipe.batch_size)]


def calibration_trajectories(
    sampler: TrajectorySampler,
    recipe: Recipe,
    *,
    on_step: StepHook,
    progress: Callable | None = None,
) -> Iterator[TrajectoryBatch]:
    """Run the recipe's calibration trajectories batch by batch, yielding each batch once run.

    `on_step(i, t, kept)` runs before every denoiser call; `kept` says whether step `i` is one
    of the recipe's calibration steps. Each trajectory stops after the last kept step. Being a
    generator lets a consumer take what it recorded batch by batch (bounded memory) while the
    loop itself stays in one place.
    """
    steps = calibration_step_indices(recipe.calibration_steps, recipe.num_timesteps, recipe.timestep_window)
    keep = set(steps)
    last = max(steps)
    batches = trajectory_batches(recipe)
    conditioning = sampler.conditioning
    bar = progress(total=len(batches) * (last + 1), desc="calibrate", unit="step") if progress else None

    def before_step(i: int, t: float) -> None:
        on_step(i, t, i in keep)
        if bar:
            bar.update(1)

    try:
        for batch in batches:
            gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + batch.start)
            noise = torch.randn((batch.size, *sampler.sample_shape), generator=gen)
            sampler.run_trajectory(
                sampler.denoiser,
                noise,
                recipe.calibration_steps,
                conditioning=conditioning.select(batch.start, batch.start + batch.size) if conditioning else None,
                guidance_scale=recipe.guidance_scale if conditioning else 1.0,
                seed=recipe.seed + batch.start,
                before_step=before_step,
                stop_after_step=last,
            )
            yield batch
    finally:
        if bar:
            bar.close()


@dataclass
class CalibrationInput:
    """One denoiser call at a calibration step, with the inputs as the denoiser received them."""

    trajectory_start: int  # first trajectory of the batch this call belongs to
    step: int  # step index in the calibration trajectory (0 = noisiest)
    timestep: float
    sample: torch.Tensor  # [uncond; cond] rows when guidance batches them
    timestep_input: torch.Tensor  # as passed to the denoiser (usually a 0-d scheduler timestep)
    conditioning: dict[str, torch.Tensor]  # encoder_hidden_states, text_embeds, time_ids

    def graph_feeds(self) -> dict[str, np.ndarray]:
        """Float32 arrays named like the exported graph's inputs, the timestep broadcast to the
        batch as the backends do, so a graph fed these computes what the denoiser computed."""
        batch = self.sample.shape[0]
        t = torch.as_tensor(self.timestep_input, dtype=torch.float32).reshape(-1)
        t = t.expand(batch) if t.numel() == 1 else t
        feeds = {"sample": self.sample, "timestep": t, **self.conditioning}
        return {name: np.ascontiguousarray(value.detach().cpu().float().numpy()) for name, value in feeds.items()}


class InputRecorder:
    """A denoiser that passes every call through and keeps the inputs of the calls at kept steps.

    Use its `on_step` as the `on_step` of `calibration_trajectories` and `drain` after each batch.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor]) -> None:
        self.denoiser = denoiser
        self._step: tuple[int, float, bool] = (-1, 0.0, False)
        self._pending: list[CalibrationInput] = []

    def on_step(self, i: int, t: float, kept: bool) -> None:
        self._step = (i, t, kept)

    def __call__(self, sample: torch.Tensor, timestep: Any, **kwargs: torch.Tensor) -> torch.Tensor:
        i, t, kept = self._step
        if kept:
            conditioning = {k: v.detach().clone() for k, v in kwargs.items() if v is not None}
            self._pending.append(CalibrationInput(-1, i, t, sample.detach().clone(), torch.as_tensor(timestep).detach().clone(), conditioning))
        return self.denoiser(sample, timestep, **kwargs)

    def drain(self, batch: TrajectoryBatch) -> list[CalibrationInput]:
        records, self._pending = self._pending, []
        for record in records:
            record.trajectory_start = batch.start
        return records


def iter_calibration_inputs(sampler: TrajectorySampler, recipe: Recipe, *, progress: Callable | None = None) -> Iterator[CalibrationInput]:
    """The denoiser calls qdiff's calibration observes, in the order it makes them.

    Lazy per batch of trajectories: at most one batch's kept calls are held in memory, which is
    what keeps this usable for latent models with long text conditioning.
    """
    recorder = InputRecorder(sampler.denoiser)
    for batch in calibration_trajectories(sampler.driven_by(recorder), recipe, on_step=recorder.on_step, progress=progress):
        yield from recorder.drain(batch)


def count_calibration_calls(recipe: Recipe) -> int:
    """How many kept denoiser calls `iter_calibration_inputs` yields (one per batch and step)."""
    steps = calibration_step_indices(recipe.calibration_steps, recipe.num_timesteps, recipe.timestep_window)
    return len(trajectory_batches(recipe)) * len(steps)

