"""Weight reconstruction on the shipped models: round-to-nearest vs AdaRound-BRECQ vs FBR.

For each shipped shapes model (shapes-ddpm, shapes-cond) and preset (w4a8, w8a8), with the mse
activation calibrator and split shortcut on (the presets), calibration as `qdiff run` does it
(10 timesteps x 32 trajectories of a 50-step DDIM loop), then:

- rtn: the table's round-to-nearest weights;
- adaround-brecq and fbr, each with learned activation steps off and on.

Each configuration is measured with the PyTorch fake-quant reference (the function the Q/DQ
graph computes, see tests/test_reconstruction.py) against the FP32 UNet, both on the GPU when
there is one: n images (DDIM, 50 steps, seeds 0..n-1, guidance 3.0 for the class model) give
mean PSNR/SSIM vs FP32 with bootstrap 95% intervals, shape-FD to 1000 real test images (with
a bootstrap interval over the generated images), and the per-step noise-prediction relative L2
on the FP32 trajectory of the first `--step-images` images. Reconstruction wall time is per
configuration, with all reconstructions running at once in `--workers` processes on one GPU.

Writes docs/results/reconstruction.json and reconstruction.md. Regenerate (H200, one command):

    python3 tools/reconstruction_results.py --device cuda --images 1000 --iterations 400

CPU check at tiny settings (minutes on 2 cores; numbers not meaningful):

    .venv/bin/python tools/reconstruction_results.py --smoke --out /tmp/recon-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("shapes-ddpm", "shapes-cond")
PRESETS = ("w4a8", "w8a8")
# (label, method, learned activation steps)
CONFIGS = (("rtn", None, False), ("adaround-brecq", "adaround-brecq", False), ("adaround-brecq+lsq", "adaround-brecq", True), ("fbr-no-lsq", "fbr", False), ("fbr", "fbr", True))
PAPER_ITERATIONS = {"adaround-brecq": 20000, "fbr": 5000}
RUN_CALIBRATION = {"num_timesteps": 10, "samples_per_timestep": 32, "calibration_steps": 50, "batch_size": 32}
SMOKE_CALIBRATION = {"num_timesteps": 2, "samples_per_timestep": 4, "calibration_steps": 4, "batch_size": 4}


def model_dir(name: str) -> Path:
    return ROOT / "qdiff" / "models" / name


def calibrate_one(job: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("QDIFF_QUIET", "1")
    torch.set_num_threads(job["threads"])
    from qdiff.api import calibrate

    started = time.perf_counter()
    res = calibrate(model_dir(job["model"]), job["out"], job["preset"], activation_calibrator="mse", timestep_stats=False, **job["calibration"])
    return {**job, "table": str(res.table_path), "calibrate_seconds": round(time.perf_counter() - started, 1)}


def reconstruct_one(job: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("QDIFF_QUIET", "1")
    torch.set_num_threads(job["threads"])
    from qdiff.api import reconstruct
    from qdiff.calib.reconstruct.settings import ReconstructionSettings

    settings = ReconstructionSettings(method=job["method"], iterations=job["iterations"], batch_size=job["batch"], learn_activation_steps=job["lsq"], device=job["device"])
    started = time.perf_counter()
    res = reconstruct(model_dir(job["model"]), job["out"], job["table"], settings)
    units = res.units
    return {
        **job,
        "weights": str(res.weights_path),
        "recon_table": str(res.table_path),
        "reconstruct_seconds": round(time.perf_counter() - started, 1),
        "units": len(units),
        "units_better_than_rtn": sum(u["error"] < u["rtn_error"] for u in units),
        "unit_error_ratio_mean": float(np.mean([u["error"] / max(u["rtn_error"], 1e-30) for u in units])),
        "settings": settings.resolved().to_json(),
    }


class _OnDevice:
    """A TorchDenoiser whose inputs (and conditioning) are moved to the model's device."""

    def __init__(self, unet: torch.nn.Module, device: str) -> None:
        from qdiff.runtime.backends import TorchDenoiser

        self.device = torch.device(device)
        self.inner = TorchDenoiser(unet.to(self.device).eval())

    def __call__(self, sample, timestep, encoder_hidden_states=None, **added):
        move = lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return self.inner(move(sample), move(timestep), move(encoder_hidden_states), **{k: move(v) for k, v in added.items()})


def _bootstrap(values: np.ndarray, rng: np.random.Generator, reps: int = 1000) -> list[float]:
    means = values[rng.integers(0, len(values), (reps, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _fd_with_interval(images: list[np.ndarray], rng: np.random.Generator, reps: int) -> dict[str, Any]:
    from qdiff.datasets import shape_classifier as sc
    from qdiff.datasets.shape_fd import _real_features, load_classifier

    feats = sc.features(load_classifier(), np.stack(images))
    real = _real_features("test", 1000)
    fd = sc.frechet_distance(feats, real)
    boots = [sc.frechet_distance(feats[rng.integers(0, len(feats), len(feats))], real) for _ in range(reps)]
    return {"shape_fd": float(fd), "shape_fd_ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}


def evaluate_model(model: str, rows: list[dict[str, Any]], args: argparse.Namespace, on_row=None) -> list[dict[str, Any]]:
    """Sample FP32 and every configuration of one model on `args.device`; fill in the metrics.

    `on_row(rows_so_far)` is called after each configuration, so a run cut off by a time limit
    still leaves every configuration it finished on disk."""
    from qdiff.api import generate, step_errors
    from qdiff.calib.fake_quant import build_fake_quant_model
    from qdiff.calib.reconstruct.artifact import ReconstructedWeights
    from qdiff.calib.table import CalibrationTable
    from qdiff.datasets.shape_fd import real_reference
    from qdiff.evaluate import sampling_plan
    from qdiff.core.metrics import psnr, ssim
    from qdiff.models import load_model

    bundle = load_model(model_dir(model))
    plan = sampling_plan(bundle, steps=args.steps, num_images=args.images, guidance_scale=3.0)
    kw = {"scheduler": plan.scheduler, "steps": plan.steps, "conditioning": plan.conditioning, "guidance_scale": plan.guidance_scale}
    seeds = list(plan.seeds)
    step_plan = sampling_plan(bundle, steps=args.steps, num_images=args.step_images, guidance_scale=3.0)
    step_kw = {**kw, "conditioning": step_plan.conditioning}
    fp = _OnDevice(bundle.unet, args.device)
    started = time.perf_counter()
    reference = generate(bundle, fp, seeds=seeds, desc=f"{model} fp32", **kw)
    ref_steps = generate(bundle, fp, seeds=seeds[: args.step_images], record_steps=True, desc=f"{model} fp32 steps", **step_kw).steps
    rng = np.random.default_rng(0)
    fp_fd = _fd_with_interval(reference.images, rng, args.fd_bootstrap)
    header = {"model": model, "fp32": {**fp_fd, "seconds": round(time.perf_counter() - started, 1)}, "real_floor_shape_fd": float(real_reference(len(seeds)))}
    bundle.unet.to("cpu")
    out = []
    for row in rows:
        started = time.perf_counter()
        table = CalibrationTable.load(row.get("recon_table", row["table"]))
        weights = ReconstructedWeights.load(row["weights"]) if "weights" in row else None
        quant = _OnDevice(build_fake_quant_model(bundle.unet, table, weights=weights), args.device)
        got = generate(bundle, quant, seeds=seeds, desc=f"{model} {row['preset']} {row['label']}", **kw)
        per_step = step_errors(ref_steps, quant)
        p = np.array([psnr(a, b) for a, b in zip(reference.images, got.images)])
        s = np.array([ssim(a, b) for a, b in zip(reference.images, got.images)])
        p_finite = np.where(np.isfinite(p), p, 100.0)  # identical images: PSNR inf, counted as 100 dB
        rel = np.array([r["rel_l2"] for r in per_step])
        out.append({
            **{k: v for k, v in row.items() if k not in ("out", "threads")},
            "n": len(seeds),
            "psnr": float(p_finite.mean()), "psnr_ci95": _bootstrap(p_finite, rng),
            "ssim": float(s.mean()), "ssim_ci95": _bootstrap(s, rng),
            "step_rel_l2_mean": float(rel.mean()), "step_rel_l2_max": float(rel.max()), "step_images": args.step_images,
            **_fd_with_interval(got.images, rng, args.fd_bootstrap),
            "eval_seconds": round(time.perf_counter() - started, 1),
        })
        print(f"evaluated {model} {row['preset']} {row['label']}: step rel-L2 {out[-1]['step_rel_l2_mean']:.4f}, PSNR {out[-1]['psnr']:.2f} dB", flush=True)
        if on_row is not None:
            on_row([header] + out)
        del quant
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return [header] + out


def to_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Weight reconstruction on the shipped models",
        "",
        "Generated by `tools/reconstruction_results.py` (do not edit by hand; rerun it). Numbers: `reconstruction.json`.",
        "",
        "## Setup",
        "",
        *([] if meta.get("complete", True) else ["**Partial: the run stopped before every configuration was evaluated; the rows below are the ones it finished.**", ""]),
        f"- Device: {meta['device']} ({meta['gpu']}); torch {meta['torch']}. Total wall time {meta['wall_seconds']} s.",
        f"- Calibration: mse activation calibrator, split shortcut on, {meta['calibration']}.",
        f"- Reconstruction: {meta['iterations']} iterations per unit for both methods (papers: AdaRound-BRECQ {PAPER_ITERATIONS['adaround-brecq']}, FBR {PAPER_ITERATIONS['fbr']}), batch {meta['batch']}; "
        f"{meta['workers']} reconstructions at once on one device, so each time below is a share of the device, not a solo time.",
        f"- Evaluation: PyTorch fake-quant reference (equal to the Q/DQ graph under ONNX Runtime) vs FP32 on the same seeds, DDIM {meta['steps']} steps, n = {meta['images']} images; "
        f"step rel-L2 on the FP32 trajectories of the first {meta['step_images']} images; shape-FD to 1000 real test images. [a, b] = bootstrap 95% interval.",
        "",
        "Regenerate:",
        "",
        "```bash",
        meta["command"],
        "```",
    ]
    for block in result["models"]:
        head = block["rows"][0]
        lines += ["", f"## {head['model']}", "", f"FP32 shape-FD {head['fp32']['shape_fd']:.2f} [{head['fp32']['shape_fd_ci95'][0]:.2f}, {head['fp32']['shape_fd_ci95'][1]:.2f}]; real train images at the same n: {head['real_floor_shape_fd']:.2f}.", ""]
        lines += ["| preset | method | PSNR dB | SSIM | step rel-L2 mean / max | shape-FD | units better than RTN | unit error / RTN | reconstruction s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in block["rows"][1:]:
            units = f"{r['units_better_than_rtn']}/{r['units']}" if "units" in r else "-"
            ratio = f"{r['unit_error_ratio_mean']:.3f}" if "units" in r else "-"
            secs = f"{r['reconstruct_seconds']}" if "reconstruct_seconds" in r else "-"
            lines.append(
                f"| {r['preset']} | {r['label']} | {r['psnr']:.2f} [{r['psnr_ci95'][0]:.2f}, {r['psnr_ci95'][1]:.2f}] | {r['ssim']:.3f} [{r['ssim_ci95'][0]:.3f}, {r['ssim_ci95'][1]:.3f}] | "
                f"{r['step_rel_l2_mean']:.4f} / {r['step_rel_l2_max']:.3f} | {r['shape_fd']:.2f} [{r['shape_fd_ci95'][0]:.2f}, {r['shape_fd_ci95'][1]:.2f}] | {units} | {ratio} | {secs} |"
            )
    lines += ["", "Targets (issue 13) on shapes-ddpm W4A8: step rel-L2 <= 0.035, PSNR >= 24 dB, shape-FD within 1.25x of FP32's; W8A8 no worse than round-to-nearest.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--iterations", type=int, default=400, help="iterations per unit, both methods (default: %(default)s; papers: 20000 / 5000)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--step-images", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--fd-bootstrap", type=int, default=200)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--work", type=Path, default=Path("/tmp/qdiff-recon-work"))
    p.add_argument("--smoke", action="store_true", help="tiny settings for a CPU check of the whole script")
    args = p.parse_args(argv)
    calibration = RUN_CALIBRATION
    if args.smoke:
        args.iterations, args.batch, args.images, args.step_images, args.steps, args.fd_bootstrap, args.workers = 5, 4, 8, 2, 4, 5, 2
        calibration = SMOKE_CALIBRATION
    started = time.perf_counter()
    threads = max(1, (os.cpu_count() or 2) // max(1, args.workers))
    cal_jobs = [{"model": m, "preset": pr, "out": str(args.work / m / pr), "calibration": calibration, "threads": threads} for m in args.models for pr in args.presets]
    with ProcessPoolExecutor(max_workers=min(args.workers, len(cal_jobs)), mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        calibrated = list(pool.map(calibrate_one, cal_jobs))
    print(f"calibrated {len(calibrated)} tables in {time.perf_counter() - started:.0f} s", flush=True)
    rec_jobs = []
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in args.models}
    for c in calibrated:
        for label, method, lsq in CONFIGS:
            row = {**c, "label": label}
            if method is None:
                rows[c["model"]].append(row)
            else:
                rec_jobs.append({**row, "method": method, "lsq": lsq, "iterations": args.iterations, "batch": args.batch, "device": args.device, "out": str(Path(c["out"]) / label)})
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        for done in pool.map(reconstruct_one, rec_jobs):
            rows[done["model"]].append(done)
            print(f"reconstructed {done['model']} {done['preset']} {done['label']} in {done['reconstruct_seconds']} s ({done['units_better_than_rtn']}/{done['units']} units below RTN)", flush=True)
    order = {label: i for i, (label, _, _) in enumerate(CONFIGS)}
    command = "python3 tools/reconstruction_results.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    models: list[dict[str, Any]] = []

    def write(partial: dict[str, Any] | None = None) -> dict[str, Any]:
        meta = {
            "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "none", "torch": torch.__version__,
            "calibration": calibration, "iterations": args.iterations, "paper_iterations": PAPER_ITERATIONS, "batch": args.batch, "workers": args.workers,
            "images": args.images, "step_images": args.step_images, "steps": args.steps, "wall_seconds": round(time.perf_counter() - started, 1), "command": command.strip(), "smoke": args.smoke,
            "complete": partial is None,
        }
        result = {"meta": meta, "models": models + ([partial] if partial else [])}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "reconstruction.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "reconstruction.md").write_text(to_markdown(result))
        return meta

    for m in args.models:
        ordered = sorted(rows[m], key=lambda r: (r["preset"], order[r["label"]]))
        models.append({"model": m, "rows": evaluate_model(m, ordered, args, on_row=lambda so_far, m=m: write({"model": m, "rows": so_far}))})
        print(f"evaluated {m} at {time.perf_counter() - started:.0f} s", flush=True)
    meta = write()
    print(f"wrote {args.out / 'reconstruction.md'} in {meta['wall_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
