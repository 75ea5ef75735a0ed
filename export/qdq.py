"""The Q/DQ insertion pass: turn an FP32 denoiser graph into an explicitly quantized one.

Placement follows TensorRT's explicit-quantization rules, so TensorRT can fuse each
DequantizeLinear into the INT8 kernel of the layer it feeds:

- the activation input of every quantized Conv/ConvTranspose/Gemm/MatMul gets
  QuantizeLinear -> DequantizeLinear, per tensor, symmetric (zero point 0);
- its weight gets the same per output channel (INT4-valued weights are clipped to
  [-8, 7] x scale first, then stored and quantized as INT8);
- nothing goes on the outputs of weighted layers.

Every layer the recipe quantizes must find its ranges in the calibration table, or the pass
fails and names the layers. Like onnx-graphsurgeon's own passes, it ends in
`cleanup().toposort()`.

Degenerate ranges (zero: a tensor or weight channel that is always 0) get scale 1 / qmax by the
rule in `calib.quant_math.scale_from_amax`, never a zero scale that QuantizeLinear would divide
by; the report lists each of them as `module:input` or `module:weight[channel]`. NaN and
infinite ranges never get here: the calibration table refuses them.

**FP32 islands at opset 17** (`cast_wrapped=True`, the FP16 graph TensorRT 8.6 can parse): an
opset-17 QuantizeLinear/DequantizeLinear takes and gives FP32 only, so each pair of an FP16
graph becomes an FP32 island. An activation: FP16 tensor -> Cast(to FLOAT) -> QuantizeLinear
-> DequantizeLinear (FP32 scale) -> Cast(to FLOAT16) -> the layer. A weight: INT8 initializer
(the integers the pair would have produced) -> DequantizeLinear (FP32 scale, per channel) ->
Cast(to FLOAT16) -> the layer. Layers of an FP32 overflow island are FP32 already and get the
same form without the Casts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdiff.calib.quant_math import MIN_AMAX, scale_from_amax, scale_in_dtype
from qdiff.calib.recipe import Recipe
from qdiff.calib.table import CalibrationTable
from qdiff.core.errors import QuantizationError
from qdiff.export.coverage import CoverageReport, shown
from qdiff.export.graph_index import WeightedNode, weighted_nodes
from qdiff.export.onnx_io import default_opset
from qdiff.export.split_shortcut import channel_counts, split_concat_conv, split_sliced_conv


@dataclass
class LayerDecision:
    module: str
    op: str
    quantized: bool
    reason: str = ""
    macs: int = 0


@dataclass
class QdqReport(CoverageReport):
    """What the pass did: which layers are INT8 and which stayed float, with MAC shares."""

    layers: list[LayerDecision] = field(default_factory=list)
    qdq_pairs: int = 0
    unused_table_entries: list[str] = field(default_factory=list)
    # Ranges that took the degenerate-range rule (scale 1 / qmax), as `module:role[channel]`.
    degenerate_ranges: list[str] = field(default_factory=list)
    # The graph's float type, and (FP16 graphs) the nodes kept in FP32 because FP16 would
    # overflow there, each with its tensor, max |x| and reason (`qdiff.export.fp16`).
    dtype: str = "fp32"
    fp32_islands: list[dict] = field(default_factory=list)
    # The written graph's default-domain opset (None: the source graph's, unchanged) and the
    # type its Q/DQ pairs compute in: "fp32", "fp16" (opset 19) or "fp32-islands" (an FP16 graph
    # at opset 17: Cast-wrapped FP32 Q/DQ, module docstring).
    opset: int | None = None
    qdq_dtype: str = "fp32"

    @property
    def mac_share(self) -> float:
        return self.share_of(sum(d.macs for d in self.layers)) or 0.0

    def summary(self) -> str:
        lines = [
            f"quantized {len(self.quantized)} of {len(self.layers)} weighted layers "
            f"({self.mac_share:.1%} of their MACs); {self.qdq_pairs} Q/DQ pairs inserted"
        ]
        for d in self.skipped:
            lines.append(f"  float: {d.module} ({d.op}, {d.macs / 1e6:.2f} MMAC): {d.reason}")
        lines += self.fp16_lines()
        if self.qdq_dtype == "fp32-islands":
            lines.append(f"  opset {self.opset}: Q/DQ are FP32 islands (Cast to FLOAT -> Q/DQ with FP32 scales -> Cast to FLOAT16; INT8 weight initializers)")
        if self.degenerate_ranges:
            lines.append(f"  {len(self.degenerate_ranges)} zero range(s) got scale 1/qmax: {shown(self.degenerate_ranges)}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "quantized_layers": len(self.quantized),
            "weighted_layers": len(self.layers),
            "mac_share": self.mac_share,
            "qdq_pairs": self.qdq_pairs,
            "float_layers": self.float_layers_json(),
            "unused_table_entries": self.unused_table_entries,
            "degenerate_ranges": self.degenerate_ranges,
            "dtype": self.dtype,
            "fp32_islands": self.fp32_islands,
            "opset": self.opset,
            "qdq_dtype": self.qdq_dtype,
        }


class _QdqBuilder:
    """Makes Q/DQ pairs, sharing one pair per (tensor, scale) so fan-out tensors (the shared
    input of to_q/to_k/to_v) are quantized once, as TensorRT prefers."""

    def __init__(self, graph: gs.Graph, cast_wrapped: bool = False) -> None:
        self.graph = graph
        self.cast_wrapped = cast_wrapped  # FP32 Q/DQ islands in an FP16 graph (opset 17)
        self.cache: dict[tuple[str, bytes], gs.Variable] = {}
        self.pairs = 0

    def quantize(self, tensor: gs.Tensor, scale: np.ndarray, axis: int | None, name: str, layer_dtype: type | None = None) -> gs.Variable:
        """The DequantizeLinear output (or its Cast) that replaces `tensor` at its layer;
        `layer_dtype` is the layer's float type where it differs from the tensor's (an FP32
        source weight of an FP16 layer, opset-17 islands only)."""
        if not np.all(np.isfinite(scale) & (scale > 0)):
            # Unreachable through a parsed table (see the module docstring); a guard for callers
            # that build scales themselves, since a zero or NaN scale silently ruins the graph.
            raise QuantizationError(f"{name}: scale for tensor {tensor.name} is not finite and positive: {scale.ravel()[:8]}")
        key = (tensor.name, scale.tobytes() + str(axis).encode())
        if key in self.cache:
            return self.cache[key]
        if self.cast_wrapped:
            self.cache[key] = self._island(tensor, np.asarray(scale, dtype=np.float32), axis, name, layer_dtype or tensor_dtype(tensor))
            self.pairs += 1
            return self.cache[key]
        # The scale and the DequantizeLinear output take the tensor's own float type: FP16 in an
        # FP16 graph (opset >= 19), so no Cast sits between a DequantizeLinear and its layer.
        dtype = tensor_dtype(tensor)
        try:
            stored = scale_in_dtype(scale, dtype)
        except ValueError as exc:
            raise QuantizationError(f"{name}: scale for tensor {tensor.name}: {exc}", hint="keep this layer in FP32 (--exclude) or use --dtype fp32") from exc
        scale_c = gs.Constant(f"{name}/scale", stored)
        zero_c = gs.Constant(f"{name}/zero_point", np.zeros(scale.shape, dtype=np.int8))
        attrs = {"axis": axis} if axis is not None else {}
        quantized = gs.Variable(f"{name}/quantized", dtype=np.int8)
        dequantized = gs.Variable(f"{name}/dequantized", dtype=dtype)
        self.graph.nodes.append(gs.Node("QuantizeLinear", f"{name}/QuantizeLinear", attrs, [tensor, scale_c, zero_c], [quantized]))
        self.graph.nodes.append(gs.Node("DequantizeLinear", f"{name}/DequantizeLinear", attrs, [quantized, scale_c, zero_c], [dequantized]))
        self.cache[key] = dequantized
        self.pairs += 1
        return dequantized

    def _island(self, tensor: gs.Tensor, scale: np.ndarray, axis: int | None, name: str, dtype: type) -> gs.Variable:
        """The opset-17 form (module docstring): FP32 scale and DequantizeLinear output, Casts to
        and from FP16 where the layer (`dtype`) is FP16; a weight (`axis` set, a Constant)
        becomes INT8 integers: round-half-even(w / scale) clipped to INT8, what a QuantizeLinear
        computes. `insert_qdq` hands it the FP32 weight, so the integers are the FP32 Q/DQ
        graph's (`fp32_weights`)."""
        scale_c = gs.Constant(f"{name}/scale", scale)
        zero_c = gs.Constant(f"{name}/zero_point", np.zeros(scale.shape, dtype=np.int8))
        attrs = {"axis": axis} if axis is not None else {}
        dequantized = gs.Variable(f"{name}/dequantized", dtype=np.float32)
        if axis is not None and isinstance(tensor, gs.Constant):
            shape = [1] * tensor.values.ndim
            shape[axis] = -1
            integers = np.clip(np.rint(tensor.values.astype(np.float32) / scale.reshape(shape)), -128, 127).astype(np.int8)
            quantized: gs.Tensor = gs.Constant(f"{name}/int8_weight", integers)
        else:
            source = tensor
            if tensor_dtype(tensor) == np.float16:
                source = gs.Variable(f"{name}/input_fp32", dtype=np.float32)
                self.graph.nodes.append(gs.Node("Cast", f"{name}/CastToFloat", {"to": onnx.TensorProto.FLOAT}, [tensor], [source]))
            quantized = gs.Variable(f"{name}/quantized", dtype=np.int8)
            self.graph.nodes.append(gs.Node("QuantizeLinear", f"{name}/QuantizeLinear", attrs, [source, scale_c, zero_c], [quantized]))
        self.graph.nodes.append(gs.Node("DequantizeLinear", f"{name}/DequantizeLinear", attrs, [quantized, scale_c, zero_c], [dequantized]))
        if dtype != np.float16:
            return dequantized
        out = gs.Variable(f"{name}/dequantized_fp16", dtype=np.float16)
        self.graph.nodes.append(gs.Node("Cast", f"{name}/CastToFloat16", {"to": onnx.TensorProto.FLOAT16}, [dequantized], [out]))
        return out


def tensor_dtype(tensor: gs.Tensor) -> type:
    """The float type of a graph tensor (a Constant's values, a Variable's declared type)."""
    dtype = tensor.values.dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    return np.float16 if dtype is not None and np.dtype(dtype) == np.float16 else np.float32


def _clip_weight(weight: np.ndarray, scale: np.ndarray, axis: int, qmax: int) -> np.ndarray:
    """Clip to the integer grid [-qmax - 1, qmax] x scale; a no-op for INT8's own range."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    s = scale.reshape(shape).astype(np.float32)
    return np.clip(weight, (-qmax - 1) * s, qmax * s).astype(weight.dtype)


def _check_weight(wn: WeightedNode, amax: list[float]) -> None:
    channels = wn.weight.values.shape[wn.weight_axis]
    if channels != len(amax):
        raise QuantizationError(
            f"layer {wn.module!r} (node {wn.node.name}): weight {wn.weight.name} has {channels} output channels "
            f"on axis {wn.weight_axis}, the calibration table has {len(amax)}",
            hint="the table was made for a different model; recalibrate",
        )


def _reconstructed_values(wn: WeightedNode, weights, role: str, current: np.ndarray, table_scale: np.ndarray) -> np.ndarray:
    """The reconstructed integers x scales of `wn`'s weight (or branch), in the graph's layout.

    They are stored in PyTorch's layout; MatMul (and Gemm without transB) hold Linear weights
    transposed. The shape must match the initializer, and the stored scales the table's, or the
    reconstruction belongs to another model or table.
    """
    parts = weights.layer(wn.module).parts
    if role not in parts:
        raise QuantizationError(f"layer {wn.module!r}: {weights.source} has no weight{role or ' (unsplit)'}; it has {sorted(parts)}", hint="reconstruct with the table and split settings you quantize with")
    if not np.array_equal(parts[role][1], np.asarray(table_scale, dtype=np.float32)):
        raise QuantizationError(f"layer {wn.module!r}: the weight{role} scales in {weights.source} differ from the calibration table's", hint="quantize with the table the reconstruction was made from (or its reconstruction.calibration.json)")
    torch_axis = 1 if wn.op == "ConvTranspose" else 0
    values = weights.dequantized(wn.module, role, torch_axis)
    if values.ndim == 2 and wn.weight_axis == 1 and wn.op in ("MatMul", "Gemm"):
        values = values.T
    if values.shape != current.shape:
        raise QuantizationError(
            f"layer {wn.module!r} (node {wn.node.name}): reconstructed weight{role} has shape {values.shape}, the graph's {wn.weight.name} has {current.shape}",
            hint="the reconstruction was made for another model; rerun `qdiff reconstruct`",
        )
    return np.ascontiguousarray(values.astype(current.dtype))


def _quantize_split(graph: gs.Graph, builder: _QdqBuilder, wn: WeightedNode, ranges, recipe: Recipe, counts: dict[str, int], report: QdqReport, weights=None, layer_dtype: type | None = None) -> None:
    """Split-shortcut layer: two Convs on the concat branches, each with its own Q/DQ, then Add.
    A split conv1 (`split_kind` "conv1") takes its branches from Slices of its input."""
    if wn.op != "Conv":
        raise QuantizationError(f"split-shortcut layer {wn.module!r} (node {wn.node.name}) is a {wn.op}, not a Conv")
    for role in ("weight_a", "weight_b"):
        if len(getattr(ranges, role)) != len(ranges.weight):
            raise QuantizationError(f"layer {wn.module!r}: {role} has {len(getattr(ranges, role))} channels, weight has {len(ranges.weight)}")
    rewrite = split_sliced_conv if ranges.split_kind == "conv1" else split_concat_conv
    split = rewrite(graph, wn.node, ranges.split_channels, wn.module, counts)
    for branch, conv in (("a", split.conv_a), ("b", split.conv_b)):
        amax = getattr(ranges, f"shortcut_{branch}")
        w_amax = getattr(ranges, f"weight_{branch}")
        if amax <= MIN_AMAX:
            report.degenerate_ranges.append(f"{wn.module}:shortcut_{branch}")
        report.degenerate_ranges += [f"{wn.module}:weight_{branch}[{c}]" for c, v in enumerate(w_amax) if v <= MIN_AMAX]
        act_scale = scale_from_amax(amax, recipe.activation_qmax)
        w_scale = scale_from_amax(w_amax, recipe.weight_qmax)
        weight = conv.inputs[1]
        if weights is not None:
            weight.values = _reconstructed_values(wn, weights, f"_{branch}", weight.values, w_scale)
        weight.values = _clip_weight(weight.values, w_scale, 0, recipe.weight_qmax)
        conv.inputs[0] = builder.quantize(conv.inputs[0], act_scale, None, f"{wn.module}/input_quantizer_{branch}")
        conv.inputs[1] = builder.quantize(weight, w_scale, 0, f"{wn.module}/weight_quantizer_{branch}", layer_dtype)


def insert_qdq(
    model: onnx.ModelProto, table: CalibrationTable, recipe: Recipe | None = None, weights=None, *, cast_wrapped: bool = False, fp32_weights: dict[str, np.ndarray | gs.Constant] | None = None
) -> tuple[onnx.ModelProto, QdqReport]:
    """Return a Q/DQ copy of `model` and a report of what was quantized.

    `weights` (a `calib.reconstruct.artifact.ReconstructedWeights`) gives every quantized layer
    its reconstructed integers (their stored scales must equal the table's) instead of rounding the float weight to nearest; the
    graph keeps the same form (float initializer on the grid, per-channel Q/DQ).

    `cast_wrapped=True` (an FP16 `model` at opset 17) writes every pair as an FP32 island with
    INT8 weight initializers (module docstring). `fp32_weights` (weighted node name -> its
    weight in the FP32 graph the FP16 one was converted from) gives those integers from the FP32
    weights, as the FP32 Q/DQ graph rounds them: rounding the FP16 copy instead moves the few
    weights that FP16 storage pushes across a rounding boundary one step."""
    recipe = recipe or Recipe.from_json(table.recipe)
    recipe.check_deployable("a Q/DQ graph")
    if weights is not None:
        if weights.model_sha256 != table.model_sha256:
            raise QuantizationError(
                f"{weights.source} was reconstructed for model {weights.model_sha256[:12]}, the calibration table is for {table.model_sha256[:12]}",
                hint="reconstruct from this table's model (`qdiff reconstruct`)",
            )
        if weights.weight_bits != recipe.weight_bits:
            raise QuantizationError(f"{weights.source} holds W{weights.weight_bits} weights, the recipe is W{recipe.weight_bits}", hint="reconstruct with this recipe's table")
    splits = {name: r.split_channels for name, r in table.split_layers(recipe.split_shortcut, recipe.split_conv1).items()}
    counts = channel_counts(model) if splits else {}
    graph = gs.import_onnx(model)
    builder = _QdqBuilder(graph, cast_wrapped=cast_wrapped)
    report = QdqReport(qdq_dtype="fp32-islands" if cast_wrapped else "fp32")
    missing: list[str] = []
    seen_modules: set[str] = set()
    macs_of = {name: entry.macs for name, entry in table.layers.items()} | {s["module"]: s.get("macs", 0) for s in table.provenance.get("float_layers", [])}
    for wn in weighted_nodes(graph):
        seen_modules.add(wn.module)
        decision = LayerDecision(wn.module, wn.op, False, macs=int(macs_of.get(wn.module) or 0))  # `macs` is optional in a table
        report.layers.append(decision)
        pattern = recipe.is_excluded(wn.module)
        if pattern is not None:
            decision.reason = f"recipe excludes it (pattern {pattern!r})"
            continue
        if wn.op not in recipe.quantize_ops:
            decision.reason = f"recipe does not quantize {wn.op}"
            continue
        ranges = table.layers.get(wn.module)
        if ranges is None or ranges.input is None or ranges.weight is None:
            missing.append(f"{wn.module} (node {wn.node.name})")
            continue
        _check_weight(wn, ranges.weight)
        layer_dtype = tensor_dtype(wn.activation)
        if fp32_weights is not None:
            if wn.node.name not in fp32_weights:
                raise QuantizationError(f"layer {wn.module!r}: node {wn.node.name} has no weight in the FP32 graph the FP16 graph came from")
            source = fp32_weights[wn.node.name]
            wn.weight.values = source.values if isinstance(source, gs.Constant) else source  # a Constant loads its values only now, one layer at a time
        if wn.module in splits:
            _quantize_split(graph, builder, wn, ranges, recipe, counts, report, weights, layer_dtype)
            decision.quantized = True
            continue
        if ranges.input <= MIN_AMAX:
            report.degenerate_ranges.append(f"{wn.module}:input")
        report.degenerate_ranges += [f"{wn.module}:weight[{c}]" for c, amax in enumerate(ranges.weight) if amax <= MIN_AMAX]
        act_scale = scale_from_amax(ranges.input, recipe.activation_qmax)
        w_scale = scale_from_amax(ranges.weight, recipe.weight_qmax)
        if weights is not None:
            wn.weight.values = _reconstructed_values(wn, weights, "", wn.weight.values, w_scale)
        wn.weight.values = _clip_weight(wn.weight.values, w_scale, wn.weight_axis, recipe.weight_qmax)
        wn.node.inputs[0] = builder.quantize(wn.activation, act_scale, None, f"{wn.module}/input_quantizer")
        wn.node.inputs[1] = builder.quantize(wn.weight, w_scale, wn.weight_axis, f"{wn.module}/weight_quantizer", layer_dtype)
        decision.quantized = True
    if missing:
        raise QuantizationError(
            f"{len(missing)} layer(s) the recipe quantizes have no ranges in the calibration table: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
            hint="the table may come from another model or recipe; recalibrate, or exclude these layers in the recipe",
        )
    report.qdq_pairs = builder.pairs
    report.unused_table_entries = sorted(set(table.layers) - seen_modules)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.producer_name = "qdiff"
    out.ir_version = model.ir_version
    return out, report


def table_overflow_islands(model: onnx.ModelProto, table: CalibrationTable, limit: float) -> list:
    """Weighted layers whose input range in the calibration table (real calibration data, from
    the model's own sampling loop) is above the FP16 limit: they stay FP32 too."""
    from qdiff.export.fp16 import Fp32Island

    islands = []
    for wn in weighted_nodes(gs.import_onnx(model)):
        ranges = table.layers.get(wn.module)
        amaxes = [] if ranges is None else [("input", ranges.input), ("shortcut_a", ranges.shortcut_a), ("shortcut_b", ranges.shortcut_b)]
        for role, amax in amaxes:
            if amax is not None and amax > limit:
                islands.append(Fp32Island(wn.node.name, wn.op, wn.activation.name, float(amax), f"calibration range of {wn.module}:{role} is {amax:.4g} > {limit:g}"))
                break
    return islands


def fp16_qdq(
    model: onnx.ModelProto, onnx_path: Path, table: CalibrationTable, recipe: Recipe | None, *, probe_size: int, tokens: int = 77, limit: float | None = None, weights=None, opset: int | None = None
) -> tuple[onnx.ModelProto, QdqReport]:
    """The FP16 Q/DQ graph: overflow guard on the FP32 graph, the opset, FP16 conversion, then
    the same Q/DQ pass. At opset 19 (default) its scales and DequantizeLinear outputs follow the
    FP16 tensors; at opset 17 (`QDQ_FP32_ISLANDS_OPSET`, what TensorRT 8.6 parses) the pairs
    are Cast-wrapped FP32 islands (`insert_qdq(cast_wrapped=True)`)."""
    from qdiff.export.fp16 import DEFAULT_FP16_LIMIT, QDQ_FP32_ISLANDS_OPSET, check_fp16_qdq_opset, convert_to_fp16, is_fp16_graph, overflow_islands, probe_feeds, qdq_dtype_of, tensor_maxima
    from qdiff.export.int4_weight_only import upgrade_opset

    opset = check_fp16_qdq_opset(opset)

    limit = DEFAULT_FP16_LIMIT if limit is None else limit
    if is_fp16_graph(model):
        raise QuantizationError(
            f"{onnx_path.name} is already an FP16 graph; the FP16 Q/DQ pass starts from the FP32 export (its overflow check runs the FP32 graph)",
            hint="give the graph from `qdiff export` without --dtype fp16",
        )
    maxima = tensor_maxima(onnx_path, probe_feeds(model, size=probe_size, tokens=tokens))
    islands = {i.node: i for i in overflow_islands(model, maxima, limit)}
    for island in table_overflow_islands(model, table, limit):
        islands.setdefault(island.node, island)
    upgraded, _ = upgrade_opset(model, opset)  # refuses a source above `opset`
    cast_wrapped = opset == QDQ_FP32_ISLANDS_OPSET
    # FP32 islands quantize the FP32 weights (the FP32 Q/DQ graph's integers), by node name.
    # The Constants, not their values: graphsurgeon loads each lazily, so no second full copy of
    # the FP32 weights is held (SD 1.5: 3.4 GB).
    fp32_weights = {wn.node.name: wn.weight for wn in weighted_nodes(gs.import_onnx(upgraded))} if cast_wrapped else None
    converted = convert_to_fp16(upgraded, set(islands))
    quantized, report = insert_qdq(converted, table, recipe, weights, cast_wrapped=cast_wrapped, fp32_weights=fp32_weights)
    report.dtype = "fp16"
    report.opset = opset
    report.qdq_dtype = qdq_dtype_of(opset)
    report.fp32_islands = [i.to_json() for i in islands.values()]
    return quantized, report


def insert_qdq_file(
    onnx_path: str | Path,
    table: CalibrationTable,
    out_path: str | Path,
    recipe: Recipe | None = None,
    weights=None,
    *,
    dtype: str = "fp32",
    probe_size: int = 64,
    fp16_limit: float | None = None,
    opset: int | None = None,
) -> QdqReport:
    """The pass from file to file. `dtype="fp16"` writes the FP16 Q/DQ graph (`fp16_qdq`) at
    `opset` 19 (default) or 17 (FP32 Q/DQ islands); the FP32 pass keeps the source's opset and
    takes no `opset`. `probe_size` is the latent size of the overflow probe's inputs; `weights`
    are reconstructed integer weights (`insert_qdq`)."""
    from qdiff.export.fp16 import check_qdq_opset
    from qdiff.export.onnx_io import load_onnx, save_onnx

    opset = check_qdq_opset(dtype, opset)

    onnx_path = Path(onnx_path)
    model = load_onnx(onnx_path)  # the full checks: this graph may come from anywhere
    external = bool(Path(str(onnx_path) + ".data").exists())
    if dtype == "fp16":
        quantized, report = fp16_qdq(model, onnx_path, table, recipe, probe_size=probe_size, limit=fp16_limit, weights=weights, opset=opset)
    else:
        from qdiff.export.fp16 import is_fp16_graph

        if is_fp16_graph(model):
            raise QuantizationError(
                f"{onnx_path.name} is an FP16 graph; Q/DQ insertion starts from the FP32 export",
                hint="give the graph from `qdiff export` without --dtype fp16, and add --dtype fp16 to `qdiff quantize` for an FP16 Q/DQ graph",
            )
        quantized, report = insert_qdq(model, table, recipe, weights)
        report.opset = default_opset(quantized)
    save_onnx(quantized, out_path, external_data=external or None)
    try:
        onnx.checker.check_model(str(out_path), full_check=True)
    except Exception as exc:
        raise QuantizationError(f"the Q/DQ graph {out_path} fails the ONNX checker: {exc}") from exc
    return report


def quantize_file(*args, **kwargs):
    """Deprecated name of `insert_qdq_file` (two passes had the same name); kept for one release."""
    import warnings

    warnings.warn("qdiff.export.qdq.quantize_file is deprecated; use insert_qdq_file", DeprecationWarning, stacklevel=2)
    return insert_qdq_file(*args, **kwargs)
