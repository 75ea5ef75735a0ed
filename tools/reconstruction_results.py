"""Weight reconstruction on the shipped models: round-to-nearest vs AdaRound-BRECQ vs FBR.

For each shipped shapes model (shapes-ddpm, shapes-cond) and preset (w4a8, w8a8), with the mse
activation calibrator and split shortcut on (the presets), calibration as `qdiff run` does it
(10 timesteps x 32 trajectories of a 50-step DDIM loop), then:

- rtn: the table's round-to-nearest weights;
- adaround-brecq and fbr, each with learned activation steps off and on.

Each configuration is measured by the evaluation harness (`qdiff.eval_harness`) with the
PyTorch fake-quant reference (the function the Q/DQ graph computes, see
tests/test_reconstruction.py) against the FP32 UNet, both on the GPU when there is one: n images
per seed set (DDIM, 50 steps, seeds 0..n-1, ..., guidance 3.0 for the class model) give
mean PSNR/SSIM vs FP32 with bootstrap 95% intervals, shape-FD to 1000 real test images (with
a bootstrap interval over the generated images), and the per-step noise-prediction relative L2
on the FP32 trajectory of the first `--step-images` images. Reconstruction wall time is per
configuration, with all reconstructions running at once in `--workers` processes on one GPU.

Writes docs/results/reconstruction.json and reconstruction.md. Regenerate (H200, one command):

    python3 tools/reconstruction_results.py --device cuda --images 1000 --iterations 1500 --workers 4

(1500 iterations x 24 units: ~250-300 s per configuration, four at once on one H200.)

CPU check at tiny settings (minutes on 2 cores; numbers not meaningful):

    .venv/bin/python tools/reconstruction_results.py --smoke --out /tmp/recon-smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from results_jobs import RUN_CALIBRATION, calibrate_job, model_dir, pool_map, reconstruct_job, worker_threads

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("shapes-ddpm", "shapes-cond")
PRESETS = ("w4a8", "w8a8")
# (label, method, learned activation steps)
CONFIGS = (("rtn", None, False), ("adaround-brecq", "adaround-brecq", False), ("adaround-brecq+lsq", "adaround-brecq", True), ("fbr-no-lsq", "fbr", False), ("fbr", "fbr", True))
PAPER_ITERATIONS = {"adaround-brecq": 20000, "fbr": 5000}
SMOKE_CALIBRATION = {"num_timesteps": 2, "samples_per_timestep": 4, "calibration_steps": 4, "batch_size": 4}


def _row_from_harness(row: dict[str, Any], got: dict[str, Any], step_images: int) -> dict[str, Any]:
    """A harness row in this report's flat fields (PSNR/SSIM/step/FD with their intervals)."""
    m = got["metrics"]
    out = {
        **{k: v for k, v in row.items() if k not in ("out", "threads")},
        "psnr": m["psnr"]["mean"], "psnr_ci95": m["psnr"]["ci95"],
        "ssim": m["ssim"]["mean"], "ssim_ci95": m["ssim"]["ci95"],
        "step_rel_l2_mean": m["step_rel_l2"]["mean"], "step_rel_l2_ci95": m["step_rel_l2"]["ci95"],
        "step_rel_l2_max": max(r["rel_l2"] for r in got["step_curve"]), "step_images": step_images,
        "eval_seconds": got["seconds"],
    }
    if "shape_fd" in m:
        out.update({"shape_fd": m["shape_fd"]["mean"], "shape_fd_ci95": m["shape_fd"]["ci95"]})
    return out


def evaluate_model(model: str, rows: list[dict[str, Any]], args: argparse.Namespace, on_row=None) -> list[dict[str, Any]]:
    """Every configuration of one model through the evaluation harness (`qdiff.eval_harness`) on
    `args.device`: FP32 sampled once per seed set, each configuration from the same noise.

    `on_row(rows_so_far)` is called after each configuration, so a run cut off by a time limit
    still leaves every configuration it finished on disk (the harness's own harness.json/.md for
    the model go to <out>/harness-<model>/)."""
    from qdiff.eval_harness import HarnessSettings, fake_quant_candidate, run_harness

    settings = HarnessSettings(images=args.images, seed_sets=args.seed_sets, steps=args.steps, step_images=args.step_images, device=args.device,
                               batch_size=args.eval_batch, bootstrap=args.fd_bootstrap)  # fmt: skip
    labels = [f"{r['preset']} {r['label']}" for r in rows]
    candidates = [fake_quant_candidate(lab, r.get("recon_table", r["table"]), weights=r.get("weights"), meta={"preset": r["preset"], "method": r["label"]}) for lab, r in zip(labels, rows)]

    def convert(result) -> list[dict[str, Any]]:
        fp = result.fp32
        header = {"model": model, "n": args.images * args.seed_sets, "fp32": {"seconds": fp.get("seconds")}}
        if "shape_fd" in fp:
            header["fp32"].update({"shape_fd": fp["shape_fd"]["mean"], "shape_fd_ci95": fp["shape_fd"]["ci95"]})
            header["real_floor_shape_fd"] = fp["real_floor_shape_fd"]
        return [header] + [_row_from_harness(r, result.rows[lab], args.step_images) for lab, r in zip(labels, rows) if lab in result.rows]

    def progress(result) -> None:
        if on_row is not None and result.rows:
            on_row(convert(result))

    result = run_harness(model_dir(model), candidates, settings, out_dir=args.out / f"harness-{model}", on_result=progress)
    return convert(result)


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
        f"- Evaluation (`qdiff.eval_harness`, docs/evaluation.md): PyTorch fake-quant reference (equal to the Q/DQ graph under ONNX Runtime) vs FP32 from the same noise, DDIM {meta['steps']} steps, "
        f"{meta.get('seed_sets', 1)} seed set(s) x {meta['images']} images; step rel-L2 on the FP32 trajectories of the first {meta['step_images']} images of each set; shape-FD to 1000 real test images. "
        "[a, b] = bootstrap 95% interval; paired differences per model in harness-<model>/harness.md.",
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
                f"{r['step_rel_l2_mean']:.4f} [{r['step_rel_l2_ci95'][0]:.4f}, {r['step_rel_l2_ci95'][1]:.4f}] / {r['step_rel_l2_max']:.3f} | {r['shape_fd']:.2f} [{r['shape_fd_ci95'][0]:.2f}, {r['shape_fd_ci95'][1]:.2f}] | {units} | {ratio} | {secs} |"
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
    p.add_argument("--fd-bootstrap", type=int, default=1000, help="bootstrap replicates of every interval (default: %(default)s)")
    p.add_argument("--seed-sets", type=int, default=1, help="disjoint seed sets of --images each (default: %(default)s)")
    p.add_argument("--eval-batch", type=int, default=250, help="images per UNet call in the evaluation (default: %(default)s)")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--work", type=Path, default=Path("/tmp/qdiff-recon-work"))
    p.add_argument("--smoke", action="store_true", help="tiny settings for a CPU check of the whole script")
    args = p.parse_args(argv)
    calibration = RUN_CALIBRATION
    if args.smoke:
        args.iterations, args.batch, args.images, args.step_images, args.steps, args.fd_bootstrap, args.workers, args.eval_batch = 5, 4, 8, 2, 4, 20, 2, 8
        calibration = SMOKE_CALIBRATION
    started = time.perf_counter()
    threads = worker_threads(args.workers)
    cal_jobs = [{"model": m, "preset": pr, "out": str(args.work / m / pr), "calibration": calibration, "options": {"activation_calibrator": "mse"}, "threads": threads}
                for m in args.models for pr in args.presets]
    calibrated = pool_map(calibrate_job, cal_jobs, args.workers, "calibrate")
    rec_jobs = []
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in args.models}
    for c in calibrated:
        for label, method, lsq in CONFIGS:
            row = {**c, "label": label}
            if method is None:
                rows[c["model"]].append(row)
            else:
                rec_jobs.append({**row, "method": method, "lsq": lsq, "iterations": args.iterations, "batch": args.batch, "device": args.device, "out": str(Path(c["out"]) / label)})
    for done in pool_map(reconstruct_job, rec_jobs, args.workers, "reconstruct"):
        rows[done["model"]].append(done)
        print(f"reconstructed {done['model']} {done['preset']} {done['label']}: {done['units_better_than_rtn']}/{done['units']} units below RTN", flush=True)
    order = {label: i for i, (label, _, _) in enumerate(CONFIGS)}
    command = "python3 tools/reconstruction_results.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    models: list[dict[str, Any]] = []

    def write(partial: dict[str, Any] | None = None) -> dict[str, Any]:
        meta = {
            "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "none", "torch": torch.__version__,
            "calibration": calibration, "iterations": args.iterations, "paper_iterations": PAPER_ITERATIONS, "batch": args.batch, "workers": args.workers,
            "images": args.images, "seed_sets": args.seed_sets, "step_images": args.step_images, "steps": args.steps, "wall_seconds": round(time.perf_counter() - started, 1), "command": command.strip(), "smoke": args.smoke,
            "complete": partial is None,
        }
        result = {"meta": meta, "models": models + ([partial] if partial else [])}
        from qdiff.core.artifacts import write_json_atomic, write_text_atomic

        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / "reconstruction.json", result)
        write_text_atomic(args.out / "reconstruction.md", to_markdown(result))
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
