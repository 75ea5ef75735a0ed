"""Which float types an ONNX graph computes in, read from its initializers and value types.

Why: a strongly typed TensorRT network (the only kind TensorRT >= 10 builds in qdiff, and the
only kind 11.x has) runs every layer in the type the graph gives it. From an FP32 graph it builds
an FP32 engine: slower than the FP16 engine the user asked for, with no error from TensorRT.
Looking only at the graph inputs is not enough (an FP16 graph may keep FP32 I/O with one Cast
each, and an FP32 graph may take FP16 inputs), so this reads every initializer's element type
(weights, Q/DQ scales; their sizes come from `dims`, so external weight files are never read),
Constant nodes, and the element types of value_info, inputs and outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FLOAT32, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16, without importing onnx here


@dataclass
class GraphTypes:
    """Float element counts and names by type (FP32 vs FP16)."""

    fp32_initializers: list[tuple[str, int]] = field(default_factory=list)  # (name, elements)
    fp16_initializers: list[tuple[str, int]] = field(default_factory=list)
    fp32_values: list[str] = field(default_factory=list)  # value_info / graph I/O names
    fp16_values: list[str] = field(default_factory=list)

    @property
    def fp32_weight_elements(self) -> int:
        return sum(n for _, n in self.fp32_initializers)

    @property
    def fp16_weight_elements(self) -> int:
        return sum(n for _, n in self.fp16_initializers)

    @property
    def fp32_weight_share(self) -> float:
        total = self.fp32_weight_elements + self.fp16_weight_elements
        return self.fp32_weight_elements / total if total else 0.0

    @property
    def is_fp32_graph(self) -> bool:
        """Mostly FP32: more FP32 than FP16 weight elements, or (no float weights) FP32 values and
        no FP16 ones. A few FP32 islands (tensors that would overflow FP16) do not make it one."""
        if self.fp32_weight_elements + self.fp16_weight_elements:
            return self.fp32_weight_share > 0.5
        return bool(self.fp32_values) and not self.fp16_values

    def float32_summary(self, limit: int = 5) -> str:
        """The float32 initializers (largest first) and tensors, for an error message."""
        parts = []
        if self.fp32_initializers:
            top = sorted(self.fp32_initializers, key=lambda kv: -kv[1])[:limit]
            more = len(self.fp32_initializers) - len(top)
            parts.append(
                f"{len(self.fp32_initializers)} float32 initializers ({self.fp32_weight_share:.0%} of the float weight elements), e.g. "
                + ", ".join(f"{n} ({e:,})" for n, e in top)
                + (f" and {more} more" if more > 0 else "")
            )
        if self.fp32_values:
            top_v = self.fp32_values[:limit]
            more = len(self.fp32_values) - len(top_v)
            parts.append(f"{len(self.fp32_values)} float32 tensors, e.g. " + ", ".join(top_v) + (f" and {more} more" if more > 0 else ""))
        return "; ".join(parts) or "no float32 tensors"


def _elements(dims: Any) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def graph_types(model: Any) -> GraphTypes:
    """Float types of `model` (an onnx.ModelProto, loaded with or without external data)."""
    types = GraphTypes()
    graph = model.graph
    for init in graph.initializer:
        entry = (init.name, _elements(init.dims))
        if init.data_type == FLOAT32:
            types.fp32_initializers.append(entry)
        elif init.data_type == FLOAT16:
            types.fp16_initializers.append(entry)
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.HasField("t"):
                entry = (node.output[0], _elements(attr.t.dims))
                if attr.t.data_type == FLOAT32:
                    types.fp32_initializers.append(entry)
                elif attr.t.data_type == FLOAT16:
                    types.fp16_initializers.append(entry)
    seen: set[str] = set()
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.name in seen:
            continue
        seen.add(value.name)
        elem = value.type.tensor_type.elem_type
        if elem == FLOAT32:
            types.fp32_values.append(value.name)
        elif elem == FLOAT16:
            types.fp16_values.append(value.name)
    return types
