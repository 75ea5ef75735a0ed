"""Q-Diffusion's ablations on qdiff's two shipped models; writes docs/results/.

What it measures, per configuration (preset x activation calibrator x calibration window x
split shortcut), against FP32 from the same seeds (`qdiff.evaluate.compare`):

- mean PSNR / SSIM of the final samples,
- mean relative L2 of the noise prediction per step (quantized model on the FP32 trajectory),
- shape-FD of the quantized samples to the dataset (FP32's and real-vs-real at the same n are
  reported once per model).

The two questions are Q-Diffusion's (Li et al., ICCV 2023): (i) does calibrating on timesteps
spread over the whole trajectory beat calibrating on one third of it (first = noisiest, middle,
last)? (ii) does split-shortcut quantization help, especially with 4-bit weights? A third is
ours: (iii) does splitting the up-block resnets' conv1 as well (recipe `split_conv1`: it sees
the same concat after GroupNorm + SiLU) help on top of the shortcut split?

The full grid is 2 presets x 4 calibrators x 4 windows x 2 split settings = 64 configurations
per model, too slow for a 2-core CPU; the default `--design fractional` runs two blocks around
the default recipe (see `design()`), `--design full` runs everything.

Everything is cached: exported and quantized graphs by their manifests (`qdiff.api`), measured
rows in `<work>/rows.json` keyed by model, configuration and sampling settings, so an
interrupted run resumes and a rerun only re-renders docs/results/.

    .venv/bin/python tools/ablations.py                     # both models, fractional design
    .venv/bin/python tools/ablations.py --measure-one        # time one configuration, write nothing
    .venv/bin/python tools/ablations.py --only w8a8-max-uniform-split-conv1   # just these rows (cached ones are kept)
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qdiff.api import RUN_CALIBRATION, calibrate, export_model, quantize_onnx  # noqa: E402
from qdiff.core.artifacts import write_json_atomic, write_text_atomic  # noqa: E402
from qdiff.evaluate import compare, reference_samples, sampling_plan  # noqa: E402
from qdiff.models import PACKAGE_MODELS, load_model  # noqa: E402
from qdiff.report import markdown_table  # noqa: E402
from qdiff.runtime.backends import OnnxRuntimeDenoiser  # noqa: E402

MODELS = {"shapes-ddpm": 1.0, "shapes-cond": 3.0}  # model -> guidance scale
PRESETS = ("w8a8", "w4a8")
CALIBRATORS = ("max", "percentile", "mse", "entropy")
WINDOWS = {"uniform": (0.0, 1.0), "first": (0.0, 1 / 3), "middle": (1 / 3, 2 / 3), "last": (2 / 3, 1.0)}
PEER_LABEL = "onnxruntime quantize_static, QDQ per-channel"


@dataclass(frozen=True)
class Config:
    preset: str
    calibrator: str
    window: str
    split: bool
    conv1: bool = False  # recipe split_conv1: the up-block resnets' conv1 split too

    @property
    def id(self) -> str:
        return f"{self.preset}-{self.calibrator}-{self.window}-{'split' if self.split else 'nosplit'}" + ("-conv1" if self.conv1 else "")


def design(kind: str) -> list[Config]:
    """The configurations to run.

    fractional: Block A, the split question: every preset x calibrator, uniform window, split on
    and off (16). Block B, the window question: windows first/middle/last with split on, for
    every preset with the max calibrator and for w8a8 with the mse calibrator (9; their uniform
    counterparts are in block A). Block C, the conv1 question: for every preset with the max
    calibrator, uniform window, split shortcut on, the resnets' conv1 split too (2; conv1 off is
    in block A). 27 per model instead of 64 (+32 conv1 variants): the window effect is not
    measured for percentile and entropy, nor for mse at w4a8, and the window x split interaction
    not at all.
    """
    if kind == "full":
        configs = [Config(p, c, w, s) for p, c, w, s in itertools.product(PRESETS, CALIBRATORS, WINDOWS, (True, False))]
        return configs + [Config(c.preset, c.calibrator, c.window, True, True) for c in configs if c.split]
    # Most informative first, so that `--limit N` keeps the core: the default recipe (it also
    # records the calibration statistics for the figures), split on/off and the windows with the
    # max calibrator, then the other calibrators.
    core = [Config(p, "max", "uniform", s) for p, s in itertools.product(PRESETS, (True, False))]
    block_b = [Config(p, "max", w, True) for p, w in itertools.product(PRESETS, ("first", "middle", "last"))]
    block_b += [Config("w8a8", "mse", w, True) for w in ("first", "middle", "last")]
    others = [Config(p, c, "uniform", s) for c, p, s in itertools.product(CALIBRATORS[1:], PRESETS, (True, False))]
    block_c = [Config(p, "max", "uniform", True, True) for p in PRESETS]
    return core + block_b + others + block_c


def _summary_row(comparison) -> dict[str, Any]:
    s = comparison.summary
    return {
        "mean_psnr": s["mean PSNR (dB)"],
        "min_psnr": s["min PSNR (dB)"],
        "mean_ssim": s["mean SSIM"],
        "mean_step_rel_l2": s["mean step rel-L2 (eps)"],
        "max_step_rel_l2": s["max step rel-L2 (eps)"],
        "shape_fd": comparison.shape_fd.get("quantized"),
        "steps": comparison.steps,
    }


class SharedTrajectoryDenoiser:
    """The model's PyTorch UNet, memoized on its inputs except at the observed calibration steps.

    Every configuration of one model calibrates on the same trajectories (same seeds, scheduler
    and conditioning); only the observed steps and the quantizer settings differ. Off the
    observed steps the UNet's output is a pure function of its input, so it is computed once and
    replayed (keyed by a hash of the input bytes, so a different input can never hit); at the
    observed steps the UNet really runs, so the range hooks see every call they would see
    without the cache. This makes calibrating a configuration cost its 10 observed calls
    instead of up to 50.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        from qdiff.runtime.backends import TorchDenoiser

        self.model = TorchDenoiser(unet)
        self.observed: set[float] = set()
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, sample, timestep, encoder_hidden_states=None, **added_cond):
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        digest = hashlib.sha256(sample.detach().contiguous().numpy().tobytes())
        digest.update(repr(t).encode())
        for name, value in sorted({"encoder_hidden_states": encoder_hidden_states, **added_cond}.items()):
            if value is not None:
                digest.update(name.encode() + value.detach().contiguous().numpy().tobytes())
        key = digest.hexdigest()
        if t not in self.observed and key in self._cache:
            return self._cache[key].clone()
        out = self.model(sample, timestep, encoder_hidden_states, **added_cond)
        self._cache[key] = out.clone()
        return out


class Runner:
    """One model: its FP32 graph and reference samples, then any number of configurations."""

    def __init__(self, name: str, args: argparse.Namespace, cache: dict[str, Any]) -> None:
        self.name = name
        self.args = args
        self.cache = cache
        self.work = args.work / name
        self.bundle = load_model(PACKAGE_MODELS / name)
        self.guidance = MODELS[name]
        self.fp32 = export_model(self.bundle, self.work).onnx_path
        self.plan = sampling_plan(self.bundle, scheduler="ddim", steps=args.steps, num_images=args.num_images, seed=args.seed, guidance_scale=self.guidance)
        self.plan_key = json.dumps({"model": self.bundle.model_sha256, **self.plan.to_json(), "calibration": RUN_CALIBRATION}, sort_keys=True)
        self._reference = None
        self.trajectories = SharedTrajectoryDenoiser(self.bundle.unet)

    def observed_timesteps(self, window: tuple[float, float]) -> set[float]:
        """Scheduler timesteps of the calibration steps of `window` (as `collect_ranges` picks them)."""
        from qdiff.calib.trajectories import calibration_step_indices
        from qdiff.runtime.schedulers import make_scheduler

        sched = make_scheduler("ddim", self.bundle.scheduler_config)
        sched.set_timesteps(RUN_CALIBRATION["calibration_steps"])
        steps = calibration_step_indices(RUN_CALIBRATION["calibration_steps"], RUN_CALIBRATION["num_timesteps"], window)
        return {float(sched.timesteps[i]) for i in steps}

    @property
    def reference_info(self) -> dict[str, Any]:
        """FP32 facts measured with the first configuration: shape-FD of FP32 and real samples."""
        return self._cached(f"{self.name}/reference") or {}

    @property
    def reference(self):
        if self._reference is None:
            started = time.perf_counter()
            self._reference = reference_samples(self.bundle, OnnxRuntimeDenoiser(self.fp32), self.plan)
            self._reference_seconds = round(time.perf_counter() - started, 1)
        return self._reference

    def _cached(self, key: str) -> dict[str, Any] | None:
        row = self.cache.get(key)
        if row and "config" in row:
            row.setdefault("conv1", False)  # rows measured before block C
        return row if row and row.get("plan_key") == self.plan_key else None

    def run_config(self, cfg: Config) -> dict[str, Any]:
        key = f"{self.name}/{cfg.id}"
        if (row := self._cached(key)) is not None:
            return row
        folder = self.work / cfg.id
        t0 = time.perf_counter()
        self.trajectories.observed = self.observed_timesteps(WINDOWS[cfg.window])
        calibrated = calibrate(
            self.bundle, folder, cfg.preset, force=False, timestep_stats=(cfg.window == "uniform" and cfg.calibrator == "max"), trajectory_denoiser=self.trajectories,
            **RUN_CALIBRATION, activation_calibrator=cfg.calibrator, timestep_window=WINDOWS[cfg.window], split_shortcut=cfg.split, split_conv1=cfg.conv1,
        )  # fmt: skip
        t1 = time.perf_counter()
        quantized = quantize_onnx(self.fp32, calibrated.table_path, folder / f"denoiser.{cfg.preset}.onnx")
        t2 = time.perf_counter()
        comparison = compare(self.bundle, self.reference, OnnxRuntimeDenoiser(quantized.onnx_path), self.plan, label=cfg.id)
        row = {
            "model": self.name, "config": cfg.id, **asdict(cfg), "kind": "qdiff", **_summary_row(comparison),
            "seconds": {"calibrate": round(t1 - t0, 1), "quantize": round(t2 - t1, 1), "compare": comparison.seconds},
            "stats": str(calibrated.stats_path.relative_to(ROOT)) if calibrated.stats_path and calibrated.stats_path.is_relative_to(ROOT) else None,
            "plan_key": self.plan_key,
        }  # fmt: skip
        if cfg.conv1:  # range ratio of the two branches per split layer, from the table
            row["branch_ratios"] = {n: max(r.shortcut_a, r.shortcut_b) / max(min(r.shortcut_a, r.shortcut_b), 1e-12) for n, r in sorted(calibrated.table.layers.items()) if r.split_channels}
        if not self.reference_info:
            self.cache[f"{self.name}/reference"] = {"shape_fd": comparison.shape_fd, "seconds": self._reference_seconds, "plan_key": self.plan_key}
        self._store(key, row)
        return row

    def run_peer(self, method: str) -> dict[str, Any] | None:
        """The peer row: ONNX Runtime's quantize_static on the same graph and calibration calls."""
        try:
            from qdiff.peers.onnxruntime_static import quantize_with_onnxruntime
        except ImportError:  # HOOK: the peer module is not there; the tables say so
            return None
        key = f"{self.name}/peer-ort-{method}"
        if (row := self._cached(key)) is not None:
            return row
        folder = self.work / f"peer-ort-{method}"
        t0 = time.perf_counter()
        peer = quantize_with_onnxruntime(self.bundle, self.fp32, folder / f"denoiser.ort-{method}.onnx", "w8a8", method=method, **RUN_CALIBRATION)
        t1 = time.perf_counter()
        comparison = compare(self.bundle, self.reference, OnnxRuntimeDenoiser(peer.onnx_path), self.plan, label=f"ort-{method}")
        row = {
            "model": self.name, "config": f"peer-ort-{method}", "preset": "w8a8", "calibrator": f"ort {method}", "window": "uniform", "split": False, "conv1": False,
            "kind": "peer", **_summary_row(comparison),
            "seconds": {"calibrate+quantize": round(t1 - t0, 1), "compare": comparison.seconds}, "plan_key": self.plan_key,
        }  # fmt: skip
        self._store(key, row)
        return row

    def _store(self, key: str, row: dict[str, Any]) -> None:
        self.cache[key] = row
        write_json_atomic(self.args.work / "rows.json", json.loads(json.dumps(self.cache, default=float)))
        print(f"  {key}: PSNR {row['mean_psnr']:.2f} dB, SSIM {row['mean_ssim']:.3f}, step rel-L2 {row['mean_step_rel_l2']:.4f}, shape-FD {row['shape_fd']:.3f}  ({row['seconds']})", flush=True)


# ----------------------------------------------------------------------------- report


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "inf" if np.isinf(x) else f"{x:.{digits}f}"
    return str(x)


def _find(rows: list[dict], **match: Any) -> dict | None:
    match = {"conv1": False, **match}  # the conv1 rows only where asked for
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _rel(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.0f}%" if b else "n/a"


def split_table(rows: list[dict], model: str) -> tuple[str, list[dict]]:
    """Split on vs off, uniform window, per preset and calibrator."""
    out, cells = [], []
    for preset, calib in itertools.product(PRESETS, CALIBRATORS):
        on = _find(rows, model=model, preset=preset, calibrator=calib, window="uniform", split=True, kind="qdiff")
        off = _find(rows, model=model, preset=preset, calibrator=calib, window="uniform", split=False, kind="qdiff")
        if not (on and off):
            continue
        cells.append({"preset": preset, "calibrator": calib, "on": on, "off": off})
        out.append([preset, calib, f"{_fmt(off['mean_psnr'])} -> {_fmt(on['mean_psnr'])}", f"{_fmt(off['mean_ssim'], 3)} -> {_fmt(on['mean_ssim'], 3)}",
                    f"{_fmt(off['mean_step_rel_l2'], 4)} -> {_fmt(on['mean_step_rel_l2'], 4)} ({_rel(on['mean_step_rel_l2'], off['mean_step_rel_l2'])})",
                    f"{_fmt(off['shape_fd'])} -> {_fmt(on['shape_fd'])}"])  # fmt: skip
    header = ["preset", "calibrator", "PSNR dB (off -> on)", "SSIM (off -> on)", "step rel-L2 (off -> on)", "shape-FD (off -> on)"]
    return markdown_table(header, out), cells


def window_table(rows: list[dict], model: str) -> tuple[str, list[dict]]:
    """Calibration window, split on, per preset and calibrator that has windowed rows."""
    out, cells = [], []
    for preset, calib in itertools.product(PRESETS, CALIBRATORS):
        found = {w: _find(rows, model=model, preset=preset, calibrator=calib, window=w, split=True, kind="qdiff") for w in WINDOWS}
        if not found["uniform"] or not any(found[w] for w in ("first", "middle", "last")):
            continue
        cells.append({"preset": preset, "calibrator": calib, **found})
        for w, r in found.items():
            if r:
                out.append([preset, calib, w, _fmt(r["mean_psnr"]), _fmt(r["mean_ssim"], 3), _fmt(r["mean_step_rel_l2"], 4), _fmt(r["max_step_rel_l2"], 3), _fmt(r["shape_fd"])])
    header = ["preset", "calibrator", "window", "PSNR (dB)", "SSIM", "step rel-L2 mean", "step rel-L2 max", "shape-FD"]
    return markdown_table(header, out), cells


def split_verdict(cells: list[dict], what: str = "split") -> list[str]:
    lines = []
    for preset in PRESETS:
        mine = [c for c in cells if c["preset"] == preset]
        if not mine:
            continue
        step = sum(c["on"]["mean_step_rel_l2"] < c["off"]["mean_step_rel_l2"] for c in mine)
        psnr = sum(c["on"]["mean_psnr"] > c["off"]["mean_psnr"] for c in mine)
        fd = sum(c["on"]["shape_fd"] < c["off"]["shape_fd"] for c in mine)
        ratio = np.mean([c["on"]["mean_step_rel_l2"] / c["off"]["mean_step_rel_l2"] for c in mine])
        lines.append(f"{preset}: {what} lowers the step error for {step}/{len(mine)} calibrators (mean ratio {ratio:.2f}), raises PSNR for {psnr}/{len(mine)}, lowers shape-FD for {fd}/{len(mine)}.")
    return lines


def conv1_table(rows: list[dict], model: str) -> tuple[str, list[dict]]:
    """conv1 split off vs on, split shortcut on, uniform window, per preset and calibrator."""
    out, cells = [], []
    for preset, calib in itertools.product(PRESETS, CALIBRATORS):
        on = _find(rows, model=model, preset=preset, calibrator=calib, window="uniform", split=True, conv1=True, kind="qdiff")
        off = _find(rows, model=model, preset=preset, calibrator=calib, window="uniform", split=True, kind="qdiff")
        if not (on and off):
            continue
        cells.append({"preset": preset, "calibrator": calib, "on": on, "off": off})
        conv1_ratios = [v for k, v in on.get("branch_ratios", {}).items() if k.endswith(".conv1")]
        out.append([preset, calib, f"{_fmt(off['mean_psnr'])} -> {_fmt(on['mean_psnr'])}", f"{_fmt(off['min_psnr'])} -> {_fmt(on['min_psnr'])}", f"{_fmt(off['mean_ssim'], 3)} -> {_fmt(on['mean_ssim'], 3)}",
                    f"{_fmt(off['mean_step_rel_l2'], 4)} -> {_fmt(on['mean_step_rel_l2'], 4)} ({_rel(on['mean_step_rel_l2'], off['mean_step_rel_l2'])})",
                    f"{_fmt(off['max_step_rel_l2'], 3)} -> {_fmt(on['max_step_rel_l2'], 3)}", f"{_fmt(off['shape_fd'])} -> {_fmt(on['shape_fd'])}",
                    f"{min(conv1_ratios):.1f}-{max(conv1_ratios):.1f}x" if conv1_ratios else "n/a"])  # fmt: skip
    header = ["preset", "calibrator", "PSNR dB (off -> on)", "min PSNR", "SSIM", "step rel-L2 mean", "step rel-L2 max", "shape-FD", "conv1 branch range ratio"]
    return markdown_table(header, out), cells


def window_verdict(cells: list[dict]) -> list[str]:
    lines = []
    for metric, better, label in (("mean_step_rel_l2", min, "step rel-L2"), ("mean_psnr", max, "PSNR"), ("shape_fd", min, "shape-FD")):
        wins, total = 0, 0
        for c in cells:
            windowed = [c[w][metric] for w in ("first", "middle", "last") if c.get(w)]
            if not windowed:
                continue
            total += 1
            wins += better([c["uniform"][metric], *windowed]) == c["uniform"][metric]
        lines.append(f"{label}: uniform is best of the four windows in {wins}/{total} (preset, calibrator) cells.")
    return lines


def branch_ratios(stats_path: Path) -> list[tuple[str, float]]:
    from qdiff.calib.timestep_stats import TimestepStats

    stats = TimestepStats.load(stats_path)
    out = []
    for p, name in enumerate(stats.split_layers):
        a, b = float(stats.branch_amax[p, 0].max()), float(stats.branch_amax[p, 1].max())
        out.append((name, max(a, b) / max(min(a, b), 1e-12)))
    return out


def range_peaks(stats_path: Path) -> str:
    """Where along the trajectory each layer's input range peaks (the max calibrator's amax)."""
    from qdiff.calib.timestep_stats import TimestepStats

    stats = TimestepStats.load(stats_path)
    last = RUN_CALIBRATION["calibration_steps"] - 1
    where = stats.step_indices[stats.amax.argmax(axis=1)] / last
    thirds = [int((where < 1 / 3).sum()), int(((where >= 1 / 3) & (where < 2 / 3)).sum()), int((where >= 2 / 3).sum())]
    at_end = int((stats.step_indices[stats.amax.argmax(axis=1)] == last).sum())
    return (
        f"Where each layer's input range peaks along the trajectory (uniform calibration): {thirds[0]} of {len(stats.layers)} layers in the first third, "
        f"{thirds[1]} in the middle, {thirds[2]} in the last ({at_end} at the very last step, t = 0). With the max calibrator those late peaks set the ranges."
    )


def figures(rows: list[dict], runners: dict[str, Runner], out: Path) -> dict[str, list[str]]:
    from qdiff.plots import calibration_figures, plot_step_errors

    made: dict[str, list[str]] = {}
    for model in runners:
        files = []
        for preset in PRESETS:
            series = {}
            for w in WINDOWS:
                r = _find(rows, model=model, preset=preset, calibrator="max", window=w, split=True, kind="qdiff")
                if r:
                    series[f"{w} window"] = r["steps"]
            off = _find(rows, model=model, preset=preset, calibrator="max", window="uniform", split=False, kind="qdiff")
            if off:
                series["uniform, no split"] = off["steps"]
            conv1 = _find(rows, model=model, preset=preset, calibrator="max", window="uniform", split=True, conv1=True, kind="qdiff")
            if conv1:
                series["uniform, split + conv1 split"] = conv1["steps"]
            if series:
                path = plot_step_errors(series, out / f"steps-{model}-{preset}.png", title=f"{model}, {preset} (max calibrator): noise-prediction error per step")
                files.append(path.name)
        stats = _find(rows, model=model, preset="w8a8", calibrator="max", window="uniform", split=True, kind="qdiff")
        if stats and stats.get("stats"):
            folder = out / f"calib-{model}"
            folder.mkdir(parents=True, exist_ok=True)
            files += [f"calib-{model}/{f['path']}" for f in calibration_figures(ROOT / stats["stats"], folder)]
        made[model] = files
    return made


def _rounded(obj: Any, digits: int = 6) -> Any:
    """Floats to `digits` significant digits: the per-step rows are most of the file."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def _row_minutes(rows: list[dict], runners: dict[str, Runner]) -> float:
    seconds = sum(sum(r["seconds"].values()) for r in rows)
    seconds += sum(r.reference_info.get("seconds", 0.0) or 0.0 for r in runners.values())
    return seconds / 60


def write_results(rows: list[dict], runners: dict[str, Runner], args: argparse.Namespace, wall: float, command: str) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(rows, runners, out)
    peer_missing = not any(r["kind"] == "peer" for r in rows)
    data = {
        "settings": {
            "design": args.design, "limits": args.limit, "num_images": args.num_images, "steps": args.steps, "sampler": "ddim", "seed": args.seed,
            "calibration": RUN_CALIBRATION, "windows": {k: list(v) for k, v in WINDOWS.items()}, "guidance": MODELS,
            "backend": "onnxruntime (CPU), FP32 and Q/DQ graphs", "command": command, "wall_seconds": round(wall, 1),
        },
        "reference": {m: r.reference_info.get("shape_fd") for m, r in runners.items()},
        "rows": [{k: v for k, v in r.items() if k != "plan_key"} for r in rows],
    }  # fmt: skip
    write_json_atomic(out / "ablations.json", _rounded(json.loads(json.dumps(data, default=float))))

    md = [
        "# Q-Diffusion's ablations on qdiff's shipped models",
        "",
        "Generated by `tools/ablations.py` (do not edit by hand; rerun it). Numbers: `ablations.json`.",
        "",
        "## Setup",
        "",
        f"- Models: `qdiff/models/shapes-ddpm` (unconditional) and `qdiff/models/shapes-cond` (class-conditional, guidance {MODELS['shapes-cond']}, classes cycled over the images).",
        f"- Sampling: DDIM, {args.steps} steps, {args.num_images} images (seeds {args.seed}..{args.seed + args.num_images - 1}), FP32 and quantized graphs both under ONNX Runtime on the CPU, same seeds.",
        f"- Calibration (as `qdiff run`): {RUN_CALIBRATION['num_timesteps']} timesteps x {RUN_CALIBRATION['samples_per_timestep']} trajectories of a {RUN_CALIBRATION['calibration_steps']}-step DDIM loop, spread uniformly over a window of the trajectory: uniform = all of it, first = the noisiest third (t near 999), middle, last = the third nearest t = 0.",
        "- Presets: w8a8 (INT8 weights per channel, max) and w4a8 (INT4-valued weights per channel, MSE clip); activations INT8 per tensor with the calibrator in the table; conv_in/conv_out float.",
        f"- Design: `{args.design}`. " + (design.__doc__.split("fractional:")[1].strip().replace("\n    ", " ") if args.design == "fractional" else "every combination."),
        f"- Metrics vs FP32 from the same seeds: mean PSNR/SSIM of the final images; mean relative L2 of the noise prediction per step (quantized model on the FP32 trajectory's inputs); shape-FD of the {args.num_images} quantized samples to 1000 real test images (classifier features; lower is better).",
        "- These are small samples (one seed set of "
        + f"{args.num_images} images): PSNR differences below ~1 dB and shape-FD differences below the FP32-vs-real spread are noise. The step rel-L2 averages over every image and step, and is the steadiest of the four.",
        f"- Time: the rows' stage times add up to {_row_minutes(rows, runners):.0f} min (2-core CPU shared with other work, load 2-7, so the same stage took 1x-4x as long at different times; calibration reuses the FP32 trajectory steps all configurations share, see `SharedTrajectoryDenoiser`). This invocation: {wall / 60:.1f} min (cached rows are not re-measured).",
        "",
        "Regenerate:",
        "",
        "```bash",
        command,
        "```",
        "",
    ]  # fmt: skip
    for model, runner in runners.items():
        ref = runner.reference_info.get("shape_fd") or {}
        measured = [r for r in rows if r["model"] == model and r["kind"] == "qdiff"]
        skipped = [c.id for c in design(args.design) if c.id not in {r["config"] for r in measured}]
        why = f"`--limit {model}={_limit(args.limit, model)}`: the first ones in the design's priority order; " if _limit(args.limit, model) is not None else ""
        md += [f"## {model}", "", f"{len(measured)} of the design's {len(design(args.design))} configurations measured" + (f" ({why}not measured: {', '.join(skipped)}. The entropy calibrator's amax search is the slowest stage, 5-9 min per configuration on this CPU)." if skipped else "."), ""]
        if ref.get("available"):
            md += [f"shape-FD at n={ref['n_generated']}: FP32 samples {_fmt(ref['fp32'])}, real train images {_fmt(ref['real_reference'])} (the floor at this n).", ""]
        stats_row = _find(rows, model=model, preset="w8a8", calibrator="max", window="uniform", split=True, kind="qdiff")
        if stats_row and stats_row.get("stats"):
            ratios = branch_ratios(ROOT / stats_row["stats"])
            md += [range_peaks(ROOT / stats_row["stats"]), ""]
            if ratios:
                md += [f"Split-shortcut layers: {len(ratios)}; range ratio of the two concat branches (larger amax / smaller, whole trajectory): {min(r for _, r in ratios):.1f}x to {max(r for _, r in ratios):.1f}x (Q-Diffusion reports up to ~200x on its models).", ""]
        table, cells = window_table(rows, model)
        md += ["### (i) Calibration window (split shortcut on)", "", table, "", *[f"- {line}" for line in window_verdict(cells)], ""]
        table, cells = split_table(rows, model)
        md += ["### (ii) Split shortcut (uniform window)", "", table, "", *[f"- {line}" for line in split_verdict(cells)], ""]
        table, cells = conv1_table(rows, model)
        if cells:
            md += ["### (iii) Splitting conv1 too (split shortcut on, uniform window)", "",
                   "Recipe `split_conv1`: the up-block resnets' conv1, which sees the skip concat after GroupNorm + SiLU, gets one activation and one weight quantizer per branch too (export: Slice -> two Convs -> Add). Off -> on:", "",
                   table, "", *[f"- {line}" for line in split_verdict(cells, "the conv1 split")], ""]  # fmt: skip
        peers = [r for r in rows if r["model"] == model and r["kind"] == "peer"]
        qdiff_default = _find(rows, model=model, preset="w8a8", calibrator="max", window="uniform", split=True, kind="qdiff")
        md += ["### Peer: ONNX Runtime static quantization (W8A8)", ""]
        if peers:
            body = [[f"{PEER_LABEL} ({p['calibrator']})", _fmt(p["mean_psnr"]), _fmt(p["mean_ssim"], 3), _fmt(p["mean_step_rel_l2"], 4), _fmt(p["shape_fd"])] for p in peers]
            if qdiff_default:
                body.insert(0, ["qdiff w8a8 (max, uniform, split)", _fmt(qdiff_default["mean_psnr"]), _fmt(qdiff_default["mean_ssim"], 3), _fmt(qdiff_default["mean_step_rel_l2"], 4), _fmt(qdiff_default["shape_fd"])])
            md += [markdown_table(["quantizer", "PSNR (dB)", "SSIM", "step rel-L2", "shape-FD"], body), "", "Same exported graph, same calibration denoiser calls (`qdiff.calib.trajectories`), same evaluation."]
            if (out / "peer-onnxruntime.md").is_file():
                md += ["All of ONNX Runtime's calibrators and a diagnosis of the gap (where ORT places its Q/DQ nodes): [peer-onnxruntime.md](peer-onnxruntime.md)."]
            md += [""]
        else:
            md += ["Not run: `qdiff.peers.onnxruntime_static` was not importable (hook: `Runner.run_peer` in tools/ablations.py).", ""]
        for f in figs.get(model, []):
            md += [f"![{f}]({f})", ""]
    md += ["## All rows", ""]
    md += [markdown_table(["model", "config", "PSNR (dB)", "min PSNR", "SSIM", "step rel-L2 mean", "max", "shape-FD", "seconds (reused stages count 0)"],
                          [[r["model"], r["config"], _fmt(r["mean_psnr"]), _fmt(r["min_psnr"]), _fmt(r["mean_ssim"], 3), _fmt(r["mean_step_rel_l2"], 4), _fmt(r["max_step_rel_l2"], 3), _fmt(r["shape_fd"]), sum(r["seconds"].values())] for r in rows]), ""]  # fmt: skip
    if peer_missing:
        md += ["(No peer rows.)", ""]
    discussion = out / "DISCUSSION.md"
    if discussion.is_file():
        md += [discussion.read_text(encoding="utf-8").strip(), ""]
    write_text_atomic(out / "README.md", "\n".join(md))


def _limit(specs: list[str], model: str) -> int | None:
    """`--limit 7` (every model) or `--limit shapes-cond=7`; the last matching one wins."""
    limit = None
    for spec in specs:
        name, _, count = spec.rpartition("=")
        if name in ("", model):
            limit = int(count)
    return limit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--design", choices=["fractional", "full"], default="fractional")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-methods", nargs="*", default=["minmax", "percentile"], help="ONNX Runtime calibrators for the peer rows (none: skip)")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "ablations", help="graphs, tables and the row cache")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--measure-one", action="store_true", help="time the default configuration of the first model and stop")
    p.add_argument("--limit", action="append", default=[], metavar="[MODEL=]N", help="run only the first N configurations of the design (most informative first), for every model or for MODEL (repeatable)")
    p.add_argument("--only", nargs="+", metavar="CONFIG", help="measure only these configuration ids (e.g. w8a8-max-uniform-split-conv1); the design's other rows are reported if cached, left out if not")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or ()) - {c.id for c in design(args.design)})
    if unknown:
        p.error(f"--only: {', '.join(unknown)} not in the {args.design} design")
    torch.set_num_threads(args.threads)
    command = " ".join([".venv/bin/python tools/ablations.py", *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()
    cache_path = args.work / "rows.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rows, runners = [], {}
    for model in args.models:
        print(f"{model}:", flush=True)
        runner = runners[model] = Runner(model, args, cache)
        configs = design(args.design)[: 1 if args.measure_one else _limit(args.limit, model)]
        for cfg in configs:
            if args.only and cfg.id not in args.only:
                if (row := runner._cached(f"{model}/{cfg.id}")) is not None:
                    rows.append(row)
                continue
            rows.append(runner.run_config(cfg))
        if args.measure_one:
            print(f"reference: {runner.reference_info}; one configuration: {rows[-1]['seconds']}")
            return 0
        for method in args.peer_methods:
            row = runner.run_peer(method)
            if row is None:
                print("  peer: qdiff.peers.onnxruntime_static not importable; no peer rows (see Runner.run_peer)")
                break
            rows.append(row)
    write_results(rows, runners, args, time.perf_counter() - started, command)
    print(f"wrote {args.out / 'README.md'} and {args.out / 'ablations.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
