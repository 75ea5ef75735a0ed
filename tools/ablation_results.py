"""Q-Diffusion's ablations through the evaluation harness, with intervals (issue 15, item 3).

tools/ablations.py measured these questions at 16 images and one seed set, through ONNX Runtime,
on the shipped models only: too few images to rank the variants (docs/results/DISCUSSION.md).
This tool asks the same questions of any model folder through `qdiff.eval_harness` (the PyTorch
fake-quant model, equal to the Q/DQ graph under ONNX Runtime, on `--device`; n images per seed
set, several seed sets, bootstrap intervals, differences paired over the same noise):

- (i) the calibration window: timesteps over the whole trajectory (the preset) against only its
  first (noisiest), middle or last third;
- (ii) split-shortcut quantization: on (the preset) against off;
- (iii) the activation calibrator: mse (the preset) against max, percentile and entropy;
- (iv) ours: the up-block resnets' conv1 split as well (`split_conv1`);
- the decomposition of the preset: weights-only and activations-only quantization.

Every variant is one calibration as `qdiff run` does it (10 timesteps x 32 trajectories of a
50-step DDIM loop) that differs from the preset (w8a8 / w4a8: mse, uniform, split shortcut on)
in exactly one recipe setting, with round-to-nearest weights; each is compared with the preset's
own row of the same harness run. Calibrations run in `--workers` processes on `--calib-device`;
the harness runs once per model and preset. Results are written as each harness run ends:
<out>/ablations.json, ablations.md, and the harness's own folders <out>/harness-<model>-<preset>/.

GPU (H200), per model (estimate from scenes-ddpm's harness: ~55 s per candidate at n = 1000,
11 candidates per preset):

    python3 tools/ablation_results.py --models .eval-models/scenes-ddpm --device cuda --calib-device cuda --images 1000 --seed-sets 3 --out docs/results/ablations-scenes-ddpm

CPU check of the whole path (numbers not meaningful):

    .venv/bin/python tools/ablation_results.py --smoke --out /tmp/ablation-smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from results_jobs import RUN_CALIBRATION, add_harness_arguments, calibrate_job, fmt_difference, fmt_interval, harness_settings, pool_map, shrink_harness_for_smoke, worker_threads

ROOT = Path(__file__).resolve().parents[1]
MODELS = (ROOT / "qdiff" / "models" / "shapes-ddpm", ROOT / "qdiff" / "models" / "shapes-cond")
PRESETS = ("w8a8", "w4a8")
# variant -> (question, the one recipe setting that differs from the preset)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "preset": ("-", {}),
    "window-first": ("window", {"timestep_window": (0.0, 1 / 3)}),
    "window-middle": ("window", {"timestep_window": (1 / 3, 2 / 3)}),
    "window-last": ("window", {"timestep_window": (2 / 3, 1.0)}),
    "no-split": ("split", {"split_shortcut": False}),
    "calib-max": ("calibrator", {"activation_calibrator": "max"}),
    "calib-percentile": ("calibrator", {"activation_calibrator": "percentile"}),
    "calib-entropy": ("calibrator", {"activation_calibrator": "entropy"}),
    "split-conv1": ("conv1", {"split_conv1": True}),
}
METRICS = ("step_rel_l2", "psnr", "ssim", "shape_fd", "class_accuracy")
LOWER_IS_BETTER = {"step_rel_l2", "shape_fd"}
SMOKE_CALIBRATION = {"num_timesteps": 3, "samples_per_timestep": 2, "calibration_steps": 6, "batch_size": 2}
SMOKE_VARIANTS = ("preset", "window-first", "no-split")


def verdict(comparison: dict[str, Any] | None, metric: str) -> str:
    """'better' / 'worse' than the preset where the paired interval excludes 0, else 'inside the noise'."""
    if not comparison:
        return "-"
    if not comparison.get("significant"):
        return "inside the noise"
    better = comparison["diff"] < 0 if metric in LOWER_IS_BETTER else comparison["diff"] > 0
    return "better than the preset" if better else "worse than the preset"


def decomposition_shares(rows: list[dict[str, Any]], model: str, preset: str) -> dict[str, float] | None:
    """Weights-only and activations-only step error as fractions of the fully quantized preset's:
    which side of the quantization the error comes from."""
    by = {r["variant"]: r["metrics"].get("step_rel_l2", {}).get("mean") for r in rows if r["model"] == model and r["preset"] == preset}
    full = by.get("preset")
    parts = {k: by.get(f"preset/{k}") for k in ("weights-only", "activations-only")}
    if not full or any(v is None for v in parts.values()):
        return None
    return {k: v / full for k, v in parts.items()}


def write_report(rows: list[dict[str, Any]], out: Path, settings: dict[str, Any]) -> None:
    from qdiff.core.artifacts import write_json_atomic, write_text_atomic
    from qdiff.report import markdown_table

    write_json_atomic(out / "ablations.json", {"settings": settings, "rows": rows})
    md = [
        "# Q-Diffusion's ablations through the evaluation harness",
        "",
        f"Made by `python3 tools/ablation_results.py {settings['argv']}` on {settings['device']} (calibration on {settings['calib_device']}); harness: {settings['harness']}.",
        f"Calibration: {settings['calibration']}; round-to-nearest weights. Each variant differs from its preset (mse calibrator, uniform window, split shortcut on) in one recipe setting.",
        "",
        "mean [95% bootstrap interval]; 'vs preset' = variant - preset, paired over the same noise (* = the interval excludes 0). "
        "The intervals cover image sampling, not calibration-to-calibration noise (one calibration per variant).",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        fp32 = next(r["fp32"] for r in rows if r["model"] == model)
        md += [f"## {model}", ""]
        if fp32:
            floor = f"; real-vs-real shape-FD at the same n {fp32['real_floor_shape_fd']:.4g}" if "real_floor_shape_fd" in fp32 else ""
            md += ["FP32: " + ", ".join(f"{k} {fmt_interval(v, '.4g')}" for k, v in fp32.items() if isinstance(v, dict) and "ci95" in v) + floor, ""]
        table = []
        for r in (r for r in rows if r["model"] == model):
            cells = [r["preset"], r["variant"], r["question"]]
            cells += [fmt_interval(r["metrics"].get(m), ".4g") for m in ("step_rel_l2", "psnr", "shape_fd")]
            cells += [fmt_difference(r["vs_preset"].get(m), ".4g") if r["vs_preset"] else "-" for m in ("step_rel_l2", "psnr")]
            table.append(cells)
        md += [markdown_table(["preset", "variant", "question", "step rel-L2", "PSNR dB", "shape-FD", "step rel-L2 vs preset", "PSNR vs preset"], table), ""]
        lines = [f"- {r['preset']} {r['variant']} ({r['question']}): step error {verdict(r['vs_preset'].get('step_rel_l2'), 'step_rel_l2')}, PSNR {verdict(r['vs_preset'].get('psnr'), 'psnr')}"
                 for r in rows if r["model"] == model and r["vs_preset"] and r["question"] != "decomposition"]
        md += ["What the intervals say (the primary metric is the per-step error):", "", *lines, ""]
        for preset in dict.fromkeys(r["preset"] for r in rows if r["model"] == model):
            share = decomposition_shares(rows, model, preset)
            if share:
                md += [f"- {preset} decomposition: weights-only quantization has {share['weights-only']:.0%} of the preset's step error, activations-only {share['activations-only']:.0%}."]
        md += [""]
    md += ["## Timing", ""] + [f"- {line}" for line in settings.get("timing", [])]
    write_text_atomic(out / "ablations.md", "\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, default=list(MODELS), help="diffusers model folders (default: the two shipped shapes models)")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="(default: all; 'preset' is always run, as the baseline)")
    parser.add_argument("--no-decomposition", action="store_true", help="skip the preset's weights-only and activations-only rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the harness runs")
    parser.add_argument("--calib-device", default="cpu", help="where the calibrations run (cpu, cuda, cuda:N)")
    add_harness_arguments(parser, seed_sets=3)
    parser.add_argument("--workers", type=int, default=8, help="calibration processes (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "ablations-harness")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qdiff-ablations"))
    parser.add_argument("--smoke", action="store_true", help="tiny settings on the CPU: checks the whole path, numbers not meaningful")
    args = parser.parse_args(argv)
    names = [m.name for m in args.models]
    if len(set(names)) != len(names):  # tables, work folders and harness folders are named by it
        parser.error(f"--models: two folders share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); give each model folder its own name")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("QDIFF_QUIET", "1")
    calibration = dict(SMOKE_CALIBRATION if args.smoke else RUN_CALIBRATION)
    if args.smoke:
        args.device, args.calib_device, args.models, args.presets, args.workers = "cpu", "cpu", args.models[:1], args.presets[:1], 1
        args.variants = [v for v in args.variants if v in SMOKE_VARIANTS]
        shrink_harness_for_smoke(args)
    variants = ["preset", *[v for v in args.variants if v != "preset"]]
    from qdiff.eval_harness import decomposition_candidates, fake_quant_candidate, run_harness

    harness = harness_settings(args, shape_fd=not args.smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timing: list[str] = []
    settings = {"argv": " ".join(argv if argv is not None else sys.argv[1:]), "device": args.device, "calib_device": args.calib_device, "calibration": calibration,
                "harness": f"{args.seed_sets} seed set(s) x {args.images} images, {args.steps} DDIM steps, step error on {args.step_images} per set", "timing": timing}
    threads = worker_threads(args.workers)
    device_option = {"device": args.calib_device} if args.calib_device != "cpu" else {}
    jobs = [{"model": str(m), "label": v, "preset": p, "calibration": calibration, "options": {**VARIANTS[v][1], **device_option}, "threads": threads,
             "out": str(args.work / m.name / f"{p}-{v}")} for m in args.models for p in args.presets for v in variants]
    tables = {(Path(j["model"]).name, j["preset"], j["label"]): j["table"] for j in pool_map(calibrate_job, jobs, args.workers, "calibrate")}
    timing.append(f"calibration: {len(jobs)} tables in {time.perf_counter() - started:.0f} s ({args.calib_device}, {args.workers} processes)")
    print(timing[-1], flush=True)
    rows: list[dict[str, Any]] = []
    for model in args.models:
        for preset in args.presets:
            t0 = time.perf_counter()
            base = f"{preset}/preset"
            candidates = decomposition_candidates(base, tables[(model.name, preset, "preset")], meta={"variant": "preset"}) if not args.no_decomposition else [
                fake_quant_candidate(base, tables[(model.name, preset, "preset")], meta={"variant": "preset"})]
            candidates += [fake_quant_candidate(f"{preset}/{v}", tables[(model.name, preset, v)], meta={"variant": v}) for v in variants[1:]]
            result = run_harness(model, candidates, harness, baseline=base, out_dir=args.out / f"harness-{model.name}-{preset}")
            for cand in candidates:
                variant = cand.label.split("/", 1)[1]
                question = VARIANTS[variant][0] if variant in VARIANTS else "decomposition"
                rows.append({"model": model.name, "model_path": str(model), "preset": preset, "variant": variant, "question": question,
                             "metrics": {m: v for m, v in result.rows[cand.label]["metrics"].items() if m in METRICS},
                             "vs_preset": {m: v for m, v in result.comparisons.get(cand.label, {}).items() if m in METRICS},
                             "fp32": {m: v for m, v in (result.fp32 or {}).items() if m in METRICS or m == "real_floor_shape_fd"}})
            timing.append(f"harness {model.name} {preset}: {len(candidates)} candidates in {time.perf_counter() - t0:.0f} s")
            print(timing[-1], flush=True)
            write_report(rows, args.out, settings)
    timing.append(f"total {time.perf_counter() - started:.0f} s")
    write_report(rows, args.out, settings)
    print(f"wrote {args.out / 'ablations.md'} in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
