"""INT4 weight-only quantization of MatMul/Gemm weights with block scales (ONNX opset 21).

Why a separate pass from `qdq.py`: W4A8 keeps INT4-valued weights in INT8 storage so TensorRT
can run INT8 kernels with INT8 activations. Weight-only INT4 is the other trade: the weights
are really stored as 4-bit integers (half the bytes of INT8, an eighth of FP32) and are
dequantized on the fly in front of an FP16 GEMM, activations untouched. TensorRT >= 10 builds
this from ONNX as `DequantizeLinear(INT4 initializer, scale, axis, block_size)` feeding a
MatMul/Gemm; those INT4 tensors and the `block_size` attribute exist from opset 21 on, so the
pass also lifts the graph from the export's opset 17 to 21.

What it writes, for every MatMul/Gemm whose second input is a constant 2-D weight:

- the weight as a `TensorProto.INT4` initializer, symmetric (no zero point: 0), values in
  [-8, 7] (max calibration gives [-7, 7]; the MSE-clip option can use -8 after rounding);
- one scale per block of `block_size` elements along the reduction (input-channel, K) axis and
  per output channel, so the scale has shape [ceil(K / B), N] (MatMul, Gemm transB=0) or
  [N, ceil(K / B)] (Gemm transB=1): the ONNX rule for a K that B does not divide, whose last
  block is shorter;
- scale = max|w| / 7 over the block (or the clip ratio with the smallest squared error when
  `clip="mse"`), FP32 by default; FP16 scales make the DequantizeLinear output FP16, so a Cast
  back to the weight's type follows it.

Convolutions stay as they are (they are W4A8's business, in INT8 storage), and so are the
activation-activation MatMuls of attention. Modules can be kept in float with fnmatch patterns
on the exporter's module names, as in the recipes. Like onnx-graphsurgeon's own passes, the
rewrite ends in `cleanup().toposort()`.

ONNX Runtime (CPU) runs blocked INT4 DequantizeLinear node by node exactly. With graph
optimizations on, it fuses DequantizeLinear + MatMul into its `MatMulNBits` kernel, whose
default accuracy level quantizes the activations to INT8 on the fly; session option
`session.qdq_matmulnbits_accuracy_level = 0` keeps them in float (the weight-only function).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdiff.export.shape_inference import symbolic_shapes, weightless
from qdiff.calib.quant_math import MIN_AMAX
from qdiff.core.errors import OnnxModelError, QuantizationError
from qdiff.export.graph_index import WEIGHTED_OPS, module_name
from qdiff.export.onnx_io import default_opset
from qdiff.export.coverage import CoverageReport, shown

TARGET_OPSET = 21
# INT4/UINT4 tensors arrived with IR version 10 (onnx 1.16, the release of opset 21).
MIN_IR_VERSION = 10
INT4_MIN, INT4_MAX = -8, 7
DEFAULT_BLOCK_SIZE = 128
MATMUL_OPS = ("MatMul", "Gemm")
SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}
CLIP_METHODS = ("max", "mse")
# Clip ratios tried per block by `clip="mse"`: 1.0 (max) down to 0.5.
MSE_RATIOS = tuple(np.round(np.linspace(1.0, 0.5, 11), 3))
# Dimension names of the export's dynamic inputs, and the values MAC counting assumes for them.
DEFAULT_DIMS = {"batch": 1, "height": 64, "width": 64, "tokens": 77}

# Default-domain ops whose schema changed between opset 17 and 21 only by gaining types
# (INT4, FLOAT8, ...) or optional attributes/inputs whose defaults keep the old behaviour. If
# onnx's version converter cannot lift a graph, a graph with no other changed op may have its
# opset number bumped directly; any other changed op (ReduceMean's axes moving from attribute to
# input in 18, GroupNormalization's per-channel scale in 21, ...) refuses the bump.
SAME_MEANING_17_TO_21 = frozenset({
    "AveragePool", "Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear", "Equal", "Flatten", "Identity",
    "If", "IsInf", "IsNaN", "Loop", "LpPool", "Pad", "QLinearMatMul", "QuantizeLinear", "Reshape", "Resize", "Scan",
    "ScatterElements", "ScatterND", "Shape", "Size", "Split", "Squeeze", "Transpose", "Unsqueeze",
})  # fmt: skip


# ----------------------------------------------------------------------------- config and report


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """The settings of the pass; serializes to JSON and back (it goes into the manifest)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    exclude: tuple[str, ...] = ()
    scale_dtype: str = "float32"
    clip: str = "max"

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2:
            raise QuantizationError(f"block size {self.block_size!r} is not an integer >= 2", hint="use e.g. --block-size 128")
        if self.scale_dtype not in SCALE_DTYPES:
            raise QuantizationError(f"scale dtype {self.scale_dtype!r} is not one of {', '.join(SCALE_DTYPES)}")
        if self.clip not in CLIP_METHODS:
            raise QuantizationError(f"clip method {self.clip!r} is not one of {', '.join(CLIP_METHODS)}")

    def excluded_by(self, module: str) -> str | None:
        """The pattern that keeps `module` in float, or None (the recipe's fnmatch rule)."""
        for pattern in self.exclude:
            if module == pattern or fnmatch.fnmatchcase(module, pattern):
                return pattern
        return None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "exclude": list(self.exclude)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Int4WeightOnlyConfig:
        return cls(**{**data, "exclude": tuple(data.get("exclude", ()))})


@dataclass
class Int4LayerDecision:
    module: str
    node: str
    op: str
    converted: bool
    reason: str = ""
    macs: int | None = None
    shape: tuple[int, ...] = ()
    bytes_before: int = 0
    bytes_after: int = 0
    # ||dequantized - w|| / ||w|| of the weight itself: a quick look at which layers suffer.
    weight_rel_l2: float | None = None

    @property
    def quantized(self) -> bool:  # the name the coverage base reads
        return self.converted


@dataclass
class Int4Report(CoverageReport):
    """What the pass did: which MatMul/Gemm weights are INT4, bytes saved, MAC shares."""

    config: Int4WeightOnlyConfig
    layers: list[Int4LayerDecision] = field(default_factory=list)
    opset_from: int = 0
    opset_upgrade: str = ""
    # MACs of every weighted layer (Conv/ConvTranspose too), from shape inference at `mac_dims`;
    # None when shapes could not be inferred.
    weighted_macs: int | None = None
    mac_dims: dict[str, int] = field(default_factory=dict)
    # Converted layers whose K the block size does not divide (their last block is shorter).
    ragged_blocks: list[str] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    # "fp16": the graph was converted to FP16 first (FP16 scales, FP16 DequantizeLinear outputs,
    # no Cast before the MatMul); the nodes kept FP32 by the overflow guard (`qdiff.export.fp16`).
    dtype: str = "fp32"
    fp32_islands: list[dict] = field(default_factory=list)

    @property
    def converted(self) -> list[Int4LayerDecision]:
        """The layers with INT4 weights (the coverage base's `quantized`)."""
        return self.quantized

    @property
    def bytes_before(self) -> int:
        return sum(d.bytes_before for d in self.converted)

    @property
    def bytes_after(self) -> int:
        return sum(d.bytes_after for d in self.converted)

    @property
    def matmul_mac_share(self) -> float | None:
        """Share of the constant-weight MatMul/Gemm MACs that run with INT4 weights."""
        return self.share_of(sum(d.macs or 0 for d in self.layers))

    @property
    def mac_share(self) -> float | None:
        """Share of all weighted-layer MACs (convolutions included) that run with INT4 weights."""
        return self.share_of(self.weighted_macs)

    def summary(self) -> str:
        def pct(x: float | None) -> str:
            return "?" if x is None else f"{x:.1%}"

        ratio = self.bytes_before / self.bytes_after if self.bytes_after else 0.0
        lines = [
            f"INT4 weight-only (block {self.config.block_size}): {len(self.converted)} of {len(self.layers)} MatMul/Gemm weights "
            f"({pct(self.matmul_mac_share)} of their MACs, {pct(self.mac_share)} of all weighted-layer MACs); "
            f"weights {self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} MB ({ratio:.1f}x), "
            f"model {self.model_bytes_before / 1e6:.2f} MB -> {self.model_bytes_after / 1e6:.2f} MB; opset {self.opset_from} -> {TARGET_OPSET} ({self.opset_upgrade})"
        ]
        for d in self.skipped:
            lines.append(f"  float: {d.module} ({d.op}): {d.reason}")
        lines += self.fp16_lines()
        if self.ragged_blocks:
            lines.append(f"  {len(self.ragged_blocks)} weight(s) with K not a multiple of {self.config.block_size} (shorter last block): {shown(self.ragged_blocks)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "converted_layers": len(self.converted),
            "matmul_gemm_layers": len(self.layers),
            "matmul_mac_share": self.matmul_mac_share,
            "mac_share": self.mac_share,
            "mac_dims": self.mac_dims,
            "weight_bytes_before": self.bytes_before,
            "weight_bytes_after": self.bytes_after,
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": self.model_bytes_after,
            "opset_from": self.opset_from,
            "opset_upgrade": self.opset_upgrade,
            "ragged_blocks": self.ragged_blocks,
            "dtype": self.dtype,
            "fp32_islands": self.fp32_islands,
            "float_layers": self.float_layers_json(),
            "layers": [
                {"module": d.module, "op": d.op, "shape": list(d.shape), "macs": d.macs, "weight_rel_l2": d.weight_rel_l2}
                for d in self.converted
            ],
        }


# ----------------------------------------------------------------------------- block arithmetic


def _blocks(weight: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, int]:
    """[K, N] view of a 2-D weight with K on `axis`, zero-padded to whole blocks: [nb, B, N]."""
    w = np.moveaxis(np.asarray(weight, dtype=np.float32), axis, 0)
    k = w.shape[0]
    nb = math.ceil(k / block_size)
    padded = np.zeros((nb * block_size, w.shape[1]), dtype=np.float32)  # zeros change no amax
    padded[:k] = w
    return padded.reshape(nb, block_size, w.shape[1]), k


def _round_to_grid(blocks: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # np.rint rounds half to even, as QuantizeLinear does.
    return np.clip(np.rint(blocks / scale[:, None, :]), INT4_MIN, INT4_MAX)


def _storable_scale(scale: np.ndarray, dtype: type) -> np.ndarray:
    """The scale as stored: FP16 can underflow to 0 or overflow to inf, which must not reach DQ."""
    stored = scale.astype(dtype)
    if dtype is np.float16:
        stored = np.maximum(stored, np.float16(np.finfo(np.float16).smallest_subnormal))
    if not np.all(np.isfinite(stored)):
        raise ValueError(f"a block scale does not fit in {np.dtype(dtype).name} (max {float(np.max(scale)):.3g})")
    return stored


def block_quantize(
    weight: np.ndarray, axis: int, block_size: int = DEFAULT_BLOCK_SIZE, *, clip: str = "max", scale_dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 block quantization of a 2-D weight along `axis` (its K).

    Returns (q, scale): q as int8 holding values in [-8, 7] with the weight's shape, scale with
    the weight's shape except ceil(K / block_size) on `axis`. A block that is all zeros gets
    scale 1 / 7 (any positive scale reproduces zeros; the rule of `calib.quant_math`).
    """
    dtype = SCALE_DTYPES[scale_dtype]
    blocks, k = _blocks(weight, axis, block_size)
    amax = np.abs(blocks).max(axis=1).astype(np.float64)  # [nb, N]
    amax = np.where(amax > MIN_AMAX, amax, 1.0)
    scale = _storable_scale(amax / INT4_MAX, dtype)
    if clip == "mse":
        best_err = np.full(amax.shape, np.inf)
        best = scale
        for ratio in MSE_RATIOS:
            candidate = _storable_scale(amax * ratio / INT4_MAX, dtype)
            s32 = candidate.astype(np.float32)
            err = np.square(_round_to_grid(blocks, s32) * s32[:, None, :] - blocks).sum(axis=1)
            better = err < best_err
            best = np.where(better, candidate, best)
            best_err = np.where(better, err, best_err)
        scale = best
    q = _round_to_grid(blocks, scale.astype(np.float32)).astype(np.int8).reshape(-1, blocks.shape[2])[:k]
    return np.ascontiguousarray(np.moveaxis(q, 0, axis)), np.ascontiguousarray(np.moveaxis(scale, 0, axis))


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """What DequantizeLinear computes with zero point 0: q * scale, each scale repeated over its
    block along `axis` (the last block cut to K). FP32 result, as ONNX Runtime computes it for
    FP32 scales."""
    k = q.shape[axis]
    expanded = np.repeat(scale, block_size, axis=axis)
    expanded = np.take(expanded, np.arange(k), axis=axis)
    return (q.astype(np.float32) * expanded.astype(np.float32)).astype(scale.dtype)


def int4_tensor(name: str, q: np.ndarray) -> onnx.TensorProto:
    """A packed TensorProto.INT4 (two values per byte, first in the low nibble)."""
    import ml_dtypes

    if q.size and (q.min() < INT4_MIN or q.max() > INT4_MAX):
        raise QuantizationError(f"{name}: INT4 values outside [{INT4_MIN}, {INT4_MAX}]")
    tensor = onnx.numpy_helper.from_array(q.astype(ml_dtypes.int4), name)
    if tensor.data_type != onnx.TensorProto.INT4:  # an onnx that does not know ml_dtypes' int4
        raise QuantizationError(f"{name}: this onnx ({onnx.__version__}) did not store an INT4 tensor", hint="install onnx >= 1.17")
    return tensor


# ----------------------------------------------------------------------------- opset 17 -> 21


def _changed_ops(model: onnx.ModelProto, source: int, target: int) -> list[str]:
    changed = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            before = onnx.defs.get_schema(node.op_type, source, "").since_version
            after = onnx.defs.get_schema(node.op_type, target, "").since_version
        except onnx.defs.SchemaError:
            changed.add(node.op_type)
            continue
        if before != after:
            changed.add(node.op_type)
    return sorted(changed)


def upgrade_opset(model: onnx.ModelProto, target: int = TARGET_OPSET) -> tuple[onnx.ModelProto, str]:
    """Lift the default-domain opset to `target`; returns (model, how it was done).

    onnx's version converter goes first (on a weightless copy, then the weights are put back by
    name). Where it fails, the opset number is bumped directly only if every op whose schema
    changed on the way is in `SAME_MEANING_17_TO_21`; otherwise the error names the ops.
    """
    source = default_opset(model)
    if source == target:
        return model, "already at the target opset"
    if source > target:
        raise OnnxModelError(f"the graph is at opset {source}, above the {target} this pass writes")
    skeleton, originals = weightless(model, stub_initializers=True)
    try:
        converted = onnx.version_converter.convert_version(skeleton, target)
        how = "onnx.version_converter"
    except Exception as exc:  # the converter raises several types; any failure -> the direct check
        changed = _changed_ops(skeleton, source, target)
        unsafe = [op for op in changed if op not in SAME_MEANING_17_TO_21]
        if unsafe:
            raise OnnxModelError(
                f"cannot lift the graph from opset {source} to {target}: onnx's version converter failed ({type(exc).__name__}: {exc}), "
                f"and op(s) {', '.join(unsafe)} changed meaning on the way",
                hint=f"re-export with `qdiff export --opset {target}`",
            ) from exc
        converted = skeleton
        for entry in converted.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = target
        how = f"direct bump (converter failed: {type(exc).__name__}); changed ops {', '.join(changed) or 'none'} only gained types/optional attributes"
    for i, tensor in enumerate(converted.graph.initializer):
        if tensor.name in originals:
            converted.graph.initializer[i].CopyFrom(originals[tensor.name])
    converted.ir_version = max(converted.ir_version, model.ir_version, MIN_IR_VERSION)
    return converted, how


# ----------------------------------------------------------------------------- MACs


def _concrete_inputs(graph: onnx.GraphProto, dims: dict[str, int]) -> None:
    for value in graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = int(dims.get(dim.dim_param, 1))


def estimate_macs(model: onnx.ModelProto, dims: dict[str, int] | None = None) -> dict[str, int] | None:
    """MACs of every weighted node (by node name) at the given dynamic dimensions, from ONNX
    Runtime's symbolic shape inference on a weightless copy; None when shapes stay unknown.

    A report figure, not a contract: a failure here never stops the pass.
    """
    dims = {**DEFAULT_DIMS, **(dims or {})}
    skeleton, _ = weightless(model, stub_initializers=False)
    _concrete_inputs(skeleton.graph, dims)
    try:
        inferred = symbolic_shapes(skeleton)
    except Exception:
        return None
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shape = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        shapes[value.name] = shape
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    macs: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in weights:
            continue
        w = weights[node.input[1]]
        shown = shapes.get(node.input[0] if node.op_type == "ConvTranspose" else node.output[0])
        if not shown or None in shown or not all(shown) or len(w) < 2:
            return None
        if node.op_type in ("Conv", "ConvTranspose"):
            per_output = int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            per_output = w[1] if any(a.name == "transB" and a.i for a in node.attribute) else w[0]
        else:
            per_output = w[0]
        macs[node.name] = int(np.prod(shown)) * int(per_output)
    return macs


# ----------------------------------------------------------------------------- the pass


def _reduction_axis(node: gs.Node) -> int:
    """Axis of the stored weight that the layer sums over (K)."""
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return 1  # Gemm(x, W^T): W is [N, K]
    return 0  # MatMul(x, W) and Gemm(x, W): W is [K, N]


class _Int4Writer:
    """Makes the INT4 initializer, scale and DequantizeLinear of a weight, once per (weight,
    axis), so a weight shared by several nodes is stored once."""

    def __init__(self, graph: gs.Graph, config: Int4WeightOnlyConfig) -> None:
        self.graph, self.config = graph, config
        self.cache: dict[tuple[str, int], tuple[gs.Variable, int, float]] = {}

    def dequantized(self, weight: gs.Constant, axis: int, name: str) -> tuple[gs.Variable, int, float]:
        key = (weight.name, axis)
        if key in self.cache:
            return self.cache[key]
        values = np.asarray(weight.values)
        cfg = self.config
        try:
            q, scale = block_quantize(values, axis, cfg.block_size, clip=cfg.clip, scale_dtype=cfg.scale_dtype)
        except ValueError as exc:
            raise QuantizationError(f"{name}: weight {weight.name}: {exc}", hint="use FP32 scales (scale_dtype=\"float32\")") from exc
        error = np.square(dequantize_blocks(q, scale, axis, cfg.block_size).astype(np.float64) - values).sum()
        norm = float(np.square(values.astype(np.float64)).sum())
        rel = math.sqrt(error / norm) if norm else 0.0
        q_const = gs.Constant(f"{name}/weight_int4", gs.ir.tensor.LazyValues(int4_tensor(f"{name}/weight_int4", q)))
        s_const = gs.Constant(f"{name}/weight_scale", scale)
        out_dtype = scale.dtype
        out = gs.Variable(f"{name}/weight_dequantized", dtype=out_dtype, shape=list(values.shape))
        attrs = {"axis": axis, "block_size": cfg.block_size}
        self.graph.nodes.append(gs.Node("DequantizeLinear", f"{name}/DequantizeLinear", attrs, [q_const, s_const], [out]))
        if out_dtype != values.dtype:  # FP16 scales: DQ gives FP16, the layer wants the weight's type
            cast = gs.Variable(f"{name}/weight_dequantized_cast", dtype=values.dtype, shape=list(values.shape))
            to = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
            self.graph.nodes.append(gs.Node("Cast", f"{name}/Cast", {"to": to}, [out], [cast]))
            out = cast
        size = (q.size + 1) // 2 + scale.nbytes
        self.cache[key] = (out, size, rel)
        return self.cache[key]


def _decide(node: gs.Node, config: Int4WeightOnlyConfig) -> tuple[Int4LayerDecision, gs.Constant | None]:
    weight = node.inputs[1]
    module = module_name(node) or node.name
    decision = Int4LayerDecision(module, node.name, node.op, False, shape=tuple(weight.shape or ()))
    pattern = config.excluded_by(module)
    if pattern is not None:
        decision.reason = f"excluded (pattern {pattern!r})"
        return decision, None
    values = weight.values
    if values.ndim != 2:
        decision.reason = f"weight {weight.name} is {values.ndim}-D; block-quantized weights must be 2-D"
        return decision, None
    if values.dtype not in (np.float32, np.float16):
        decision.reason = f"weight {weight.name} is {values.dtype}, not a float"
        return decision, None
    if not np.all(np.isfinite(values)):
        raise QuantizationError(
            f"layer {module!r} (node {node.name}): weight {weight.name} holds NaN or Inf",
            hint="the model's weights are damaged; re-export from a good checkpoint, or --exclude this layer",
        )
    return decision, weight


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def rewrite_int4(model: onnx.ModelProto, config: Int4WeightOnlyConfig, report: Int4Report, macs: dict[str, int] | None = None) -> onnx.ModelProto:
    """The graph rewrite proper, on a graph already at opset 21 with its weights loaded."""
    graph = gs.import_onnx(model)
    writer = _Int4Writer(graph, config)
    candidates = [n for n in graph.nodes if n.op in MATMUL_OPS and len(n.inputs) >= 2 and isinstance(n.inputs[1], gs.Constant)]
    if not candidates:
        raise QuantizationError(
            "the graph has no MatMul/Gemm with a constant weight, so INT4 weight-only quantization has nothing to do",
            hint="give the FP32 graph from `qdiff export` (not a Q/DQ graph); convolution-only models need W4A8 (`--recipe w4a8`)",
        )
    for node in candidates:
        decision, weight = _decide(node, config)
        decision.macs = macs.get(node.name) if macs is not None else None
        report.layers.append(decision)
        if weight is None:
            continue
        axis = _reduction_axis(node)
        dequantized, size, rel = writer.dequantized(weight, axis, decision.module)
        node.inputs[1] = dequantized
        decision.converted, decision.weight_rel_l2 = True, rel
        decision.bytes_before, decision.bytes_after = int(weight.values.nbytes), size
        if weight.shape[axis] % config.block_size:
            report.ragged_blocks.append(f"{decision.module} (K={weight.shape[axis]})")
    if not report.converted:
        raise QuantizationError(
            f"none of the {len(report.layers)} MatMul/Gemm weights was converted: " + "; ".join(f"{d.module}: {d.reason}" for d in report.layers[:5]),
            hint="check --exclude; an exclusion that matches every layer leaves nothing to quantize",
        )
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.producer_name = "qdiff"
    out.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return out


def int4_weight_only(
    model: onnx.ModelProto, config: Int4WeightOnlyConfig | None = None, *, dims: dict[str, int] | None = None
) -> tuple[onnx.ModelProto, Int4Report]:
    """Return an opset-21 copy of `model` with INT4 block-quantized MatMul/Gemm weights, and a
    report. `model` must hold its weights; `dims` sets the dynamic dimensions MACs are counted at."""
    config = config or Int4WeightOnlyConfig()
    report = Int4Report(config, opset_from=default_opset(model), mac_dims={**DEFAULT_DIMS, **(dims or {})})
    report.model_bytes_before = _initializer_bytes(model)
    macs = estimate_macs(model, dims)
    upgraded, report.opset_upgrade = upgrade_opset(model)
    out = rewrite_int4(upgraded, config, report, macs)
    report.weighted_macs = sum(macs.values()) if macs else None
    report.model_bytes_after = _initializer_bytes(out)
    return out, report


def int4_weight_only_file(
    onnx_path: str | Path, out_path: str | Path, config: Int4WeightOnlyConfig | None = None, *, dims: dict[str, int] | None = None, dtype: str = "fp32"
) -> Int4Report:
    """The pass from file to file. External data (graphs above 2 GB) stays external: the opset
    is lifted on the weightless graph and the weights are read only for the rewrite.

    `dtype="fp16"`: the FP32 graph is probed for FP16 overflows, converted to FP16
    (`qdiff.export.fp16`), and its block scales are FP16, so each DequantizeLinear gives FP16
    straight into its MatMul/Gemm."""
    from onnx.external_data_helper import load_external_data_for_model

    from qdiff.export.onnx_io import external_data_locations, load_onnx, save_onnx

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    config = config or Int4WeightOnlyConfig()
    model = load_onnx(onnx_path, load_weights=False)  # the full checks: this graph may come from anywhere
    external = bool(external_data_locations(model))
    report = Int4Report(config, opset_from=default_opset(model), mac_dims={**DEFAULT_DIMS, **(dims or {})})
    report.model_bytes_before = _initializer_bytes(model)
    macs = estimate_macs(model, dims)
    upgraded, report.opset_upgrade = upgrade_opset(model)
    del model
    if external:
        try:
            load_external_data_for_model(upgraded, str(onnx_path.parent))
        except Exception as exc:
            raise OnnxModelError(f"{onnx_path}: its external data cannot be read ({type(exc).__name__}: {exc})", hint="the .data file may be truncated; re-export it") from exc
    if dtype == "fp16":
        from qdiff.export.fp16 import convert_to_fp16, is_fp16_graph, overflow_islands, probe_feeds, tensor_maxima

        if is_fp16_graph(upgraded):
            raise QuantizationError(f"{onnx_path.name} is already an FP16 graph", hint="give the FP32 graph from `qdiff export`; --dtype fp16 converts it")
        maxima = tensor_maxima(onnx_path, probe_feeds(upgraded, size=int((dims or {}).get("height", DEFAULT_DIMS["height"]))))
        islands = overflow_islands(upgraded, maxima)
        upgraded = convert_to_fp16(upgraded, {i.node for i in islands})
        config = Int4WeightOnlyConfig(**{**config.to_json(), "exclude": config.exclude, "scale_dtype": "float16"})
        report.config, report.dtype, report.fp32_islands = config, "fp16", [i.to_json() for i in islands]
    out = rewrite_int4(upgraded, config, report, macs)
    del upgraded
    report.weighted_macs = sum(macs.values()) if macs else None
    report.model_bytes_after = _initializer_bytes(out)
    save_onnx(out, out_path, external_data=external or None)
    try:
        onnx.checker.check_model(str(out_path), full_check=True)
    except Exception as exc:
        raise QuantizationError(f"the INT4 weight-only graph {out_path} fails the ONNX checker: {exc}") from exc
    return report


def quantize_file(*args, **kwargs):
    """Deprecated name of `int4_weight_only_file` (two passes had the same name); kept for one release."""
    import warnings

    warnings.warn("qdiff.export.int4_weight_only.quantize_file is deprecated; use int4_weight_only_file", DeprecationWarning, stacklevel=2)
    return int4_weight_only_file(*args, **kwargs)
