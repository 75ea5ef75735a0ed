"""Timestep-uniform calibration, as in Q-Diffusion.

Activation ranges of a diffusion denoiser drift with the timestep, so calibrating on inputs
from one part of the trajectory clips the others. Q-Diffusion runs the model's own sampler from
noise and keeps denoiser inputs at timesteps spread uniformly over the whole trajectory. Here
the statistics are collected on the fly: hooks on the quantized layers are switched on only at
the chosen steps, so the inputs never have to be stored, and each trajectory stops after the
last step that is needed. With classifier-free guidance the denoiser sees the unconditional and
the conditional batch, as it will at inference. The trajectories themselves (seeds, batches,
kept steps) are driven by `calib.trajectories`, which peers that need the same calls as tensors
share; the sampling loop itself comes from the caller (a `TrajectorySampler`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from qdiff.calib.hooks import forward_with_hooks
from qdiff.calib.observers import ActivationRecorder, weight_amax, weight_amax_of
from qdiff.calib.recipe import Recipe
from qdiff.calib.table import CalibrationTable, LayerRanges
from qdiff.calib.shortcuts import find_split_layers
from qdiff.calib.targets import select_targets
from qdiff.calib.timestep_stats import TimestepStatsRecorder
from qdiff.calib.trajectories import TimestepPlan, TrajectorySampler, calibration_step_indices, calibration_trajectories
from qdiff.core.conditioning import Conditioning
from qdiff.core.errors import CalibrationError
from qdiff.core.progress import Phases

__all__ = ["calibration_step_indices", "collect_ranges", "example_call", "layer_macs"]


def layer_macs(model: nn.Module, example: dict[str, torch.Tensor], names: list[str]) -> dict[str, int]:
    """Multiply-accumulates per sample of each named Conv/Linear layer, from one forward pass."""
    macs: dict[str, int] = {}
    handles = []
    wanted = set(names)
    for name, module in model.named_modules():
        if name not in wanted:
            continue

        def hook(mod: nn.Module, _inp: Any, out: torch.Tensor, name: str = name) -> None:
            per_output = mod.weight[0].numel() if not isinstance(mod, nn.ConvTranspose2d) else mod.weight.shape[0] * mod.weight[0, 0].numel() // max(1, mod.groups)
            if isinstance(mod, nn.Linear):
                per_output = mod.in_features
            macs[name] = macs.get(name, 0) + out.numel() // out.shape[0] * per_output

        handles.append(module.register_forward_hook(hook))
    forward_with_hooks(model, example, handles)
    return macs


def collect_ranges(
    unet: nn.Module,
    sampler: TrajectorySampler,
    recipe: Recipe,
    *,
    model_sha256: str,
    progress: Callable | None = None,
    timestep_stats: TimestepStatsRecorder | None = None,
    phases: Phases | None = None,
) -> CalibrationTable:
    """Run the recipe's calibration trajectories over `unet` and return the calibration table.

    `sampler` is the caller's forward loop (`qdiff.runtime.calibration_loop` builds qdiff's own):
    its denoiser must call `unet`, so calibration drives exactly the loop that inference uses
    while calib itself stays independent of the runtime package. A `timestep_stats` recorder,
    if given, watches the same layers at the same steps and keeps per-step ranges and branch
    histograms (its `result()` afterwards).

    With `recipe.timestep_sampling == "tdac"` a probe batch first decides how many samples each
    step gets (`calib.tdac.tdac_plan`); the decision and its evidence go into the provenance.

    The ranges are measured where `unet` is (its parameters' device, named in the provenance);
    the sampler should run its trajectory there too (`TrajectorySampler.device`). Whatever the
    device, the table holds plain floats: observers and weight searches end in `float`/`tolist`.
    """
    phases = phases if phases is not None else Phases()  # timed either way; the caller may not keep them
    sample_shape, conditioning = sampler.sample_shape, sampler.conditioning
    targets, skipped = select_targets(unet, recipe)
    if not targets:
        raise CalibrationError("the recipe selects no layer to quantize", hint="check the recipe's exclude and quantize_ops")
    tdac = None
    if recipe.timestep_sampling == "tdac":
        from qdiff.calib.tdac import tdac_plan

        tdac = tdac_plan(unet, sampler, recipe, progress=progress)
        plan = tdac.plan()
    else:
        plan = TimestepPlan.uniform(recipe)
    steps = plan.steps
    total = recipe.samples_per_timestep
    recorded_timesteps: dict[int, float] = {}
    device = model_device(unet)
    example = example_call(unet, sample_shape, conditioning, device)
    splits: dict[str, int] = {}
    conv1_splits: dict[str, int] = {}
    if recipe.split_shortcut or recipe.split_conv1:
        conv_targets = {t.name for t in targets if t.op == "Conv"}
        shortcuts, conv1s = find_split_layers(unet, example, conv1=recipe.split_conv1)
        if recipe.split_shortcut:
            splits = {name: c for name, c in shortcuts.items() if name in conv_targets}
        conv1_splits = {name: c for name, c in conv1s.items() if name in conv_targets}
        splits |= conv1_splits
    with _attached(timestep_stats, targets, splits), ActivationRecorder(targets, recipe, splits) as recorder:

        def on_step(i: int, t: float, kept: bool) -> None:
            recorder.enabled = kept
            if timestep_stats is not None:
                timestep_stats.begin_step(i, t, kept)
            if kept:
                recorded_timesteps.setdefault(i, t)

        with phases("trajectories"):
            for _batch in calibration_trajectories(sampler, recipe, on_step=on_step, progress=progress, plan=plan):
                pass
        phases.add("observers", recorder.collect_seconds)
        # The last trajectory step was a kept one: switch recording off, or the MAC-counting
        # pass below (a zero sample at t=500) would be observed as calibration data too.
        recorder.enabled = False
        if timestep_stats is not None:
            timestep_stats.begin_step(-1, 0.0, False)
        observers = recorder.observers
        never_ran = [name for name, obs in observers.items() if obs.batches == 0]
        table = CalibrationTable(model_sha256=model_sha256, recipe=recipe.to_json())
        with phases("macs"):
            macs = layer_macs(unet, example, [t.name for t in targets] + [s.name for s in skipped])
        for target in targets:
            observer = observers[target.name]
            if observer.batches == 0:
                continue  # the layer is not on the forward path (and not in the export)
            with phases("activation ranges"):
                amax = observer.amax()
            if amax <= 0:
                table.degenerate.append(f"{target.name}:input")
            with phases("weight ranges"):
                weights = weight_amax(target, recipe)
            table.degenerate += [f"{target.name}:weight[{c}]" for c, w in enumerate(weights) if w <= 0]
            ranges = LayerRanges(op=target.op, input=amax, weight=weights, macs=macs.get(target.name))
            if target.name in recorder.branch_observers:
                _add_split_ranges(ranges, target, splits[target.name], recorder.branch_observers[target.name], recipe, table.degenerate, phases)
                if target.name in conv1_splits:
                    ranges.split_kind = "conv1"
            table.layers[target.name] = ranges
    table.provenance = {
        "scheduler": sampler.scheduler_name,
        "scheduler_class": sampler.scheduler_class,
        "calibration_steps": recipe.calibration_steps,
        "step_indices": steps,
        "timesteps": [recorded_timesteps[s] for s in steps],
        "samples_per_timestep": total,
        "timestep_sampling": recipe.timestep_sampling,
        "denoiser_inputs": plan.total * (2 if conditioning and recipe.guidance_scale != 1.0 else 1),
        "seed": recipe.seed,
        "calibrator": recipe.activation_calibrator,
        "weight_calibrator": recipe.weight_calibrator,
        "conditioning": conditioning.source if conditioning else "none (unconditional model)",
        **device_provenance(device),
        "sample_shape": list(sample_shape),
        "layers_never_run": never_ran,
        "split_shortcut_layers": {name: splits[name] for name in sorted(splits) if name not in conv1_splits},
        "float_layers": [{"module": s.name, "op": s.op, "reason": s.reason, "macs": macs.get(s.name, 0)} for s in skipped],
    }
    if tdac is not None:
        table.provenance["timestep_plan"] = plan.to_json()
        table.provenance["tdac"] = tdac.to_json()
    if recipe.split_conv1:
        table.provenance["split_conv1_layers"] = {name: conv1_splits[name] for name in sorted(conv1_splits)}
    return table


@contextlib.contextmanager
def _attached(recorder: TimestepStatsRecorder | None, targets: list, splits: dict[str, int]) -> Iterator[None]:
    """Hook the optional statistics recorder onto the targets; unhook it whatever happens."""
    try:
        if recorder is not None:
            recorder.attach(((t.name, t.module) for t in targets), splits)
        yield
    finally:
        if recorder is not None:
            recorder.remove()


def _add_split_ranges(ranges: LayerRanges, target, split: int, branches, recipe: Recipe, degenerate: list[str], phases: Phases) -> None:
    """Per-branch activation ranges and per-branch (input-channel slice) weight ranges."""
    ranges.split_channels = split
    with phases("activation ranges"):
        ranges.shortcut_a, ranges.shortcut_b = (obs.amax() for obs in branches)
    weight = target.module.weight
    with phases("weight ranges"):
        ranges.weight_a = weight_amax_of(weight[:, :split], target.weight_axis, recipe)
        ranges.weight_b = weight_amax_of(weight[:, split:], target.weight_axis, recipe)
    for role in ("shortcut_a", "shortcut_b"):
        if getattr(ranges, role) <= 0:
            degenerate.append(f"{target.name}:{role}")
    for role in ("weight_a", "weight_b"):
        degenerate += [f"{target.name}:{role}[{c}]" for c, w in enumerate(getattr(ranges, role)) if w <= 0]


def example_call(unet: nn.Module, sample_shape: tuple[int, int, int], conditioning: Conditioning | None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One batch-1 call of `unet` (zero sample, t=500, the first conditioning entry) on `device`,
    the UNet's: what the structure probes (split layers, MACs) run."""
    example: dict[str, Any] = {"sample": torch.zeros(1, *sample_shape, device=device), "timestep": torch.tensor([500.0], device=device)}
    if conditioning is not None:
        cond = {k: v.to(device) for k, v in conditioning.select(0, 1).cond.items()}
        example["encoder_hidden_states"] = cond["encoder_hidden_states"]
        added = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
        if added:
            example["added_cond_kwargs"] = added
    return example


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (a model without any: the CPU)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def device_provenance(device: torch.device) -> dict[str, str]:
    """Where the ranges were measured, for the table's provenance: the device, and on CUDA the
    GPU's name (two GPU models may round differently; two cards of one model do not)."""
    label = {"device": str(device)}
    if device.type == "cuda":
        label["device_name"] = torch.cuda.get_device_name(device)
    return label
