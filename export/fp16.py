"""FP16 graphs: the float conversion, its overflow guard, and the graph's FP32 boundary.

Why: TensorRT >= 10 builds a strongly typed network, where every layer runs in the type the
graph gives it (TensorRT 11 has no other mode). The fast engine therefore needs a graph whose
weights and activations are FP16 already. TensorRT 8.6 still takes qdiff's FP32 graphs with its
FP16 builder flag, so FP32 stays the default export and this module is opted into with
`--dtype fp16`.

The conversion itself is onnxconverter-common's `float16.convert_float_to_float16`
(Microsoft's converter, also what onnxruntime's transformer optimizer uses). Chosen over
ModelOpt's `modelopt.onnx.autocast` because it is pure Python with only onnx/numpy/protobuf as
dependencies, it runs on a CPU, and it has exactly the two controls qdiff needs: `keep_io_types`
(FP32 graph I/O with a Cast at the boundary) and `node_block_list` (named nodes stay FP32 with
Casts around them). Autocast, as shipped in nvidia-modelopt 0.47.0, does not import without
the `[onnx]` extra (onnxslim and more), and its own overflow rule would still have to be
reported in qdiff's terms. The converter's known gaps are fixed here by small
onnx-graphsurgeon passes, each ending in `cleanup().toposort()`:

- Cast nodes the exporter wrote with `to=FLOAT` keep that target after conversion although
  their output became FP16 (ORT refuses the graph); `_retarget_casts` points them at FLOAT16.
- Resize's `scales` must stay tensor(float); `_resize_scales_fp32` keeps it FP32.
- `keep_io_types` writes one Cast per consumer of an input (encoder_hidden_states feeds every
  cross-attention); `_one_cast_per_input` merges them, so each graph input and output has
  exactly one Cast.

**Overflow guard.** FP16's largest finite value is 65504. A node stays FP32 ("FP32 island")
when, on real inputs of the FP32 graph, a tensor it produces or reads exceeds
`DEFAULT_FP16_LIMIT`, or when it reads a constant whose magnitude exceeds 65504. Both the
producer and every consumer of such a tensor stay FP32 (the consumer must read the big values
in FP32; GroupNorm after an overflowing residual brings them back into range, and its output
is cast to FP16 again). The limit is 16384, a quarter of 65504: the probe inputs are a sample,
and two binades of headroom cover activations a few times larger than any seen there without
making islands of normal layers (SD-style UNets peak in the hundreds to low thousands). Nothing
else is kept FP32: GroupNorm/LayerNorm/Softmax are FP16, as in NVIDIA's SD UNet builds.

**Graph I/O.** FP32 at the graph boundary (one Cast after each float input, one before each
output): the ONNX Runtime and TensorRT denoisers feed float32 tensors, and the cast is a
negligible elementwise layer inside the engine.

ONNX Runtime on the CPU has few FP16 kernels; it runs the others in FP32 with each node's
inputs and outputs rounded to FP16 (its insert-cast transformer), so the CPU numerics are FP16
storage with FP32 arithmetic per node, which is also what TensorRT's FP16 kernels do.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdiff.core.errors import OnnxModelError, QuantizationError

FP16_MAX = 65504.0
# A tensor whose magnitude on the probe inputs exceeds this keeps its nodes in FP32 (see above).
DEFAULT_FP16_LIMIT = 16384.0
DTYPES = ("fp32", "fp16")
# The opset FP16 Q/DQ needs: QuantizeLinear/DequantizeLinear take FP16 inputs and scales from 19.
QDQ_FP16_OPSET = 19
# TensorRT 8.6's ONNX parser stops at opset 17, where Q/DQ are FP32 only: an FP16 Q/DQ graph at
# this opset wraps each pair in Casts, an FP32 island (`qdiff.export.qdq`). For measuring whether
# 8.6 keeps the FP16 regions of an INT8 engine in FP16 (docs/fp16-graphs.md).
QDQ_FP32_ISLANDS_OPSET = 17
QDQ_FP16_OPSETS = (QDQ_FP32_ISLANDS_OPSET, QDQ_FP16_OPSET)
# onnxconverter-common's default block list, minus float ops TensorRT runs in FP16 (Resize and
# Upsample are the UNet's nearest-neighbour upsampling; Min/Max are elementwise).
OP_BLOCK_LIST = tuple(
    op
    for op in (
        "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "FeatureVectorizer", "Imputer",
        "LabelEncoder", "LinearClassifier", "LinearRegressor", "Normalizer", "OneHotEncoder", "RandomUniformLike",
        "SVMClassifier", "SVMRegressor", "Scaler", "TreeEnsembleClassifier", "TreeEnsembleRegressor", "ZipMap",
        "NonMaxSuppression", "TopK", "RoiAlign", "Range", "CumSum",
    )
)  # fmt: skip


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise OnnxModelError(f"unknown graph dtype {dtype!r}; use one of {', '.join(DTYPES)}", hint="--dtype fp32 (TensorRT 8.6) or --dtype fp16 (TensorRT >= 10)")
    return dtype


def check_fp16_qdq_opset(opset: int | None) -> int:
    """The opset of an FP16 Q/DQ graph: 19 (default; FP16 Q/DQ, TensorRT >= 10) or 17 (FP32 Q/DQ
    islands, which TensorRT 8.6 parses). Others are refused: below 17 qdiff exports nothing, and
    18 has neither FP16 Q/DQ nor 8.6's parser."""
    if opset is None:
        return QDQ_FP16_OPSET
    if opset not in QDQ_FP16_OPSETS:
        raise QuantizationError(
            f"an FP16 Q/DQ graph is written at opset {QDQ_FP16_OPSET} (FP16 Q/DQ) or {QDQ_FP32_ISLANDS_OPSET} (FP32 Q/DQ islands); not opset {opset}",
            hint=f"--opset {QDQ_FP16_OPSET} for TensorRT >= 10, --opset {QDQ_FP32_ISLANDS_OPSET} for TensorRT 8.6",
        )
    return opset


def qdq_dtype_of(opset: int | None) -> str:
    """What a Q/DQ graph's pairs compute in, from its checked opset (None: the FP32 graph):
    "fp32", "fp16" (opset 19) or "fp32-islands" (opset 17). The manifest and the report both say it."""
    return "fp32" if opset is None else "fp32-islands" if opset == QDQ_FP32_ISLANDS_OPSET else "fp16"


def check_qdq_opset(dtype: str, opset: int | None) -> int | None:
    """`opset` of a Q/DQ graph of `dtype`: chosen for FP16 only (`check_fp16_qdq_opset`); the
    FP32 graph keeps the export's opset, so an explicit one is refused rather than ignored."""
    check_dtype(dtype)
    if dtype == "fp16":
        return check_fp16_qdq_opset(opset)
    if opset is not None:
        raise QuantizationError(
            f"the FP32 Q/DQ graph keeps the opset of the graph it quantizes; --opset {opset} applies to --dtype fp16 only",
            hint="drop --opset, or add --dtype fp16 (opset 19, or 17 for TensorRT 8.6)",
        )
    return None


@dataclass(frozen=True)
class Fp32Island:
    """One node kept in FP32, and the data that made it so."""

    node: str
    op: str
    tensor: str
    max_abs: float
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- probing


def is_fp16_graph(model: onnx.ModelProto) -> bool:
    """True when the graph's weights are mostly FP16 (a graph this module already converted)."""
    kinds = [t.data_type for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.dims)]
    return bool(kinds) and kinds.count(onnx.TensorProto.FLOAT16) > len(kinds) // 2


def _float_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of every FP32 node output, from ONNX shape inference on a weightless copy."""
    from qdiff.export.shape_inference import weightless

    skeleton, _ = weightless(model, stub_initializers=True)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    return [out for node in model.graph.node for out in node.output if out and types.get(out) == onnx.TensorProto.FLOAT]


def tensor_maxima(onnx_path: str | os.PathLike[str], feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """max |x| of every FP32 intermediate tensor of the graph at `onnx_path` over `feeds`.

    Each float node output gets an Abs -> ReduceMax pair whose scalar is a graph output, and
    the graph runs in ONNX Runtime with graph optimizations off (so every tensor keeps its
    name). Only scalars leave the session: making the tensors themselves outputs would hold
    every activation of the UNet at once (SD 1.5's fp16 export went past 24 GB that way).
    The probe graph is written beside the original (its external data paths are relative)
    under a temporary name, then removed.
    """
    import hashlib

    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    feeds = list(feeds)
    digest = hashlib.sha256()
    for feed in feeds:
        for k in sorted(feed):
            digest.update(k.encode() + np.ascontiguousarray(feed[k], dtype=np.float32).tobytes())
    stat = onnx_path.stat()
    key = (str(onnx_path.resolve()), stat.st_mtime_ns, stat.st_size, digest.hexdigest())
    if key in _MAXIMA_CACHE:  # the opset-19 and opset-17 passes of one graph probe it alike (SD 1.5: ~30 s a run)
        return dict(_MAXIMA_CACHE[key])
    model = onnx.load(str(onnx_path), load_external_data=False)
    probes: dict[str, str] = {}  # probe output -> tensor
    floats = set(_float_tensors(model))
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        # Each probe right after its producer: ONNX Runtime runs nodes in about this order, and
        # a probe left at the end would keep its tensor alive until then.
        for name in (o for o in node.output if o in floats):
            i = len(probes)
            absolute, peak = f"qdiff_probe/{i}/abs", f"qdiff_probe/{i}/absmax"
            nodes.append(onnx.helper.make_node("Abs", [name], [absolute], name=f"qdiff_probe/{i}/Abs"))
            nodes.append(onnx.helper.make_node("ReduceMax", [absolute], [peak], name=f"qdiff_probe/{i}/ReduceMax", keepdims=0))
            model.graph.output.append(onnx.helper.make_tensor_value_info(peak, onnx.TensorProto.FLOAT, []))
            probes[peak] = name
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    fd, tmp = tempfile.mkstemp(prefix=f".{onnx_path.stem}.probe-", suffix=".onnx", dir=onnx_path.parent)
    os.close(fd)
    maxima: dict[str, float] = {}
    try:
        onnx.save(model, tmp)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        # Priority-based order runs each probe as soon as its tensor exists; the default order
        # kept the tensors alive (SD 1.5, batch 1 at 64x64: 14.4 GB peak vs 4.4 GB for a plain run).
        if hasattr(ort, "ExecutionOrder"):
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
        outputs = list(probes)
        wanted = {i.name for i in session.get_inputs()}
        for feed in feeds:
            results = session.run(outputs, {k: np.asarray(v, dtype=np.float32) for k, v in feed.items() if k in wanted})
            for probe, value in zip(outputs, results):
                name = probes[probe]
                maxima[name] = max(maxima.get(name, 0.0), float(value))
    except Exception as exc:
        raise OnnxModelError(f"{onnx_path}: running the FP32 graph to find FP16 overflows failed: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _MAXIMA_CACHE.clear()  # one graph's maxima at a time: enough for the two passes, and small
    _MAXIMA_CACHE[key] = dict(maxima)
    return maxima


_MAXIMA_CACHE: dict[tuple, dict[str, float]] = {}


def probe_feeds(model: onnx.ModelProto, *, size: int, tokens: int = 77, count: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Calibration-like denoiser inputs built from the graph's own input signature: unit-normal
    latents (x_t has unit variance at every timestep of a variance-preserving schedule),
    timesteps spread over the whole trajectory as calibration spreads them (999 down to 1),
    unit-normal conditioning. Batch 1, one input per timestep."""
    rng = np.random.default_rng(seed)
    timesteps = np.linspace(999, 1, count).round()
    feeds = []
    for t in timesteps:
        feed = {}
        for value in model.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            if value.name == "timestep":
                feed[value.name] = np.full([1], t, dtype=np.float32)
                continue
            shape = [1 if i == 0 else (d if d is not None else (tokens if value.name == "encoder_hidden_states" and i == 1 else size)) for i, d in enumerate(dims)]
            feed[value.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def overflow_islands(model: onnx.ModelProto, maxima: dict[str, float], limit: float = DEFAULT_FP16_LIMIT) -> list[Fp32Island]:
    """The nodes that must stay FP32: producers and consumers of tensors above `limit` on the
    probe data, and consumers of constants above FP16's 65504. `model` must hold its weights."""
    big_constants: dict[str, float] = {}
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 0:
            values = onnx.numpy_helper.to_array(init)
            if values.size:
                m = float(np.max(np.abs(values)))
                if m > FP16_MAX:
                    big_constants[init.name] = m
    islands: dict[str, Fp32Island] = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.HasField("t") and attr.t.data_type == onnx.TensorProto.FLOAT:
                    m = float(np.max(np.abs(onnx.numpy_helper.to_array(attr.t)))) if np.prod(attr.t.dims) else 0.0
                    if m > FP16_MAX:
                        big_constants[node.output[0]] = m
    for node in model.graph.node:
        found = next(((n, big_constants[n]) for n in node.input if n in big_constants), None)
        if found is not None:
            name, c = found
            islands[node.name] = Fp32Island(node.name, node.op_type, name, c, f"constant {name} holds {c:.4g} > FP16 max {FP16_MAX:g}")
            continue
        found = next(((n, maxima[n]) for n in node.output if maxima.get(n, 0.0) > limit), None)
        if found is not None:
            name, m = found
            islands[node.name] = Fp32Island(node.name, node.op_type, name, m, f"output {name} reaches {m:.4g} > {limit:g} on the probe inputs")
            continue
        found = next(((n, maxima[n]) for n in node.input if maxima.get(n, 0.0) > limit), None)
        if found is not None:
            name, m = found
            islands[node.name] = Fp32Island(node.name, node.op_type, name, m, f"input {name} reaches {m:.4g} > {limit:g} on the probe inputs")
    unnamed = [i for i in islands if not i]
    if unnamed:
        raise QuantizationError("an FP16 overflow was found at a node without a name; the FP32 island cannot be addressed", hint="re-export with `qdiff export` (it names every node)")
    return list(islands.values())


# ----------------------------------------------------------------------------- conversion


def _retarget_casts(graph: gs.Graph, keep_fp32: set[str]) -> None:
    """Exporter Casts to FLOAT whose output the converter made FP16 now cast to FLOAT16."""
    for node in graph.nodes:
        if node.op == "Cast" and node.name in keep_fp32:
            continue
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT and node.outputs[0].dtype == np.float16:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
    graph.cleanup().toposort()


def _resize_scales_fp32(graph: gs.Graph) -> None:
    """Resize's `scales` input is tensor(float) in every opset; the converter made it FP16."""
    for node in graph.nodes:
        if node.op != "Resize" or len(node.inputs) < 3:
            continue
        scales = node.inputs[2]
        if isinstance(scales, gs.Constant) and scales.values.dtype == np.float16:
            node.inputs[2] = gs.Constant(f"{scales.name}_fp32", scales.values.astype(np.float32))
        elif isinstance(scales, gs.Variable) and scales.dtype == np.float16:
            cast = gs.Variable(f"{scales.name}_fp32", dtype=np.float32, shape=scales.shape)
            graph.nodes.append(gs.Node("Cast", f"{node.name}/scales_cast", {"to": onnx.TensorProto.FLOAT}, [scales], [cast]))
            node.inputs[2] = cast
    graph.cleanup().toposort()


def _one_cast_per_input(graph: gs.Graph) -> None:
    """Merge the converter's per-consumer Casts of each graph input into one."""
    for tensor in graph.inputs:
        casts = [n for n in tensor.outputs if n.op == "Cast"]
        by_target: dict[int, list[gs.Node]] = {}
        for cast in casts:
            by_target.setdefault(int(cast.attrs["to"]), []).append(cast)
        for same in by_target.values():
            keep = same[0]
            for extra in same[1:]:
                for consumer in list(extra.outputs[0].outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is extra.outputs[0]:
                            consumer.inputs[i] = keep.outputs[0]
                extra.outputs.clear()
                extra.inputs.clear()
    graph.cleanup().toposort()


def convert_to_fp16(model: onnx.ModelProto, keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """FP16 copy of an FP32 graph (weights loaded), FP32 I/O, the named nodes kept FP32.

    Shape inference runs on a weightless copy first (so graphs above 2 GB work) and its value
    types are handed to the converter, which needs them to place Casts."""
    from onnxconverter_common import float16

    from qdiff.export.shape_inference import weightless

    keep_fp32 = set(keep_fp32)
    model = _deep_copy(model)  # not a serialize round trip: above 2 GB even ByteSize() raises (SD 1.5's FP32 graph is 3.4 GB)
    skeleton, _ = weightless(model, stub_initializers=True)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    converted = float16.convert_float_to_float16(
        model, min_positive_val=1e-7, max_finite_val=FP16_MAX, keep_io_types=True, disable_shape_infer=True,
        op_block_list=list(OP_BLOCK_LIST), node_block_list=sorted(keep_fp32),
    )  # fmt: skip
    graph = gs.import_onnx(converted)
    _retarget_casts(graph, keep_fp32)
    _resize_scales_fp32(graph)
    _one_cast_per_input(graph)
    out = gs.export_onnx(graph)
    out.producer_name = "qdiff"
    out.ir_version = converted.ir_version
    # Value types afresh (the converter's are stale after the rewrites): the Q/DQ pass reads
    # each activation's type from them to give its scale the same type.
    del out.graph.value_info[:]
    skeleton, _ = weightless(out, stub_initializers=True)
    out.graph.value_info.extend(onnx.shape_inference.infer_shapes(skeleton).graph.value_info)
    return out


def _deep_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def fp16_graph(model: onnx.ModelProto, maxima: dict[str, float], limit: float = DEFAULT_FP16_LIMIT) -> tuple[onnx.ModelProto, list[Fp32Island]]:
    """The overflow guard and the conversion in one call: (FP16 graph, its FP32 islands)."""
    islands = overflow_islands(model, maxima, limit)
    return convert_to_fp16(model, {i.node for i in islands}), islands


# ----------------------------------------------------------------------------- structure


def boundary_casts(model: onnx.ModelProto) -> dict[str, int]:
    """Casts reading each graph input and writing each graph output, by tensor name."""
    counts = {v.name: 0 for v in [*model.graph.input, *model.graph.output]}
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type != "Cast":
            continue
        for name in node.input:
            if name in counts and name not in outputs:
                counts[name] += 1
        for name in node.output:
            if name in outputs:
                counts[name] += 1
    return counts
