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
    names are only recorded in the table's provenance. `device` is where the trajectory runs:
    each batch's noise is drawn on the CPU (the same start on every device) and handed to the
    loop there, so `qdiff.runtime.sampler.denoise` keeps the latents and the conditioning on it;
    a GPU model then never round-trips through host memory between steps.
    """

    run_trajectory: TrajectoryRunner
    denoiser: Callable[..., torch.Tensor]
    sample_shape: tuple[int, int, int]
    conditioning: Conditioning | None
    scheduler_name: str
    scheduler_class: str
    device: torch.device | str = "cpu"

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


@dataclass(frozen=True)
class TimestepPlan:
    """How many calibration trajectories are observed at each step of the calibration loop.

    Step `i` observes the first `counts[i]` trajectories of the pool (trajectories 0 ..
    `trajectories - 1`, sampled in batches of the recipe's `batch_size` from the recipe's seeds);
    steps without a count are only run. Uniform sampling (Q-Diffusion) observes all
    `samples_per_timestep` trajectories at `num_timesteps` evenly spaced steps; TDAC (`calib.tdac`)
    spreads the same budget unevenly over every step of the window. Taking the *first* n
    trajectories (not a random subset) keeps the pool, its seeds and its conditioning those of
    uniform calibration, and lets every consumer (range observers, the recorded calls of
    reconstruction and the peers) see the same rows.
    """

    counts: dict[int, int]

    def __post_init__(self) -> None:
        if not any(c > 0 for c in self.counts.values()) or any(c < 0 for c in self.counts.values()):
            raise CalibrationError(f"a timestep plan needs non-negative counts and at least one > 0, got {self.counts}")

    @classmethod
    def uniform(cls, recipe: Recipe) -> TimestepPlan:
        steps = calibration_step_indices(recipe.calibration_steps, recipe.num_timesteps, recipe.timestep_window)
        return cls({step: recipe.samples_per_timestep for step in steps})

    @property
    def steps(self) -> list[int]:
        """The observed steps, in trajectory order."""
        return sorted(step for step, count in self.counts.items() if count > 0)

    @property
    def trajectories(self) -> int:
        """The size of the trajectory pool: the most trajectories any step observes."""
        return max(self.counts.values())

    @property
    def total(self) -> int:
        """Observed (trajectory, step) pairs: the calibration budget spent."""
        return sum(self.counts.values())

    def rows(self, step: int, batch: TrajectoryBatch) -> int:
        """How many leading trajectories of `batch` step `step` observes (0 .. batch.size)."""
        return min(max(self.counts.get(step, 0) - batch.start, 0), batch.size)

    def to_json(self) -> dict[str, list[int]]:
        steps = self.steps
        return {"step_indices": steps, "counts": [self.counts[s] for s in steps]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TimestepPlan:
        return cls({int(s): int(c) for s, c in zip(obj["step_indices"], obj["counts"], strict=True)})

    @classmethod
    def of_table(cls, provenance: dict[str, Any], recipe: Recipe) -> TimestepPlan:
        """The plan a calibration table was made with: uniform from the recipe, TDAC's from the
        table's provenance (it depends on the model's features, so it is recorded, not redone)."""
        if recipe.timestep_sampling == "uniform":
            return cls.uniform(recipe)
        if "timestep_plan" not in provenance:
            raise CalibrationError(
                f"the table's recipe samples timesteps by {recipe.timestep_sampling!r} but its provenance has no timestep_plan",
                hint="recalibrate with this version of qdiff (`qdiff calibrate --force`)",
            )
        return cls.from_json(provenance["timestep_plan"])


def trajectory_batches(recipe: Recipe, plan: TimestepPlan | None = None) -> list[TrajectoryBatch]:
    total = plan.trajectories if plan is not None else recipe.samples_per_timestep
    return [TrajectoryBatch(start, min(recipe.batch_size, total - start)) for start in range(0, total, recipe.batch_size)]


def default_plan(recipe: Recipe, plan: TimestepPlan | None) -> TimestepPlan:
    """`plan`, or the recipe's uniform plan; a TDAC recipe needs its plan given (`calib.tdac`)."""
    if plan is not None:
        return plan
    if recipe.timestep_sampling != "uniform":
        raise CalibrationError(
            f"recipe {recipe.name!r} samples timesteps by {recipe.timestep_sampling!r}, which needs a TimestepPlan from the model",
            hint="compute it with qdiff.calib.tdac.tdac_plan (collect_ranges and model_calibration_inputs do), or read a table's with TimestepPlan.of_table",
        )
    return TimestepPlan.uniform(recipe)


def _select_rows(value: Any, index: torch.Tensor, batch_rows: int) -> Any:
    """`value` restricted to the batch rows `index`: tensors with one row per call row (and
    dicts of them, diffusers' added_cond_kwargs); anything else (a 0-d timestep) as is."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_rows:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, dict):
        return {k: _select_rows(v, index, batch_rows) for k, v in value.items()}
    return value


class _PartlyObserved:
    """The denoiser of a calibration trajectory at steps that observe only some of the batch.

    At such a step the call is split in two, the observed trajectories first (`on_step(i, t,
    True)` before it) and the rest (`on_step(i, t, False)`), and the outputs are put back in
    order: the loop goes on exactly as one call would, while the hooks (and a recorder of the
    calls) see only the observed rows. With classifier-free guidance the call holds [uncond;
    cond] halves and the same trajectories are taken from each. A UNet treats batch rows
    independently, so only floating-point summation order can differ from the unsplit call.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], on_step: StepHook) -> None:
        self.denoiser = denoiser
        self.on_step = on_step
        self.step: tuple[int, float, int, int] = (-1, 0.0, 0, 0)  # (i, t, rows observed, batch size)

    def __call__(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> torch.Tensor:
        i, t, rows, size = self.step
        if rows in (0, size):
            return self.denoiser(sample, timestep, **kwargs)
        n = sample.shape[0]
        if n % size:
            raise CalibrationError(f"the denoiser call at step {i} has {n} rows, not a multiple of the {size} trajectories of its batch")
        observed = torch.cat([torch.arange(rows) + g * size for g in range(n // size)])
        mask = torch.ones(n, dtype=torch.bool)
        mask[observed] = False
        rest = torch.nonzero(mask).flatten()
        outputs = []
        for index, kept in ((observed, True), (rest, False)):
            self.on_step(i, t, kept)
            outputs.append(self.denoiser(sample.index_select(0, index.to(sample.device)), _select_rows(timestep, index, n), **_select_rows(kwargs, index, n)))
        out = torch.empty((n, *outputs[0].shape[1:]), dtype=outputs[0].dtype, device=outputs[0].device)
        out[observed.to(out.device)] = outputs[0]
        out[rest.to(out.device)] = outputs[1]
        return out


def calibration_trajectories(
    sampler: TrajectorySampler,
    recipe: Recipe,
    *,
    on_step: StepHook,
    progress: Callable | None = None,
    plan: TimestepPlan | None = None,
) -> Iterator[TrajectoryBatch]:
    """Run the recipe's calibration trajectories batch by batch, yielding each batch once run.

    `on_step(i, t, kept)` runs before every denoiser call; `kept` says whether the call's rows
    are observed at step `i` (`plan`, by default the recipe's uniform one). Where a plan observes
    only part of a batch, the call is split in two (`_PartlyObserved`) and `on_step` runs before
    each part. Each trajectory stops after the last observed step. Being a generator lets a
    consumer take what it recorded batch by batch (bounded memory) while the loop itself stays
    in one place.
    """
    plan = default_plan(recipe, plan)
    last = max(plan.steps)
    batches = trajectory_batches(recipe, plan)
    conditioning = sampler.conditioning
    if conditioning is not None and conditioning.num_samples < plan.trajectories:
        raise CalibrationError(f"the calibration plan needs {plan.trajectories} trajectories but the conditioning has {conditioning.num_samples} entries", hint="resolve the conditioning for that many samples")
    bar = progress(total=len(batches) * (last + 1), desc="calibrate", unit="step") if progress else None
    split = _PartlyObserved(sampler.denoiser, on_step)
    current = [batches[0]]

    def before_step(i: int, t: float) -> None:
        batch = current[0]
        rows = plan.rows(i, batch)
        split.step = (i, t, rows, batch.size)
        if rows in (0, batch.size):
            on_step(i, t, rows > 0)
        if bar:
            bar.update(1)

    try:
        for batch in batches:
            current[0] = batch
            gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + batch.start)
            noise = torch.randn((batch.size, *sampler.sample_shape), generator=gen).to(sampler.device)
            sampler.run_trajectory(
                split,
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


def iter_calibration_inputs(
    sampler: TrajectorySampler, recipe: Recipe, *, progress: Callable | None = None, plan: TimestepPlan | None = None
) -> Iterator[CalibrationInput]:
    """The denoiser calls qdiff's calibration observes, in the order it makes them (with a
    `plan` that observes part of a batch at a step, that part's rows only).

    Lazy per batch of trajectories: at most one batch's kept calls are held in memory, which is
    what keeps this usable for latent models with long text conditioning.
    """
    recorder = InputRecorder(sampler.denoiser)
    for batch in calibration_trajectories(sampler.driven_by(recorder), recipe, on_step=recorder.on_step, progress=progress, plan=plan):
        yield from recorder.drain(batch)


def count_calibration_calls(recipe: Recipe, plan: TimestepPlan | None = None) -> int:
    """How many kept denoiser calls `iter_calibration_inputs` yields (one per batch and observed step)."""
    plan = default_plan(recipe, plan)
    return sum(plan.rows(step, batch) > 0 for batch in trajectory_batches(recipe, plan) for step in plan.steps)

