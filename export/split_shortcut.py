"""The split-shortcut rewrite: conv(cat(a, b), W, bias) -> Conv(a, W[:, :Ca], bias) + Conv(b, W[:, Ca:]).

Exact in real arithmetic (a convolution sums over input channels, and zero padding pads both
slices alike), so each concat branch can carry its own INT8 scale into TensorRT instead of
being requantized at the Concat. The Concat stays when something else reads it (the resnet's
GroupNorm -> conv1 path does); otherwise graph cleanup drops it.

New nodes are named under the layer's module scope (`/unet/<module>/ConvA`, `ConvB`,
`SplitAdd`), so `graph_index.module_name` still maps them to the PyTorch module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdiff.errors import QuantizationError


@dataclass
class SplitConv:
    conv_a: gs.Node
    conv_b: gs.Node
    add: gs.Node

    @property
    def branch_a(self) -> gs.Tensor:
        return self.conv_a.inputs[0]

    @property
    def branch_b(self) -> gs.Tensor:
        return self.conv_b.inputs[0]


def channel_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Static dim 1 of every tensor ONNX shape inference can type (empty if inference fails,
    e.g. for a model over 2 GB; the rewrite then checks what it can without shapes)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a best-effort extra check
        return {}
    counts = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].HasField("dim_value"):
            counts[vi.name] = dims[1].dim_value
    return counts


def split_concat_conv(graph: gs.Graph, node: gs.Node, split_channels: int, module: str, counts: dict[str, int] | None = None) -> SplitConv:
    """Rewrite one Conv that reads a 2-input channel Concat into two Convs plus an Add (FP32)."""
    where = f"split-shortcut layer {module!r} (node {node.name})"
    if node.op != "Conv":
        raise QuantizationError(f"{where}: expected a Conv node, got {node.op}")
    x = node.inputs[0]
    producer = x.inputs[0] if x.inputs else None
    if producer is None or producer.op != "Concat":
        raise QuantizationError(f"{where}: its input {x.name} is not produced by a Concat", hint="recalibrate with split_shortcut=false, or export the model again")
    if producer.attrs.get("axis") not in (1, -3) or len(producer.inputs) != 2:
        raise QuantizationError(f"{where}: Concat {producer.name} must join exactly 2 tensors on axis 1 (has {len(producer.inputs)} on axis {producer.attrs.get('axis')})")
    if node.attrs.get("group", 1) != 1:
        raise QuantizationError(f"{where}: grouped convolutions cannot be split")
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant):
        raise QuantizationError(f"{where}: weight {weight.name} is not a constant")
    w = weight.values
    total = w.shape[1]
    if not 0 < split_channels < total:
        raise QuantizationError(f"{where}: split_channels={split_channels} is outside (0, {total})", hint="the table was made for a different model; recalibrate")
    a, b = producer.inputs
    counts = counts or {}
    for tensor, expected in ((a, split_channels), (b, total - split_channels)):
        known = counts.get(tensor.name)
        if known is None and tensor.shape is not None and len(tensor.shape) >= 2 and isinstance(tensor.shape[1], int):
            known = tensor.shape[1]
        if known is not None and known != expected:
            raise QuantizationError(
                f"{where}: Concat {producer.name} input {tensor.name} has {known} channels, the calibration table says {expected}",
                hint="the table was made for a different model; recalibrate",
            )
    prefix = node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
    w_a = gs.Constant(f"{weight.name}.split_a", np.ascontiguousarray(w[:, :split_channels]))
    w_b = gs.Constant(f"{weight.name}.split_b", np.ascontiguousarray(w[:, split_channels:]))
    out = node.outputs[0]
    y_a = gs.Variable(f"{prefix}/ConvA_output_0", dtype=np.float32)
    y_b = gs.Variable(f"{prefix}/ConvB_output_0", dtype=np.float32)
    bias = list(node.inputs[2:3])
    conv_a = gs.Node("Conv", f"{prefix}/ConvA", dict(node.attrs), [a, w_a, *bias], [y_a])
    conv_b = gs.Node("Conv", f"{prefix}/ConvB", dict(node.attrs), [b, w_b], [y_b])
    node.outputs.clear()
    node.inputs.clear()
    add = gs.Node("Add", f"{prefix}/SplitAdd", {}, [y_a, y_b], [out])
    graph.nodes += [conv_a, conv_b, add]
    return SplitConv(conv_a, conv_b, add)


def split_shortcuts(model: onnx.ModelProto, splits: dict[str, int]) -> onnx.ModelProto:
    """FP32 rewrite of the given layers ({module: split_channels}), no Q/DQ (for checks)."""
    from qdiff.export.graph_index import weighted_nodes

    counts = channel_counts(model)
    graph = gs.import_onnx(model)
    done = set()
    for wn in weighted_nodes(graph):
        if wn.module in splits:
            split_concat_conv(graph, wn.node, splits[wn.module], wn.module, counts)
            done.add(wn.module)
    missing = sorted(set(splits) - done)
    if missing:
        raise QuantizationError(f"split-shortcut layer(s) not found in the graph: {', '.join(missing)}")
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out
