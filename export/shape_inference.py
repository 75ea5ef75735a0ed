"""Concrete tensor shapes of an exported graph, for MAC counts in reports.

ONNX's own shape inference loses shapes behind some Reshape chains (attention); ONNX Runtime's
symbolic inference follows them. Its public `infer_shapes` saves `sym_shape_infer_temp.onnx`
(and a data file) into the current directory whenever some shape stays unknown, so this drives
the same class without that side effect. A partly inferred graph is fine: callers check the
shapes they need.
"""

from __future__ import annotations

import onnx


def symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
    inference._preprocess(model)
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_


def _copy_without(message, skip: str, into):
    """Copy every set field of a protobuf message but `skip` (its big tensors) into `into`."""
    for fd, value in message.ListFields():
        if fd.name == skip:
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "extend"):
            if fd.message_type is not None:
                getattr(into, fd.name).CopyFrom(value)
            else:
                setattr(into, fd.name, value)
        else:
            getattr(into, fd.name).extend(value)
    return into


def weightless(model: onnx.ModelProto, stub_initializers: bool) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of `model` without weight bytes, so tools that serialize the whole model (the
    version converter, shape inference) work above protobuf's 2 GB and copy nothing big.

    Initializers above 1 KB become stubs (external data that points nowhere) when
    `stub_initializers`, else graph inputs of the same type and shape; smaller ones (shape
    constants) are kept. Returns the copy and the originals by name.
    """
    graph = _copy_without(model.graph, "initializer", onnx.GraphProto())
    skeleton = _copy_without(model, "graph", onnx.ModelProto())
    originals = {}
    for tensor in model.graph.initializer:
        has_data = bool(tensor.raw_data) or any(len(getattr(tensor, f)) for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"))
        # Small inline constants (shape targets) stay; a data-less one is a skeleton's stripped weight.
        inline_small = tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.ByteSize() <= 1024 and (has_data or not tensor.dims or 0 in tensor.dims)
        if inline_small:
            graph.initializer.append(tensor)
            continue
        originals[tensor.name] = tensor
        if stub_initializers:
            stub = graph.initializer.add()
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="qdiff-weightless-stub")
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    skeleton.graph.CopyFrom(graph)
    return skeleton, originals
