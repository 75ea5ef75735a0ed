"""qdiff's sampler as calibration's forward loop.

Calibration (`qdiff.calib`) decides which trajectories it looks at but does not know how to
sample one; it takes a `TrajectorySampler` from its caller, the way ModelOpt's
`quantize(model, config, forward_loop)` takes a forward loop. This module builds that object
from runtime's denoising loop and a diffusers scheduler, so the API and the peers (which must
see the same calls) wire calibration to exactly the loop inference runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from qdiff.calib.recipe import Recipe
from qdiff.calib.trajectories import CalibrationInput, TimestepPlan, TrajectorySampler, iter_calibration_inputs
from qdiff.core.conditioning import Conditioning
from qdiff.runtime.sampler import denoise
from qdiff.runtime.schedulers import make_scheduler

__all__ = ["model_calibration_inputs", "model_trajectory_sampler", "trajectory_sampler"]


def trajectory_sampler(
    denoiser: Callable[..., torch.Tensor],
    scheduler: Any,
    *,
    sample_shape: tuple[int, int, int],
    conditioning: Conditioning | None,
    scheduler_name: str,
    device: torch.device | str = "cpu",
) -> TrajectorySampler:
    """`denoise` over `scheduler` as calibration's loop. The one scheduler instance serves every
    batch of trajectories (`denoise` resets it with `set_timesteps`), as calibration always ran.
    On `device` the loop runs where the noise is (`TrajectorySampler.device`), as `generate`'s
    does where its denoiser lives: latents, conditioning and the scheduler's arithmetic there."""
    return TrajectorySampler(
        run_trajectory=partial(_denoise_with, scheduler),
        denoiser=denoiser,
        sample_shape=sample_shape,
        conditioning=conditioning,
        scheduler_name=scheduler_name,
        scheduler_class=type(scheduler).__name__,
        device=device,
    )


def _denoise_with(scheduler: Any, denoiser: Callable[..., torch.Tensor], noise: torch.Tensor, num_inference_steps: int, **kwargs: Any) -> torch.Tensor:
    return denoise(denoiser, scheduler, noise, num_inference_steps, **kwargs)


def model_trajectory_sampler(
    bundle: Any, recipe: Recipe, denoiser: Callable[..., torch.Tensor], *, conditioning: Conditioning | None, device: torch.device | str = "cpu"
) -> TrajectorySampler:
    """The calibration loop of a loaded model (`qdiff.models.ModelBundle`): the recipe's
    scheduler made from the model's own scheduler config, the model's sample shape, run on
    `device` (where `denoiser`'s UNet must be, or a wrapper that moves the inputs to it)."""
    return trajectory_sampler(
        denoiser,
        make_scheduler(recipe.scheduler, bundle.scheduler_config),
        sample_shape=(bundle.in_channels, bundle.sample_size, bundle.sample_size),
        conditioning=conditioning,
        scheduler_name=recipe.scheduler,
        device=device,
    )


def model_calibration_inputs(
    bundle: Any,
    recipe: Recipe,
    denoiser: Callable[..., torch.Tensor],
    *,
    conditioning: Conditioning | None,
    progress: Callable | None = None,
    plan: TimestepPlan | None = None,
) -> Iterator[CalibrationInput]:
    """`iter_calibration_inputs` for a loaded model over qdiff's sampling loop. Reconstruction
    and the peers calibrate on exactly these calls, driven by `denoiser`. A TDAC recipe without
    a `plan` (a table's: `TimestepPlan.of_table`) gets one from a probe batch of `bundle.unet`."""
    sampler = model_trajectory_sampler(bundle, recipe, denoiser, conditioning=conditioning)
    if plan is None and recipe.timestep_sampling == "tdac":
        from qdiff.calib.tdac import tdac_plan

        plan = tdac_plan(bundle.unet, sampler, recipe, progress=progress).plan()
    return iter_calibration_inputs(sampler, recipe, progress=progress, plan=plan)


def unet_calls(records: Iterator[CalibrationInput] | list[CalibrationInput]) -> list[dict[str, Any]]:
    """Calibration calls as UNet keyword arguments (what reconstruction replays), the timestep
    broadcast to the batch the way every backend calls the UNet (`backends.timestep_batch`)."""
    from qdiff.runtime.backends import timestep_batch

    calls = []
    for rec in records:
        call: dict[str, Any] = {"sample": rec.sample, "timestep": timestep_batch(rec.timestep_input, rec.sample.shape[0])}
        cond = dict(rec.conditioning)
        if "encoder_hidden_states" in cond:
            call["encoder_hidden_states"] = cond.pop("encoder_hidden_states")
        if cond:
            call["added_cond_kwargs"] = cond
        calls.append(call)
    return calls
