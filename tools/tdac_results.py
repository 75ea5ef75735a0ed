"""TDAC (EDA-DM's temporal distribution alignment calibration) vs uniform timestep sampling.

For each model (default: the two shipped shapes models; `--models DIR ...` for others), preset
(w8a8, w4a8) and timestep sampling (uniform, tdac), one calibration as `qdiff run` does it
(10 timesteps x 32 trajectories of a 50-step DDIM loop: TDAC spends the same 320 samples
over all 50 steps), then round-to-nearest weights and AdaRound-BRECQ reconstruction on that
table (`qdiff.api.reconstruct`, which replays the table's own TDAC counts). Every (model,
preset, method) pair uniform/tdac is measured by the evaluation harness
(`qdiff.eval_harness.run_harness`) with uniform as the baseline, so the tdac row's differences
are paired over the same noise, with bootstrap 95% intervals. Optionally (`--sensitivity`) the
per-layer-group sensitivity table of tools/sensitivity_results.py for each model and preset.

Calibrations run on the CPU in `--workers` processes; reconstructions on `--device` in
`--workers` processes at once; the harness runs one candidate pair after the other. Results
are written as they finish: <out>/tdac.json (rows), tdac.md, harness folders per pair, and
TDAC's samples-per-step plot per model and preset (harness folders: <out>/harness/<model>-<preset>-<method>/).

GPU (H200), the issue's measurement (estimate: ~20-25 min; see the report's timing lines):

    python3 tools/tdac_results.py --device cuda --images 1000 --seed-sets 1 --iterations 500 --sensitivity --out docs/results/tdac

CPU check of the whole path (< 2 min on an idle 2-core machine; numbers not meaningful):

    .venv/bin/python tools/tdac_results.py --smoke --out /tmp/tdac-smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from results_jobs import RUN_CALIBRATION, add_harness_arguments, calibrate_job, fmt_difference, fmt_interval, harness_settings, pool_map, shrink_harness_for_smoke, reconstruct_job, worker_threads

ROOT = Path(__file__).resolve().parents[1]
MODELS = (ROOT / "qdiff" / "models" / "shapes-ddpm", ROOT / "qdiff" / "models" / "shapes-cond")
PRESETS = ("w8a8", "w4a8")
SAMPLINGS = ("uniform", "tdac")
METHODS = ("rtn", "adaround-brecq")
SMOKE_CALIBRATION = {"num_timesteps": 2, "samples_per_timestep": 2, "calibration_steps": 4, "batch_size": 2}


def counts_summary(tdac: dict[str, Any] | None) -> dict[str, Any] | None:
    if not tdac:
        return None
    counts = tdac["counts"]
    return {"steps": len(counts), "min": min(counts), "max": max(counts), "zero_steps": sum(c == 0 for c in counts), "r": tdac["r"], "r_rule": tdac["r_rule"], "lam": tdac["lam"]}


# Two-sided 95% Student t quantiles by degrees of freedom (calibration seeds - 1); few seeds are
# the expensive case, so the table covers them and larger counts use the normal quantile.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def seed_paired(uniform: list[dict[str, Any]], tdac: list[dict[str, Any]]) -> dict[str, Any]:
    """tdac - uniform per metric, paired by calibration seed: mean, t interval over the seeds, and
    the spread of uniform's own means across seeds (calibration noise, which the per-image
    bootstrap of one calibration does not see)."""
    out = {}
    for name in uniform[0]:
        if name not in tdac[0]:
            continue
        u = np.array([m[name]["mean"] for m in uniform])
        d = np.array([t[name]["mean"] for t in tdac]) - u
        half = _T95.get(len(d) - 1, 1.96) * d.std(ddof=1) / np.sqrt(len(d))
        out[name] = {"seeds": len(d), "diff": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)],
                     "significant": bool(abs(d.mean()) > half), "uniform_spread": [float(u.min()), float(u.max())]}
    return out


def write_report(rows: list[dict[str, Any]], out: Path, settings: dict[str, Any]) -> None:
    from qdiff.core.artifacts import write_json_atomic, write_text_atomic
    from qdiff.report import markdown_table

    write_json_atomic(out / "tdac.json", {"settings": settings, "rows": rows})

    table = []
    for r in rows:
        for name in ("step_rel_l2", "psnr", "shape_fd", "class_accuracy"):
            if name in r["uniform"]:
                table.append([r["model"], r["preset"], r["method"], name, fmt_interval(r["uniform"].get(name), ".4g"), fmt_interval(r["tdac"].get(name), ".4g"), fmt_difference(r["comparison"].get(name), ".4g")])
    md = [
        "# TDAC vs uniform timestep sampling",
        "",
        f"Made by `python3 tools/tdac_results.py {settings['argv']}` on {settings['device']}; harness: {settings['harness']}.",
        f"Calibration: {settings['calibration']} (TDAC spreads the same num_timesteps x samples_per_timestep budget over every step of the loop, at most samples_per_timestep per step; calib/tdac.py). "
        f"Reconstruction: adaround-brecq, {settings['iterations']} iterations per unit.",
        "",
        "Each row: mean [95% bootstrap interval]; tdac - uniform is paired over the same noise (* = interval excludes 0).",
        "",
        markdown_table(["model", "preset", "weights", "metric", "uniform", "tdac", "tdac - uniform"], table),
        "",
    ]
    seeded = [r for r in rows if r.get("over_calibration_seeds")]
    if seeded:
        md += ["## Over calibration seeds", "",
               "Each configuration calibrated with trajectory seeds 0..N-1; tdac - uniform paired by seed, mean [t 95% interval over the seeds] (* = excludes 0); "
               "'uniform across seeds' is the range of uniform's means, the calibration noise one calibration's intervals do not show.", "",
               markdown_table(["model", "preset", "weights", "metric", "seeds", "tdac - uniform", "uniform across seeds"],
                              [[r["model"], r["preset"], r["method"], name, str(c["seeds"]), f"{c['diff']:+.4g} [{c['ci95'][0]:+.4g}, {c['ci95'][1]:+.4g}]" + (" *" if c["significant"] else ""),
                                f"{c['uniform_spread'][0]:.4g} .. {c['uniform_spread'][1]:.4g}"] for r in seeded for name, c in r["over_calibration_seeds"].items()]), ""]
    md += [
        "## TDAC's samples per step",
        "",
    ]
    seen = set()
    for r in rows:
        key = (r["model"], r["preset"])
        if key in seen or not r.get("tdac_counts"):
            continue
        seen.add(key)
        s = r["tdac_counts"]
        md += [f"- {r['model']} {r['preset']}: {s['steps']} steps, {s['min']}..{s['max']} samples per step, {s['zero_steps']} steps without any; r = {s['r']:.4g} ({s['r_rule']}), lambda {s['lam']}. ![tdac]({r['tdac_plot']})"]
    md += ["", "## Timing", ""] + [f"- {line}" for line in settings.get("timing", [])]
    write_text_atomic(out / "tdac.md", "\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, default=list(MODELS), help="diffusers model folders (default: the two shipped shapes models)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="weights: rtn and/or adaround-brecq reconstruction (default: both)")
    parser.add_argument("--iterations", type=int, default=500, help="reconstruction iterations per unit (default: %(default)s)")
    parser.add_argument("--recon-batch", type=int, default=32)
    parser.add_argument("--tdac-lambda", type=float, help="TDAC lambda (default: the recipe's, 1.2)")
    parser.add_argument("--tdac-r", help="TDAC radius: auto or a number (default: the recipe's, auto)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_harness_arguments(parser, seed_sets=1)
    parser.add_argument("--calibration-seeds", type=int, default=1,
                        help="calibrate each configuration with this many trajectory seeds (0..N-1): the harness intervals cover image sampling only, "
                             "so with N >= 2 the report adds tdac - uniform paired by calibration seed with a t interval over the seeds (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=8, help="processes for calibration (CPU) and reconstruction (device) (default: %(default)s)")
    parser.add_argument("--sensitivity", action="store_true", help="also the per-layer-group sensitivity table (tools/sensitivity_results.py) per model and preset")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "tdac")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qdiff-tdac"))
    parser.add_argument("--smoke", action="store_true", help="tiny settings on the CPU: checks the whole path, numbers not meaningful")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("QDIFF_QUIET", "1")
    calibration = dict(SMOKE_CALIBRATION if args.smoke else RUN_CALIBRATION)
    if args.tdac_lambda is not None:
        calibration["tdac_lambda"] = args.tdac_lambda
    if args.tdac_r is not None:
        calibration["tdac_r"] = args.tdac_r if args.tdac_r == "auto" else float(args.tdac_r)
    if args.smoke:
        args.device, args.models, args.presets, args.iterations, args.workers = "cpu", args.models[:1], args.presets[:1], 2, 1
        shrink_harness_for_smoke(args)
    from qdiff.eval_harness import fake_quant_candidate, run_harness
    from qdiff.plots import plot_tdac

    harness = harness_settings(args, shape_fd=not args.smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timing: list[str] = []
    settings = {"argv": " ".join(argv if argv is not None else sys.argv[1:]), "device": args.device, "calibration": calibration, "iterations": args.iterations,
                "harness": f"{args.seed_sets} seed set(s) x {args.images} images, {args.steps} DDIM steps, step error on {args.step_images}", "timing": timing}
    threads = worker_threads(args.workers)
    seeds = list(range(max(1, args.calibration_seeds)))
    settings["calibration_seeds"] = len(seeds)
    jobs = [{"model": str(m), "label": m.name, "preset": p, "sampling": s, "seed": k, "calibration": {**calibration, **({"seed": k} if k else {})},
             "options": {"timestep_sampling": s}, "threads": threads, "out": str(args.work / m.name / (f"{p}-{s}" + (f"-seed{k}" if k else "")))}
            for m in args.models for p in args.presets for s in SAMPLINGS for k in seeds]
    tables = {(j["label"], j["preset"], j["sampling"], j["seed"]): j for j in pool_map(calibrate_job, jobs, args.workers, "calibrate")}
    timing.append(f"calibration: {len(jobs)} tables in {time.perf_counter() - started:.0f} s (CPU, {args.workers} processes)")
    print(timing[-1], flush=True)
    weights: dict[tuple, dict[str, Any]] = {}
    if "adaround-brecq" in args.methods:
        t0 = time.perf_counter()
        rjobs = [{**j, "method": "adaround-brecq", "iterations": args.iterations, "batch": args.recon_batch, "device": args.device} for j in tables.values()]
        weights = {(j["label"], j["preset"], j["sampling"], j["seed"]): j for j in pool_map(reconstruct_job, rjobs, args.workers, "reconstruct")}
        timing.append(f"reconstruction: {len(rjobs)} x {args.iterations} iterations in {time.perf_counter() - t0:.0f} s ({args.device}, {args.workers} at once)")
        print(timing[-1], flush=True)
    rows: list[dict[str, Any]] = []
    for model in args.models:
        for preset in args.presets:
            tdac = tables[(model.name, preset, "tdac", 0)]["tdac"]
            plot = plot_tdac(tdac, args.out / f"tdac-samples-{model.name}-{preset}.png")
            for method in args.methods:
                t0 = time.perf_counter()
                candidates = []
                for k in seeds:
                    for sampling in SAMPLINGS:
                        job = tables[(model.name, preset, sampling, k)]
                        rec = weights.get((model.name, preset, sampling, k)) if method != "rtn" else None
                        candidates.append(fake_quant_candidate(f"{preset}/{method}/{sampling}" + (f"/seed{k}" if k else ""), rec["recon_table"] if rec else job["table"],
                                                               weights=rec["weights"] if rec else None, meta={"sampling": sampling, "method": method, "preset": preset, "calibration_seed": k}))
                result = run_harness(model, candidates, harness, baseline=candidates[0].label, out_dir=args.out / "harness" / f"{model.name}-{preset}-{method}")
                uniform, tdac_row = (result.rows[c.label]["metrics"] for c in candidates[:2])
                per_seed = {s: [result.rows[c.label]["metrics"] for c in candidates if c.meta["sampling"] == s] for s in SAMPLINGS}
                rows.append({"model": model.name, "model_path": str(model), "preset": preset, "method": method, "iterations": args.iterations if method != "rtn" else None,
                             "uniform": uniform, "tdac": tdac_row, "comparison": result.comparisons.get(candidates[1].label, {}), "fp32": result.fp32,
                             "over_calibration_seeds": seed_paired(per_seed["uniform"], per_seed["tdac"]) if len(seeds) > 1 else None,
                             "tdac_counts": counts_summary(tdac), "tdac_plot": plot.name, "seconds": round(time.perf_counter() - t0, 1)})
                timing.append(f"harness {model.name} {preset} {method}: {rows[-1]['seconds']} s")
                write_report(rows, args.out, settings)
                c = rows[-1]["comparison"].get("step_rel_l2", {})
                print(f"harness: {model.name} {preset} {method}: step rel-L2 uniform {uniform['step_rel_l2']['mean']:.4f}, tdac {tdac_row['step_rel_l2']['mean']:.4f}"
                      + (f", diff {c['diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" if c else "") + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.sensitivity:
        sys.path.insert(0, str(ROOT / "tools"))
        from sensitivity_results import model_sensitivity, write_outputs

        t0 = time.perf_counter()
        entries = []
        sens_settings = {"argv": settings["argv"] + " (via tdac_results --sensitivity)", "device": args.device}
        for model in args.models:
            for preset in args.presets:
                entries.append(model_sensitivity(model, preset, device=args.device, images=2 if args.smoke else 64, steps=args.steps, calibration=calibration, calibrator=None, work=args.work / "sensitivity"))
                write_outputs(entries, args.out / "sensitivity", sens_settings)
        timing.append(f"sensitivity: {len(entries)} tables in {time.perf_counter() - t0:.0f} s")
    timing.append(f"total {time.perf_counter() - started:.0f} s")
    write_report(rows, args.out, settings)
    print(f"wrote {args.out / 'tdac.md'} in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
