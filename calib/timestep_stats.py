"""Per-timestep activation statistics, recorded beside calibration for plots and diagnosis.

The calibration table keeps one range per layer: the answer. This file keeps the evidence for
why Q-Diffusion calibrates the way it does: at every calibration timestep, each quantized
layer's input range (amax), and for split-shortcut layers the range and a histogram of each
concat branch (a = deep features, b = skip). Plotted (`qdiff.plots`), the first shows ranges
moving with the timestep (why calibration must cover the whole trajectory), the second shows
two branches with different ranges sharing one tensor (why they get one scale each).

It is cheap by design: one abs-max per hooked call, and for split layers a fixed-size seeded
random subsample of each branch (histogrammed once at the end), so recording adds a few percent
to calibration and the file stays small (tens of kB).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qdiff.core.artifacts import atomic_path
from qdiff.core.errors import CalibrationError

STATS_SUFFIX = ".stats.npz"
_KEYS = ("step_indices", "timesteps", "layers", "amax", "split_layers", "branch_amax", "branch_hist", "branch_edges")


def stats_path_for(table_path: str | Path) -> Path:
    """`calibration.json` -> `calibration.stats.npz`, in the same folder."""
    table_path = Path(table_path)
    return table_path.with_name(table_path.stem + STATS_SUFFIX)


@dataclass
class TimestepStats:
    """Arrays indexed [layer, step] (`amax`) and [split layer, branch, step, ...] (branches).

    Steps are in trajectory order (0 = noisiest); `timesteps[s]` is the scheduler's timestep.
    Branch histograms are densities over `branch_edges[layer]`, shared by both branches and
    all steps of a layer so they can be drawn on one axis.
    """

    step_indices: np.ndarray  # int64 [S]
    timesteps: np.ndarray  # float64 [S]
    layers: list[str]
    amax: np.ndarray  # float32 [L, S]
    split_layers: list[str]
    branch_amax: np.ndarray  # float32 [P, 2, S]
    branch_hist: np.ndarray  # float32 [P, 2, S, B]
    branch_edges: np.ndarray  # float32 [P, B + 1]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        arrays = {key: getattr(self, key) for key in _KEYS}
        arrays["layers"] = np.array(self.layers, dtype=np.str_)
        arrays["split_layers"] = np.array(self.split_layers, dtype=np.str_)
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TimestepStats:
        """Read and check a stats file; a missing or damaged one is a CalibrationError."""
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"per-timestep statistics {path} do not exist", hint="rerun `qdiff calibrate` (it writes them beside the table)")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in _KEYS}
        except (OSError, ValueError, KeyError) as exc:
            raise CalibrationError(f"{path} is not a qdiff per-timestep statistics file ({type(exc).__name__}: {exc})", hint="rerun `qdiff calibrate`") from exc
        stats = cls(**{**arrays, "layers": arrays["layers"].tolist(), "split_layers": arrays["split_layers"].tolist()})
        s, layers, splits = len(stats.step_indices), len(stats.layers), len(stats.split_layers)
        expected = {"timesteps": (s,), "amax": (layers, s), "branch_amax": (splits, 2, s)}
        bad = [key for key, shape in expected.items() if getattr(stats, key).shape != shape]
        if stats.branch_hist.shape[:3] != (splits, 2, s) or stats.branch_edges.shape != (splits, stats.branch_hist.shape[3] + 1):
            bad.append("branch_hist/branch_edges")
        if bad:
            raise CalibrationError(f"{path}: arrays {bad} do not match {layers} layers x {s} steps", hint="rerun `qdiff calibrate`")
        return stats

    def layer_amax(self, name: str) -> np.ndarray:
        return self.amax[self.layers.index(name)]


class TimestepStatsRecorder:
    """Forward pre-hooks that record per-step statistics while `begin_step` says so.

    `collect_ranges` attaches it next to the range observers and calls `begin_step` before every
    denoiser call of the calibration trajectories; only the calibration steps are recorded.
    """

    def __init__(self, samples_per_call: int = 4096, bins: int = 121, seed: int = 0) -> None:
        self.samples_per_call = samples_per_call
        self.bins = bins
        self._gen = torch.Generator().manual_seed(seed)
        self._handles: list = []
        self._step: int | None = None
        self._timesteps: dict[int, float] = {}
        self._amax: dict[tuple[str, int], float] = defaultdict(float)
        self._branch_amax: dict[tuple[str, int, int], float] = defaultdict(float)
        self._branch_samples: dict[tuple[str, int, int], list[torch.Tensor]] = defaultdict(list)
        self._layers: list[str] = []
        self._splits: dict[str, int] = {}

    def attach(self, modules: Iterable[tuple[str, nn.Module]], splits: dict[str, int]) -> None:
        self._splits = dict(splits)
        for name, module in modules:
            self._layers.append(name)
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))

    def begin_step(self, index: int, timestep: float, record: bool) -> None:
        self._step = index if record else None
        if record:
            self._timesteps[index] = timestep

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if self._step is None or not args:
                return
            x = args[0].detach()
            key = (name, self._step)
            self._amax[key] = max(self._amax[key], float(x.abs().max()))
            split = self._splits.get(name)
            if split is not None:
                for branch, part in enumerate((x[:, :split], x[:, split:])):
                    bkey = (name, branch, self._step)
                    self._branch_amax[bkey] = max(self._branch_amax[bkey], float(part.abs().max()))
                    self._branch_samples[bkey].append(self._subsample(part))

        return hook

    def _subsample(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1).float()
        if flat.numel() <= self.samples_per_call:
            return flat.cpu().clone()  # kept on the CPU: a CUDA model's samples are histogrammed by numpy
        return flat[torch.randint(flat.numel(), (self.samples_per_call,), generator=self._gen).to(flat.device)].cpu()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def result(self) -> TimestepStats:
        steps = sorted(self._timesteps)
        layers = [name for name in self._layers if any((name, s) in self._amax for s in steps)]
        splits = [name for name in layers if name in self._splits]
        amax = np.array([[self._amax.get((name, s), 0.0) for s in steps] for name in layers], dtype=np.float32).reshape(len(layers), len(steps))
        branch_amax = np.zeros((len(splits), 2, len(steps)), dtype=np.float32)
        hist = np.zeros((len(splits), 2, len(steps), self.bins), dtype=np.float32)
        edges = np.zeros((len(splits), self.bins + 1), dtype=np.float32)
        for p, name in enumerate(splits):
            bound = max(max((self._branch_amax.get((name, b, s), 0.0) for b in (0, 1) for s in steps), default=0.0), 1e-12)
            edges[p] = np.linspace(-bound, bound, self.bins + 1)
            for b in (0, 1):
                for j, s in enumerate(steps):
                    branch_amax[p, b, j] = self._branch_amax.get((name, b, s), 0.0)
                    samples = self._branch_samples.get((name, b, s))
                    if samples:
                        values = torch.cat(samples).numpy()
                        hist[p, b, j] = np.histogram(values, bins=edges[p], density=True)[0]
        return TimestepStats(
            step_indices=np.array(steps, dtype=np.int64),
            timesteps=np.array([self._timesteps[s] for s in steps], dtype=np.float64),
            layers=layers,
            amax=amax,
            split_layers=splits,
            branch_amax=branch_amax,
            branch_hist=hist,
            branch_edges=edges,
        )
