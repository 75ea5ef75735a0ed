"""Where an engine runs INT8, where it does not, and why: the answer to "why is INT8 not faster".

Inputs are TensorRT's engine-inspector JSON (written beside every plan as `layers.json`), the
ONNX graph the engine was built from, and optionally per-layer times from TensorRT's profiler.
The graph gives each Conv/ConvTranspose/Gemm/MatMul its MACs (by ONNX shape inference at the
profile's opt shapes; weights are never loaded) and whether the graph quantized its input. The
inspector gives each engine layer its kernel and tensor formats. Joining them by node name:

- per weighted node: the engine layer that runs it and that layer's precision; the INT8 share
  of conv/matmul MACs follows;
- per float fallback, the reason: the graph left it unquantized, or TensorRT chose a float
  kernel although the graph quantized it;
- the reformat layers TensorRT inserted (format or precision changes, e.g. around a Concat);
- the fused Myelin blocks ({ForeignNode[first...last]}) with their I/O precisions. TensorRT 8.6
  does not break these down, so nodes inside one are attributed to the block by graph order.

The inspector JSON comes in two shapes, and both are read:

- TensorRT 8.6 (and early 10.x): per-layer tensors carry one "Format/Datatype" string ("Channel
  major FP16 format where channel % 8 == 0"), engine I/O is a "Bindings" list of names;
- later 10.x and 11.x: per-layer tensors carry "Format" and a separate "Datatype" (spelled
  "DataType" in places), and engine I/O is an "I/O Tensors" list of objects (Name, IOMode,
  DataType, ...). The datatype field wins over the format text when both exist.

Everything here is plain JSON processing, so it is tested on machines without a GPU
(tests/data/inspector-*.layers.json hold one fixture of each shape).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qdiff.core.errors import OnnxModelError

CONV_OPS = ("Conv", "ConvTranspose")
MATMUL_OPS = ("Gemm", "MatMul")
_FOREIGN = re.compile(r"\{ForeignNode\[(.*)\]\}")
_SCOPE = re.compile(r"/unet/[^/ ]+/[^/ ]+/")  # e.g. /unet/down_blocks.0/attentions.1/
_INT8_TACTIC = re.compile(r"(^|_)i8")  # e.g. sm90_xmma_fprop_implicit_gemm_i8f32_...
_FP16_TACTIC = re.compile(r"(^|_)(f16|h\d{3,4}|hmma)")  # ..._f16f16_f16f32_..., h1688
_FP32_TACTIC = re.compile(r"(^|_)(f32|tf32|s\d{3,4}|sgemm)")


# ----------------------------------------------------------------------------- the graph side


@dataclass
class GraphNode:
    name: str
    op: str
    index: int  # position in the graph's (topological) node order
    macs: int
    weighted: bool  # second input is a constant weight (attention's activation MatMuls are not)
    quantized_in_graph: bool  # its first input comes from a DequantizeLinear


def _shape(value_info: Any) -> list[int] | None:
    dims = value_info.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims):
        return None
    return [d.dim_value for d in dims]


def load_graph(onnx_path: str | Path) -> Any:
    """The graph without its weights (engines are built from multi-GB files)."""
    import onnx

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise OnnxModelError(f"{onnx_path}: not a readable ONNX model ({exc})") from exc


def graph_nodes(graph: str | Path | Any, input_shapes: Mapping[str, Sequence[int]], *, name: str | None = None) -> list[GraphNode]:
    """Conv/ConvTranspose/Gemm/MatMul nodes with MACs at `input_shapes` (no weights loaded).
    `graph` is a path or a model from `load_graph` (whose input dims this fixes in place)."""
    import onnx

    model = load_graph(graph) if isinstance(graph, (str, Path)) else graph
    onnx_path = name or (graph if isinstance(graph, (str, Path)) else "graph")
    for value in model.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            shape = list(input_shapes[value.name])
            if len(dims) != len(shape):
                raise OnnxModelError(f"{onnx_path}: input {value.name} has rank {len(dims)}, shape {shape} given")
            for d, v in zip(dims, shape):
                d.Clear()
                d.dim_value = int(v)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int] | None] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        shapes[vi.name] = _shape(vi)
    # ONNX's own inference loses shapes behind some Reshape chains (attention); ONNX Runtime's
    # symbolic inference follows them. Used to fill the gaps, never to overrule.
    try:
        from qdiff.export.shape_inference import symbolic_shapes, weightless

        symbolic = symbolic_shapes(weightless(model, stub_initializers=False)[0])
        for vi in symbolic.graph.value_info:
            if shapes.get(vi.name) is None:
                shapes[vi.name] = _shape(vi)
    except Exception:  # noqa: BLE001  (best effort: nodes without shapes count 0 MACs)
        pass
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    constants = {i.name for i in model.graph.initializer}
    producers: dict[str, Any] = {}
    for node in model.graph.node:
        for out in node.output:
            producers[out] = node
        if node.op_type == "Constant":
            constants.update(node.output)
    # A weight behind a DequantizeLinear (Q/DQ graphs) is still a constant weight.
    def is_constant(name: str) -> bool:
        if name in constants:
            return True
        p = producers.get(name)
        return p is not None and p.op_type in ("DequantizeLinear", "QuantizeLinear", "Transpose", "Cast") and is_constant(p.input[0])

    found = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in CONV_OPS + MATMUL_OPS or len(node.input) < 2:
            continue
        out = shapes.get(node.output[0])
        w = shapes.get(node.input[1])
        macs = 0
        if out and w and all(isinstance(v, int) and v > 0 for v in (*out, *w)):
            if node.op_type == "Conv":
                macs = _prod(out) * _prod(w[1:])  # out elems x (Cin/groups x kh x kw)
            elif node.op_type == "ConvTranspose":
                x = shapes.get(node.input[0])
                macs = _prod(x) * w[1] * _prod(w[2:]) if x else 0  # in elems x (Cout/groups x kh x kw)
            elif node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                macs = _prod(out) * (w[1] if trans_b else w[0])
            else:  # MatMul: out [..., M, N], reduction dim = w[-2]
                macs = _prod(out) * w[-2]
        producer = producers.get(node.input[0])
        found.append(
            GraphNode(
                name=node.name,
                op=node.op_type,
                index=index,
                macs=int(macs),
                weighted=is_constant(node.input[1]),
                quantized_in_graph=producer is not None and producer.op_type == "DequantizeLinear",
            )
        )
    return found


def _prod(values: Sequence[int] | None) -> int:
    out = 1
    for v in values or ():
        out *= int(v)
    return out


def graph_order(graph: str | Path | Any) -> dict[str, int]:
    model = load_graph(graph) if isinstance(graph, (str, Path)) else graph
    return {n.name: i for i, n in enumerate(model.graph.node)}


# ----------------------------------------------------------------------------- the engine side


def precision_of(fmt: str) -> str:
    """'Thirty-two wide channel vectorized row major Int8 format' -> 'INT8', 'Half' -> 'FP16'."""
    low = fmt.lower()
    if low.startswith("n/a"):  # "N/A due to dynamic shapes" (TensorRT 8.6)
        return "?"
    for keys, label in ((("int8",), "INT8"), (("int4",), "INT4"), (("fp8",), "FP8"), (("fp4",), "FP4"), (("bf16", "bfloat16"), "BF16"), (("fp16", "half"), "FP16"), (("fp32", "float"), "FP32"), (("int32",), "INT32"), (("int64",), "INT64"), (("bool",), "BOOL")):
        if any(k in low for k in keys):
            return label
    return "?"


@dataclass
class EngineLayer:
    name: str
    type: str
    inputs: list[str]  # precisions of the inputs, in order
    outputs: list[str]
    tactic: str
    nodes: list[str]  # ONNX node names fused into this layer ([] for reformats)
    foreign_range: tuple[str, str] | None = None  # Myelin: first and last ONNX node of the block
    origin: str = ""  # "QDQ" for a QuantizeLinear TensorRT could not fuse into its producer

    @property
    def is_standalone_quantize(self) -> bool:
        return self.origin == "QDQ"

    @property
    def is_reformat(self) -> bool:
        return self.type == "Reformat" or self.name.startswith("Reformatting CopyNode")

    @property
    def is_myelin(self) -> bool:
        return self.foreign_range is not None or self.type == "Myelin"

    @property
    def compute_precision(self) -> str:
        """INT8 when the kernel reads INT8 (an INT8 conv may write FP16/FP32 output)."""
        tactic = self.tactic.lower()
        if _INT8_TACTIC.search(tactic) or self.inputs[:1] == ["INT8"]:
            return "INT8"
        if self.inputs and self.inputs[0] != "?":
            return self.inputs[0]
        # Engines with dynamic shapes report "N/A" formats (TensorRT 8.6); the kernel name says it.
        if _FP16_TACTIC.search(tactic):
            return "FP16"
        if _FP32_TACTIC.search(tactic):
            return "FP32"
        return "?"


def tensor_precision(tensor: Mapping[str, Any]) -> str:
    """A layer tensor's precision in either schema: the separate "Datatype"/"DataType" field
    (10.x/11.x) when present, else the combined "Format/Datatype" text (8.6), else "Format"."""
    for key in ("Datatype", "DataType"):
        if tensor.get(key):
            return precision_of(str(tensor[key]))
    return precision_of(str(tensor.get("Format/Datatype", tensor.get("Format", ""))))


@dataclass
class EngineIO:
    name: str
    mode: str  # "input" / "output" / "?" (8.6's "Bindings" gives names only)
    precision: str  # "?" when the schema does not say


def parse_io(info: Mapping[str, Any]) -> list[EngineIO]:
    """The engine's I/O tensors: 10.x/11.x "I/O Tensors" objects, or 8.6's "Bindings" names."""
    io = info.get("I/O Tensors")
    if isinstance(io, list):
        out = []
        for t in io:
            if isinstance(t, Mapping):
                dtype = t.get("DataType", t.get("Datatype"))
                out.append(EngineIO(str(t.get("Name", "")), str(t.get("IOMode", "?")).lower(), precision_of(str(dtype)) if dtype else "?"))
        return out
    return [EngineIO(str(n), "?", "?") for n in info.get("Bindings", []) if isinstance(n, str)]


def parse_layers(info: Mapping[str, Any]) -> list[EngineLayer]:
    """Parse TensorRT's LayerInformationFormat.JSON, in the 8.6 or the 10.x/11.x schema."""
    raw = info.get("Layers", info.get("layers"))
    if not isinstance(raw, list):
        raise OnnxModelError("engine layer information has no 'Layers' list", hint="build the engine with qdiff (profiling verbosity DETAILED)")
    layers = []
    for entry in raw:
        if isinstance(entry, str):  # built without DETAILED verbosity: names only
            entry = {"Name": entry}
        name = str(entry.get("Name", ""))
        fmts = lambda key: [tensor_precision(t) for t in entry.get(key, []) if isinstance(t, Mapping)]  # noqa: E731
        match = _FOREIGN.search(name)
        foreign = None
        nodes: list[str] = []
        if match:
            first, _, last = match.group(1).partition("...")
            foreign = (first.strip(), (last or first).strip())
        elif not name.startswith("Reformatting CopyNode"):
            nodes = [part.strip() for part in name.split(" + ") if part.strip()]
        layers.append(
            EngineLayer(
                name=name,
                type=str(entry.get("LayerType", "?")),
                inputs=fmts("Inputs"),
                outputs=fmts("Outputs"),
                tactic=str(entry.get("TacticName", "")),
                nodes=nodes,
                foreign_range=foreign,
                origin=str(entry.get("Origin", "")),
            )
        )
    return layers


# ----------------------------------------------------------------------------- the join


@dataclass
class NodePrecision:
    node: str
    op: str
    macs: int
    weighted: bool
    quantized_in_graph: bool
    layer: str | None
    precision: str  # INT8 / FP16 / FP32 / "fused block" / "not found"
    reason: str = ""


@dataclass
class InspectReport:
    nodes: list[NodePrecision]
    layers: list[EngineLayer]
    timings_ms: dict[str, float] = field(default_factory=dict)
    io: list[EngineIO] = field(default_factory=list)

    # -- summaries
    def _compute(self, ops: Sequence[str]) -> list[NodePrecision]:
        return [n for n in self.nodes if n.op in ops]

    def int8_mac_share(self, ops: Sequence[str] = CONV_OPS + MATMUL_OPS) -> float:
        nodes = self._compute(ops)
        total = sum(n.macs for n in nodes)
        return sum(n.macs for n in nodes if n.precision == "INT8") / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        convs, mms = self._compute(CONV_OPS), self._compute(MATMUL_OPS)
        count = lambda nodes, p: sum(1 for n in nodes if n.precision == p)  # noqa: E731
        myelin = [lay for lay in self.layers if lay.is_myelin]
        reformats = [lay for lay in self.layers if lay.is_reformat]
        out = {
            "layers": len(self.layers),
            "convolutions": {"total": len(convs), "int8": count(convs, "INT8"), "fp16": count(convs, "FP16"), "fp32": count(convs, "FP32"), "in_fused_blocks": count(convs, "fused block")},
            "matmuls": {"total": len(mms), "int8": count(mms, "INT8"), "fp16": count(mms, "FP16"), "fp32": count(mms, "FP32"), "in_fused_blocks": count(mms, "fused block")},
            "int8_mac_share": round(self.int8_mac_share(), 4),
            "int8_mac_share_convolutions": round(self.int8_mac_share(CONV_OPS), 4),
            "macs_in_fused_blocks": round(sum(n.macs for n in self.nodes if n.precision == "fused block") / max(1, sum(n.macs for n in self.nodes)), 4),
            "reformat_layers": len(reformats),
            "standalone_quantize_layers": sum(1 for lay in reformats if lay.is_standalone_quantize),
            "fused_blocks": len(myelin),
            "fused_blocks_with_fp32_io": sum(1 for lay in myelin if "FP32" in lay.inputs + lay.outputs),
            "io": {t.name: t.precision for t in self.io},
        }
        if self.timings_ms:
            total = sum(self.timings_ms.values())
            by_kind: dict[str, float] = {}
            for lay in self.layers:
                kind = "standalone quantize" if lay.is_standalone_quantize else "reformat" if lay.is_reformat else "fused block" if lay.is_myelin else lay.compute_precision
                by_kind[kind] = by_kind.get(kind, 0.0) + self.timings_ms.get(lay.name, 0.0)
            out["profile_ms_total"] = round(total, 4)
            out["profile_ms_by_kind"] = {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
        return out

    def fallbacks(self) -> list[NodePrecision]:
        return [n for n in self.nodes if n.weighted and n.precision != "INT8"]

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "nodes": [asdict(n) for n in self.nodes],
            "reformats": [{"name": lay.name, "from": lay.inputs, "to": lay.outputs, "ms": self.timings_ms.get(lay.name)} for lay in self.layers if lay.is_reformat],
            "fused_blocks": [{"name": lay.name, "inputs": lay.inputs, "outputs": lay.outputs, "ms": self.timings_ms.get(lay.name)} for lay in self.layers if lay.is_myelin],
            "timings_ms": self.timings_ms,
        }


def join(nodes: Sequence[GraphNode], layers: Sequence[EngineLayer], order: Mapping[str, int] | None = None) -> InspectReport:
    """Attribute every conv/matmul node to the engine layer that runs it."""
    by_node: dict[str, EngineLayer] = {}
    for lay in layers:
        for n in lay.nodes:
            by_node.setdefault(n, lay)
    ranges = []
    if order:
        for lay in layers:
            if lay.foreign_range:
                lo, hi = order.get(lay.foreign_range[0]), order.get(lay.foreign_range[1])
                if lo is not None and hi is not None:
                    ranges.append((min(lo, hi), max(lo, hi), lay))
    scoped: dict[str, EngineLayer] = {}
    for lay in layers:
        if lay.is_myelin:
            for scope in _SCOPE.findall(lay.name):
                scoped.setdefault(scope, lay)
    out = []
    for node in nodes:
        lay = by_node.get(node.name)
        if lay is None:
            block = next((r[2] for r in ranges if r[0] <= node.index <= r[1]), None)
            if block is None:  # block ends named by tensors/initializers: attribute by module scope
                match = _SCOPE.match(node.name)
                block = scoped.get(match.group(0)) if match else None
            if block is not None:
                out.append(NodePrecision(node.name, node.op, node.macs, node.weighted, node.quantized_in_graph, block.name, "fused block", "inside a fused (Myelin) block; TensorRT 8.6 does not report its precision"))
            else:
                out.append(NodePrecision(node.name, node.op, node.macs, node.weighted, node.quantized_in_graph, None, "not found", "no engine layer names this node (fused away or renamed)"))
            continue
        precision = lay.compute_precision
        reason = ""
        if precision != "INT8":
            if not node.quantized_in_graph:
                reason = "the graph leaves its input unquantized (no Q/DQ)" if node.weighted else "activation-activation matmul (not quantized by the recipe)"
            else:
                reason = f"quantized in the graph, but TensorRT chose a {precision} kernel ({lay.tactic or lay.type})"
        out.append(NodePrecision(node.name, node.op, node.macs, node.weighted, node.quantized_in_graph, lay.name, precision, reason))
    return InspectReport(out, list(layers))


def inspect(onnx_path: str | Path, layer_info: Mapping[str, Any], input_shapes: Mapping[str, Sequence[int]], timings_ms: Mapping[str, float] | None = None) -> InspectReport:
    model = load_graph(onnx_path)  # once: both the MAC count and the node order read it
    report = join(graph_nodes(model, input_shapes, name=str(onnx_path)), parse_layers(layer_info), graph_order(model))
    report.timings_ms = dict(timings_ms or {})
    report.io = parse_io(layer_info)
    return report


# ----------------------------------------------------------------------------- Markdown


def to_markdown(report: InspectReport, title: str = "Engine inspection", top: int = 25) -> str:
    s = report.summary()
    lines = [f"# {title}", ""]
    c, m = s["convolutions"], s["matmuls"]
    lines += [
        f"- INT8 share of conv/matmul MACs: **{s['int8_mac_share']:.1%}** (convolutions alone: {s['int8_mac_share_convolutions']:.1%}; MACs inside fused blocks, precision unreported: {s['macs_in_fused_blocks']:.1%})",
        f"- convolutions: {c['total']} ({c['int8']} INT8, {c['fp16']} FP16, {c['fp32']} FP32, {c['in_fused_blocks']} in fused blocks)",
        f"- matmuls: {m['total']} ({m['int8']} INT8, {m['fp16']} FP16, {m['fp32']} FP32, {m['in_fused_blocks']} in fused blocks)",
        f"- engine layers: {s['layers']}; reformat layers: {s['reformat_layers']} ({s['standalone_quantize_layers']} of them QuantizeLinear that TensorRT could not fuse into the producer); fused (Myelin) blocks: {s['fused_blocks']}, {s['fused_blocks_with_fp32_io']} with FP32 inputs/outputs (formats are reported only for static-shape engines)",
    ]
    if report.io:
        lines.append("- engine I/O: " + ", ".join(f"{t.name} ({t.mode}, {t.precision})" if t.mode != "?" else t.name for t in report.io))
    if report.timings_ms:
        lines.append(f"- profiled time per call (sum of layers): {s['profile_ms_total']:.3f} ms; by kind: " + ", ".join(f"{k} {v:.3f} ms" for k, v in s["profile_ms_by_kind"].items()))
        lines += ["", f"## Slowest {top} layers", "", "| ms | share | type | precision (in -> out) | layer |", "| ---: | ---: | --- | --- | --- |"]
        total = s["profile_ms_total"] or 1.0
        ranked = sorted(report.layers, key=lambda lay: -report.timings_ms.get(lay.name, 0.0))[:top]
        for lay in ranked:
            ms = report.timings_ms.get(lay.name, 0.0)
            lines.append(f"| {ms:.3f} | {ms / total:.1%} | {lay.type} | {'/'.join(lay.inputs) or '-'} -> {'/'.join(lay.outputs) or '-'} | `{_short(lay.name)}` |")
    fallbacks = report.fallbacks()
    lines += ["", f"## Weighted layers not in INT8 ({len(fallbacks)})", ""]
    if fallbacks:
        lines += ["| node | op | MACs | precision | reason |", "| --- | --- | ---: | --- | --- |"]
        for n in sorted(fallbacks, key=lambda n: -n.macs):
            lines.append(f"| `{n.node}` | {n.op} | {n.macs:,} | {n.precision} | {n.reason} |")
    else:
        lines.append("None: every weighted conv/matmul runs an INT8 kernel.")
    reformats = [lay for lay in report.layers if lay.is_reformat]
    lines += ["", f"## Reformat layers ({len(reformats)})", ""]
    for lay in reformats[:top]:
        lines.append(f"- {'/'.join(lay.inputs)} -> {'/'.join(lay.outputs)}: `{_short(lay.name, 160)}`")
    if len(reformats) > top:
        lines.append(f"- ... {len(reformats) - top} more in the JSON report")
    return "\n".join(lines) + "\n"


def _short(name: str, width: int = 110) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."
