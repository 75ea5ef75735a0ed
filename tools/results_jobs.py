"""What the results tools (tdac_results, quest_results, reconstruction_results) share: the
calibration and reconstruction jobs they run in spawned worker processes, the pool that runs
them, and the interval formatting of their reports.

Why one module: each tool prepares tables and reconstructed weights the same way (as `qdiff run`
calibrates, in `--workers` processes with the CPU threads split between them) before handing
them to the evaluation harness; copies of that boilerplate drifted (thread setup, result keys,
model-folder lookup). Job functions take and return plain dicts, so they pickle into spawned
workers; they import qdiff lazily, so the pool's children start without torch work.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# As `qdiff run` calibrates: 10 timesteps x 32 trajectories of a 50-step DDIM loop.
RUN_CALIBRATION = {"num_timesteps": 10, "samples_per_timestep": 32, "calibration_steps": 50, "batch_size": 32}

Job = dict[str, Any]


def model_dir(name: str | os.PathLike[str]) -> Path:
    """A shipped model's name (shapes-ddpm) or any model folder."""
    shipped = ROOT / "qdiff" / "models" / str(name)
    return shipped if shipped.is_dir() else Path(name).resolve()


def worker_setup(threads: int) -> None:
    """A worker's start: quiet progress bars, its share of the CPU threads."""
    import torch

    os.environ.setdefault("QDIFF_QUIET", "1")
    torch.set_num_threads(max(1, int(threads)))


def worker_threads(workers: int) -> int:
    """CPU threads per worker when `workers` run at once (all of them for one)."""
    return max(1, (os.cpu_count() or 2) // max(1, workers))


def calibrate_job(job: Job) -> Job:
    """`qdiff.api.calibrate` of job["model"] with job["preset"] and job["calibration"] (plus
    job["options"], e.g. timestep_sampling / activation_calibrator) into job["out"]."""
    worker_setup(job["threads"])
    from qdiff.api import calibrate

    started = time.perf_counter()
    res = calibrate(model_dir(job["model"]), job["out"], job["preset"], timestep_stats=False, **job["calibration"], **job.get("options", {}))
    return {**job, "table": str(res.table_path), "tdac": res.table.provenance.get("tdac"), "calibrate_seconds": round(time.perf_counter() - started, 1)}


def reconstruct_job(job: Job) -> Job:
    """`qdiff.api.reconstruct` of job["table"]: job["method"] (default adaround-brecq),
    job["iterations"] per unit, job["batch"], job["lsq"] (learned activation steps) on job["device"]."""
    worker_setup(job["threads"])
    import numpy as np

    from qdiff.api import reconstruct
    from qdiff.calib.reconstruct.settings import ReconstructionSettings

    settings = ReconstructionSettings(
        method=job.get("method", "adaround-brecq"), iterations=job["iterations"], batch_size=job["batch"], learn_activation_steps=job.get("lsq", False), device=job["device"]
    )
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
        "unit_error_ratio_mean": float(np.mean([u["error"] / max(u["rtn_error"], 1e-30) for u in units])) if units else None,
        "settings": settings.resolved().to_json(),
    }


def describe(job: Job) -> str:
    """A finished job in a progress line: its model, preset and the keys that tell it apart."""
    name = Path(str(job["model"])).name
    parts = [name, str(job["preset"])] + [str(job[k]) for k in ("sampling", "label", "method", "k") if job.get(k) is not None and job[k] != name]
    secs = next((job[k] for k in ("seconds", "reconstruct_seconds", "calibrate_seconds") if k in job), None)
    return " ".join(parts) + (f" done in {secs} s" if secs is not None else " done")


def pool_map(fn: Callable[[Job], Job], jobs: list[Job], workers: int, what: str, log: Callable[[str], None] = print) -> list[Job]:
    """`fn` over `jobs` in `workers` spawned processes (inline with one, or one job), in order,
    logging each as it ends; CUDA in the children needs spawn, not fork."""
    if not jobs:
        return []
    started = time.perf_counter()
    done: list[Job] = []
    if workers <= 1 or len(jobs) == 1:
        results = map(fn, jobs)
        for result in results:
            done.append(result)
            log(f"{what}: {describe(result)}")
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(fn, jobs):
                done.append(result)
                log(f"{what}: {describe(result)}")
    log(f"{what}: {len(done)} jobs in {time.perf_counter() - started:.0f} s")
    return done


def add_harness_arguments(parser: Any, *, seed_sets: int) -> None:
    """The evaluation harness's options, named alike in every results tool that shares them."""
    parser.add_argument("--images", type=int, default=1000, help="harness images per seed set")
    parser.add_argument("--seed-sets", type=int, default=seed_sets)
    parser.add_argument("--step-images", type=int, default=256, help="images per seed set whose FP32 trajectory gives the per-step error")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--batch-size", type=int, default=250, help="harness images per UNet call")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of the intervals")


def shrink_harness_for_smoke(args: Any) -> None:
    """The harness options of a --smoke run: every code path in seconds, numbers meaningless."""
    args.images, args.seed_sets, args.step_images, args.steps, args.batch_size, args.bootstrap = 3, 1, 2, 3, 4, 20


def harness_settings(args: Any, *, shape_fd: bool) -> Any:
    """`qdiff.eval_harness.HarnessSettings` from add_harness_arguments' options and args.device."""
    from qdiff.eval_harness import HarnessSettings

    return HarnessSettings(images=args.images, seed_sets=args.seed_sets, steps=args.steps, step_images=args.step_images, device=args.device,
                           batch_size=args.batch_size, bootstrap=args.bootstrap, shape_fd=shape_fd)


def fmt_interval(metric: dict[str, Any] | None, spec: str = ".4f") -> str:
    """`mean [lo, hi]` of a harness metric ({"mean", "ci95"}) in format `spec`, "-" when absent."""
    if not metric:
        return "-"
    lo, hi = metric["ci95"]
    return f"{metric['mean']:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def fmt_difference(comp: dict[str, Any] | None, spec: str = ".4f") -> str:
    """`+diff [lo, hi]` of a paired comparison in format `spec`, ` *` when its interval excludes 0;
    "-" when absent."""
    if not comp:
        return "-"
    lo, hi = comp["ci95"]
    return f"{comp['diff']:+{spec}} [{lo:+{spec}}, {hi:+{spec}}]{' *' if comp.get('significant') else ''}"
