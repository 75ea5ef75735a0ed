"""qdiff's W8A8 next to NVIDIA ModelOpt's INT8 diffusion-UNet recipe.

ModelOpt's recipe (`qdiff.peers.modelopt_int8`: SmoothQuant alpha 0.8 on Linear inputs, the
example's per-step percentile/min-mean calibrator on Conv inputs, per-channel INT8 weights, quant
level 3, the example's float layers) is calibrated from the same denoiser calls qdiff's
calibration observes and exported as a Q/DQ graph with qdiff's input/output names, so
`qdiff build --precision int8` and `qdiff eval` take it as they take qdiff's own.

Two modes:

    # shapes: the shipped models on the CPU, sampled from the same seeds and measured against one
    # FP32 reference exactly as tools/peer_onnxruntime.py does (qdiff.evaluate.compare)
    .venv/bin/python tools/peer_modelopt.py                    # -> docs/results/peer-modelopt.json/.md
    .venv/bin/python tools/peer_modelopt.py --models shapes-ddpm --json /tmp/p.json

    # sd15: the GPU benchmark's SD 1.5 UNet (made by `benchmarks/sd15_unet.py export`), calibrated
    # as `benchmarks/sd15_unet.py quantize` calibrates qdiff (random conditioning, 8 timesteps x 2
    # samples of a 16-step loop); writes <work>/onnx/denoiser.modelopt-int8.onnx (+ manifest)
    python tools/peer_modelopt.py sd15 --work /tmp/sd15 --device cuda [--build]

Rows per shapes model: qdiff W8A8 as `qdiff run` makes it; the same qdiff table placed on ModelOpt's
INT8 layers only (ModelOpt keeps the residual shortcuts and timestep MLPs float, qdiff does not,
so this is the like-for-like row); ModelOpt's recipe; ModelOpt with the
library's MaxCalibrator on Conv inputs (the example's `--collect-method default`); and a
diagnostic with the example's literal min-mean (per-step sums divided by the number of steps,
see the peer's docstring). qdiff's graphs and the FP32 export are read from (and cached in) the
ONNX Runtime peer's work folder, so both peer reports measure the same qdiff graph.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from peer_onnxruntime import graph_facts, json_ready, summary_row  # noqa: E402

from qdiff.api import RUN_CALIBRATION, calibrate, export_model, quantize_onnx  # noqa: E402
from qdiff.core.artifacts import library_versions, write_json_atomic, write_text_atomic  # noqa: E402
from qdiff.calib.recipe import load_recipe  # noqa: E402
from qdiff.core.conditioning import resolve_conditioning  # noqa: E402
from qdiff.evaluate import compare, reference_samples, sampling_plan  # noqa: E402
from qdiff.models import PACKAGE_MODELS, load_model  # noqa: E402
from qdiff.peers.modelopt_int8 import ONNX_NAME, ModelOptInt8Settings, calibration_calls, quantize_with_modelopt  # noqa: E402
from qdiff.runtime.backends import OnnxRuntimeDenoiser  # noqa: E402

MODELS = {"shapes-ddpm": 1.0, "shapes-cond": 3.0}  # model -> guidance scale (as tools/peer_onnxruntime.py)
QDIFF_LABEL = "qdiff W8A8 (`qdiff run`)"
QDIFF_SAME_LAYERS = "qdiff W8A8 on ModelOpt's INT8 layers (its float layers excluded)"
# ModelOpt's float layers as qdiff exclusion patterns (module names, fnmatch).
MODELOPT_FLOAT_PATTERNS = ("conv_in", "conv_out", "*conv_shortcut*", "*time_emb_proj*", "time_embedding*")

# label -> ModelOpt settings overrides (folder name, overrides)
VARIANTS = {
    "recipe": ("ModelOpt INT8 recipe (SmoothQuant 0.8, Conv inputs min-mean)", {}),
    "maxcal": ("ModelOpt INT8, Conv inputs by the library's MaxCalibrator", {"conv_calibrator": "max"}),
    "literal": ("diagnostic: ModelOpt INT8 with the example's literal min-mean (sum / steps)", {"mean_divisor": "steps"}),
}

# benchmarks/sd15_unet.py `quantize` defaults (--timesteps 8 --samples 2 --calib-steps 16, batch =
# samples) and its random conditioning: the ModelOpt graph sees the calls qdiff's W8A8 saw.
SD15_CALIBRATION = {"num_timesteps": 8, "samples_per_timestep": 2, "calibration_steps": 16}
# benchmarks/sd15_unet.py `build`: the same profile for every engine it compares.
SD15_PROFILE = {"batch": (1, 2, 2), "size": 64, "tokens": 77}


# ----------------------------------------------------------------------------- shapes


def measure_model(name: str, guidance: float, work: Path, qdiff_work: Path, variants: list[str]) -> dict[str, Any]:
    torch.manual_seed(0)
    bundle = load_model(PACKAGE_MODELS / name)
    shared = qdiff_work / name
    fp32 = export_model(bundle, shared).onnx_path
    plan = sampling_plan(bundle, steps=50, num_images=8, seed=0, guidance_scale=guidance)
    print(f"[{name}] FP32 reference: {len(plan.seeds)} images, {plan.steps} DDIM steps", flush=True)
    reference = reference_samples(bundle, OnnxRuntimeDenoiser(fp32), plan)
    rows, graphs, fd_reference = [], {"fp32": graph_facts(fp32)}, None

    t0 = time.perf_counter()
    table = calibrate(bundle, shared / "qdiff-split", "w8a8", split_shortcut=True, **RUN_CALIBRATION)
    q = quantize_onnx(fp32, table.table_path, shared / "qdiff-split" / "denoiser.w8a8.onnx")
    seconds = time.perf_counter() - t0
    coverage = q.report.to_json() if hasattr(q.report, "to_json") else q.report
    comparison = compare(bundle, reference, OnnxRuntimeDenoiser(q.onnx_path), plan, label="qdiff")
    rows.append(summary_row(QDIFF_LABEL, "qdiff", "max, split shortcut", comparison, coverage, seconds))
    if comparison.shape_fd.get("available"):
        fd_reference = {"fp32": comparison.shape_fd["fp32"], "real_reference": comparison.shape_fd["real_reference"], "n": comparison.shape_fd["n_generated"]}
    graphs[QDIFF_LABEL] = graph_facts(q.onnx_path) | {"float_nodes_reading_dequantized_activations_only": activation_float_readers(q.onnx_path)}
    print(f"[{name}] {QDIFF_LABEL}: {comparison.summary['mean PSNR (dB)']:.2f} dB", flush=True)

    # qdiff's same table, placed on ModelOpt's INT8 layers only (its float layers excluded): the
    # quantizers compared on the same layers. Placement only, no recalibration.
    t0 = time.perf_counter()
    same = quantize_onnx(fp32, table.table_path, work / name / "qdiff-modelopt-layers" / "denoiser.w8a8-custom.onnx", exclude=MODELOPT_FLOAT_PATTERNS)
    seconds += time.perf_counter() - t0
    coverage = same.report.to_json() if hasattr(same.report, "to_json") else same.report
    comparison = compare(bundle, reference, OnnxRuntimeDenoiser(same.onnx_path), plan, label="qdiff-modelopt-layers")
    rows.append(summary_row(QDIFF_SAME_LAYERS, "qdiff", "max, split shortcut", comparison, coverage, seconds))
    graphs[QDIFF_SAME_LAYERS] = graph_facts(same.onnx_path)
    print(f"[{name}] {QDIFF_SAME_LAYERS}: {comparison.summary['mean PSNR (dB)']:.2f} dB", flush=True)

    # The calibration calls, made once for all variants (only if one needs them).
    recipe = load_recipe("w8a8", **RUN_CALIBRATION)
    conditioning = resolve_conditioning(bundle, recipe.samples_per_timestep, seed=recipe.seed)
    cache: dict[str, list] = {}

    def calls() -> list:
        if "calls" not in cache:
            cache["calls"] = list(calibration_calls(bundle, recipe, conditioning))
        return cache["calls"]

    for key in variants:
        label, overrides = VARIANTS[key]
        t0 = time.perf_counter()
        peer = quantize_with_modelopt(bundle, work / name / f"modelopt-{key}" / ONNX_NAME, "w8a8", settings=overrides, fp32_onnx=fp32, calibration_inputs=calls, **RUN_CALIBRATION)
        seconds = time.perf_counter() - t0
        coverage = peer.report.to_json() if hasattr(peer.report, "to_json") else peer.report
        comparison = compare(bundle, reference, OnnxRuntimeDenoiser(peer.onnx_path), plan, label=f"modelopt-{key}")
        settings = ModelOptInt8Settings().with_overrides(**overrides)
        calibrator = f"{settings.algorithm} {settings.alpha} (Linear); " + (
            f"{settings.conv_calibrator}/{settings.collect_method}" + (" sum/steps" if settings.mean_divisor == "steps" else "") if settings.conv_calibrator == "percentile" else "max"
        ) + " (Conv)"
        rows.append(summary_row(label, "modelopt", calibrator, comparison, coverage, seconds, settings=settings.to_json(), float_layers=coverage.get("float_layers", [])))
        graphs[label] = graph_facts(peer.onnx_path) | {
            "Mul_smoothquant": _smoothquant_muls(peer.onnx_path),
            "float_nodes_reading_dequantized_activations_only": activation_float_readers(peer.onnx_path),
        }
        print(f"[{name}] {label}: {comparison.summary['mean PSNR (dB)']:.2f} dB ({seconds:.0f} s)", flush=True)
    return {"model": name, "model_sha256": bundle.model_sha256, "sampling": plan.to_json(), "fd_reference": fd_reference, "rows": rows, "graphs": graphs}


def activation_float_readers(path: Path) -> int:
    """Float nodes that read a dequantized *activation* (a DequantizeLinear whose QuantizeLinear
    reads a computed tensor). peer_onnxruntime.graph_facts' count also takes the Transpose that
    the exporter puts after each Linear weight's Q/DQ pair, which is not an activation."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    count = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "QuantizeLinear", "DequantizeLinear"):
            continue
        for name in node.input:
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in init:
                count += 1
                break
    return count


def _smoothquant_muls(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("input_quantizer/Mul"))


def markdown(results: list[dict[str, Any]], command: str, versions: dict[str, str]) -> str:
    recipe = load_recipe("w8a8", **RUN_CALIBRATION)
    s = ModelOptInt8Settings()
    lines = [
        "# qdiff W8A8 vs NVIDIA ModelOpt's INT8 diffusion recipe",
        "",
        f"Made by `{command}` on {datetime.date.today().isoformat()} (2-core CPU, nvidia-modelopt {versions.get('nvidia-modelopt', '?')}, "
        f"ONNX Runtime {versions.get('onnxruntime', '?')}). Same calibration denoiser calls as `qdiff calibrate` "
        f"({recipe.samples_per_timestep} trajectories x {recipe.num_timesteps} timesteps of a {recipe.calibration_steps}-step DDIM loop, seeds, "
        "conditioning and CFG batches), same 8 seeds and 50 DDIM steps, every graph run by ONNX Runtime on the CPU and compared with the FP32 "
        "graph's samples (the columns of docs/results/peer-onnxruntime.md; its qdiff row is this qdiff row).",
        "",
        "ModelOpt's recipe, rebuilt on the `modelopt.torch.quantization` API from NVIDIA/TensorRT-Model-Optimizer "
        "`examples/diffusers/quantization` (`qdiff/peers/modelopt_int8.py` names the file behind each setting): "
        f"quant level {s.quant_level:g} (every Conv2d and Linear), INT8 weights per output channel, "
        f"SmoothQuant alpha {s.alpha} on Linear inputs (per-tensor after smoothing, a per-channel `Mul` before the quantizer), "
        f"Conv inputs per tensor by the example's step calibrator ({s.collect_method}, percentile {s.percentile}: per-step mean of the maxima, "
        "then the minimum over steps), output quantizers off, and float: "
        + ", ".join(f"`{p}`" for p in s.float_modules if p in ("time_emb_proj", "time_embedding", "conv_in", "conv_out", "conv_shortcut"))
        + " (the example's `filter_func`; qdiff keeps only conv_in/conv_out float). Symmetric INT8, FP32 graph I/O, opset 17, qdiff's input names.",
        "",
        "ModelOpt quantizes fewer layers than qdiff (it keeps the 1x1 residual shortcuts and the timestep MLPs float), so the second row "
        "places qdiff's own table on exactly ModelOpt's INT8 layers (`qdiff.api.quantize_onnx(..., exclude=...)`, no recalibration): compare the quantizers there, "
        "and the first row for what each tool does by default.",
        "",
        "Deviations from the example (and why) are in the peer's docstring; the one that moves numbers: its min-mean divides each step's "
        "sum of maxima by the number of steps, not by the number of calls, which equals a mean only by accident (0.8 x the mean for its SDXL "
        "command, 1/10 here). The peer uses the mean; the diagnostic row uses the literal rule.",
        "",
        "Columns: PSNR/SSIM of the final 8 samples vs the FP32 graph's (same seeds); step rel-L2: the quantized denoiser on the FP32 "
        "trajectory's inputs, relative L2 of its noise prediction, mean and max over the 50 steps; shape-FD: Frechet distance to the shapes "
        "dataset in a small classifier's feature space (lower is better); INT8 MAC share: of the weighted layers' MACs.",
        "",
    ]
    for result in results:
        guidance = result["sampling"].get("guidance_scale")
        title = result["model"] + (f", guidance {guidance:g}" if guidance and guidance != 1.0 else "")
        lines += [
            f"## {title}",
            "",
            "| quantizer | calibrator | mean PSNR (dB) | min PSNR (dB) | mean SSIM | step rel-L2 mean / max | shape-FD | INT8 layers | INT8 MAC share |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in result["rows"]:
            fd = "-" if r["shape_fd"] is None else f"{r['shape_fd']:.3f}"
            lines.append(
                f"| {r['label']} | {r['calibrator']} | {r['mean_psnr']:.2f} | {r['min_psnr']:.2f} | {r['mean_ssim']:.3f} | "
                f"{r['mean_step_rel_l2']:.4f} / {r['max_step_rel_l2']:.3f} | {fd} | {r['quantized_layers']} | {r['mac_share']:.1%} |"
            )
        rows = {r["label"]: r for r in result["rows"]}
        peer = rows.get(VARIANTS["recipe"][0])
        if peer:
            kinds: dict[str, int] = {}
            for layer in peer.get("float_layers", []):
                pattern = layer["reason"].split("pattern ")[-1].strip("')") if "pattern" in layer["reason"] else layer["reason"]
                kinds[pattern] = kinds.get(pattern, 0) + 1
            facts = result["graphs"].get(VARIANTS["recipe"][0], {})
            lines += [
                "",
                f"ModelOpt's graph: {facts.get('QuantizeLinear')} QuantizeLinear / {facts.get('DequantizeLinear')} DequantizeLinear, "
                f"{facts.get('Mul_smoothquant')} SmoothQuant `Mul` nodes; float weighted layers by filter pattern: "
                + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
                + f". {facts.get('float_nodes_reading_dequantized_activations_only')} float nodes read a dequantized activation "
                f"({result['graphs'].get(QDIFF_LABEL, {}).get('float_nodes_reading_dequantized_activations_only')} in qdiff's graph): the "
                "quantizers sit inside each module's forward, so, unlike ONNX Runtime's peer, no float reader sees quantized values.",
            ]
        best = min(result["rows"], key=lambda r: r["mean_step_rel_l2"])
        top = max(result["rows"], key=lambda r: r["mean_psnr"])
        lines += ["", f"Lowest mean step rel-L2: {best['label']} ({best['mean_step_rel_l2']:.4f}). Highest mean PSNR: {top['label']} ({top['mean_psnr']:.2f} dB)."]
        fds = result.get("fd_reference")
        if fds:
            lines += ["", f"shape-FD at n = {fds.get('n', 8)}: FP32 samples {fds['fp32']:.2f}, real vs real {fds['real_reference']:.2f}; a sanity check, not a ranking."]
        lines.append("")
    lines += [
        "Row-to-row noise: docs/results/peer-onnxruntime.md measured that two graphs with the same layers and scales up to round-off "
        "differ by ~0.1 dB mean PSNR and ~1e-4 step rel-L2 on these models; smaller gaps are not differences between quantizers.",
        "",
    ]
    return "\n".join(lines)


def cmd_shapes(args: argparse.Namespace, command: str) -> int:
    md_path = args.md or args.json.with_suffix(".md")
    if args.render_only:
        payload = json.loads(args.json.read_text(encoding="utf-8"))
        write_text_atomic(md_path, markdown(payload["results"], payload["command"], payload["versions"]))
        print(f"wrote {md_path}")
        return 0
    torch.set_num_threads(2)
    started = time.perf_counter()
    results = [measure_model(name, MODELS[name], args.work, args.qdiff_work, args.variants) for name in args.models]
    recipe = load_recipe("w8a8", **RUN_CALIBRATION)
    versions = library_versions()
    import modelopt

    versions["nvidia-modelopt"] = modelopt.__version__
    payload = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "calibration": {k: v for k, v in recipe.to_json().items() if k in ("num_timesteps", "samples_per_timestep", "calibration_steps", "scheduler", "guidance_scale", "batch_size", "seed")},
        "modelopt_settings": {key: ModelOptInt8Settings().with_overrides(**VARIANTS[key][1]).to_json() for key in args.variants},
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(args.json, json_ready(payload))
    text = markdown(results, command, versions)
    write_text_atomic(md_path, text)
    print(text)
    print(f"wrote {args.json} and {md_path} in {payload['seconds']} s")
    return 0


# ----------------------------------------------------------------------------- sd15


def cmd_sd15(args: argparse.Namespace) -> int:
    from qdiff.core.errors import ModelLoadError

    folder = args.work / "sd15-unet"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no SD 1.5 UNet folder at {folder}", hint=f"make it first: python benchmarks/sd15_unet.py export --work {args.work}")
    fp32 = args.work / "onnx" / "denoiser.onnx"
    out = args.work / "onnx" / ONNX_NAME
    t0 = time.perf_counter()
    calibration = {"num_timesteps": args.timesteps, "samples_per_timestep": args.samples, "calibration_steps": args.calib_steps, "batch_size": args.samples}
    result = quantize_with_modelopt(
        folder, out, args.recipe, device=args.device, random_conditioning=True, fp32_onnx=fp32 if fp32.is_file() else None, force=args.force, **calibration
    )
    report = result.report.to_json() if hasattr(result.report, "to_json") else result.report
    print(f"modelopt: {result.onnx_path} ({report['quantized_layers']}/{report['weighted_layers']} layers INT8, {report['mac_share']:.1%} of MACs; {time.perf_counter() - t0:.0f} s)")
    if args.build:
        from qdiff import api

        built = api.build_engine(result.onnx_path, args.work / "engine-modelopt-int8", precision="int8", optimization_level=args.opt_level, force=args.force, **SD15_PROFILE)
        print(f"build modelopt-int8: {built.engine_path} ({built.manifest.details.get('build_seconds')} s)")
    else:
        b = SD15_PROFILE["batch"]
        print(
            f"build it like the benchmark's engines: qdiff build {result.onnx_path} -o {args.work / 'engine-modelopt-int8'} --precision int8 "
            f"--batch {','.join(map(str, b))} --size {SD15_PROFILE['size']} --tokens {SD15_PROFILE['tokens']}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["shapes", *argv]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("shapes", help="the shipped models on the CPU (default)")
    s.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    s.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    s.add_argument("--work", type=Path, default=ROOT / "out" / "peer-modelopt", help="ModelOpt graphs (cached by manifest)")
    s.add_argument("--qdiff-work", type=Path, default=ROOT / "out" / "peer-onnxruntime", help="FP32 export and qdiff's graphs, shared with tools/peer_onnxruntime.py")
    s.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "peer-modelopt.json")
    s.add_argument("--md", type=Path, default=None, help="default: the --json path with .md")
    s.add_argument("--render-only", action="store_true", help="measure nothing: rewrite the Markdown from the --json file")
    g = sub.add_parser("sd15", help="the GPU benchmark's SD 1.5 UNet -> <work>/onnx/denoiser.modelopt-int8.onnx")
    g.add_argument("--work", type=Path, default=Path("/tmp/sd15"), help="the work folder of benchmarks/sd15_unet.py")
    g.add_argument("--device", default="cuda", help="where ModelOpt calibrates (default: %(default)s)")
    g.add_argument("--recipe", default="w8a8")
    g.add_argument("--timesteps", type=int, default=SD15_CALIBRATION["num_timesteps"])
    g.add_argument("--samples", type=int, default=SD15_CALIBRATION["samples_per_timestep"])
    g.add_argument("--calib-steps", type=int, default=SD15_CALIBRATION["calibration_steps"])
    g.add_argument("--build", action="store_true", help="also build <work>/engine-modelopt-int8 with the benchmark's profile (TensorRT)")
    g.add_argument("--opt-level", type=int)
    g.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.mode == "sd15":
        return cmd_sd15(args)
    return cmd_shapes(args, ("python tools/peer_modelopt.py " + " ".join(argv[1:])).strip())


if __name__ == "__main__":
    from qdiff.core.errors import QdiffError

    try:
        raise SystemExit(main())
    except QdiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
