"""The committed H200 benchmark results: complete, self-consistent, and rendered by the script's
own code (so the Markdown in the repo is what the JSON says), and `merge` refuses to mix GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.sd15_unet import ENGINES, main, to_markdown

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def result():
    return json.loads((RESULTS / "h200-sd15-unet.json").read_text())


def test_every_setup_of_the_issue_is_measured_with_its_facts(result):
    setups = [r["setup"] for r in result["rows"]]
    labels = {label for *_, label in ENGINES.values()}
    assert setups[:2] == ["PyTorch FP16 eager", "torch.compile FP16 (default mode)"]
    assert "TensorRT FP16" in setups and any(s.startswith("ModelOpt INT8") for s in setups)
    assert sum(s.startswith("qdiff W8A8") for s in setups) >= 3
    for row in result["rows"]:
        for b in ("batch1", "batch2"):
            assert row[b]["p10_ms"] <= row[b]["median_ms"] <= row[b]["p90_ms"] and row[b]["calls"] >= 30
        assert row["e2e_50_steps"]["steps"] == 50
        if row["setup"] in labels:  # a TensorRT engine: coverage, build time, memory and profile
            assert row["build_s"] > 0 and row["plan_mib"] > 0 and row["activation_mib"] > 0
            assert sum(row["profile_ms_by_kind"].values()) > row["batch2"]["median_ms"] * 0.9
    assert result["gpu"]["driver"].count("\n") == 0 and "H200" in result["gpu"]["gpu"]
    assert result["floor_ms_batch2"]["int8"] == pytest.approx(result["floor_ms_batch2"]["fp16"] / 2, rel=1e-2)


def test_committed_markdown_is_the_rendering_of_the_json(result):
    rendered = [line for line in to_markdown(result).splitlines() if line.startswith("|")]
    committed = [line for line in (RESULTS / "h200-sd15-unet.md").read_text().splitlines() if line.startswith("|")]
    assert rendered == committed


def test_merge_refuses_runs_from_another_gpu(result, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result))
    other = {**result, "gpu": {**result["gpu"], "gpu": "NVIDIA H100"}}
    b.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="another GPU"):
        main(["merge", str(a), str(b), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m.json").exists()
    main(["merge", str(a), str(a), "--out", str(tmp_path / "m")])
    merged = json.loads((tmp_path / "m.json").read_text())
    assert len(merged["rows"]) == 2 * len(result["rows"]) and all("gpu_slot" in r for r in merged["rows"])


def test_w4a8_stage_reconstructs_and_records_a_deployable_graph(tmp_path):
    """`sd15_unet.py quantize --recipe w4a8 --reconstruct-iters N` (issue 13's W4A8 engine) on a
    tiny SD-style UNet on the CPU: its own table, a reconstruction artifact, and a Q/DQ graph
    whose weights are INT4-valued in INT8 storage, recorded as the `w4a8` engine's graph."""
    import sys

    import numpy as np
    import onnx
    from onnx import numpy_helper

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import per_channel, tiny_cond_unet

    from benchmarks.sd15_unet import _graph

    tiny_cond_unet("sd").save_pretrained(tmp_path / "sd15-unet", safe_serialization=True)
    main(["export", "--work", str(tmp_path)])
    main(["quantize", "--work", str(tmp_path), "--recipe", "w4a8", "--timesteps", "2", "--samples", "1", "--calib-steps", "2", "--reconstruct-iters", "2"])
    graph = _graph(tmp_path, "w4a8")
    assert graph.name == ENGINES["w4a8"][0] and graph.exists()
    from qdiff.engines.builder import check_precision, graph_facts

    assert "W4A8" in check_precision(ENGINES["w4a8"][1], graph_facts(graph), graph)  # the builder takes it as the engine's precision
    assert (tmp_path / "calib-w4a8" / "reconstruction" / "reconstruction.safetensors").exists()
    assert not (tmp_path / "calib").exists()  # the W8A8 table's folder is not touched
    model = onnx.load(str(graph))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weight_qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
    assert len(weight_qs) > 10
    for node in weight_qs:  # the FP32 weight TensorRT folds through its Q: exactly on the 4-bit grid
        w, scale = inits[node.input[0]], inits[node.input[1]]
        levels = w / per_channel(scale, w.ndim, next((a.i for a in node.attribute if a.name == "axis"), 1))
        assert np.abs(levels - np.rint(levels)).max() < 1e-3, node.name
        assert levels.min() >= -8.001 and levels.max() <= 7.001, node.name


def test_crossover_detached_run_is_followed_by_wait_until_it_finishes(tmp_path):
    """The crossover runs longer than one device call, so it detaches and later calls `--wait`:
    on a tiny SD-style UNet on the CPU (no TensorRT here), the detached run exports, records
    the build's failure as a row with its reason, marks itself finished, and `--wait` returns 0
    having printed the run's log."""
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import tiny_cond_unet

    work, out = tmp_path / "work", tmp_path / "out"
    tiny_cond_unet("sd").save_pretrained(work / "sd15-unet", safe_serialization=True)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sd15_crossover.py"
    assert subprocess.run([sys.executable, str(script), "--out", str(out), "--wait", "5"], capture_output=True, text=True, timeout=60).returncode == 2  # no run there
    started = subprocess.run([sys.executable, str(script), "--work", str(work), "--out", str(out), "--engines", "fp16", "--budget-s", "600", "--bench-reserve-s", "0", "--detach", "--wait", "0"], capture_output=True, text=True, timeout=60)
    try:
        assert started.returncode in (0, 3), started.stderr[-2000:]
        again = subprocess.run([sys.executable, str(script), "--work", str(work), "--out", str(out), "--detach"], capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "still writing" in again.stderr  # a live run is not clobbered
        waited = subprocess.run([sys.executable, str(script), "--out", str(out), "--wait", "500"], capture_output=True, text=True, timeout=560)
        assert waited.returncode == 0, waited.stdout[-2000:] + waited.stderr[-2000:]
    finally:
        import os
        import signal

        pid = int((out / "orchestrator.pid").read_text())
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    doc = json.loads((out / "h200-sd15-crossover.json").read_text())
    steps = {s["step"]: s["result"] for s in doc["steps"]}
    assert doc["finished"] and steps["export-fp32"] == "ok" and "export-fp16" not in steps
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        assert "TensorRT is not importable" in steps["build-fp16"]
    assert "start export-fp32" in started.stdout + waited.stdout


def test_crossover_builds_wait_for_their_gate_and_timing_for_other_gpu_work(tmp_path, monkeypatch):
    """Builds start only once the gate file exists (TensorRT still being copied), while a job
    that needs no TensorRT runs at once; timing waits for the listed GPU processes to end and
    records any still alive at its timeout."""
    import argparse
    import subprocess
    import sys
    import threading
    import time as _time

    from benchmarks import sd15_crossover as xo

    args = argparse.Namespace(opt_level=1, max_builds=2, warmup=1, iters=1, timesteps=1, calib_steps=1, budget_s=60)
    run = xo.Run(tmp_path / "out", args)
    gate = tmp_path / "trt-ready"
    started: dict[str, float] = {}

    real_popen = subprocess.Popen

    def short_sleep(argv, **kw):  # each job's process is a short sleep, so no model is needed
        started[argv[-1]] = _time.monotonic()  # run_jobs calls [python, script, *job.argv]
        return real_popen([sys.executable, "-c", "import time; time.sleep(0.2)"], **kw)

    with monkeypatch.context() as m:
        m.setattr(xo.subprocess, "Popen", short_sleep)
        threading.Timer(3.0, gate.touch).start()
        t0 = _time.monotonic()
        done = xo.run_jobs(run, [xo.Job("export-fp32", ["export-fp32"]), xo.Job("build-fp16", ["build-fp16"])], deadline=t0 + 30, builds_after=gate)
    assert done["export-fp32"].state == "ok" and done["build-fp16"].state == "ok"
    assert started["export-fp32"] - t0 < 2.5  # not gated
    assert started["build-fp16"] - t0 >= 3.0  # gated until the file appeared

    # a build waits for the other quantize job to END, and runs when that one failed
    def fail_slowly(argv, **kw):
        started[argv[-1]] = _time.monotonic()
        code = "import sys, time; time.sleep(1.5); sys.exit(1)" if argv[-1] == "quantize-w4a8" else "import time; time.sleep(0.2)"
        return real_popen([sys.executable, "-c", code], **kw)

    with monkeypatch.context() as m:
        m.setattr(xo.subprocess, "Popen", fail_slowly)
        t0 = _time.monotonic()
        jobs = [xo.Job("quantize-fp32", ["quantize-fp32"]), xo.Job("quantize-w4a8", ["quantize-w4a8"]),
                xo.Job("build-int8", ["build-int8"], ("quantize-fp32",), waits_for=("quantize-w4a8",)), xo.Job("build-w4a8", ["build-w4a8"], ("quantize-w4a8",))]
        done = xo.run_jobs(run, jobs, deadline=t0 + 30)
    assert done["quantize-w4a8"].state == "failed" and done["build-w4a8"].state == "skipped"
    assert done["build-int8"].state == "ok" and started["build-int8"] - t0 >= 1.5  # after the failed job ended, not skipped for it
    assert any(st["step"] == "build-w4a8" and st["result"] == "skipped: needs quantize-w4a8" for st in run.doc["steps"])

    sleeper = real_popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pids = tmp_path / "others.pids"
        pids.write_text(f"{sleeper.pid}\n")
        xo.wait_for_quiet_gpu(run, pids, seconds=0.5)
        assert run.doc["gpu_shared_at_timing"] == [sleeper.pid]  # still alive at the timeout: recorded
    finally:
        sleeper.kill()
        sleeper.wait()
    xo.wait_for_quiet_gpu(run, pids, seconds=5)
    assert run.doc["gpu_shared_at_timing"] == []
    assert "inflated" not in (run.out / "h200-sd15-crossover.md").read_text()


def test_crossover_builds_keep_one_timing_cache_per_engine(tmp_path):
    """With --timing-cache-dir every engine build reads and merges its own cache file (two
    builds at once would race on one), so a later run that brings the files back skips the
    tactic timing; without it no build is given a cache, and only the steps the engines need run.
    Every build waits for every quantize job to end (their torch work holds GPU memory), but
    needs only its own to succeed."""
    import argparse

    from benchmarks import sd15_crossover as xo

    base = dict(work=tmp_path / "w", engines="int8,w4a8", opt_level=1, timesteps=1, calib_steps=1, reconstruct_iters=2)
    jobs = {j.name: j for j in xo.plan_jobs(argparse.Namespace(**base, timing_cache_dir=tmp_path / "caches"))}
    assert set(jobs) == {"export-fp32", "quantize-fp32", "quantize-w4a8", "build-int8", "build-w4a8"}
    assert jobs["build-w4a8"].after == ("quantize-w4a8",) and jobs["build-w4a8"].waits_for == ("quantize-fp32",)  # ended, in any state
    assert jobs["build-int8"].after == ("quantize-fp32",) and jobs["build-int8"].waits_for == ("quantize-w4a8",)
    for which in ("int8", "w4a8"):
        argv = jobs[f"build-{which}"].argv
        assert argv[argv.index("--timing-cache") + 1] == str(tmp_path / "caches" / f"timing-{which}.cache")
    plain = xo.plan_jobs(argparse.Namespace(**base, timing_cache_dir=None))
    assert not any("--timing-cache" in j.argv for j in plain)


def test_crossover_times_engines_in_a_fresh_process_and_keeps_the_document(tmp_path):
    """Timing runs in a child process (an orchestrator started before TensorRT arrived cannot
    load it later): the child appends to the orchestrator's document, and when it fails (here:
    no CUDA, no model) the failure is recorded there with the child's own words, the steps stay."""
    import argparse
    import sys

    from benchmarks import sd15_crossover as xo

    ns = argparse.Namespace(work=tmp_path / "work", opt_level=1, max_builds=1, warmup=1, iters=1, timesteps=2, calib_steps=2, budget_s=10)
    run = xo.Run(tmp_path / "out", ns)
    run.doc["steps"].append({"step": "build-int8", "result": "ok", "seconds": 1.0})
    xo.bench_in_fresh_process(run, ns, ["int8"])
    doc = json.loads((tmp_path / "out" / "h200-sd15-crossover.json").read_text())
    assert doc["steps"] == [{"step": "build-int8", "result": "ok", "seconds": 1.0}]
    assert doc["bench_error"].startswith("timing exited 1") and "Error" in doc["bench_error"], doc["bench_error"]
    assert "Timing failed: timing exited 1" in (tmp_path / "out" / "h200-sd15-crossover.md").read_text()


def test_crossover_runs_merge_into_one_document_that_says_which_run_each_number_is_from(tmp_path):
    """Engines no single device call could build together are merged from their runs'
    documents: each engine, row and step keeps its run's label, an engine built in both runs is
    kept twice (renamed), the INT8/FP16 ratios say when they compare two runs, and every run's
    GEMM anchor is listed; a missing label is refused."""
    import subprocess
    import sys

    from benchmarks import sd15_crossover as xo

    def doc(date: str, engines: dict, rows: list, **extra) -> dict:
        return {"what": "SD 1.5", "method": f"method of {date}", "gpu": {"gpu": "NVIDIA H200", "driver": "580"}, "versions": {"tensorrt": "8.6.0"}, "date": date, "steps": [{"step": "build", "result": "ok", "seconds": 1.0}], "engines": engines, "rows": rows, **extra}

    facts = {"label": "FP16", "graph": "g.onnx", "plan_mib": 1, "activation_mib_at_profile_max": 2}
    row = lambda e, ms: {"engine": e, "batch": 2, "latent": 64, "median_ms": ms, "rel_l2_vs_fp32": 0.01}  # noqa: E731
    a = doc("2026-12-02", {"fp16": facts}, [row("fp16", 10.0)])
    anchor = {"rows": [{"shape": "big 8192^3", "fp16_ms": 1.7, "fp16_tflops": 643.0}, {"shape": "conv", "fp16_ms": 0.05, "fp16_tflops": 300.0}]}
    b = doc("2026-12-03", {"int8": {**facts, "label": "W8A8"}, "fp16": facts}, [row("int8", 15.0), row("fp16", 9.0)], anchor=anchor)
    files = []
    for name, d in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(d))
        files.append(str(tmp_path / name))
    script = Path(xo.__file__)
    done = subprocess.run([sys.executable, str(script), "--merge", *files, "--label", "run 4", "--label", "run 6", "--note", "what they mean", "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    merged = json.loads((tmp_path / "m" / "h200-sd15-crossover.json").read_text())
    assert {k: e["run"] for k, e in merged["engines"].items()} == {"fp16": "run 4", "int8": "run 6", "fp16@run 6": "run 6"}
    assert [(r["engine"], r["run"]) for r in merged["rows"]] == [("fp16", "run 4"), ("int8", "run 6"), ("fp16@run 6", "run 6")]
    md = (tmp_path / "m" / "h200-sd15-crossover.md").read_text()
    assert "- int8 b2 64x64: 0.67x (across runs: FP16 from run 4, INT8 from run 6)" in md
    assert "GEMM anchor FP16 8192^3 643 TFLOP/s" in md and "no GEMM anchor" in md and "- what they mean" in md
    assert "| build | 1.0 | ok | run 6 |" in md
    bad = subprocess.run([sys.executable, str(script), "--merge", *files, "--label", "run 4", "--out", str(tmp_path / "n")], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "one distinct --label per run" in bad.stderr and not (tmp_path / "n").exists()


def test_fp16_islands_graph_with_convolution_only_qdq_leaves_attention_plain_fp16(tmp_path):
    """The `int8-g16c-conv` engine's graph (`quantize --dtype fp16 --placements all,conv`) on a tiny
    SD-style UNet: opset 17 (8.6's parser), Q/DQ in front of every convolution and of no MatMul, so
    the attention blocks that 8.6's Myelin compiles hold no INT8 weights, and FP16 tensors there;
    the crossover plans it from the FP16 quantize step."""
    import argparse
    import sys

    import onnx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import tiny_cond_unet

    from benchmarks import sd15_crossover as xo
    from benchmarks.sd15_unet import _graph

    tiny_cond_unet("sd").save_pretrained(tmp_path / "sd15-unet", safe_serialization=True)
    main(["export", "--work", str(tmp_path)])
    quant = ["--timesteps", "2", "--samples", "1", "--calib-steps", "2"]
    main(["quantize", "--work", str(tmp_path), *quant, "--placements", "all"])
    main(["quantize", "--work", str(tmp_path), *quant, "--placements", "all,conv", "--reuse-table", "--dtype", "fp16"])
    graph = _graph(tmp_path, "int8-g16c-conv")
    assert graph.exists() and graph != _graph(tmp_path, "int8-g16c")
    model = onnx.load(str(graph))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    producer = {out: n for n in model.graph.node for out in n.output}

    def fed_by_dq(node) -> bool:  # through the FP16 Cast that ends each FP32 island
        for name in node.input:
            src = producer.get(name)
            while src is not None and src.op_type == "Cast":
                src = producer.get(src.input[0])
            if src is not None and src.op_type == "DequantizeLinear":
                return True
        return False

    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert convs and matmuls
    assert sum(fed_by_dq(n) for n in convs) >= len(convs) - 2  # conv_in / conv_out stay float by the recipe
    assert not any(fed_by_dq(n) for n in matmuls)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    jobs = {j.name: j for j in xo.plan_jobs(argparse.Namespace(work=tmp_path, engines="int8-g16c-conv", opt_level=1, timesteps=1, calib_steps=1, reconstruct_iters=0, timing_cache_dir=None))}
    argv = jobs["quantize-fp16"].argv
    assert argv[argv.index("--placements") + 1] == "conv" and jobs["build-int8-g16c-conv"].after == ("quantize-fp16",)
    assert jobs["build-int8-g16c-conv"].waits_for == ("quantize-fp32",)
