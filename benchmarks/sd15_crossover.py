"""Issue 12 part 5: FP16-graph engines on TensorRT 8.6, where INT8 crosses FP16, and the W4A8 engine.

    python benchmarks/sd15_crossover.py --work /tmp/sd15 --out $OUT --budget-s 530 --opt-level 1

An SD 1.5 build on 8.6 with the crossover profile takes over 7 minutes (measured 2026-12-02),
so the whole run does not fit one device call (10 minutes). Start it detached and wait in each
call; the calls must follow each other while the machine is warm (it is given back 30 s after
a call, and /tmp with it):

    python benchmarks/sd15_crossover.py --work /tmp/sd15 --out /tmp/xo --budget-s 1500 --detach --wait 560
    python benchmarks/sd15_crossover.py --out /tmp/xo --wait 560        # the next call(s): exit 3 = still running

How:

- the FP32 and the FP16 export run at once (separate processes), calibration follows the FP32
  export, and each engine build starts once its graph exists, at most `--max-builds` at a time
  (default 2: builds time their tactics on the one GPU, so more at once slow each other and
  time kernels on a shared GPU);
- each precision is built ONCE, with one dynamic profile covering every shape in
  CROSSOVER_SHAPES (batch 1, 2, 8 at 64x64 latents; 1, 2 at 128x128), and timed per shape: a
  static-shape engine per shape would not fit. A dynamic-profile engine may pick other tactics
  than a static one, so these ms are not the same experiment as the static rows of
  h200-sd15-unet.md, and the builder optimization level (`--opt-level`) is lowered to fit the
  budget; both are recorded in the output;
- every build waits for every quantize job (their torch work holds GPU memory, and the INT8
  engine's tactic timing needs most of the GPU's), and timing runs in a fresh process once the
  builds ended (a process started before TensorRT's libraries arrived cannot load them later);
- every step that finishes is written at once (JSON + Markdown in --out), so a run cut short
  still returns what it measured; a step that fails (e.g. 8.6's parser on the opset-19 FP16
  Q/DQ graph) is a row with its error, not a crash.

Engines (`--engines`, names from benchmarks/sd15_unet.py ENGINES): TensorRT FP16 from the FP32
graph (fp16) and from the FP16 graph (fp16-g16); W8A8 from the FP32 Q/DQ graph (int8), from the
FP16 Q/DQ graph at opset 19 (int8-g16) and from the FP16 graph with FP32 Q/DQ islands at opset
17 (int8-g16c), and the same with Q/DQ on the convolutions only (int8-g16c-conv: the attention
blocks plain FP16, where 8.6's Myelin asserted on int8-g16c's INT8 weights); W4A8 from a short AdaRound-BRECQ reconstruction (w4a8, issue 13). Per engine
and shape: ms per call (median of --iters after --warmup, CUDA events, CUDA-graph replay),
relative L2 error vs the FP32 PyTorch UNet on the same inputs; per engine: activation memory
(device memory of the engine at its profile's max), INT8 share of conv/matmul MACs (engine
inspector), build seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after site-packages: an installed qdiff wins over the source folder (its stage folders map by package-dir)

from benchmarks.sd15_unet import CROSSOVER_ENGINES, CROSSOVER_SHAPES, ENGINES, _gpu_facts, _graph, _versions, make_model, time_calls  # noqa: E402

SCRIPT = str(ROOT / "benchmarks" / "sd15_unet.py")


def _gpu_or_none() -> dict[str, Any]:
    try:
        return _gpu_facts()
    except (AssertionError, RuntimeError) as exc:  # no CUDA here: a dry run of the orchestration
        return {"gpu": "none", "driver": "-", "error": str(exc)[:200]}


class Run:
    """The result document, rewritten (JSON + Markdown) after every step."""

    def __init__(self, out: Path, args: argparse.Namespace, resume: bool = False) -> None:
        self.out = out
        self.t0 = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)
        if resume:  # the bench child: append to the document its parent wrote
            self.doc = json.loads((out / "h200-sd15-crossover.json").read_text())
            return
        self.doc: dict[str, Any] = {
            "what": "SD 1.5 UNet (qdiff/configs/sd15-unet.json, seeded random weights), 77 text tokens; FP32 vs FP16 graphs, FP16 vs W8A8 engines",
            "method": (
                f"one engine per precision, built once with ONE dynamic profile covering batch 1-8 and 64-128 latents (opt: batch 2, 64x64), timed per shape; "
                f"builder optimization level {args.opt_level}, at most {args.max_builds or 'any number of'} builds at once (concurrent builds time their tactics on a shared GPU); cuBLAS/cuDNN tactics {os.environ.get('QDIFF_TRT_TACTIC_SOURCES', 'default')}; "
                f"CUDA events, {args.warmup} warm-up calls then the median of {args.iters}, CUDA-graph replay; inputs/outputs FP32 on the GPU; "
                f"error = relative L2 vs the FP32 PyTorch UNet on the same inputs; calibration: {args.timesteps} timesteps x 2 samples, {args.calib_steps}-step DDIM"
            ),
            "budget_s": args.budget_s,
            "gpu": _gpu_or_none(),
            "versions": _versions(),
            "date": time.strftime("%Y-%m-%d"),
            "steps": [],
            "engines": {},
            "rows": [],
        }
        self.save()

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.0f} s] {msg}", flush=True)

    def save(self) -> None:
        """Atomically (write, then rename): a `--wait` in another process reads the JSON."""
        for name, text in (("h200-sd15-crossover.json", json.dumps(self.doc, indent=1)), ("h200-sd15-crossover.md", to_markdown(self.doc))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


class Job:
    def __init__(self, name: str, argv: list[str], after: tuple[str, ...] = (), waits_for: tuple[str, ...] = ()) -> None:
        # after: jobs that must succeed first; waits_for: jobs that must have ended, in any state
        # (builds wait for the quantize jobs' GPU memory, not for their success)
        self.name, self.argv, self.after, self.waits_for = name, argv, after, waits_for
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.state = "waiting"  # waiting / running / ok / failed / skipped / timeout


def run_jobs(run: Run, jobs: list[Job], deadline: float, max_builds: int = 0, builds_after: Path | None = None) -> dict[str, Job]:
    """Start each job when the jobs it needs succeeded; kill what is still running at the deadline.

    `max_builds` > 0 caps the engine builds running at once: builds time their tactics on the
    one GPU, so concurrent builds both slow each other and time kernels on a shared GPU.
    `builds_after`: no build starts before this file exists (the exports and calibration,
    which need no TensorRT, can run while TensorRT is still being copied onto the machine)."""
    gate_logged = False
    by_name = {j.name: j for j in jobs}
    while True:
        now = time.monotonic()
        for job in jobs:
            if job.state == "waiting":
                deps = [by_name[d].state for d in job.after]
                building = sum(j.state == "running" and j.name.startswith("build-") for j in jobs)
                blocked = [d for d in job.after if by_name[d].state in ("failed", "skipped", "timeout")]
                others_busy = any(by_name[d].state in ("waiting", "running") for d in job.waits_for if d in by_name)
                if blocked:
                    job.state = "skipped"
                    _step(run, job, f"skipped: needs {', '.join(blocked)}", 0.0)
                elif now > deadline:
                    job.state = "timeout"
                    _step(run, job, "not started: the budget was spent", 0.0)
                elif job.name.startswith("build-") and builds_after is not None and not builds_after.exists():
                    if not gate_logged:
                        run.log(f"builds wait for {builds_after}")
                        gate_logged = True
                elif all(s == "ok" for s in deps) and not others_busy and not (job.name.startswith("build-") and 0 < max_builds <= building):
                    log = open(run.out / "logs" / f"{job.name}.log", "w")
                    job.proc = subprocess.Popen([sys.executable, SCRIPT, *job.argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
                    job.started, job.state = now, "running"
                    run.log(f"start {job.name}")
            elif job.state == "running" and job.proc is not None:
                rc = job.proc.poll()
                if rc is not None:
                    job.state = "ok" if rc == 0 else "failed"
                    _step(run, job, "ok" if rc == 0 else f"exit {rc}: {_tail(run, job)}", now - job.started)
                elif now > deadline:
                    job.proc.kill()
                    job.proc.wait()
                    job.state = "timeout"
                    _step(run, job, f"not finished within the budget ({now - job.started:.0f} s); killed", now - job.started)
        if all(j.state not in ("waiting", "running") for j in jobs):
            return by_name
        time.sleep(2.0)


def _needed(jobs: list[Job], targets: list[str]) -> list[Job]:
    """The jobs the targets need, transitively, in their original order (a rerun for some
    engines does not redo the others' exports)."""
    by_name, keep, todo = {j.name: j for j in jobs}, set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(by_name[name].after)
    return [j for j in jobs if j.name in keep]


def _tail(run: Run, job: Job, lines: int = 4) -> str:
    text = (run.out / "logs" / f"{job.name}.log").read_text(errors="replace").strip().splitlines()
    keep = [ln for ln in text if "error" in ln.lower() or "hint" in ln.lower()] or text
    return " | ".join(keep[-lines:])[-1200:]


def _step(run: Run, job: Job, result: str, seconds: float) -> None:
    run.doc["steps"].append({"step": job.name, "result": result, "seconds": round(seconds, 1)})
    run.log(f"{job.name}: {result}")
    run.save()


def wait_for_quiet_gpu(run: Run, pid_file: Path | None, seconds: float) -> None:
    """Before timing, wait (up to `seconds`) for the other GPU work started beside this run to
    end: the processes whose pids `pid_file` lists, one per line. What was still running when
    timing began is recorded in the result (`gpu_shared_at_timing`), since it inflates the ms."""
    if pid_file is None:
        return
    end = time.monotonic() + seconds
    while True:
        try:
            pids = [int(x) for x in pid_file.read_text().split()]
        except (FileNotFoundError, ValueError):
            pids = []
        alive = [p for p in pids if _alive(p)]
        if not alive or time.monotonic() >= end:
            break
        run.log(f"timing waits for other GPU work to end: pids {alive}")
        time.sleep(10.0)
    run.doc["gpu_shared_at_timing"] = alive
    run.save()


def bench(run: Run, args: argparse.Namespace, built: list[str]) -> None:
    """Time every built engine at every crossover shape; error vs the FP32 PyTorch UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from qdiff import api
    from qdiff.engines.manifest import read_engine_manifest
    from qdiff.core.metrics import relative_l2
    from qdiff.runtime.tensorrt_backend import TensorRTDenoiser

    def inputs(batch: int, side: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(batch * 1000 + side)
        return {"sample": torch.randn(batch, 4, side, side, generator=g).cuda(), "timestep": torch.full((batch,), 500.0).cuda(), "encoder_hidden_states": torch.randn(batch, 77, 768, generator=g).cuda()}

    feeds = {shape: inputs(*shape) for shape in CROSSOVER_SHAPES}
    unet = UNet2DConditionModel.from_pretrained(args.work / "sd15-unet").eval().cuda()
    with torch.no_grad():
        ref = {k: unet(f["sample"], f["timestep"], f["encoder_hidden_states"], return_dict=False)[0].float() for k, f in feeds.items()}
    del unet
    torch.cuda.empty_cache()
    for which in built:
        engine_dir = args.work / f"engine-{which}"
        d = read_engine_manifest(engine_dir).manifest.details
        facts: dict[str, Any] = {"label": ENGINES[which][3], "graph": str(_graph(args.work, which).name), "typing": d.get("typing"), "build_s": d.get("build_seconds"), "plan_mib": round(d.get("plan_bytes", 0) / 2**20), "activation_mib_at_profile_max": round(d.get("device_memory_bytes", 0) / 2**20), "optimization_level": d.get("optimization_level")}
        try:
            summary = api.inspect_engine(engine_dir, out=run.out / f"inspect-{which}").summary()
            facts.update(int8_mac_share=summary["int8_mac_share"], int8_convs=f"{summary['convolutions']['int8']}/{summary['convolutions']['total']}", fused_blocks_fp32_io=f"{summary['fused_blocks_with_fp32_io']}/{summary['fused_blocks']}")
        except Exception as exc:  # noqa: BLE001  (a report must not cost the timing)
            facts["inspect_error"] = f"{type(exc).__name__}: {exc}"[:300]
        run.doc["engines"][which] = facts
        run.save()
        denoiser = TensorRTDenoiser(engine_dir)
        for (batch, side), f in feeds.items():
            call = lambda f=f: denoiser(f["sample"], f["timestep"], f["encoder_hidden_states"])  # noqa: E731
            try:
                stats = time_calls(call, args.warmup, args.iters)
                row = {"engine": which, "batch": batch, "latent": side, **stats, "rel_l2_vs_fp32": relative_l2(call().float(), ref[(batch, side)])}
            except Exception as exc:  # noqa: BLE001
                row = {"engine": which, "batch": batch, "latent": side, "error": f"{type(exc).__name__}: {exc}"[:300]}
            run.doc["rows"].append(row)
            run.log(json.dumps(row))
            run.save()
        del denoiser
        torch.cuda.empty_cache()


def bench_in_fresh_process(run: Run, args: argparse.Namespace, built: list[str]) -> None:
    """Time the engines in a new process, not in this one. A run started before TensorRT's
    libraries were on the machine (`--builds-after`) cannot load them later: the dynamic loader
    looked for them when the process started and does not look again (measured on the H200,
    2026-12-03: the builds, each a fresh process, succeeded; timing in the orchestrator failed
    with "libnvinfer.so.8: cannot open shared object file"). The child appends its rows to the
    same document; a failure is recorded in it, not raised."""
    run.save()
    argv = [sys.executable, str(Path(__file__).resolve()), "--work", str(Path(args.work).resolve()), "--out", str(run.out.resolve()),
            "--warmup", str(args.warmup), "--iters", str(args.iters), "--bench-only", ",".join(built)]
    log_path = run.out / "logs" / "bench.log"  # written as it goes: `--wait` and a cut-off run see the rows
    run.log(f"timing {', '.join(built)} in a fresh process (log {log_path})")
    with open(log_path, "w") as log:
        done = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    run.doc = json.loads((run.out / "h200-sd15-crossover.json").read_text())
    if done.returncode != 0:
        tail = [ln for ln in log_path.read_text(errors="replace").strip().splitlines() if ln.strip()][-3:]
        run.doc["bench_error"] = f"timing exited {done.returncode}: " + " | ".join(tail)[-600:]
        run.log(run.doc["bench_error"])
    run.save()


def merge_runs(docs: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """One document from several runs' documents (engines that no single device call could
    build together): every engine, row and step keeps the label of its run, and each run's
    method, versions, notes and GEMM anchor (`anchor`, benchmarks/gemm_anchor.py) are listed,
    since ms from two runs compare only as well as their machines did."""
    if len(docs) != len(labels) or len(set(labels)) != len(labels):
        raise SystemExit("--merge: give one distinct --label per run document")
    merged: dict[str, Any] = {"what": docs[-1]["what"], "gpu": docs[-1]["gpu"], "versions": docs[-1]["versions"], "date": ", ".join(dict.fromkeys(d["date"] for d in docs)), "runs": [], "steps": [], "engines": {}, "rows": [], "finished": True}
    for doc, label in zip(docs, labels):
        keep = ("date", "method", "budget_s", "wall_s", "gpu", "versions", "note", "anchor", "bench_error", "error", "gpu_shared_at_timing")
        merged["runs"].append({"label": label, **{k: doc[k] for k in keep if doc.get(k) not in (None, [], "")}})
        rename = {}
        for which, facts in doc["engines"].items():
            name = which if which not in merged["engines"] else f"{which}@{label}"
            rename[which] = name
            merged["engines"][name] = {**facts, "run": label}
        merged["rows"] += [{**r, "engine": rename.get(r["engine"], r["engine"]), "run": label} for r in doc["rows"]]
        merged["steps"] += [{**st, "run": label} for st in doc["steps"]]
    return merged


def _anchor_line(anchor: dict[str, Any]) -> str:
    rows = anchor.get("rows", [])
    big = next((r for r in rows if "8192^3" in r.get("shape", "")), None)
    small = [r["fp16_ms"] for r in rows if "8192^3" not in r.get("shape", "")]
    text = f"GEMM anchor FP16 8192^3 {big['fp16_tflops']:.0f} TFLOP/s" if big else "GEMM anchor"
    return text + (f", SD 1.5 layer shapes median {sorted(small)[len(small) // 2] * 1000:.1f} us" if small else "")


def to_markdown(doc: dict[str, Any]) -> str:
    gpu, v = doc["gpu"], doc["versions"]
    runs = doc.get("runs")
    lines = [
        f"# SD 1.5 UNet on {gpu['gpu']}: FP16 graphs and the INT8/FP16 crossover on TensorRT {v.get('tensorrt')} ({doc['date']})",
        "",
        doc["what"] + ".",
    ]
    if runs:
        lines += ["", f"Merged from {len(runs)} runs (one device call could not build every engine); the `run` column says which run each engine comes from:", ""]
        for r in runs:
            rv, rg = r.get("versions", {}), r.get("gpu", {})
            extra = [_anchor_line(r["anchor"])] if r.get("anchor") else ["no GEMM anchor"]
            extra += [f"note: {r['note'].rstrip('.')}"] if r.get("note") else []
            extra += [f"**the run ended with an error: {r['error']}**"] if r.get("error") else []
            extra += [f"**timing failed: {r['bench_error']}**"] if r.get("bench_error") else []
            lines.append(f"- **{r['label']}** ({r['date']}): {r.get('method', '-')}. GPU {rg.get('gpu')} driver {rg.get('driver')}; " + ", ".join(f"{k} {val}" for k, val in rv.items()) + ". " + "; ".join(extra) + ".")
        lines.append("")
    else:
        lines += [f"Method: {doc['method']}. GPU driver {gpu.get('driver')}; " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", ""]
    lines += [
        *([f"Timing failed: {doc['bench_error']}", ""] if doc.get("bench_error") else []),
        *([f"Other GPU work still running when timing began (pids {doc['gpu_shared_at_timing']}): the ms below are inflated by it.", ""] if doc.get("gpu_shared_at_timing") else []),
        "## Engines",
        "",
        "| engine | graph | typing | build (s) | plan / activations at profile max (MiB) | INT8 MAC share | INT8 convs |" + (" run |" if runs else ""),
        "| --- | --- | --- | ---: | ---: | ---: | ---: |" + (" --- |" if runs else ""),
    ]
    for which, e in doc["engines"].items():
        share = f"{e['int8_mac_share']:.1%}" if "int8_mac_share" in e else e.get("inspect_error", "-")
        lines.append(f"| {e['label']} | {e['graph']} | {e.get('typing')} | {e.get('build_s')} | {e['plan_mib']} / {e['activation_mib_at_profile_max']} | {share} | {e.get('int8_convs', '-')} |" + (f" {e.get('run', '-')} |" if runs else ""))
    lines += ["", "## ms per call (median) and rel-L2 vs FP32 PyTorch, per shape", "", "| engine | " + " | ".join(f"b{b} {s}x{s}" for b, s in CROSSOVER_SHAPES) + " |", "| --- |" + " ---: |" * len(CROSSOVER_SHAPES)]
    for which in doc["engines"]:
        cells = []
        for b, s in CROSSOVER_SHAPES:
            r = next((r for r in doc["rows"] if r["engine"] == which and r["batch"] == b and r["latent"] == s), None)
            cells.append("-" if r is None else f"error: {r['error'][:60]}" if "error" in r else f"{r['median_ms']:.2f} ({r['rel_l2_vs_fp32']:.3f})")
        lines.append(f"| {doc['engines'][which]['label']} | " + " | ".join(cells) + " |")
    fp16 = {(r["batch"], r["latent"]): r["median_ms"] for r in doc["rows"] if r["engine"] == "fp16" and "median_ms" in r}
    int8 = [r for r in doc["rows"] if r["engine"].startswith("int8") and "median_ms" in r]
    if fp16 and int8:
        fp16_run = next((r.get("run") for r in doc["rows"] if r["engine"] == "fp16"), None)
        lines += ["", "INT8 vs TensorRT FP16 (FP32 graph) at each shape, FP16 ms / INT8 ms (> 1: INT8 faster):", ""]
        for r in int8:
            key = (r["batch"], r["latent"])
            if key in fp16:
                across = f" (across runs: FP16 from {fp16_run}, INT8 from {r['run']})" if r.get("run") != fp16_run else ""
                lines.append(f"- {r['engine']} b{key[0]} {key[1]}x{key[1]}: {fp16[key] / r['median_ms']:.2f}x{across}")
    if doc.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in doc["notes"]]]
    lines += ["", "## Steps", "", "| step | seconds | result |" + (" run |" if runs else ""), "| --- | ---: | --- |" + (" --- |" if runs else "")]
    lines += [f"| {s['step']} | {s['seconds']} | {s['result'].replace('|', '/')} |" + (f" {s.get('run', '-')} |" if runs else "") for s in doc["steps"]]
    return "\n".join(lines) + "\n"


LOG_NAME = "crossover.log"
PID_NAME = "orchestrator.pid"


def detach(args: argparse.Namespace) -> int:
    """Start this run in its own process session and return at once: the device tool ends a
    command's processes when it returns, except (where commands run as root, as on the H200
    machines here) those of a new session, which run on while the machine stays warm. So a
    run longer than one call's 10 minutes spans several calls, each of which only `--wait`s
    (and copies what is written so far)."""
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pid = _pid(out)
    if pid is not None and _alive(pid):
        raise SystemExit(f"a detached run ({pid}) is still writing {out}: `--wait` for it, or give another --out")
    for stale in ("h200-sd15-crossover.json", ".wait-offset", LOG_NAME, PID_NAME):  # an earlier run's "finished" must not end the wait
        (out / stale).unlink(missing_ok=True)
    child = ["--work", str(args.work.resolve()), "--out", str(out)]  # rebuilt from the parsed options, never --detach/--wait
    for option in ("budget_s", "bench_reserve_s", "opt_level", "timesteps", "calib_steps", "warmup", "iters", "engines", "reconstruct_iters", "max_builds", "builds_after", "others_pid_file", "quiet_wait_s", "timing_cache_dir"):
        if getattr(args, option) is not None:
            value = getattr(args, option)
            child += [f"--{option.replace('_', '-')}", str(value.resolve() if isinstance(value, Path) else value)]
    log = open(out / LOG_NAME, "ab")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *child], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    (out / PID_NAME).write_text(str(proc.pid))
    print(f"detached run {proc.pid}; log {out / LOG_NAME}", flush=True)
    return 0


def _pid(out: Path) -> int | None:
    try:
        return int((out / PID_NAME).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _state(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "h200-sd15-crossover.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wait(out: Path, seconds: float) -> int:
    """Print the detached run's new log lines until it finishes or `seconds` pass: 0 when it
    finished, 3 while it still runs, 2 when there is no run (or it died without finishing),
    4 when it finished with an error."""
    out = out.resolve()
    log, offset_file = out / LOG_NAME, out / ".wait-offset"
    pid = _pid(out)
    if pid is None:
        print(f"no detached run in {out} (no {PID_NAME}): a fresh machine, or another --out?")
        return 2
    end = time.monotonic() + seconds
    while True:
        offset = int(offset_file.read_text()) if offset_file.exists() else 0
        if log.exists():
            with open(log, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            if chunk:
                print(chunk.decode(errors="replace"), end="", flush=True)
                offset_file.write_text(str(offset + len(chunk)))
        alive = _alive(pid)
        doc = _state(out)  # read after the liveness check: a run that finished just now is seen finished
        if doc is not None and doc.get("finished"):
            if doc.get("error"):
                print(f"the run finished with an error: {doc['error']}")
                return 4
            return 0
        if not alive:
            print(f"the detached run {pid} ended without finishing; see {log}")
            return 2
        if time.monotonic() >= end:
            print(f"still running after {seconds:.0f} s of waiting")
            return 3
        time.sleep(5.0)


def _alive(pid: int) -> bool:
    """Running (a zombie, a child that exited but is not yet reaped, counts as ended)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state != "Z"


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """The steps the run needs for `args.engines`: exports, quantizations and one build per
    engine, each with the steps it waits for."""
    wanted = args.engines.split(",")
    w = ["--work", str(Path(args.work).resolve())]  # the steps run with cwd = the repo root
    # one timing cache per engine (concurrent builds would race on one file): a finished build
    # leaves its tactic timings there, and a later run that brings the file back skips them
    cache = lambda which: ["--timing-cache", str(args.timing_cache_dir / f"timing-{which}.cache")] if args.timing_cache_dir else []  # noqa: E731
    build = lambda which, after: Job(f"build-{which}", ["build", *w, "--which", which, "--crossover-profile", "--opt-level", str(args.opt_level), *cache(which)], after)  # noqa: E731
    quant = ["--timesteps", str(args.timesteps), "--samples", "2", "--calib-steps", str(args.calib_steps)]
    # the FP16 Q/DQ graphs the wanted engines need: every layer, and/or the convolutions only
    fp16_placements = ",".join(p for p, engines in (("all", ("int8-g16", "int8-g16c")), ("conv", ("int8-g16c-conv",))) if any(e in wanted for e in engines)) or "all"
    jobs = [
        Job("export-fp32", ["export", *w]),
        Job("export-fp16", ["export", *w, "--dtype", "fp16"]),
        Job("quantize-fp32", ["quantize", *w, *quant, "--placements", "all"], ("export-fp32",)),
        Job("quantize-fp16", ["quantize", *w, *quant, "--placements", fp16_placements, "--reuse-table", "--dtype", "fp16"], ("quantize-fp32",)),
    ]
    if "w4a8" in wanted:  # issue 13: a W4A8 table, a short reconstruction on the GPU, its Q/DQ graph
        jobs.append(Job("quantize-w4a8", ["quantize", *w, *quant, "--placements", "all", "--recipe", "w4a8", "--reconstruct-iters", str(args.reconstruct_iters)], ("export-fp32",)))
    needs = {"fp16": ("export-fp32",), "fp16-g16": ("export-fp16",), "int8": ("quantize-fp32",), "int8-g16": ("quantize-fp16",), "int8-g16c": ("quantize-fp16",), "int8-g16c-conv": ("quantize-fp16",), "w4a8": ("quantize-w4a8",)}
    jobs += [build(which, needs[which]) for which in wanted]
    jobs = _needed(jobs, [f"build-{which}" for which in wanted])
    # every build also waits for every quantize job to END (whether it succeeded or not): those
    # hold GPU memory (calibration and reconstruction in torch), and an SD 1.5 INT8 build, whose
    # activations at the profile max are 131 GiB, ran out of memory in its tactic timing beside
    # the W4A8 stage (run 6)
    quantizers = tuple(j.name for j in jobs if j.name.startswith("quantize-"))
    for job in jobs:
        if job.name.startswith("build-"):
            job.waits_for = tuple(q for q in quantizers if q not in job.after)
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/sd15"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=530.0, help="wall seconds for the whole run; builds are killed at budget minus --bench-reserve-s")
    p.add_argument("--bench-reserve-s", type=float, default=110.0)
    p.add_argument("--opt-level", type=int, default=1, help="builder optimization level for every engine (lowered from 3 to fit the budget)")
    p.add_argument("--timesteps", type=int, default=4)
    p.add_argument("--calib-steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--engines", default=",".join(CROSSOVER_ENGINES))
    p.add_argument("--reconstruct-iters", type=int, default=20, help="AdaRound-BRECQ iterations per unit for the w4a8 engine (speed only: the weights are random)")
    p.add_argument("--max-builds", type=int, default=2, help="engine builds at once (0: no cap); they share the one GPU for tactic timing")
    p.add_argument("--builds-after", type=Path, help="start no engine build before this file exists (e.g. TensorRT's libraries still being copied)")
    p.add_argument("--others-pid-file", type=Path, help="pids (one per line) of other GPU work on this machine: timing waits for them to end (up to --quiet-wait-s)")
    p.add_argument("--quiet-wait-s", type=float, default=300.0)
    p.add_argument("--timing-cache-dir", type=Path, help="keep each engine's TensorRT timing cache here (timing-<engine>.cache), read before and merged after its build; bring the files back to make a later run's builds shorter")
    p.add_argument("--detach", action="store_true", help="run in a new process session and return (or --wait); for runs longer than one device call")
    p.add_argument("--wait", type=float, metavar="S", help="print a detached run's progress for up to S seconds; exit 0 finished, 3 still running, 2 died")
    p.add_argument("--bench-only", metavar="ENGINES", help=argparse.SUPPRESS)  # the timing child of bench_in_fresh_process
    p.add_argument("--merge", type=Path, nargs="+", metavar="RUN_JSON", help="write one document (JSON + Markdown in --out) from several runs' h200-sd15-crossover.json; name each with --label")
    p.add_argument("--label", action="append", default=[], help="the name of each --merge run, in order")
    p.add_argument("--note", action="append", default=[], help="a note for the merged document (repeatable): what the runs' numbers mean together")
    args = p.parse_args(argv)
    if (args.label or args.note) and not args.merge:
        p.error("--label and --note name the runs of --merge; give --merge RUN_JSON ...")
    if args.merge:
        doc = merge_runs([json.loads(f.read_text()) for f in args.merge], args.label)
        doc["notes"] = args.note
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "h200-sd15-crossover.json").write_text(json.dumps(doc, indent=1))
        (args.out / "h200-sd15-crossover.md").write_text(to_markdown(doc))
        print(f"merged {len(args.merge)} runs -> {args.out / 'h200-sd15-crossover.md'}")
        return 0
    if args.bench_only:
        bench(Run(args.out, args, resume=True), args, args.bench_only.split(","))
        return 0
    if args.detach:
        detach(args)
        return wait(args.out, args.wait) if args.wait is not None else 0
    if args.wait is not None:
        return wait(args.out, args.wait)
    run = Run(args.out, args)
    deadline = run.t0 + args.budget_s - args.bench_reserve_s
    make_model(args.work)
    wanted = args.engines.split(",")
    jobs = plan_jobs(args)
    try:
        done = run_jobs(run, jobs, deadline, args.max_builds, args.builds_after)
        built = [which for which in wanted if done[f"build-{which}"].state == "ok"]
        run.log(f"built: {', '.join(built) or 'nothing'}; timing")
        run.doc["versions"] = _versions()  # again: TensorRT may have arrived after the start (--builds-after)
        run.save()
        if built:
            wait_for_quiet_gpu(run, args.others_pid_file, args.quiet_wait_s)
            bench_in_fresh_process(run, args, built)
    except BaseException as exc:
        run.doc["error"] = f"{type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        run.doc["finished"] = True
        run.doc["wall_s"] = round(time.monotonic() - run.t0, 1)
        run.save()
    run.log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
