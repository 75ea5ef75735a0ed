"""qdiff's W8A8 next to ONNX Runtime's `quantize_static` on the shipped models.

Why: a quantizer's numbers mean little alone. ONNX Runtime's static quantizer is the tool most
people would reach for first with an ONNX denoiser, so each of its calibrators (MinMax,
Entropy, Percentile) runs here on the same exported FP32 graph, from the same calibration
denoiser calls qdiff's calibration observes (`qdiff.peers`), with settings a TensorRT
deployment could use (QDQ, per-channel INT8 weights, symmetric INT8 activations, the same
layers). Every variant is then sampled from the same seeds and measured against one FP32
reference exactly as `qdiff run` measures qdiff's own graph (`qdiff.evaluate.compare`).

Rows per model:

- qdiff W8A8 as `qdiff run` makes it (max calibrator, split shortcut, `api.RUN_CALIBRATION`);
- qdiff W8A8 without split shortcut (the closest qdiff setting to ORT's MinMax);
- ORT MinMax, Entropy, Percentile;
- ORT MinMax with attention's activation x activation MatMuls quantized too, which is what
  ORT's QDQ quantizer does by default (it ignores `MatMulConstBOnly`);
- ORT MinMax after `quant_pre_process` (ORT's recommended preprocessing), to see whether it
  changes anything; the graph-level differences are reported too;
- a diagnostic, not a quantizer: ORT's MinMax graph with its float readers of quantized
  tensors rewired to the float tensors (qdiff's placement), to locate the gap between them.

Graphs and tables are cached in `--work` by their manifests, so a rerun only samples again.

    .venv/bin/python tools/peer_onnxruntime.py                      # both shipped models
    .venv/bin/python tools/peer_onnxruntime.py --models shapes-ddpm --json /tmp/peer.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qdiff.api import RUN_CALIBRATION, calibrate, export_model, quantize_onnx  # noqa: E402
from qdiff.core.artifacts import library_versions, write_json_atomic, write_text_atomic  # noqa: E402
from qdiff.evaluate import compare, reference_samples, sampling_plan  # noqa: E402
from qdiff.models import PACKAGE_MODELS, load_model  # noqa: E402
from qdiff.peers import ORT_METHODS, quantize_with_onnxruntime  # noqa: E402
from qdiff.peers.onnxruntime_static import ort_settings  # noqa: E402
from qdiff.calib.recipe import load_recipe  # noqa: E402
from qdiff.runtime.backends import OnnxRuntimeDenoiser  # noqa: E402

MODELS = {"shapes-ddpm": 1.0, "shapes-cond": 3.0}  # model -> guidance scale (unconditional: unused)
DIAGNOSTIC = "diagnostic: ORT minmax graph, float readers rewired to the float tensor"


def graph_facts(path: Path) -> dict[str, Any]:
    """Op counts and how many float nodes read a dequantized activation.

    ORT wires every reader of a quantized tensor to the DequantizeLinear output, float readers
    (GroupNorm, skip Concat, residual Add) included; qdiff rewires only the quantized layer.
    Counting those readers shows how far the two placements differ on the same layers.
    """
    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    weighted = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    float_readers = 0
    for node in model.graph.node:
        if node.op_type in weighted or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for name in node.input:
            dq = producer.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] not in init and producer.get(dq.input[0]) is not None:
                float_readers += 1
                break
    ops = [n.op_type for n in model.graph.node]
    return {
        "nodes": len(ops),
        "QuantizeLinear": ops.count("QuantizeLinear"),
        "DequantizeLinear": ops.count("DequantizeLinear"),
        "float_nodes_reading_dequantized_activations": float_readers,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
    }


def rewire_float_readers(src: Path, dst: Path) -> int:
    """A diagnostic copy of an ORT graph whose float readers of quantized tensors read the float
    tensor again, as in qdiff's placement; returns how many inputs it rewired.

    Not a quantizer anyone ships: it isolates how much of ORT's gap to qdiff comes from feeding
    GroupNorms and skip Concats dequantized activations.
    """
    model = onnx.load(str(src), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    rewired = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "QuantizeLinear", "DequantizeLinear"):
            continue
        for j, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] not in init:
                node.input[j] = producer[dq.input[0]].input[0]
                rewired += 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return rewired


def scale_agreement(ort_graph: Path, fp32_graph: Path, table_path: Path) -> dict[str, Any]:
    """Largest relative difference between ORT MinMax's activation scales and qdiff's max
    calibrator's (amax / 127) over the layers both quantize. Same calls, same rule: ~0 says
    both saw exactly the same calibration inputs."""
    from onnx import numpy_helper

    from qdiff.calib.table import CalibrationTable
    from qdiff.peers.onnxruntime_static import weighted_layers

    table = CalibrationTable.load(table_path)
    layers = weighted_layers(fp32_graph)
    model = onnx.load(str(ort_graph), load_external_data=False)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    gaps = []
    for node in model.graph.node:
        module = layers.get(node.name, (None,))[0]
        dq = producer.get(node.input[0]) if node.input else None
        if module in table.layers and dq is not None and dq.op_type == "DequantizeLinear":
            gaps.append(abs(float(init[dq.input[1]]) * 127 / table.layers[module].input - 1))
    return {"layers": len(gaps), "max_rel_diff": float(max(gaps)) if gaps else None}


def output_gap(a: Path, b: Path, unet, seeds: tuple[int, ...] = (1, 2, 3)) -> float:
    """Largest relative L2 between two graphs' outputs on seeded random inputs (0: same function)."""
    from qdiff.export.onnx_export import example_inputs
    from qdiff.core.metrics import relative_l2

    first, second = OnnxRuntimeDenoiser(a), OnnxRuntimeDenoiser(b)
    gaps = []
    for seed in seeds:
        inputs = example_inputs(unet, batch=2, seed=seed, tokens=4)
        sample, t = inputs.pop("sample"), inputs.pop("timestep")
        gaps.append(relative_l2(second(sample, t, **inputs), first(sample, t, **inputs)))
    return float(max(gaps))


def summary_row(label: str, quantizer: str, calibrator: str, comparison, coverage: dict[str, Any], seconds: float, **extra: Any) -> dict[str, Any]:
    s = comparison.summary
    return {
        "label": label,
        "quantizer": quantizer,
        "calibrator": calibrator,
        "mean_psnr": s["mean PSNR (dB)"],
        "min_psnr": s["min PSNR (dB)"],
        "mean_ssim": s["mean SSIM"],
        "mean_step_rel_l2": s["mean step rel-L2 (eps)"],
        "max_step_rel_l2": s["max step rel-L2 (eps)"],
        "shape_fd": s.get("shape-FD quantized"),
        "quantized_layers": f"{coverage['quantized_layers']}/{coverage['weighted_layers']}",
        "mac_share": coverage["mac_share"],
        "quantize_seconds": round(seconds, 1),
        "images": comparison.images,
        "step_rel_l2": [round(r["rel_l2"], 6) for r in comparison.steps],
        **extra,
    }


def measure_model(name: str, guidance: float, work: Path, methods: list[str], preprocess_check: bool) -> dict[str, Any]:
    """All rows for one model (see the module docstring)."""
    torch.manual_seed(0)
    bundle = load_model(PACKAGE_MODELS / name)
    work = work / name
    fp32 = export_model(bundle, work).onnx_path
    plan = sampling_plan(bundle, steps=50, num_images=8, seed=0, guidance_scale=guidance)
    print(f"[{name}] FP32 reference: {len(plan.seeds)} images, {plan.steps} DDIM steps", flush=True)
    reference = reference_samples(bundle, OnnxRuntimeDenoiser(fp32), plan)
    rows, graphs, fd_reference, round_off_gap, scales = [], {"fp32": graph_facts(fp32)}, None, None, None

    for split in (True, False):
        folder = work / ("qdiff-split" if split else "qdiff-nosplit")
        t0 = time.perf_counter()
        table = calibrate(bundle, folder, "w8a8", split_shortcut=split, **RUN_CALIBRATION)
        q = quantize_onnx(fp32, table.table_path, folder / "denoiser.w8a8.onnx")
        seconds = time.perf_counter() - t0
        coverage = q.report.to_json() if hasattr(q.report, "to_json") else q.report
        label = "qdiff W8A8 (`qdiff run`)" if split else "qdiff W8A8, no split shortcut"
        comparison = compare(bundle, reference, OnnxRuntimeDenoiser(q.onnx_path), plan, label="qdiff")
        rows.append(summary_row(label, "qdiff", "max" + (", split shortcut" if split else ""), comparison, coverage, seconds))
        if comparison.shape_fd.get("available"):
            fd_reference = {"fp32": comparison.shape_fd["fp32"], "real_reference": comparison.shape_fd["real_reference"], "n": comparison.shape_fd["n_generated"]}
        graphs[label] = graph_facts(q.onnx_path)
        print(f"[{name}] {label}: {comparison.summary['mean PSNR (dB)']:.2f} dB", flush=True)

    # (method, quant_pre_process first, attention's activation MatMuls quantized too)
    variants = [(m, False, False) for m in methods]
    if "minmax" in methods:
        variants.append(("minmax", False, True))
        if preprocess_check:
            variants.append(("minmax", True, False))
    peer_paths = {}
    for method, pre, act_mm in variants:
        tag = f"ort-{method}{'-pre' if pre else ''}{'-attn' if act_mm else ''}"
        t0 = time.perf_counter()
        peer = quantize_with_onnxruntime(bundle, fp32, work / tag / f"denoiser.ort-{method}.onnx", "w8a8", method=method, preprocess=pre, activation_matmuls=act_mm, **RUN_CALIBRATION)
        seconds = time.perf_counter() - t0
        coverage = peer.report.to_json() if hasattr(peer.report, "to_json") else peer.report
        label = f"ORT quantize_static, {method}" + (" + quant_pre_process" if pre else "") + (", attention MatMuls in INT8 too (ORT's QDQ default)" if act_mm else "")
        comparison = compare(bundle, reference, OnnxRuntimeDenoiser(peer.onnx_path), plan, label=tag)
        calibration = {k: v for k, v in peer.calibration.items() if k != "nodes_excluded"} | {"nodes_excluded": len(peer.calibration.get("nodes_excluded", []))}
        rows.append(summary_row(label, "onnxruntime", method, comparison, coverage, seconds, calibration=calibration, preprocess=pre, activation_matmuls=act_mm))
        graphs[label] = graph_facts(peer.onnx_path)
        peer_paths[(method, pre, act_mm)] = peer.onnx_path
        print(f"[{name}] {label}: {comparison.summary['mean PSNR (dB)']:.2f} dB", flush=True)

    if ("minmax", False, False) in peer_paths:
        diagnostic = work / "ort-minmax-rewired" / "denoiser.onnx"
        rewired = rewire_float_readers(peer_paths[("minmax", False, False)], diagnostic)
        comparison = compare(bundle, reference, OnnxRuntimeDenoiser(diagnostic), plan, label="ort-minmax-rewired")
        label = DIAGNOSTIC
        rows.append(summary_row(label, "diagnostic", "minmax", comparison, coverage_of(rows, "ORT quantize_static, minmax"), 0.0, inputs_rewired=rewired))
        graphs[label] = graph_facts(diagnostic)
        round_off_gap = output_gap(diagnostic, work / "qdiff-nosplit" / "denoiser.w8a8.onnx", bundle.unet)
        scales = scale_agreement(peer_paths[("minmax", False, False)], fp32, work / "qdiff-nosplit" / "calibration.json")
        print(f"[{name}] {label}: {comparison.summary['mean PSNR (dB)']:.2f} dB", flush=True)

    preprocess = None
    if ("minmax", True, False) in peer_paths:
        plain, pre = peer_paths[("minmax", False, False)], peer_paths[("minmax", True, False)]
        preprocess = {"output_rel_l2_between_graphs": output_gap(plain, pre, bundle.unet), "plain": graphs["ORT quantize_static, minmax"], "preprocessed": graphs["ORT quantize_static, minmax + quant_pre_process"]}
    return {
        "model": name,
        "model_sha256": bundle.model_sha256,
        "sampling": plan.to_json(),
        "fd_reference": fd_reference,
        "rows": rows,
        "graphs": graphs,
        "preprocess_check": preprocess,
        "round_off_gap": round_off_gap,
        "minmax_vs_qdiff_max_scales": scales,
    }


def coverage_of(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    row = next(r for r in rows if r["label"] == label)
    done, total = row["quantized_layers"].split("/")
    return {"quantized_layers": int(done), "weighted_layers": int(total), "mac_share": row["mac_share"]}


def markdown(results: list[dict[str, Any]], command: str) -> str:
    recipe = load_recipe("w8a8", **RUN_CALIBRATION)
    settings = ort_settings(recipe, "minmax")
    lines = [
        "# qdiff W8A8 vs ONNX Runtime `quantize_static`",
        "",
        f"Made by `{command}` on {datetime.date.today().isoformat()} (2-core CPU, ONNX Runtime {library_versions().get('onnxruntime')}).",
        "Same exported FP32 graph, same calibration denoiser calls "
        f"({recipe.samples_per_timestep} trajectories x {recipe.num_timesteps} timesteps of a {recipe.calibration_steps}-step DDIM loop, "
        "seeds, conditioning and CFG batches as `qdiff calibrate`), same 8 seeds and 50 DDIM steps, all graphs run by ONNX Runtime on the CPU "
        "and compared with the FP32 graph's samples.",
        "",
        "ORT settings (the fair-peer choice, `qdiff/peers/onnxruntime_static.py`): QDQ, per-channel symmetric INT8 weights, "
        "**symmetric QInt8 activations** (TensorRT only takes zero point 0; ORT's default asymmetric QUInt8 could not be deployed there), "
        "op types " + "/".join(settings["op_types_to_quantize"]) + " with a constant weight (attention's activation x activation MatMuls and conv_in/conv_out "
        "kept in float by node name, the layers qdiff quantizes), "
        "no Q/DQ on layer outputs and float biases (TensorRT's placement rules). Calibrator parameters are ORT's defaults "
        "(Entropy: 128 bins; Percentile: 99.999th, 2048 bins).",
        "",
        "Columns: PSNR/SSIM of the final 8 samples vs the FP32 graph's (same seeds); step rel-L2: the quantized denoiser on the FP32 "
        "trajectory's inputs, relative L2 of its noise prediction, mean and max over the 50 steps; shape-FD: Frechet distance of the samples "
        "to the shapes dataset in a small classifier's feature space (lower is better); INT8 MAC share: of the weighted layers' MACs.",
        "",
    ]
    for result in results:
        sampling = result["sampling"]
        lines += [f"## {result['model']}" + (f", guidance {sampling['guidance_scale']:g}" if sampling["guidance_scale"] != 1.0 else ""), ""]
        header = ["quantizer", "mean PSNR (dB)", "min PSNR (dB)", "mean SSIM", "step rel-L2 mean / max", "shape-FD", "INT8 layers", "INT8 MAC share"]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for r in result["rows"]:
            fd = "n/a" if r["shape_fd"] is None else f"{r['shape_fd']:.3f}"
            lines.append(
                f"| {r['label']} | {r['mean_psnr']:.2f} | {r['min_psnr']:.2f} | {r['mean_ssim']:.3f} | "
                f"{r['mean_step_rel_l2']:.4f} / {r['max_step_rel_l2']:.3f} | {fd} | {r['quantized_layers']} | {r['mac_share']:.1%} |"
            )
        ranked = [r for r in result["rows"] if r["quantizer"] != "diagnostic"]
        best_step = min(ranked, key=lambda r: r["mean_step_rel_l2"])
        best_psnr = max(ranked, key=lambda r: r["mean_psnr"])
        lines += ["", f"Lowest mean step rel-L2: {best_step['label']} ({best_step['mean_step_rel_l2']:.4f}). Highest mean PSNR: {best_psnr['label']} ({best_psnr['mean_psnr']:.2f} dB)."]
        agree = result.get("minmax_vs_qdiff_max_scales")
        if agree and agree.get("max_rel_diff") is not None:
            lines += ["", f"Same calibration data, checked: ORT MinMax's activation scales equal qdiff's max-calibrator scales (amax / 127) on all {agree['layers']} "
                      f"quantized layers to a relative {agree['max_rel_diff']:.1e} (round-off level)."]
        rows = {r["label"]: r for r in result["rows"]}
        check = result.get("preprocess_check")
        plain, pre = rows.get("ORT quantize_static, minmax"), rows.get("ORT quantize_static, minmax + quant_pre_process")
        if check and plain and pre:
            lines += [
                "",
                f"`quant_pre_process` (run with `auto_merge=True`: with its defaults it stops at \"Incomplete symbolic shape inference\" on this graph) "
                f"folds constants and shape subgraphs (nodes {check['plain']['nodes']} -> {check['preprocessed']['nodes']}) and leaves the quantization as it was: "
                f"Q/DQ nodes {check['plain']['QuantizeLinear']}/{check['plain']['DequantizeLinear']} -> {check['preprocessed']['QuantizeLinear']}/{check['preprocessed']['DequantizeLinear']}, "
                f"mean step rel-L2 {plain['mean_step_rel_l2']:.4f} -> {pre['mean_step_rel_l2']:.4f}, PSNR {plain['mean_psnr']:.2f} -> {pre['mean_psnr']:.2f} dB. "
                f"Its outputs differ from the plain graph's by relative L2 {check['output_rel_l2_between_graphs']:.1e} on random inputs, float round-off "
                "turned into rounding flips (see the last paragraph). The peer leaves it off by default.",
            ]
        graphs = result["graphs"]
        qdiff_readers = graphs["qdiff W8A8 (`qdiff run`)"]["float_nodes_reading_dequantized_activations"]
        ort_readers = graphs.get("ORT quantize_static, minmax", {}).get("float_nodes_reading_dequantized_activations")
        if ort_readers is not None:
            lines += [
                "",
                f"Placement: ORT wires every reader of a quantized tensor to its DequantizeLinear, so {ort_readers} float nodes "
                f"(GroupNorm reshapes, skip Concats) read dequantized activations in ORT's graph, {qdiff_readers} in qdiff's. "
                "The diagnostic row rewires them to the float tensors (nothing else changes)"
                + (
                    f", which moves MinMax's mean step rel-L2 from {rows['ORT quantize_static, minmax']['mean_step_rel_l2']:.4f} to "
                    f"{rows[DIAGNOSTIC]['mean_step_rel_l2']:.4f} (qdiff without split shortcut: {rows['qdiff W8A8, no split shortcut']['mean_step_rel_l2']:.4f})."
                    if DIAGNOSTIC in rows and "ORT quantize_static, minmax" in rows
                    else "."
                ),
            ]
        twin, same = rows.get(DIAGNOSTIC), rows.get("qdiff W8A8, no split shortcut")
        noise = result.get("round_off_gap")
        if twin and same and noise is not None:
            fd = "" if twin["shape_fd"] is None else f", shape-FD {abs(twin['shape_fd'] - same['shape_fd']):.2f}"
            lines += [
                "",
                "How steady the numbers are: the diagnostic graph and qdiff's no-split graph quantize the same layers with the same weights and "
                f"scales (up to round-off in the scale), yet their outputs differ by relative L2 {noise:.1e} on random inputs: a round-off difference "
                "flips some roundings, and flips propagate through the network's quantizers. Their rows differ by "
                f"{abs(twin['mean_psnr'] - same['mean_psnr']):.2f} dB mean PSNR, {abs(twin['mean_ssim'] - same['mean_ssim']):.3f} SSIM, "
                f"{abs(twin['mean_step_rel_l2'] - same['mean_step_rel_l2']):.1e} step rel-L2{fd}: gaps of that size between two rows are not differences between quantizers.",
            ]
        fds = result.get("fd_reference")
        if fds:
            lines += [
                "",
                f"shape-FD at n = {fds.get('n', 8)}: FP32 samples {fds['fp32']:.2f}, real vs real {fds['real_reference']:.2f}. At this n the small-sample "
                "term dominates; read the column as a sanity check, not a ranking.",
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(ORT_METHODS), choices=list(ORT_METHODS))
    p.add_argument("--no-preprocess-check", dest="preprocess_check", action="store_false", help="skip the quant_pre_process row")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "peer-onnxruntime", help="graphs and tables (cached by manifest)")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "peer-onnxruntime.json")
    p.add_argument("--md", type=Path, default=None, help="default: the --json path with .md")
    p.add_argument("--render-only", action="store_true", help="measure nothing: rewrite the Markdown from the --json file")
    args = p.parse_args(argv)
    md_path = args.md or args.json.with_suffix(".md")
    if args.render_only:
        payload = json.loads(args.json.read_text(encoding="utf-8"))
        write_text_atomic(md_path, markdown(payload["results"], payload["command"]))
        print(f"wrote {md_path}")
        return 0
    torch.set_num_threads(2)
    command = "python tools/peer_onnxruntime.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    results = []
    for name in args.models:
        results.append(measure_model(name, MODELS[name], args.work, args.methods, args.preprocess_check))
    recipe = load_recipe("w8a8", **RUN_CALIBRATION)
    payload = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "calibration": {k: v for k, v in recipe.to_json().items() if k in ("num_timesteps", "samples_per_timestep", "calibration_steps", "scheduler", "guidance_scale", "batch_size", "seed", "exclude")},
        "ort_settings": {m: ort_settings(recipe, m) for m in args.methods},
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(args.json, json_ready(payload))
    write_text_atomic(md_path, markdown(results, command.strip()))
    print(markdown(results, command.strip()))
    print(f"wrote {args.json} and {md_path} in {payload['seconds']} s")
    return 0


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


if __name__ == "__main__":
    raise SystemExit(main())
