"""QuEST's methods on the evaluation models: selective fine-tuning, the time-aware activation
quantizer (K buckets) and W4A4 (simulated), measured with the evaluation harness.

For every model folder (default: the two shipped shapes models; `--models DIR ...` adds others)
and preset (w8a8, w4a8, and w4a4, which is simulated: TensorRT has no INT4 activations), with
calibration as `qdiff run` does it (10 timesteps x 32 trajectories of a 50-step DDIM loop), rows:

- `rtn`: the table's round-to-nearest weights;
- `adaround-brecq`: reconstructed weights (`qdiff reconstruct`, `--iterations` per unit);
- `adaround-brecq+ft`: those, then QuEST's selective fine-tuning (`qdiff finetune`: time
  embedding, then attention; `--ft-iterations` per stage, Adam `--ft-lr`);
- `rtn+ta-K<k>` and `adaround-brecq+ta-K<k>`: the time-aware activation quantizer, K buckets of
  the calibration timesteps (`qdiff.api.calibrate_time_aware`), on either weights. K = 1 is the
  ordinary fake-quant model by construction (tests/test_quest.py checks it bit for bit), so its
  rows must equal `rtn` / `adaround-brecq`: a check of the run, not a result.

Each (model, preset) is one `run_harness` call (baseline `rtn`: every other row gets a paired
bootstrap difference with it), FP32 sampled once per call. Preparation (calibration, time-aware
tables: CPU; reconstruction, fine-tuning: `--device`) runs in `--workers` processes; every
reconstructions and fine-tunings are cached under `--work` (a rerun after a cut-off skips them;
calibration and the time-aware tables are redone, ~20 s each on the H200 host). Rows are
written as they finish: `<out>/quest.json` + `quest.md`, and per (model, preset) the harness's
own `harness.json/.md` and plots under `<out>/quest/<model>-<preset>/`.

Regenerate (H200). Each command stays under 10 minutes; their rows accumulate in quest.json
(a rerun of a (model, preset) replaces its rows):

    python3 tools/quest_results.py --device cuda --models shapes-ddpm --presets w8a8 w4a8
    python3 tools/quest_results.py --device cuda --models shapes-ddpm --presets w4a4
    python3 tools/quest_results.py --device cuda --models shapes-cond --presets w8a8 w4a8
    python3 tools/quest_results.py --device cuda --models shapes-cond --presets w4a4

CPU check of the whole path at tiny settings (numbers meaningless):

    .venv/bin/python tools/quest_results.py --smoke --out /tmp/quest-smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from results_jobs import RUN_CALIBRATION, calibrate_job, describe, fmt_difference, fmt_interval, model_dir, pool_map, reconstruct_job, worker_setup, worker_threads

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("shapes-ddpm", "shapes-cond")
PRESETS = ("w8a8", "w4a8", "w4a4")
BUCKETS = (1, 2, 4, 10)
SMOKE_CALIBRATION = {"num_timesteps": 2, "samples_per_timestep": 2, "calibration_steps": 3, "batch_size": 2}


def model_key(name: str) -> str:
    return Path(name).name


def time_aware_job(job: dict[str, Any]) -> dict[str, Any]:
    worker_setup(job["threads"])
    from qdiff.api import calibrate_time_aware

    started = time.perf_counter()
    res = calibrate_time_aware(model_dir(job["model"]), job["out"], job["table"], job["k"])
    return {**job, "index": str(res.index_path), "seconds": round(time.perf_counter() - started, 1)}


def finetune_job(job: dict[str, Any]) -> dict[str, Any]:
    worker_setup(job["threads"])
    from qdiff.api import finetune
    from qdiff.calib.quest.settings import FinetuneSettings

    settings = FinetuneSettings(iterations=job["iterations"], batch_size=job["batch"], lr=job["lr"], device=job["device"])
    started = time.perf_counter()
    res = finetune(model_dir(job["model"]), job["out"], job["table"], settings, reconstruction=job["weights"])
    stages = [{k: s[k] for k in ("name", "layers", "iterations", "error_before", "error_after", "integers_changed", "seconds")} for s in res.stages]
    return {**job, "ft_weights": str(res.weights_path), "ft_table": str(res.table_path), "seconds": round(time.perf_counter() - started, 1), "stages": stages}


def candidates_for(prep: dict[str, Any], buckets: tuple[int, ...]) -> list:
    """The harness candidates of one (model, preset), baseline first."""
    from qdiff.eval_harness import fake_quant_candidate
    from qdiff.quest import time_aware_candidate

    simulated = prep.get("simulated")
    base = {"preset": prep["preset"], **({"simulated": simulated} if simulated else {})}
    cands = [fake_quant_candidate("rtn", prep["table"], meta={**base, "row": "rtn"})]
    if "weights" in prep:
        cands.append(fake_quant_candidate("adaround-brecq", prep["recon_table"], weights=prep["weights"], meta={**base, "row": "adaround-brecq", "reconstruct_seconds": prep.get("recon_seconds")}))
    if "ft_weights" in prep:
        cands.append(fake_quant_candidate("adaround-brecq+ft", prep["ft_table"], weights=prep["ft_weights"], meta={**base, "row": "adaround-brecq+ft", "finetune_stages": prep.get("stages"), "finetune_seconds": prep.get("ft_seconds")}))
    for k in buckets:
        index = prep.get("ta", {}).get(k)
        if index is None:
            continue
        cands.append(time_aware_candidate(f"rtn+ta-K{k}", index, meta={**base, "row": "time-aware", "weights_from": "rtn"}))
        if "weights" in prep:
            cands.append(time_aware_candidate(f"adaround-brecq+ta-K{k}", index, weights=prep["weights"], meta={**base, "row": "time-aware", "weights_from": "adaround-brecq"}))
    return cands


def to_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# QuEST on the evaluation models: selective fine-tuning, time-aware activation scales, W4A4 (simulated)",
        "",
        "Generated by `tools/quest_results.py` (do not edit by hand; rerun it). Numbers: `quest.json`; per model and preset the harness's own report under `quest/`.",
        "",
        *([] if meta.get("complete") else ["**Partial: the run stopped before every row was evaluated; the rows below are the ones it finished.**", ""]),
        f"- Device: {meta['device']} ({meta['gpu']}); torch {meta['torch']}. Wall time {meta['wall_seconds']} s.",
        f"- Calibration: the presets (mse activation calibrator, split shortcut), {meta['calibration']}.",
        f"- adaround-brecq: {meta['iterations']} iterations per unit, batch {meta['batch']}. +ft: QuEST's selective fine-tuning, time embedding then attention, {meta['ft_iterations']} iterations per stage, batch {meta['ft_batch']}, Adam lr {meta['ft_lr']}, weights on the integer grid (floor_ste with the reconstructed rounding kept; biases and scales unchanged).",
        f"- ta-K<k>: activation scales per bucket of the calibration timesteps (K in {list(meta['buckets'])}; K = 1 must equal its weights' plain row).",
        f"- Harness: {meta['harness']['seed_sets']} seed set(s) x {meta['harness']['images']} images, DDIM {meta['harness']['steps']} steps; step rel-L2 on the FP32 trajectory of {meta['harness']['step_images']} images per set. [a, b] = bootstrap 95% interval; diff vs rtn is paired (same noise), * = interval excludes 0.",
        "- w4a4 rows are **simulated: TensorRT has no INT4 activations** (fake-quant only; `qdiff quantize` refuses the recipe).",
        "",
        "Regenerate:",
        "",
        "```bash",
        meta["command"],
        "```",
    ]
    for block in result["runs"]:
        fp = block.get("fp32", {})
        title = f"{block['model']} {block['preset']}" + (" (simulated: TensorRT has no INT4 activations)" if block.get("simulated") else "")
        lines += ["", f"## {title}", ""]
        if "shape_fd" in fp:
            lines += [f"FP32 shape-FD {fmt_interval(fp['shape_fd'], '.2f') if isinstance(fp['shape_fd'], dict) else fp['shape_fd']}; real-vs-real floor at the same n {fp.get('real_floor_shape_fd', '-')}.", ""]
        lines += ["| row | step rel-L2 | diff vs rtn | PSNR dB | SSIM | shape-FD | s |", "|---|---|---|---|---|---|---|"]
        for label, row in block["rows"].items():
            m = row["metrics"]
            comp = block.get("comparisons", {}).get(label, {})
            lines.append(f"| {label} | {fmt_interval(m.get('step_rel_l2'), '.4f')} | {fmt_difference(comp.get('step_rel_l2'), '.4f')} | {fmt_interval(m.get('psnr'), '.2f')} | {fmt_interval(m.get('ssim'), '.3f')} | {fmt_interval(m.get('shape_fd'), '.2f')} | {row.get('seconds', '-')} |")
        for label, error in block.get("failed", {}).items():
            lines.append(f"| {label} | failed: {error} | | | | | |")
        ft = block.get("finetune_stages")
        if ft:
            lines += ["", "Fine-tuning stages (relative eps error on the calibration inputs): " + "; ".join(f"{s['name']} ({s['layers']} layers): {s['error_before']:.4g} -> {s['error_after']:.4g}, {s['integers_changed']} integers moved" for s in ft) + "."]
    lines.append("")
    return "\n".join(lines)


def _earlier_runs(path: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("runs", []))
    except (OSError, ValueError, AttributeError):
        return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="shipped model names or model folders (default: %(default)s)")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--buckets", nargs="+", type=int, default=list(BUCKETS), help="time-aware K values (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=500, help="reconstruction iterations per unit (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="reconstruction batch (default: %(default)s)")
    p.add_argument("--ft-iterations", type=int, default=300, help="fine-tuning iterations per stage (default: %(default)s)")
    p.add_argument("--ft-batch", type=int, default=32)
    p.add_argument("--ft-lr", type=float, default=1e-5)
    p.add_argument("--images", type=int, default=1000, help="images per seed set (default: %(default)s)")
    p.add_argument("--seed-sets", type=int, default=1)
    p.add_argument("--step-images", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--harness-batch", type=int, default=250)
    p.add_argument("--workers", type=int, default=12, help="preparation processes (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--work", type=Path, default=Path("/tmp/qdiff-quest-work"))
    p.add_argument("--smoke", action="store_true", help="tiny settings on the CPU, the whole path (< 2 min)")
    args = p.parse_args(argv)
    calibration = RUN_CALIBRATION
    if args.smoke:
        args.device = "cpu"
        if args.models == list(MODELS):
            args.models = ["shapes-cond"]
        if args.presets == list(PRESETS):
            args.presets = ["w4a4"]  # the simulated path; every row kind
        if args.buckets == list(BUCKETS):
            args.buckets = [2]
        args.iterations, args.batch, args.ft_iterations, args.ft_batch = 2, 2, 2, 2
        args.images, args.seed_sets, args.step_images, args.steps, args.harness_batch, args.workers = 4, 1, 2, 3, 4, 2
        calibration = SMOKE_CALIBRATION
    from qdiff.calib.recipe import PRESETS as RECIPES
    from qdiff.eval_harness import HarnessSettings, run_harness

    started = time.perf_counter()
    threads = worker_threads(args.workers)
    work = args.work
    jobs = [{"model": m, "preset": pr, "out": str(work / model_key(m) / pr), "calibration": calibration, "threads": threads} for m in args.models for pr in args.presets]
    calibrated = {(c["model"], c["preset"]): c for c in pool_map(calibrate_job, jobs, args.workers, "calibrate")}
    prep = {key: {"model": key[0], "preset": key[1], "table": c["table"], "simulated": RECIPES[key[1]].simulated_only, "ta": {}} for key, c in calibrated.items()}
    ta_jobs = [{**c, "k": k, "out": str(Path(c["out"]))} for c in calibrated.values() for k in args.buckets]
    rec_jobs = [{**c, "iterations": args.iterations, "batch": args.batch, "device": args.device, "out": str(Path(c["out"]) / "adaround-brecq")} for c in calibrated.values()]
    # The time-aware tables (CPU) and the reconstructions (device) are independent: one pool.
    with ProcessPoolExecutor(max_workers=max(1, min(args.workers, len(ta_jobs) + len(rec_jobs))), mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        futures = [(pool.submit(time_aware_job, j), "time-aware") for j in ta_jobs] + [(pool.submit(reconstruct_job, j), "reconstruct") for j in rec_jobs]
        for fut, what in futures:
            done = fut.result()
            entry = prep[(done["model"], done["preset"])]
            if what == "time-aware":
                entry["ta"][done["k"]] = done["index"]
            else:
                entry.update({"weights": done["weights"], "recon_table": done["recon_table"], "recon_seconds": done["reconstruct_seconds"]})
            print(f"{what}: {describe(done)}", flush=True)
    ft_jobs = [{"model": e["model"], "preset": e["preset"], "table": e["recon_table"], "weights": e["weights"], "iterations": args.ft_iterations, "batch": args.ft_batch, "lr": args.ft_lr, "device": args.device, "threads": threads, "out": str(Path(e["recon_table"]).parent / "ft")} for e in prep.values()]
    for done in pool_map(finetune_job, ft_jobs, args.workers, "finetune"):
        prep[(done["model"], done["preset"])].update({"ft_weights": done["ft_weights"], "ft_table": done["ft_table"], "ft_seconds": done["seconds"], "stages": done["stages"]})
    print(f"prepared {len(prep)} (model, preset) pairs at {time.perf_counter() - started:.0f} s", flush=True)

    settings = HarnessSettings(images=args.images, seed_sets=args.seed_sets, steps=args.steps, step_images=args.step_images, device=args.device, batch_size=args.harness_batch, bootstrap=50 if args.smoke else 1000)
    command = "python3 tools/quest_results.py " + " ".join(argv if argv is not None else sys.argv[1:])
    # Runs of earlier invocations (other models or presets) stay in quest.json; this one's replace theirs.
    mine = {(model_key(m), pr) for m, pr in prep}
    runs: list[dict[str, Any]] = [r for r in _earlier_runs(args.out / "quest.json") if (r["model"], r["preset"]) not in mine]

    def write(current: dict[str, Any] | None = None, complete: bool = False) -> None:
        meta = {
            "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "none", "torch": torch.__version__,
            "calibration": calibration, "iterations": args.iterations, "batch": args.batch, "ft_iterations": args.ft_iterations, "ft_batch": args.ft_batch, "ft_lr": args.ft_lr,
            "buckets": args.buckets, "harness": {"images": args.images, "seed_sets": args.seed_sets, "steps": args.steps, "step_images": args.step_images},
            "wall_seconds": round(time.perf_counter() - started, 1), "command": command.strip(), "smoke": args.smoke, "complete": complete,
        }
        result = {"meta": meta, "runs": runs + ([current] if current else [])}
        from qdiff.core.artifacts import write_json_atomic, write_text_atomic

        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / "quest.json", result)
        write_text_atomic(args.out / "quest.md", to_markdown(result))

    for (m, pr), entry in prep.items():
        block = {"model": model_key(m), "preset": pr, "simulated": entry["simulated"], "finetune_stages": entry.get("stages"), "prep": {k: v for k, v in entry.items() if k not in ("stages",)}}

        def on_result(res, block=block) -> None:
            block.update({"fp32": res.fp32, "rows": res.rows, "comparisons": res.comparisons, "failed": res.failed, "harness_seconds": res.seconds})
            write(block)

        block.update({"rows": {}, "comparisons": {}})
        res = run_harness(model_dir(m), candidates_for(entry, tuple(args.buckets)), settings, baseline="rtn", out_dir=args.out / "quest" / f"{model_key(m)}-{pr}", on_result=on_result)
        on_result(res)
        runs.append(block)
        print(f"evaluated {model_key(m)} {pr}: {len(res.rows)} rows at {time.perf_counter() - started:.0f} s", flush=True)
    write(complete=True)
    print(f"wrote {args.out / 'quest.md'} in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
