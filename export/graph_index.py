"""Find the ONNX node(s) of each PyTorch layer.

The TorchScript exporter names nodes by module scope: `/unet/mid_block/attentions.0/
transformer_blocks.0/attn1/to_q/MatMul` belongs to module `mid_block.attentions.0.
transformer_blocks.0.attn1.to_q`. A weighted node is a Conv/ConvTranspose/Gemm/MatMul whose
weight is a constant initializer; attention's activation-activation MatMuls are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx_graphsurgeon as gs

# Scope prefix of every node that belongs to the UNet (the export wrapper's attribute name);
# defined here so reading a graph's layers imports no torch (qdiff.export.onnx_export re-exports it).
SCOPE_ROOT = "unet"

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_OP_SUFFIX = re.compile(r"^[A-Za-z]+(_\d+)?$")


@dataclass
class WeightedNode:
    node: gs.Node
    module: str
    op: str
    weight: gs.Constant
    # Axis of `weight` (as stored in the graph) that indexes output channels.
    weight_axis: int

    @property
    def activation(self) -> gs.Variable:
        return self.node.inputs[0]


def module_name(node: gs.Node) -> str | None:
    """`/unet/a.0/b/conv1/Conv_2` -> `a.0.b.conv1`; None for nodes outside the UNet scope."""
    parts = [p for p in (node.name or "").split("/") if p]
    if len(parts) < 2 or parts[0] != SCOPE_ROOT or not _OP_SUFFIX.match(parts[-1]):
        return None
    return ".".join(parts[1:-1]) or None


def _weight_axis(node: gs.Node) -> int:
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1  # MatMul: x @ W with W stored [in, out]


def weighted_nodes(graph: gs.Graph) -> list[WeightedNode]:
    found = []
    for node in graph.nodes:
        if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant):
            continue
        name = module_name(node)
        if name is None:
            continue
        found.append(WeightedNode(node, name, node.op, weight, _weight_axis(node)))
    return found
