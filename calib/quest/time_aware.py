"""QuEST's time-aware activation quantizer: activation scales per timestep bucket.

Activation ranges drift along the trajectory (`calib.timestep_stats` records how much), so one
scale per layer is a compromise between the noisy early steps and the clean late ones. QuEST
keeps one activation step per calibration timestep; here the calibration timesteps are split
into K buckets of (as near as possible) equal counts, in trajectory order, and each bucket gets
its own calibration table: the same layers, weight ranges and split settings as the base table,
only the input (and split-branch) ranges measured on that bucket's timesteps, with the recipe's
own calibrator (`calib.observers`, mse in the presets). K = 1 is the base table itself, so the
time-aware model with one bucket is the ordinary fake-quant model, exactly.

At inference a timestep belongs to the bucket whose calibration timesteps surround it:
boundaries lie halfway between the last timestep of one bucket and the first of the next.
`TimeAwareUNet` is the fake-quant model (`calib.fake_quant`, weights shared, with reconstructed
integers if given) whose input scales are switched by the `timestep` argument of each call.

The K tables are ordinary calibration tables: `qdiff quantize` makes a Q/DQ graph of each, which
is what deploying K engines that differ only in activation scales would start from. That
deployment waits for a measured gain; until then this is a fake-quant simulation.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qdiff.calib.fake_quant import FakeQuantLayer, SplitShortcutFakeQuant, build_fake_quant_model
from qdiff.calib.observers import ActivationRecorder
from qdiff.calib.recipe import Recipe
from qdiff.calib.table import CalibrationTable
from qdiff.calib.targets import select_targets
from qdiff.calib.trajectories import TimestepPlan, TrajectorySampler, calibration_trajectories
from qdiff.core.artifacts import write_json_atomic
from qdiff.core.errors import CalibrationError

BUCKETS_FORMAT = "qdiff-time-buckets/1"
INDEX_NAME = "buckets.json"


@dataclass(frozen=True)
class TimeBuckets:
    """K groups of calibration steps (trajectory order: bucket 0 is the noisiest) and the
    timestep boundaries between them (descending; K - 1 of them)."""

    step_indices: tuple[tuple[int, ...], ...]
    timesteps: tuple[tuple[float, ...], ...]
    boundaries: tuple[float, ...]

    @property
    def k(self) -> int:
        return len(self.step_indices)

    @classmethod
    def split(cls, step_indices: Sequence[int], timesteps: Sequence[float], k: int) -> TimeBuckets:
        """K buckets of equal counts of calibration timesteps (sizes differ by at most one)."""
        if len(step_indices) != len(timesteps) or not step_indices:
            raise CalibrationError(f"time buckets need the calibration steps and their timesteps; got {len(step_indices)} steps and {len(timesteps)} timesteps", hint="the table's provenance lacks them; recalibrate with `qdiff calibrate`")
        if not 1 <= k <= len(step_indices):
            raise CalibrationError(f"{k} time buckets asked for, but the table was calibrated at {len(step_indices)} timesteps", hint="use K <= the recipe's num_timesteps, or recalibrate with more timesteps")
        order = np.argsort(np.asarray(step_indices), kind="stable")
        steps = np.asarray(step_indices)[order]
        ts = np.asarray(timesteps, dtype=np.float64)[order]
        if np.any(np.diff(ts) >= 0):
            raise CalibrationError(f"calibration timesteps {ts.tolist()} do not fall along the trajectory", hint="the table's provenance is damaged; recalibrate")
        groups = np.array_split(np.arange(len(steps)), k)
        boundaries = tuple(float((ts[a[-1]] + ts[b[0]]) / 2) for a, b in zip(groups[:-1], groups[1:]))
        return cls(tuple(tuple(int(s) for s in steps[g]) for g in groups), tuple(tuple(float(t) for t in ts[g]) for g in groups), boundaries)

    @classmethod
    def of_table(cls, table: CalibrationTable, k: int) -> TimeBuckets:
        prov = table.provenance
        return cls.split(prov.get("step_indices", []), prov.get("timesteps", []), k)

    def bucket_of_step(self, step: int) -> int | None:
        return next((b for b, steps in enumerate(self.step_indices) if step in steps), None)

    def bucket_of(self, timestep: Any) -> torch.Tensor:
        """Bucket index of each timestep (a number or a tensor of any shape), as int64."""
        t = torch.as_tensor(timestep).detach().reshape(-1).to("cpu", torch.float64)
        bounds = torch.tensor(self.boundaries, dtype=torch.float64)
        return (t[:, None] < bounds[None, :]).sum(dim=1)

    def to_json(self) -> dict[str, Any]:
        return {"format": BUCKETS_FORMAT, **{k: [list(v) for v in vals] if k != "boundaries" else list(vals) for k, vals in asdict(self).items()}}

    @classmethod
    def from_json(cls, obj: Any, source: str = "time buckets") -> TimeBuckets:
        if not isinstance(obj, dict) or obj.get("format") != BUCKETS_FORMAT:
            raise CalibrationError(f"{source} is not a {BUCKETS_FORMAT} object", hint="rerun `calibrate_time_aware`")
        try:
            out = cls(tuple(tuple(int(s) for s in g) for g in obj["step_indices"]), tuple(tuple(float(t) for t in g) for g in obj["timesteps"]), tuple(float(b) for b in obj["boundaries"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"{source} is malformed: {exc}", hint="rerun `calibrate_time_aware`") from exc
        if len(out.boundaries) != out.k - 1 or len(out.timesteps) != out.k:
            raise CalibrationError(f"{source}: {out.k} buckets need {out.k - 1} boundaries, it has {len(out.boundaries)}")
        return out


def copy_table(table: CalibrationTable) -> CalibrationTable:
    """A deep copy (`from_json(to_json())` shares the provenance dict with the original)."""
    return CalibrationTable.from_json(copy.deepcopy(table.to_json()))


def collect_bucket_tables(unet: nn.Module, sampler: TrajectorySampler, table: CalibrationTable, buckets: TimeBuckets, *, progress: Callable | None = None) -> list[CalibrationTable]:
    """One calibration table per bucket, its activation ranges measured at that bucket's steps.

    One pass over the base table's calibration trajectories (same recipe, seeds, conditioning:
    `sampler` must drive `unet` as `calibrate` did), with one set of the recipe's observers per
    bucket, switched on at that bucket's steps. Weight ranges, split channels and everything
    else come from `table`. A layer no call of a bucket reached keeps the base range."""
    recipe = Recipe.from_json(table.recipe)
    targets = [t for t in select_targets(unet, recipe)[0] if t.name in table.layers]
    splits = {name: r.split_channels for name, r in table.split_layers(recipe.split_shortcut, recipe.split_conv1).items()}
    recorders = [ActivationRecorder(targets, recipe, splits) for _ in range(buckets.k)]
    try:

        def on_step(i: int, _t: float, kept: bool) -> None:
            b = buckets.bucket_of_step(i) if kept else None
            for k, recorder in enumerate(recorders):
                recorder.enabled = b == k

        plan = TimestepPlan.of_table(table.provenance, recipe)  # a TDAC table's own counts (uniform: the recipe's)
        for _batch in calibration_trajectories(sampler, recipe, on_step=on_step, progress=progress, plan=plan):
            pass
    finally:
        for recorder in recorders:
            recorder.remove()
    out = []
    for k, recorder in enumerate(recorders):
        new = copy_table(table)
        for name, ranges in new.layers.items():
            observer = recorder.observers.get(name)
            if observer is None or observer.batches == 0:
                continue
            ranges.input = observer.amax()
            if name in recorder.branch_observers:
                ranges.shortcut_a, ranges.shortcut_b = (obs.amax() for obs in recorder.branch_observers[name])
            for role in ("input", "shortcut_a", "shortcut_b"):
                if getattr(ranges, role) is not None and getattr(ranges, role) <= 0 and f"{name}:{role}" not in new.degenerate:
                    new.degenerate.append(f"{name}:{role}")
        out.append(new)
    return out


def bucket_tables(unet: nn.Module, sampler: TrajectorySampler, table: CalibrationTable, k: int, *, base_sha256: str = "", progress: Callable | None = None) -> tuple[list[CalibrationTable], TimeBuckets]:
    """The K tables of `table` (K = 1: `table` itself) and their buckets, provenance filled in."""
    buckets = TimeBuckets.of_table(table, k)
    tables = [copy_table(table)] if k == 1 else collect_bucket_tables(unet, sampler, table, buckets, progress=progress)
    for b, t in enumerate(tables):
        t.provenance["time_aware"] = {"bucket": b, "buckets": k, "step_indices": list(buckets.step_indices[b]), "timesteps": list(buckets.timesteps[b]), "base_table_sha256": base_sha256}
    return tables, buckets


def bucket_table_name(b: int) -> str:
    return f"bucket-{b:02d}.calibration.json"


def save_time_aware(folder: Path, tables: Sequence[CalibrationTable], buckets: TimeBuckets) -> Path:
    """Write the K tables, then the index (`buckets.json`, last: its presence means complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for b, t in enumerate(tables):
        t.save(folder / bucket_table_name(b))
    index = folder / INDEX_NAME
    write_json_atomic(index, {**buckets.to_json(), "tables": [bucket_table_name(b) for b in range(len(tables))], "model_sha256": tables[0].model_sha256})
    return index


def load_time_aware(index: str | Path) -> tuple[list[CalibrationTable], TimeBuckets]:
    """The tables and buckets an index (`buckets.json`, or its folder) names; checked to agree."""
    index = Path(index)
    if index.is_dir():
        index = index / INDEX_NAME
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"time-aware index {index} cannot be read: {exc}", hint="rerun `calibrate_time_aware`") from exc
    buckets = TimeBuckets.from_json(obj, source=str(index))
    names = obj.get("tables")
    if not isinstance(names, list) or len(names) != buckets.k:
        raise CalibrationError(f"{index}: {buckets.k} buckets but tables {names!r}")
    tables = [CalibrationTable.load(index.parent / n) for n in names]
    check_tables(tables, str(index))
    return tables, buckets


def check_tables(tables: Sequence[CalibrationTable], source: str) -> None:
    """The K tables must describe one model, one recipe and the same weights and layers."""
    first = tables[0]
    for b, t in enumerate(tables[1:], start=1):
        if t.model_sha256 != first.model_sha256 or t.recipe != first.recipe or set(t.layers) != set(first.layers):
            raise CalibrationError(f"{source}: bucket {b}'s table is for another model, recipe or layer set than bucket 0's", hint="rerun `calibrate_time_aware`")
        for name, r in t.layers.items():
            f = first.layers[name]
            if (r.weight, r.weight_a, r.weight_b, r.split_channels) != (f.weight, f.weight_a, f.weight_b, f.split_channels):
                raise CalibrationError(f"{source}: layer {name!r} has other weight ranges in bucket {b} than in bucket 0", hint="the buckets may differ only in activation ranges")


class TimeAwareUNet(nn.Module):
    """A fake-quant UNet whose activation scales follow the timestep of each call.

    Every quantizer's input scale buffer (`input_scale`, or `input_scale_a`/`_b` of a split
    layer) gets a `<name>_buckets` buffer of K values; `forward` sets the buffer to the value of
    the call's bucket and runs the fake-quant model. A call whose batch mixes timesteps of two
    buckets is refused (the sampling loop calls with one timestep, broadcast or not).
    """

    def __init__(self, quantized: nn.Module, buckets: TimeBuckets, switches: list[tuple[str, str]]) -> None:
        super().__init__()
        self.unet = quantized
        self.buckets = buckets
        self.switches = switches  # (module name, buffer name)

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def select(self, bucket: int) -> None:
        for module_name, buffer in self.switches:
            module = self.unet.get_submodule(module_name)
            setattr(module, buffer, getattr(module, f"{buffer}_buckets")[bucket])

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        ks = self.buckets.bucket_of(timestep)
        if ks.numel() == 0 or not bool(torch.all(ks == ks[0])):
            raise CalibrationError(f"a UNet call mixes timesteps of time buckets {sorted(set(ks.tolist()))}", hint="call the time-aware model with one timestep per call")
        self.select(int(ks[0]))
        return self.unet(sample, timestep, *args, **kwargs)


def build_time_aware_model(model: nn.Module, tables: Sequence[CalibrationTable], buckets: TimeBuckets, *, weights=None, dtype: torch.dtype = torch.float32) -> TimeAwareUNet:
    """The fake-quant model of `tables[0]` (with `weights`' integers if given), its input scales
    per bucket taken from each bucket's own fake-quant model, so each bucket computes exactly
    what the ordinary fake-quant model of its table computes."""
    if len(tables) != buckets.k:
        raise CalibrationError(f"{len(tables)} tables for {buckets.k} time buckets")
    check_tables(tables, "time-aware tables")
    quantized = build_fake_quant_model(model, tables[0], dtype=dtype, weights=weights)
    names = [n for n, m in quantized.named_modules() if isinstance(m, (FakeQuantLayer, SplitShortcutFakeQuant))]
    scales: dict[tuple[str, str], list[torch.Tensor]] = {}
    for table in tables:  # one bucket's fake-quant model at a time: its scales, then let it go
        other = build_fake_quant_model(model, table, dtype=dtype) if table is not tables[0] else quantized
        for name in names:
            module = other.get_submodule(name)
            for buffer, value in module.named_buffers(recurse=False):
                if buffer.startswith("input_scale"):
                    scales.setdefault((name, buffer), []).append(value.detach().clone())
        del other
    for (name, buffer), values in scales.items():
        quantized.get_submodule(name).register_buffer(f"{buffer}_buckets", torch.stack(values))
    wrapper = TimeAwareUNet(quantized, buckets, list(scales))
    wrapper.select(0)
    return wrapper
