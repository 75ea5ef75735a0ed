"""SD 1.5 UNet on one GPU: PyTorch FP16 eager, torch.compile, TensorRT FP16 and qdiff INT8.

The SD 1.5 UNet architecture (qdiff/configs/sd15-unet.json, 859.5M parameters) with seeded
random weights: speed does not depend on the weights, and no weights can be downloaded here.
Stages, each resumable in one work folder (the builds take minutes each):

    python benchmarks/sd15_unet.py export   --work /tmp/sd15          # model folder + FP32 ONNX
    python benchmarks/sd15_unet.py quantize --work /tmp/sd15          # calibrate + W8A8 Q/DQ graph
    python benchmarks/sd15_unet.py build    --work /tmp/sd15 --which fp16
    python benchmarks/sd15_unet.py build    --work /tmp/sd15 --which int8
    python benchmarks/sd15_unet.py bench    --work /tmp/sd15 --out benchmarks/results

`bench` measures per-UNet-call latency (CUDA events, warm-up, median of many calls) at batch 1
and 2 (2 = classifier-free guidance), end-to-end 50-step DDIM sampling time at guidance 7.5,
INT8 coverage by MACs (engine inspector), build time, plan size and activation memory, and the
error of each setup against the FP32 PyTorch UNet on the same inputs. It writes
`<out>/<gpu>-sd15-unet.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "qdiff" / "configs" / "sd15-unet.json"
PEAK_FP16_TFLOPS = {"H200": 989.0, "H100": 989.0}
PEAK_INT8_TOPS = {"H200": 1979.0, "H100": 1979.0}


def _model_dir(work: Path) -> Path:
    return work / "sd15-unet"


def make_model(work: Path, config: Path = CONFIG, seed: int = 0) -> Path:
    """A bare UNet folder with seeded random weights (fp32 safetensors)."""
    from diffusers import UNet2DConditionModel

    folder = _model_dir(work)
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(json.loads(config.read_text()))
    unet.save_pretrained(folder, safe_serialization=True)
    return folder


def cmd_export(args: argparse.Namespace) -> None:
    from qdiff import api

    folder = make_model(args.work, args.config)
    t0 = time.perf_counter()
    if args.dtype == "fp16":  # opset 17 so TensorRT 8.6's parser takes the float graph
        from qdiff.core.errors import QdiffError

        try:
            result = api.export_model(folder, args.work / "onnx-fp16", check=False, opset=17, dtype="fp16")
        except QdiffError as exc:  # the FP16 exporter may need a newer opset: take its default
            print(f"export: fp16 at opset 17 refused ({exc}); using the exporter's default opset")
            result = api.export_model(folder, args.work / "onnx-fp16", check=False, dtype="fp16")
        _record_graph(args.work, "fp16-g16", Path(result.onnx_path))
    else:
        result = api.export_model(folder, args.work / "onnx", check=False)
    print(f"export: {result.onnx_path} in {time.perf_counter() - t0:.0f} s")


def cmd_quantize(args: argparse.Namespace) -> None:
    from qdiff import api

    folder = _model_dir(args.work)
    onnx = args.work / "onnx" / api.ONNX_NAME
    calib_dir = args.work / ("calib" if args.recipe == "w8a8" else f"calib-{args.recipe}")  # one table per recipe
    table_path = calib_dir / api.TABLE_NAME
    device = "cuda" if torch.cuda.is_available() else "cpu"  # calibration and reconstruction on the GPU (SD 1.5's calibration: ~150 s on 16 CPU cores)
    t0 = time.perf_counter()
    if not (args.reuse_table and table_path.exists()):
        calibrated = api.calibrate(
            folder, calib_dir, args.recipe, random_conditioning=True, device=device,
            num_timesteps=args.timesteps, samples_per_timestep=args.samples, calibration_steps=args.calib_steps, batch_size=args.samples,
        )
        table_path = calibrated.table_path
        _print_phases("calibrate", calibrated.phases)
        print(f"calibrate: {time.perf_counter() - t0:.0f} s on {device}", flush=True)
    if args.reconstruct_iters:  # issue 13: a short reconstruction shows the artifact deploys (random weights: speed only)
        t1 = time.perf_counter()
        recon = api.reconstruct(
            folder, calib_dir / "reconstruction", table_path, random_conditioning=True,
            iterations=args.reconstruct_iters, batch_size=args.samples, device=device,
        )
        _print_phases("reconstruct", recon.phases)
        print(f"reconstruct: {time.perf_counter() - t1:.0f} s", flush=True)
        t2 = time.perf_counter()
        q = api.quantize_onnx(onnx, recon.table_path, reconstruction=recon.weights_path, placement="all")
        _record_graph(args.work, args.recipe, Path(q.onnx_path))
        print(f"quantize: {q.onnx_path} ({time.perf_counter() - t2:.0f} s)", flush=True)
        print(f"reconstruct + quantize: {q.onnx_path} ({time.perf_counter() - t1:.0f} s)", flush=True)
        return
    for placement in args.placements.split(","):
        if args.dtype == "fp16":  # both FP16 Q/DQ graphs come from the FP32 export (its overflow probe runs that graph)
            suffix = "" if placement == "all" else f"-{placement}"
            q = api.quantize_onnx(onnx, table_path, placement=placement, dtype="fp16")
            _record_graph(args.work, f"int8-g16{suffix}", Path(q.onnx_path))
            # and the opset-17 one TensorRT 8.6 can parse: FP32 Q/DQ islands in the FP16 graph
            q = api.quantize_onnx(onnx, table_path, placement=placement, dtype="fp16", opset=17)
            _record_graph(args.work, f"int8-g16c{suffix}", Path(q.onnx_path))
        else:
            q = api.quantize_onnx(onnx, table_path, placement=placement)
            if placement == "all":
                _record_graph(args.work, "int8", Path(q.onnx_path))
        print(f"quantize: {q.onnx_path} ({time.perf_counter() - t0:.0f} s)", flush=True)


def _print_phases(stage: str, phases: dict[str, float]) -> None:
    """One line per phase of a stage (its result's `phases`), flushed: a log of a killed run
    says where the time went up to there. Nothing when the stage reused its artifact."""
    for name, seconds in phases.items():
        print(f"{stage} phase {name}: {seconds:.1f} s", flush=True)


def _graph(work: Path, which: str) -> Path:
    """The graph an engine is built from: what `quantize` recorded in <work>/graphs.json (the
    quantizer names its outputs), else ENGINES' default name."""
    recorded = work / "graphs.json"
    if recorded.exists():
        known = json.loads(recorded.read_text())
        if which in known:
            return Path(known[which])
    return work / "onnx" / ENGINES[which][0]


def _record_graph(work: Path, which: str, path: Path) -> None:
    recorded = work / "graphs.json"
    known = json.loads(recorded.read_text()) if recorded.exists() else {}
    known[which] = str(path)
    recorded.write_text(json.dumps(known, indent=1))


# Engine name -> (graph in <work>/onnx, precision, float layers pinned to, label). The qdiff
# INT8 graphs are one calibration table under three placements (qdiff.export.placement); the
# `-pin` engines add network-level FP16 constraints on the float layers (qdiff.engines.precision).
ENGINES = {
    "fp16": ("denoiser.onnx", "fp16", None, "TensorRT FP16"),
    "int8": ("denoiser.w8a8.onnx", "int8", None, "qdiff W8A8 (all Conv/Linear, split shortcut)"),
    "int8-pin": ("denoiser.w8a8.onnx", "int8", "fp16", "qdiff W8A8 (all Conv/Linear) + float layers pinned FP16"),
    "int8-conv": ("denoiser.w8a8-conv.onnx", "int8", None, "qdiff W8A8 (convolutions only, split shortcut)"),
    "int8-conv-pin": ("denoiser.w8a8-conv.onnx", "int8", "fp16", "qdiff W8A8 (convolutions only) + float layers pinned FP16"),
    "int8-conv-ff": ("denoiser.w8a8-conv-ff.onnx", "int8", None, "qdiff W8A8 (convolutions + feed-forward Linears)"),
    "int8-conv-ff-pin": ("denoiser.w8a8-conv-ff.onnx", "int8", "fp16", "qdiff W8A8 (convolutions + feed-forward) + float layers pinned FP16"),
    "modelopt": ("denoiser.modelopt-int8.onnx", "int8", None, "ModelOpt INT8 (its diffusion UNet recipe), same builder"),
    # Issue 12: the FP16 graphs (`qdiff export --dtype fp16`, `qdiff quantize --dtype fp16`), in <work>/onnx-fp16.
    "fp16-g16": ("../onnx-fp16/denoiser.fp16.onnx", "fp16", None, "TensorRT FP16 from the FP16 graph"),
    "int8-g16": ("denoiser.w8a8.fp16.onnx", "int8", None, "qdiff W8A8 from the FP16 Q/DQ graph (opset 19)"),
    "int8-g16c": ("denoiser.w8a8.fp16-op17.onnx", "int8", None, "qdiff W8A8 from the FP16 graph with FP32 Q/DQ islands (opset 17)"),
    # 8.6's Myelin asserts on INT8 weights inside the attention blocks of int8-g16c; with Q/DQ on
    # the convolutions only, the attention blocks are plain FP16 graph, which Myelin fuses in the
    # FP16 engine: the one INT8 engine on 8.6 whose attention may run as the FP16 engine's does.
    "int8-g16c-conv": ("denoiser.w8a8-conv.fp16-op17.onnx", "int8", None, "qdiff W8A8 convolutions only, FP16 graph with FP32 Q/DQ islands (opset 17)"),
    # Issue 13: W4A8 (INT4-valued weights in INT8 storage, INT8 kernels) from a reconstructed table.
    "w4a8": ("denoiser.w4a8-adaround-brecq.onnx", "w4a8", None, "qdiff W4A8 (AdaRound-BRECQ weights, all Conv/Linear)"),
}

# `crossover`: the shapes where INT8 may cross FP16 on TensorRT 8.6 (batch, latent side), all
# covered by ONE dynamic profile per engine so each precision is built once.
CROSSOVER_SHAPES = ((1, 64), (2, 64), (8, 64), (1, 128), (2, 128))
CROSSOVER_ENGINES = ("fp16", "fp16-g16", "int8", "int8-g16", "int8-g16c")


def cmd_build(args: argparse.Namespace) -> None:
    from qdiff import api

    graph, precision, float_layers, _ = ENGINES[args.which]
    batch, size = (1, 2, 2), 64
    if args.crossover_profile:  # one profile over every CROSSOVER_SHAPES shape
        batch = (min(b for b, _ in CROSSOVER_SHAPES), 2, max(b for b, _ in CROSSOVER_SHAPES))
        size = (min(s for _, s in CROSSOVER_SHAPES), 64, max(s for _, s in CROSSOVER_SHAPES))
    result = api.build_engine(
        _graph(args.work, args.which), args.work / f"engine-{args.which}", precision=precision, float_layers=float_layers,
        batch=batch, size=size, tokens=77, optimization_level=args.opt_level, timing_cache=args.timing_cache, force=args.force,
    )
    print(f"build {args.which}: {result.engine_path} ({result.manifest.details.get('build_seconds')} s)")


# ----------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], Any], warmup: int, iters: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": statistics.median(times), "p10_ms": times[len(times) // 10], "p90_ms": times[(9 * len(times)) // 10], "calls": iters}


def _inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 64, 64, generator=g).cuda(),
        "timestep": torch.full((batch,), 500.0).cuda(),
        "encoder_hidden_states": torch.randn(batch, 77, 768, generator=g).cuda(),
    }


class TorchFp16:
    """The UNet in FP16 behind qdiff's denoiser contract (fp32 in, fp32 out, like the engines)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.device = torch.device("cuda")

    @torch.no_grad()
    def __call__(self, sample, timestep, encoder_hidden_states=None, **_):
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        return self.unet(sample.half(), t, encoder_hidden_states.half(), return_dict=False)[0].float()


def e2e_sampling(denoiser: Any, steps: int, runs: int) -> dict[str, float]:
    """50-step DDIM with CFG 7.5 (batch-2 calls), latents on the GPU, no text encoder/VAE."""
    from diffusers import DDIMScheduler

    from qdiff.core.conditioning import Conditioning
    from qdiff.runtime.sampler import denoise

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    g = torch.Generator().manual_seed(1)
    cond = Conditioning({"encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}, {"encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}, "random")
    noise = torch.randn(1, 4, 64, 64, generator=g).cuda()
    times = []
    for i in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        denoise(denoiser, sched, noise, steps, conditioning=cond, guidance_scale=7.5)
        torch.cuda.synchronize()
        if i:  # the first run warms up (graph capture, compile)
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "runs": runs, "steps": steps}


def _gpu_facts() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    driver = "?"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
        driver = (out.strip().splitlines() or ["?"])[0]  # one line per GPU
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "gpu": props.name, "sm": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1), "driver": driver,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "all"),
    }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("diffusers", "tensorrt", "onnx"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = "-"
    return out


def cmd_bench(args: argparse.Namespace) -> None:
    from diffusers import UNet2DConditionModel

    from qdiff import api
    from qdiff.engines.inspector import graph_nodes
    from qdiff.engines.manifest import read_engine_manifest
    from qdiff.core.metrics import relative_l2
    from qdiff.runtime.tensorrt_backend import TensorRTDenoiser

    setups = args.setups.split(",")
    gpu = _gpu_facts()
    short = next((k for k in PEAK_FP16_TFLOPS if k in gpu["gpu"]), None)
    unet = UNet2DConditionModel.from_pretrained(_model_dir(args.work)).eval().cuda()
    feeds = {b: _inputs(b) for b in (1, 2)}
    with torch.no_grad():
        ref = {b: unet(f["sample"], f["timestep"], f["encoder_hidden_states"], return_dict=False)[0].float() for b, f in feeds.items()}
    unet = unet.half()
    macs_b2 = sum(n.macs for n in graph_nodes(_graph(args.work, "fp16"), {"sample": (2, 4, 64, 64), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}))
    rows: list[dict[str, Any]] = []

    def measure(name: str, denoiser: Any, extra: dict[str, Any]) -> None:
        row = {"setup": name, **extra}
        for b, f in feeds.items():
            call = lambda f=f: denoiser(f["sample"], f["timestep"], f["encoder_hidden_states"])  # noqa: E731
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            stats = time_calls(call, args.warmup, args.iters)
            row[f"batch{b}"] = {**stats, "rel_l2_vs_fp32": relative_l2(call().float(), ref[b]), "torch_peak_extra_mib": round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)}
        row["e2e_50_steps"] = e2e_sampling(denoiser, args.steps, args.e2e_runs)
        b2 = row["batch2"]["median_ms"]
        row["tflops_batch2"] = round(2 * macs_b2 / (b2 * 1e-3) / 1e12, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "eager" in setups:
        measure("PyTorch FP16 eager", TorchFp16(unet), {})
    if "compile" in setups:
        compiled = torch.compile(unet)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(feeds[2]["sample"].half(), feeds[2]["timestep"], feeds[2]["encoder_hidden_states"].half())
        torch.cuda.synchronize()
        measure("torch.compile FP16 (default mode)", TorchFp16(compiled), {"compile_s": round(time.perf_counter() - t0, 1)})
        del compiled
    del unet
    torch.cuda.empty_cache()
    for which in [s.removeprefix("trt-") for s in setups if s.startswith("trt-")]:
        engine_dir = args.work / f"engine-{which}"
        info = read_engine_manifest(engine_dir)
        label = ENGINES[which][3]
        report = api.inspect_engine(engine_dir, profile=args.profile, runs=10, out=args.out / f"inspect-{which}")
        summary = report.summary()
        d = info.manifest.details
        extra = {
            "build_s": d.get("build_seconds"),
            "plan_mib": round(d.get("plan_bytes", 0) / 2**20),
            "activation_mib": round(d.get("device_memory_bytes", 0) / 2**20),
            "int8_mac_share": summary["int8_mac_share"],
            "int8_convs": f"{summary['convolutions']['int8']}/{summary['convolutions']['total']}",
            "fused_blocks_fp32_io": f"{summary['fused_blocks_with_fp32_io']}/{summary['fused_blocks']}",
            "reformats": summary["reformat_layers"],
        }
        if args.profile:
            extra["profile_ms_by_kind"] = summary.get("profile_ms_by_kind")
        measure(label, TensorRTDenoiser(engine_dir), extra)
        torch.cuda.empty_cache()

    result = {
        "what": "SD 1.5 UNet (diffusers UNet2DConditionModel, SD 1.5 config, 859.5M parameters, seeded random weights), latent 64x64, 77 text tokens",
        "method": f"CUDA events; {args.warmup} warm-up calls then the median of {args.iters}; inputs and outputs FP32 on the GPU for every setup; e2e = {args.steps}-step DDIM, CFG 7.5 (batch-2 calls), median of {args.e2e_runs} runs after one warm-up run",
        "gmac_per_call_batch2": round(macs_b2 / 1e9, 1),
        "floor_ms_batch2": {"fp16": round(2 * macs_b2 / (PEAK_FP16_TFLOPS.get(short, 989.0) * 1e12) * 1e3, 3), "int8": round(2 * macs_b2 / (PEAK_INT8_TOPS.get(short, 1979.0) * 1e12) * 1e3, 3)},
        "gpu": gpu,
        "versions": _versions(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{(short or 'gpu').lower()}-sd15-unet" + (f".{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(to_markdown(result))
    print(to_markdown(result))


def cmd_merge(args: argparse.Namespace) -> None:
    """One table from several `bench` runs of the same session (e.g. one per GPU of a machine).

    Rows keep their order and record the GPU they ran on; runs on different GPU models or with
    different methods are refused rather than mixed into one table."""
    parts = [json.loads(Path(f).read_text()) for f in args.inputs]
    first = parts[0]
    for part, name in zip(parts, args.inputs):
        if part["gpu"]["gpu"] != first["gpu"]["gpu"] or part["method"] != first["method"]:
            raise SystemExit(f"{name}: another GPU or method than {args.inputs[0]}; not merging")
    rows = []
    for part in parts:
        for row in part["rows"]:
            rows.append({**row, "gpu_slot": part["gpu"].get("cuda_visible_devices", "all")})
    merged = {**first, "rows": rows, "merged_from": [Path(f).name for f in args.inputs]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(merged, indent=1))
    args.out.with_suffix(".md").write_text(to_markdown(merged))
    print(to_markdown(merged))


def to_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    fp16 = next((r for r in rows if r["setup"] == "TensorRT FP16"), None)
    compiled = next((r for r in rows if r["setup"].startswith("torch.compile")), None)
    lines = [
        f"# SD 1.5 UNet on {result['gpu']['gpu']} ({result['date']})",
        "",
        result["what"] + ".",
        f"{result['method']}. GPU driver {result['gpu']['driver']}; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        f"One batch-2 call is {result['gmac_per_call_batch2']} GMAC: at dense peak it cannot go below {result['floor_ms_batch2']['fp16']} ms in FP16 or {result['floor_ms_batch2']['int8']} ms in INT8.",
        "",
        "| setup | ms/call b1 | ms/call b2 | vs TRT FP16 (b2) | vs torch.compile (b2) | % of FP16 peak (b2) | 50-step e2e (s) | rel-L2 vs FP32 (b2) | INT8 MAC share | build (s) | plan / activations (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        b2 = r["batch2"]["median_ms"]
        vs = f"{fp16['batch2']['median_ms'] / b2:.2f}x" if fp16 else "-"
        vs_compile = f"{compiled['batch2']['median_ms'] / b2:.2f}x" if compiled else "-"
        mem = f"{r['plan_mib']} / {r['activation_mib']}" if "plan_mib" in r else f"- / {r['batch2']['torch_peak_extra_mib']:.0f}"
        share = f"{r['int8_mac_share']:.1%}" if "int8_mac_share" in r else "-"
        build = r.get("build_s", r.get("compile_s", "-"))
        pct = 100 * result["floor_ms_batch2"]["fp16"] / b2
        lines.append(
            f"| {r['setup']} | {r['batch1']['median_ms']:.2f} | {b2:.2f} | {vs} | {vs_compile} | {pct:.0f}% | {r['e2e_50_steps']['median_s']:.3f} | {r['batch2']['rel_l2_vs_fp32']:.4f} | {share} | {build} | {mem} |"
        )
    profiled = [r for r in rows if r.get("profile_ms_by_kind")]
    if profiled:
        kinds = ["fused block", "INT8", "FP16", "FP32", "standalone quantize", "reformat"]
        kinds += sorted({k for r in profiled for k in r["profile_ms_by_kind"]} - set(kinds))
        lines += [
            "",
            "Where the time goes (b2, per-layer profile via `qdiff inspect --profile`: the sum of layer medians, ms; profiling syncs after every layer, so sums exceed the call time):",
            "",
            "| engine | " + " | ".join(kinds) + " | sum |",
            "| --- | " + " | ".join("---:" for _ in kinds) + " | ---: |",
        ]
        for r in profiled:
            t = r["profile_ms_by_kind"]
            lines.append(f"| {r['setup']} | " + " | ".join(f"{t[k]:.2f}" if k in t else "-" for k in kinds) + f" | {sum(t.values()):.2f} |")
    extra = [r for r in rows if "int8_convs" in r]
    if extra:
        lines += ["", "| engine | INT8 convolutions | fused blocks with FP32 I/O | reformat layers |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['setup']} | {r['int8_convs']} | {r['fused_blocks_fp32_io']} | {r['reformats']} |" for r in extra]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge several bench JSON files into one table")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--out", type=Path, required=True, help="output stem (.json and .md are written)")
    for name in ("export", "quantize", "build", "bench"):
        s = sub.add_parser(name)
        s.add_argument("--work", type=Path, default=Path("/tmp/sd15"))
        if name in ("export", "quantize"):
            s.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="fp16: the FP16 graph (export) / FP16 Q/DQ graph from it (quantize), in <work>/onnx-fp16")
        if name == "export":
            s.add_argument("--config", type=Path, default=CONFIG, help="UNet config (default: SD 1.5)")
        if name == "quantize":
            s.add_argument("--recipe", default="w8a8")
            s.add_argument("--timesteps", type=int, default=8)
            s.add_argument("--samples", type=int, default=2)
            s.add_argument("--calib-steps", type=int, default=16)
            s.add_argument("--reuse-table", action="store_true", help="use the recipe's table if it exists (<work>/calib for w8a8, <work>/calib-<recipe> otherwise; same seeded model)")
            s.add_argument("--placements", default="all,conv,conv-ff", help="comma-separated qdiff.export.placement names, one Q/DQ graph each")
            s.add_argument("--reconstruct-iters", type=int, default=0, help="> 0: AdaRound-BRECQ with this many iterations per unit on the GPU, then the Q/DQ graph from it (recorded as the recipe's engine, e.g. w4a8)")
        if name == "build":
            s.add_argument("--which", choices=list(ENGINES), required=True)
            s.add_argument("--opt-level", type=int)
            s.add_argument("--timing-cache", type=Path, help="builder timing cache file (opt-in: on 8.6 a cache from another graph made builds fail)")
            s.add_argument("--crossover-profile", action="store_true", help="one dynamic profile over batch 1-8 and 64-128 latents (the crossover shapes)")
            s.add_argument("--force", action="store_true")
        if name == "bench":
            s.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
            s.add_argument("--setups", default="eager,compile,trt-fp16,trt-int8,trt-int8-conv")
            s.add_argument("--warmup", type=int, default=10)
            s.add_argument("--iters", type=int, default=50)
            s.add_argument("--steps", type=int, default=50)
            s.add_argument("--e2e-runs", type=int, default=3)
            s.add_argument("--profile", action="store_true", help="also per-layer profile each engine (qdiff inspect --profile)")
            s.add_argument("--tag", help="suffix of the output files (<gpu>-sd15-unet.<tag>.json), for runs merged later")
    args = p.parse_args(argv)
    {"export": cmd_export, "quantize": cmd_quantize, "build": cmd_build, "bench": cmd_bench, "merge": cmd_merge}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
