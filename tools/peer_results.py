"""The peer quantizers through the evaluation harness, with intervals (issue 15, item 3).

tools/peer_modelopt.py and tools/peer_onnxruntime.py measured NVIDIA ModelOpt's INT8 recipe and
ONNX Runtime's `quantize_static` against qdiff at 8 images, on the shipped models, through ONNX
Runtime on a CPU. This tool asks the same question of any model folder at the harness's n, with
bootstrap intervals and differences paired over the same noise:

- qdiff W8A8 (the preset: mse calibrator, split shortcut), its PyTorch fake-quant model;
- the same qdiff table placed on ModelOpt's INT8 layers only (ModelOpt keeps conv_in/conv_out,
  the 1x1 residual shortcuts and the timestep MLPs float): the quantizers on equal layers;
- ModelOpt's recipe (SmoothQuant 0.8 on Linear inputs, the example's per-step min-mean
  calibrator on Conv inputs) and ModelOpt with the library's MaxCalibrator on Conv inputs, as
  ModelOpt's calibrated PyTorch modules (`qdiff.peers.candidates`), on the calls qdiff's
  calibration observes;
- with `--ort-methods`: ONNX Runtime's quantizer per calibration method. It exists only as a
  graph, run by ONNX Runtime on the CPU, so these rows form a second harness run at
  `--ort-images` images with qdiff's own Q/DQ graph (also under ONNX Runtime) as their baseline.

Every row is compared with qdiff's row of the same harness run. Reports: <out>/peers.json,
peers.md, and the harness folders <out>/harness-<model>[-ort]/.

GPU (H200), per model (~30-50 s per PyTorch candidate at n = 1000; the ORT rows run on the CPU):

    python3 tools/peer_results.py --models .eval-models/scenes-cond --device cuda --calib-device cuda --seed-sets 1 --out OUT

CPU check of the whole path (numbers not meaningful):

    .venv/bin/python tools/peer_results.py --smoke --ort-methods minmax --out /tmp/peer-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from results_jobs import RUN_CALIBRATION, add_harness_arguments, fmt_difference, fmt_interval, harness_settings, shrink_harness_for_smoke

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = (ROOT / "qdiff" / "models" / "shapes-ddpm", ROOT / "qdiff" / "models" / "shapes-cond")
MODELOPT_VARIANTS = {
    "modelopt": ("ModelOpt INT8 recipe (SmoothQuant 0.8, Conv inputs min-mean)", {}),
    "modelopt-maxcal": ("ModelOpt INT8, Conv inputs by the library's MaxCalibrator", {"conv_calibrator": "max"}),
}
QDIFF = "qdiff"
QDIFF_ON_MODELOPT_LAYERS = "qdiff-on-modelopt-layers"
DESCRIPTIONS = {QDIFF: "qdiff W8A8 (mse, split shortcut)", QDIFF_ON_MODELOPT_LAYERS: "qdiff's table on ModelOpt's INT8 layers (its float layers excluded)",
                **{k: v[0] for k, v in MODELOPT_VARIANTS.items()}, "qdiff-graph": "qdiff W8A8 Q/DQ graph under ONNX Runtime (baseline of the ORT rows)"}
METRICS = ("step_rel_l2", "psnr", "ssim", "shape_fd", "class_accuracy")
SMOKE_CALIBRATION = {"num_timesteps": 2, "samples_per_timestep": 2, "calibration_steps": 4, "batch_size": 2}


def rows_of(result, model: str, run: str, descriptions: dict[str, str]) -> list[dict[str, Any]]:
    """One row per candidate of a harness result: its metrics and its paired difference to the baseline."""
    return [{"model": model, "run": run, "candidate": label, "description": descriptions.get(label, label),
             "metrics": {m: v for m, v in row["metrics"].items() if m in METRICS},
             "vs_baseline": {m: v for m, v in result.comparisons.get(label, {}).items() if m in METRICS},
             "baseline": result.baseline, "layers": row["meta"].get("layers"), "seconds": row["seconds"],
             "fp32": {m: v for m, v in (result.fp32 or {}).items() if m in METRICS or m == "real_floor_shape_fd"},
             "n": result.settings["images"], "seed_sets": result.settings["seed_sets"]}
            for label, row in result.rows.items()]


def write_report(rows: list[dict[str, Any]], out: Path, settings: dict[str, Any]) -> None:
    from qdiff.core.artifacts import write_json_atomic, write_text_atomic
    from qdiff.report import markdown_table

    write_json_atomic(out / "peers.json", {"settings": settings, "rows": rows})
    md = ["# Peer quantizers through the evaluation harness", "",
          f"Made by `python3 tools/peer_results.py {settings['argv']}` on {settings['device']} (calibration on {settings['calib_device']}); calibration {settings['calibration']}.",
          "mean [95% bootstrap interval]; 'vs baseline' = row - baseline, paired over the same noise (* = the interval excludes 0). "
          "The intervals cover image sampling, not calibration-to-calibration noise.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        md += [f"## {model}", ""]
        for run in dict.fromkeys(r["run"] for r in rows if r["model"] == model):
            mine = [r for r in rows if r["model"] == model and r["run"] == run]
            first = mine[0]
            fp32 = ", ".join(f"{k} {fmt_interval(v, '.4g')}" for k, v in first["fp32"].items() if isinstance(v, dict) and "ci95" in v)
            md += [f"### {run}: {first['seed_sets']} seed set(s) x {first['n']} images, baseline `{first['baseline']}`" + (f"; FP32 {fp32}" if fp32 else ""), ""]
            table = [[f"`{r['candidate']}`", r["description"], *[fmt_interval(r["metrics"].get(m), ".4g") for m in ("step_rel_l2", "psnr", "ssim", "shape_fd")],
                      *[fmt_difference(r["vs_baseline"].get(m), ".4g") if r["vs_baseline"] else "-" for m in ("step_rel_l2", "psnr")], f"{r['seconds']:.0f}"] for r in mine]
            md += [markdown_table(["row", "what", "step rel-L2", "PSNR dB", "SSIM", "shape-FD", "step rel-L2 vs baseline", "PSNR vs baseline", "s"], table), ""]
    md += ["## Timing", ""] + [f"- {line}" for line in settings.get("timing", [])]
    write_text_atomic(out / "peers.md", "\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, default=list(MODELS), help="diffusers model folders (default: the two shipped shapes models)")
    parser.add_argument("--modelopt-variants", nargs="*", choices=list(MODELOPT_VARIANTS), default=list(MODELOPT_VARIANTS))
    parser.add_argument("--ort-methods", nargs="*", default=[], help="ONNX Runtime quantize_static methods (minmax, entropy, percentile) as graph rows; default: none")
    parser.add_argument("--ort-images", type=int, default=250, help="images per seed set of the ORT rows' harness run (they run on the CPU)")
    parser.add_argument("--ort-threads", type=int, default=None, help="ONNX Runtime CPU threads (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the harness runs")
    parser.add_argument("--calib-device", default="cpu", help="where qdiff's and ModelOpt's calibrations run")
    add_harness_arguments(parser, seed_sets=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "peers-harness")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qdiff-peers"))
    parser.add_argument("--smoke", action="store_true", help="tiny settings on the CPU: checks the whole path, numbers not meaningful")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("QDIFF_QUIET", "1")
    from qdiff.api import calibrate, export_model, quantize_onnx
    from qdiff.calib.recipe import load_recipe
    from qdiff.core.conditioning import resolve_conditioning
    from qdiff.eval_harness import fake_quant_candidate, onnx_graph_candidate, run_harness
    from qdiff.models import load_model
    from qdiff.peers import ORT_METHODS, quantize_with_onnxruntime
    from qdiff.peers.candidates import modelopt_candidate, modelopt_int8_layers
    from qdiff.peers.modelopt_int8 import calibration_calls

    unknown = sorted(set(args.ort_methods) - set(ORT_METHODS))
    if unknown:
        parser.error(f"--ort-methods: {', '.join(unknown)} not among {', '.join(ORT_METHODS)}")
    calibration = dict(SMOKE_CALIBRATION if args.smoke else RUN_CALIBRATION)
    if args.smoke:
        args.device, args.calib_device, args.models = "cpu", "cpu", args.models[:1]
        shrink_harness_for_smoke(args)
        args.ort_images = args.images
    harness = harness_settings(args, shape_fd=not args.smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timing: list[str] = []
    settings = {"argv": " ".join(argv if argv is not None else sys.argv[1:]), "device": args.device, "calib_device": args.calib_device, "calibration": calibration, "timing": timing}
    device_option = {"device": args.calib_device} if args.calib_device != "cpu" else {}
    rows: list[dict[str, Any]] = []
    for model in args.models:
        t0 = time.perf_counter()
        bundle = load_model(model)
        work = args.work / model.name
        table = calibrate(bundle, work / "qdiff", "w8a8", timestep_stats=False, **calibration, **device_option)
        recipe = load_recipe("w8a8", **calibration)
        cache: dict[str, list] = {}

        def calls() -> list:  # computed once, on the first ModelOpt variant that needs them
            if "calls" not in cache:
                conditioning = resolve_conditioning(bundle, recipe.samples_per_timestep, seed=recipe.seed)
                cache["calls"] = list(calibration_calls(bundle, recipe, conditioning, torch.device(args.calib_device)))
            return cache["calls"]

        candidates = [fake_quant_candidate(QDIFF, table.table_path),
                      fake_quant_candidate(QDIFF_ON_MODELOPT_LAYERS, table.table_path, layers=modelopt_int8_layers(bundle.unet, list(table.table.layers)))]
        candidates += [modelopt_candidate(key, bundle, recipe, settings=MODELOPT_VARIANTS[key][1], device=args.calib_device, calibration_inputs=calls) for key in args.modelopt_variants]
        result = run_harness(bundle, candidates, harness, baseline=QDIFF, out_dir=args.out / f"harness-{model.name}")
        rows += rows_of(result, model.name, "pytorch", DESCRIPTIONS)
        timing.append(f"{model.name}: calibration + {len(candidates)} PyTorch candidates in {time.perf_counter() - t0:.0f} s")
        print(timing[-1], flush=True)
        write_report(rows, args.out, settings)
        if args.ort_methods:
            t0 = time.perf_counter()
            fp32 = export_model(bundle, work / "export", check=False).onnx_path
            qdq = quantize_onnx(fp32, table.table_path, work / "qdiff" / "denoiser.w8a8.onnx").onnx_path
            graphs = [onnx_graph_candidate("qdiff-graph", qdq, threads=args.ort_threads)]
            for method in args.ort_methods:
                peer = quantize_with_onnxruntime(bundle, fp32, work / f"ort-{method}" / "denoiser.onnx", "w8a8", method=method, **calibration)
                graphs.append(onnx_graph_candidate(f"ort-{method}", peer.onnx_path, threads=args.ort_threads, meta={"method": method}))
            ort_harness = dataclasses.replace(harness, images=args.ort_images, step_images=min(args.step_images, args.ort_images), device="cpu")
            result = run_harness(bundle, graphs, ort_harness, baseline="qdiff-graph", out_dir=args.out / f"harness-{model.name}-ort")
            rows += rows_of(result, model.name, "onnxruntime graphs", {**DESCRIPTIONS, **{f"ort-{m}": f"ONNX Runtime quantize_static, {m} calibration (graph under ONNX Runtime)" for m in ORT_METHODS}})
            timing.append(f"{model.name}: {len(graphs)} ONNX Runtime graph rows in {time.perf_counter() - t0:.0f} s")
            print(timing[-1], flush=True)
            write_report(rows, args.out, settings)
    timing.append(f"total {time.perf_counter() - started:.0f} s")
    write_report(rows, args.out, settings)
    print(f"wrote {args.out / 'peers.md'} in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
