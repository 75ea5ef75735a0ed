"""The split-shortcut rewrite: conv(cat(a, b), W, bias) -> Conv(a, W[:, :Ca], bias) + Conv(b, W[:, Ca:]).

Exact in real arithmetic (a convolution sums over input channels, and zero padding pads both
slices alike), so each concat branch can carry its own INT8 scale into TensorRT instead of
being requantized at the Concat. The Concat stays when something else reads it (the resnet's
GroupNorm -> conv1 path does); otherwise graph cleanup drops it.

A resnet's `conv1` reads the concat after GroupNorm and SiLU, so its input is no Concat output:
`split_sliced_conv` cuts that tensor with two Slice nodes on the channel axis ([:Ca], [Ca:])
and then rewrites the same way (recipe `split_conv1`).

New nodes are named under the layer's module scope (`/unet/<module>/ConvA`, `ConvB`,
`SplitAdd`, and `SliceA`, `SliceB` for conv1), so `graph_index.module_name` still maps them to
the PyTorch module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdiff.core.errors import QuantizationError


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
    """Rewrite one Conv that reads a 2-input channel Concat into two Convs plus an Add (in the graph's float type)."""
    where = f"split-shortcut layer {module!r} (node {node.name})"
    if node.op != "Conv":
        raise QuantizationError(f"{where}: expected a Conv node, got {node.op}")
    x = node.inputs[0]
    producer = x.inputs[0] if x.inputs else None
    if producer is None or producer.op != "Concat":
        raise QuantizationError(f"{where}: its input {x.name} is not produced by a Concat", hint="recalibrate with split_shortcut=false, or export the model again")
    if producer.attrs.get("axis") not in (1, -3) or len(producer.inputs) != 2:
        raise QuantizationError(f"{where}: Concat {producer.name} must join exactly 2 tensors on axis 1 (has {len(producer.inputs)} on axis {producer.attrs.get('axis')})")
    total = _splittable_input_channels(node, split_channels, where)
    a, b = producer.inputs
    for tensor, expected in ((a, split_channels), (b, total - split_channels)):
        known = _channels(tensor, counts)
        if known is not None and known != expected:
            raise QuantizationError(
                f"{where}: Concat {producer.name} input {tensor.name} has {known} channels, the calibration table says {expected}",
                hint="the table was made for a different model; recalibrate",
            )
    return _two_convs(graph, node, a, b, split_channels)


def split_sliced_conv(graph: gs.Graph, node: gs.Node, split_channels: int, module: str, counts: dict[str, int] | None = None) -> SplitConv:
    """Rewrite one Conv into Slice [:, :Ca] / [:, Ca:] of its input, two Convs and an Add (FP32).

    For a conv whose input is a channel-wise function of a skip concat (a resnet's conv1 after
    GroupNorm + SiLU), where there is no Concat to read the branches from."""
    where = f"split conv1 layer {module!r} (node {node.name})"
    if node.op != "Conv":
        raise QuantizationError(f"{where}: expected a Conv node, got {node.op}")
    total = _splittable_input_channels(node, split_channels, where)
    x = node.inputs[0]
    known = _channels(x, counts)
    if known is not None and known != total:
        raise QuantizationError(f"{where}: input {x.name} has {known} channels, the weight {total}", hint="the table was made for a different model; recalibrate")
    prefix = _prefix(node)
    dtype = x.dtype if x.dtype is not None else np.float32
    axes = gs.Constant(f"{prefix}/SliceAxes", np.array([1], dtype=np.int64))
    halves = []
    for tag, (start, end) in (("A", (0, split_channels)), ("B", (split_channels, total))):
        starts = gs.Constant(f"{prefix}/Slice{tag}Starts", np.array([start], dtype=np.int64))
        ends = gs.Constant(f"{prefix}/Slice{tag}Ends", np.array([end], dtype=np.int64))
        half = gs.Variable(f"{prefix}/Slice{tag}_output_0", dtype=dtype)
        graph.nodes.append(gs.Node("Slice", f"{prefix}/Slice{tag}", {}, [x, starts, ends, axes], [half]))
        halves.append(half)
    return _two_convs(graph, node, halves[0], halves[1], split_channels)


def _splittable_input_channels(node: gs.Node, split_channels: int, where: str) -> int:
    """The Conv's input channel count, after checking it can be cut at `split_channels`."""
    if node.attrs.get("group", 1) != 1:
        raise QuantizationError(f"{where}: grouped convolutions cannot be split")
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant):
        raise QuantizationError(f"{where}: weight {weight.name} is not a constant")
    total = weight.values.shape[1]
    if not 0 < split_channels < total:
        raise QuantizationError(f"{where}: split_channels={split_channels} is outside (0, {total})", hint="the table was made for a different model; recalibrate")
    return total


def _channels(tensor: gs.Tensor, counts: dict[str, int] | None) -> int | None:
    """A tensor's channel count: from shape inference (`counts`), else its static shape."""
    known = (counts or {}).get(tensor.name)
    if known is None and tensor.shape is not None and len(tensor.shape) >= 2 and isinstance(tensor.shape[1], int):
        known = tensor.shape[1]
    return known


def _prefix(node: gs.Node) -> str:
    return node.name.rsplit("/", 1)[0] if "/" in node.name else node.name


def _two_convs(graph: gs.Graph, node: gs.Node, a: gs.Tensor, b: gs.Tensor, split_channels: int) -> SplitConv:
    """Replace `node` by Conv(a, W[:, :split], bias) + Conv(b, W[:, split:]), same output tensor."""
    prefix = _prefix(node)
    weight = node.inputs[1]
    w = weight.values
    w_a = gs.Constant(f"{weight.name}.split_a", np.ascontiguousarray(w[:, :split_channels]))
    w_b = gs.Constant(f"{weight.name}.split_b", np.ascontiguousarray(w[:, split_channels:]))
    out = node.outputs[0]
    dtype = out.dtype if out.dtype is not None else w.dtype  # FP16 in an FP16 graph
    y_a = gs.Variable(f"{prefix}/ConvA_output_0", dtype=dtype)
    y_b = gs.Variable(f"{prefix}/ConvB_output_0", dtype=dtype)
    bias = list(node.inputs[2:3])
    conv_a = gs.Node("Conv", f"{prefix}/ConvA", dict(node.attrs), [a, w_a, *bias], [y_a])
    conv_b = gs.Node("Conv", f"{prefix}/ConvB", dict(node.attrs), [b, w_b], [y_b])
    node.outputs.clear()
    node.inputs.clear()
    add = gs.Node("Add", f"{prefix}/SplitAdd", {}, [y_a, y_b], [out])
    graph.nodes += [conv_a, conv_b, add]
    return SplitConv(conv_a, conv_b, add)


def split_shortcuts(model: onnx.ModelProto, splits: dict[str, int], sliced: dict[str, int] | None = None) -> onnx.ModelProto:
    """FP32 rewrite of the given layers ({module: split_channels}), no Q/DQ (for checks):
    `splits` read their Concat, `sliced` (split conv1 layers) slice their input."""
    from qdiff.export.graph_index import weighted_nodes

    sliced = sliced or {}
    counts = channel_counts(model)
    graph = gs.import_onnx(model)
    done = set()
    for wn in weighted_nodes(graph):
        if wn.module in splits:
            split_concat_conv(graph, wn.node, splits[wn.module], wn.module, counts)
            done.add(wn.module)
        elif wn.module in sliced:
            split_sliced_conv(graph, wn.node, sliced[wn.module], wn.module, counts)
            done.add(wn.module)
    missing = sorted((set(splits) | set(sliced)) - done)
    if missing:
        raise QuantizationError(f"split-shortcut layer(s) not found in the graph: {', '.join(missing)}")
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out
