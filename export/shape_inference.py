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
