"""ONNX Runtime's static quantizer (`quantize_static`) as a peer of qdiff's W8A8.

It quantizes the same exported FP32 graph from the same calibration denoiser calls qdiff's
calibration observes (same scheduler trajectories, seeds, kept timesteps, conditioning and
classifier-free-guidance batches), with ONNX Runtime's own calibrators: MinMax, Entropy,
Percentile. The settings make it a fair peer, not ONNX Runtime's CPU defaults:

- QDQ format, INT8 weights per output channel, INT8 activations per tensor;
- activations QInt8 *symmetric* (zero point 0), not ORT's default asymmetric QUInt8: TensorRT's
  explicit quantization accepts only symmetric INT8, and qdiff's graphs are built for it, so an
  asymmetric peer would get a finer grid than any TensorRT deployment could use;
- the same layers: the op types the recipe quantizes (Conv/ConvTranspose/Gemm/MatMul) with a
  constant weight; attention's activation x activation MatMuls and the recipe's exclusions
  (conv_in, conv_out) are kept in float by node name (`excluded_nodes`: ORT's QDQ path ignores
  `MatMulConstBOnly`);
- no Q/DQ on the outputs of those layers and biases left in float (`QuantizeBias=False`), as
  TensorRT's placement rules and qdiff's pass do; ORT's defaults would add output Q/DQ pairs
  and INT32 biases that a TensorRT build does not use.

What stays ORT's own, on purpose: the calibrators and their defaults, and the placement of a
quantized tensor's Q/DQ pair. ORT feeds every reader of that tensor from the DequantizeLinear,
float readers (GroupNorm, skip Concat) included, where qdiff rewires only the quantized layer;
on shapes-ddpm that alone costs ORT's MinMax ~2 dB against qdiff's identical max scales
(docs/results/peer-onnxruntime.md, diagnostic row).

`quant_pre_process` (ORT's recommended preprocessing) is optional (`preprocess=True`) and off
by default: on the shipped models it folds constants and shape subgraphs but yields the same
Q/DQ placement and the same function up to float round-off, and with its defaults it stops on
the exported UNet ("Incomplete symbolic shape inference"), so it runs with `auto_merge=True`.

Memory: each calibration call is fed to ORT as one batch, and ORT reduces the activations of
one call at a time (`CalibStridedMinMax=1`, which despite its name strides every calibrator),
so peak memory is one denoiser call's activations, not the whole calibration set's. The
calibration calls themselves are produced lazily, one batch of trajectories at a time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qdiff.core.artifacts import CachedStage, Manifest, read_manifest, sha256_file
from qdiff.calib.recipe import Recipe, load_recipe
from qdiff.calib.trajectories import CalibrationInput, calibration_step_indices, count_calibration_calls
from qdiff.core.errors import ArtifactMismatchError, OnnxModelError, QuantizationError
from qdiff.export.qdq import LayerDecision, QdqReport
from qdiff.core.progress import log, progress

ORT_METHODS = ("minmax", "entropy", "percentile")

# The recipe fields that decide which denoiser calls calibration sees and which layers are
# quantized: all the peer takes from a qdiff recipe (its calibrator settings are ORT's own).
RECIPE_FIELDS = (
    "num_timesteps", "samples_per_timestep", "calibration_steps", "timestep_window", "scheduler",
    "guidance_scale", "batch_size", "seed", "exclude", "quantize_ops",
)  # fmt: skip


def ort_settings(recipe: Recipe, method: str) -> dict[str, Any]:
    """The `quantize_static` arguments of the peer, JSON-ready (see the module docstring)."""
    if method not in ORT_METHODS:
        raise QuantizationError(f"unknown ONNX Runtime calibration method {method!r}", hint=f"use one of {', '.join(ORT_METHODS)}")
    if recipe.weight_bits != 8 or recipe.activation_bits != 8:
        raise QuantizationError(
            f"the ONNX Runtime peer quantizes W8A8 only; recipe {recipe.name!r} asks for W{recipe.weight_bits}A{recipe.activation_bits}",
            hint="use the w8a8 recipe",
        )
    ops = list(recipe.quantize_ops)
    return {
        "quant_format": "QDQ",
        "calibrate_method": {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}[method],
        "op_types_to_quantize": ops,
        "per_channel": True,
        "reduce_range": False,
        "activation_type": "QInt8",
        "weight_type": "QInt8",
        "extra_options": {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "CalibTensorRangeSymmetric": True,
            "OpTypesToExcludeOutputQuantization": ops,
            "QuantizeBias": False,
            "CalibStridedMinMax": 1,
        },
    }


def _ort_call_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    kwargs = dict(settings)
    kwargs["quant_format"] = QuantFormat[kwargs["quant_format"]]
    kwargs["calibrate_method"] = CalibrationMethod[kwargs["calibrate_method"]]
    kwargs["activation_type"] = QuantType[kwargs["activation_type"]]
    kwargs["weight_type"] = QuantType[kwargs["weight_type"]]
    kwargs["extra_options"] = dict(kwargs["extra_options"])
    return kwargs


class CalibrationFeeds:
    """`onnxruntime.quantization.CalibrationDataReader` over qdiff's calibration calls.

    ORT asks for its data in consecutive ranges (`set_range`, then `get_next` until None);
    the calls come from a generator that runs the sampler lazily, so ranges must move forward.
    """

    def __init__(self, calls: Iterator[CalibrationInput], count: int, input_names: list[str], source: Path) -> None:
        self.calls = calls
        self.count = count
        self.input_names = input_names
        self.source = source
        self.position = 0
        self.stop = count
        self.fed: list[dict[str, Any]] = []  # what ORT was given: step, timestep, rows

    def __len__(self) -> int:
        return self.count

    def set_range(self, start_index: int, end_index: int) -> None:
        if start_index != self.position:
            raise QuantizationError(f"ONNX Runtime asked for calibration calls {start_index}..{end_index} after {self.position}; the calls can only be read in order")
        self.stop = min(end_index, self.count)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.stop:
            return None
        call = next(self.calls, None)
        if call is None:
            raise QuantizationError(f"the calibration loop yielded {self.position} calls, {self.count} were expected")
        feeds = call.graph_feeds()
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise QuantizationError(
                f"{self.source.name} needs input(s) {', '.join(missing)} that the calibration calls do not carry (they have {', '.join(feeds)})",
                hint="give the conditioning the graph was exported with (prompts, class labels, --embeddings or --random-conditioning)",
            )
        self.position += 1
        self.fed.append({"step": call.step, "timestep": call.timestep, "rows": int(call.sample.shape[0])})
        return {n: feeds[n] for n in self.input_names}


def weighted_layers(graph_path: Path) -> dict[str, tuple[str, str]]:
    """Node name -> (PyTorch module name, op) of each weighted layer, found the way qdiff's own
    Q/DQ pass finds them (exporter scope names, constant weights)."""
    import onnx_graphsurgeon as gs

    from qdiff.export.graph_index import weighted_nodes

    graph = gs.import_onnx(onnx.load(str(graph_path), load_external_data=False))
    return {wn.node.name: (wn.module, wn.op) for wn in weighted_nodes(graph)}


def excluded_nodes(graph_path: Path, recipe: Recipe, *, activation_matmuls: bool = False) -> list[str]:
    """Node names ORT must leave in float so that it quantizes the layers qdiff quantizes.

    qdiff decides by PyTorch module name (`conv_in`), ORT by node name; this translates. It
    also lists attention's activation x activation MatMuls (QK^T, softmax x V): ORT's QDQ
    quantizer ignores `MatMulConstBOnly` (only its QOperator path reads it) and would quantize
    them, softmax probabilities included, on a symmetric INT8 grid that wastes half its codes.
    `activation_matmuls=True` leaves them to ORT (what its QDQ defaults do).
    """
    layers = weighted_layers(graph_path)
    excluded = [node for node, (module, op) in layers.items() if recipe.is_excluded(module) is not None or op not in recipe.quantize_ops]
    if not activation_matmuls:
        graph = onnx.load(str(graph_path), load_external_data=False).graph
        excluded += [node.name for node in graph.node if node.op_type in recipe.quantize_ops and node.name not in layers]
    return excluded


def peer_coverage(fp32_path: Path, peer_path: Path, recipe: Recipe, macs: dict[str, int]) -> QdqReport:
    """Which weighted layers of the FP32 graph run in INT8 in the peer graph, in qdiff's report form.

    A layer counts as quantized when both its activation and its weight arrive through a
    DequantizeLinear, which is what lets TensorRT (and ORT's CPU kernels) run it in INT8.
    """
    import onnx_graphsurgeon as gs

    from qdiff.export.graph_index import weighted_nodes

    fp32 = gs.import_onnx(onnx.load(str(fp32_path), load_external_data=False))
    peer = onnx.load(str(peer_path), load_external_data=False)
    producer = {out: node for node in peer.graph.node for out in node.output}
    by_name = {node.name: node for node in peer.graph.node}
    report = QdqReport()
    for wn in weighted_nodes(fp32):
        decision = LayerDecision(wn.module, wn.op, False, macs=int(macs.get(wn.module, 0)))
        report.layers.append(decision)
        node = by_name.get(wn.node.name)
        if node is None:
            decision.reason = "not in the peer graph (renamed or fused)"
            continue
        dq = [producer.get(name) is not None and producer[name].op_type == "DequantizeLinear" for name in node.input[:2]]
        decision.quantized = all(dq)
        if not decision.quantized:
            pattern = recipe.is_excluded(wn.module)
            decision.reason = f"recipe excludes it (pattern {pattern!r})" if pattern else "ONNX Runtime left it in float"
    # One DequantizeLinear per quantized tensor: ORT stores weights as INT8 initializers with a
    # DequantizeLinear only, where qdiff keeps float weights behind a Q/DQ pair.
    report.qdq_pairs = sum(1 for node in peer.graph.node if node.op_type == "DequantizeLinear")
    return report


@dataclass
class PeerResult:
    onnx_path: Path
    method: str
    settings: dict[str, Any]
    report: QdqReport | dict[str, Any]
    calibration: dict[str, Any] = field(default_factory=dict)
    reused: bool = False


def _layer_macs(bundle, fp32_path: Path, conditioning) -> dict[str, int]:
    from qdiff.calib.collect import example_call, layer_macs

    modules = [module for module, _ in weighted_layers(fp32_path).values()]
    return layer_macs(bundle.unet, example_call(bundle.unet, (bundle.in_channels, bundle.sample_size, bundle.sample_size), conditioning), modules)


def _has_external_data(path: Path) -> bool:
    """Graphs exported above 2 GB keep their weights in `<name>.data`; the peer graph then does
    too (INT8 weights are smaller, but ORT's calibration copy adds outputs to the same model)."""
    from qdiff.export.onnx_io import external_data_locations

    return bool(external_data_locations(onnx.load(str(path), load_external_data=False)))


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """ORT's calibrators print progress lines on stdout and warn through `logging`; keep
    qdiff's own output readable (errors still raise)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def preprocess_graph(src: Path, dst: Path, external: bool) -> None:
    """ORT's recommended `quant_pre_process` (symbolic shape inference, graph optimization).

    `auto_merge=True`: with its defaults, symbolic shape inference stops on the exported UNet
    ("Incomplete symbolic shape inference", the dynamic batch axis meets the fixed ones).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet_ort():
            quant_pre_process(
                str(src), str(dst), auto_merge=True, save_as_external_data=external, all_tensors_to_one_file=True, external_data_location=dst.name + ".data"
            )
    except Exception as exc:
        raise QuantizationError(f"ONNX Runtime's quant_pre_process failed on {src}: {type(exc).__name__}: {exc}", hint="quantize without preprocess") from exc


def quantize_with_onnxruntime(
    model,
    fp32_onnx: str | Path,
    out_onnx: str | Path | None = None,
    recipe: str | Path | Recipe = "w8a8",
    *,
    method: str = "minmax",
    scheduler: str | None = None,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    embeddings: str | Path | None = None,
    random_conditioning: bool = False,
    preprocess: bool = False,
    activation_matmuls: bool = False,
    force: bool = False,
    **recipe_overrides: Any,
) -> PeerResult:
    """Quantize `fp32_onnx` with ONNX Runtime's `quantize_static` from qdiff's calibration calls.

    `model` is the model folder (or loaded bundle) the graph was exported from: its sampler
    makes the calibration calls, exactly as `qdiff.calibrate(model, ..., recipe, **overrides)`
    would with the same recipe, overrides and conditioning options. The result goes to
    `out_onnx` (default: `<stem>.ort-<method>.onnx` beside the FP32 graph) with a manifest, and
    is reused when the manifest says it was made from the same graph, model and settings.
    `preprocess` runs ORT's `quant_pre_process` first (off by default: see
    docs/results/peer-onnxruntime.md for what it changes); `activation_matmuls` lets ORT also
    quantize attention's activation x activation MatMuls, as its QDQ defaults do (off: qdiff
    keeps them in float).
    """
    from qdiff.core.conditioning import conditioning_key, resolve_conditioning
    from qdiff.export.onnx_io import load_onnx, publish_onnx
    from qdiff.models import as_bundle
    from qdiff.runtime.backends import TorchDenoiser
    from qdiff.runtime.calibration_loop import model_calibration_inputs

    recipe = load_recipe(recipe, scheduler=scheduler, **recipe_overrides)
    settings = ort_settings(recipe, method)  # fail fast, before loading anything
    fp32_onnx = Path(fp32_onnx)
    load_onnx(fp32_onnx, load_weights=False, check=False)  # exists, parses, opset, safe data paths
    bundle = as_bundle(model)
    exported = read_manifest(fp32_onnx)
    exported_from = exported.model_sha256 if exported else None
    if exported_from and exported_from != bundle.model_sha256:
        raise ArtifactMismatchError(
            f"{fp32_onnx.name} was exported from model {exported_from[:12]}, but the calibration calls would come from {bundle.label} ({bundle.model_sha256[:12]})",
            hint="pass the model folder the graph was exported from",
        )
    target = Path(out_onnx) if out_onnx is not None else fp32_onnx.with_name(f"{fp32_onnx.stem}.ort-{method}.onnx")
    if target.suffix != ".onnx":
        target = target / f"{fp32_onnx.stem}.ort-{method}.onnx"
    conditioning = resolve_conditioning(
        bundle, recipe.samples_per_timestep, prompts=prompts, class_labels=class_labels, embeddings=embeddings, random=random_conditioning, seed=recipe.seed
    )
    import onnxruntime

    recipe_json = recipe.to_json()
    wanted = Manifest(
        kind="ort-static-qdq",
        inputs={"onnx_sha256": sha256_file(fp32_onnx), "model_sha256": bundle.model_sha256, "conditioning": conditioning_key(conditioning)},
        settings={
            "calibration": {k: recipe_json[k] for k in RECIPE_FIELDS},
            "ort": settings,
            "preprocess": preprocess,
            "activation_matmuls": activation_matmuls,
            "onnxruntime": onnxruntime.__version__,
        },
    )
    cached = CachedStage(target, wanted, log_as="peer", why="same graph, model and settings")
    if (have := cached.reusable(force)) is not None:
        return PeerResult(target, method, settings, have.details.get("coverage", {}), have.details.get("calibration", {}), reused=True)

    started = time.perf_counter()
    external = _has_external_data(fp32_onnx)
    steps = calibration_step_indices(recipe.calibration_steps, recipe.num_timesteps, recipe.timestep_window)
    log(
        f"peer: ONNX Runtime quantize_static ({settings['calibrate_method']}) on {fp32_onnx.name}, calibrated with "
        f"{recipe.samples_per_timestep} trajectories x {len(steps)} timesteps of a {recipe.calibration_steps}-step {recipe.scheduler} loop"
    )
    with cached.staging() as stage:
        source = fp32_onnx
        if preprocess:
            source = stage / f"{fp32_onnx.stem}.pre.onnx"
            preprocess_graph(fp32_onnx, source, external)
        nodes_to_exclude = excluded_nodes(source, recipe, activation_matmuls=activation_matmuls)
        calls = model_calibration_inputs(bundle, recipe, TorchDenoiser(bundle.unet), conditioning=conditioning, progress=progress)
        input_names = [i.name for i in onnx.load(str(source), load_external_data=False).graph.input]
        reader = CalibrationFeeds(calls, count_calibration_calls(recipe), input_names, fp32_onnx)
        staged = stage / target.name
        _run_quantize_static(source, staged, reader, settings, nodes_to_exclude, external)
        if reader.position != reader.count:
            raise QuantizationError(f"ONNX Runtime read {reader.position} of {reader.count} calibration calls from {fp32_onnx.name}")
        try:
            load_onnx(staged, load_weights=False)  # the full checker, by path (works above 2 GB)
        except OnnxModelError as exc:
            raise QuantizationError(f"ONNX Runtime's Q/DQ graph from {fp32_onnx.name} fails the ONNX checker: {exc.message}") from exc
        report = peer_coverage(source, staged, recipe, _layer_macs(bundle, source, conditioning))
        publish_onnx(staged, target)
    calibration = {
        "calls": reader.count,
        "rows": sum(f["rows"] for f in reader.fed),
        "step_indices": steps,
        "timesteps": [f["timestep"] for f in reader.fed[: len(steps)]],
        "samples_per_timestep": recipe.samples_per_timestep,
        "conditioning": conditioning.source if conditioning else "none (unconditional model)",
        "nodes_excluded": nodes_to_exclude,
    }
    cached.record({"coverage": report.to_json(), "calibration": calibration, "seconds": round(time.perf_counter() - started, 2)})
    log(f"peer: {report.summary().splitlines()[0]} -> {target}")
    return PeerResult(target, method, settings, report, calibration)


def _run_quantize_static(source: Path, out: Path, reader: CalibrationFeeds, settings: dict[str, Any], nodes_to_exclude: list[str], external: bool) -> None:
    from onnxruntime.quantization import quantize_static

    try:
        with _quiet_ort():
            quantize_static(
                str(source),
                str(out),
                reader,
                nodes_to_exclude=nodes_to_exclude,
                use_external_data_format=external,
                calibration_providers=["CPUExecutionProvider"],
                **_ort_call_kwargs(settings),
            )
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(
            f"ONNX Runtime's quantize_static failed on {source}: {type(exc).__name__}: {exc}",
            hint="check that the graph runs under ONNX Runtime (`qdiff sample --onnx`) and that onnxruntime is >= 1.20",
        ) from exc
    if not out.is_file():
        raise QuantizationError(f"ONNX Runtime's quantize_static wrote no graph for {source}")
