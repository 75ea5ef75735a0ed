"""Network-level precision for the float parts of an explicitly quantized (Q/DQ) network.

TensorRT < 10 only (weakly typed networks). On TensorRT >= 10 qdiff builds strongly typed
networks, whose precisions come from the graph; the APIs used here (`ILayer.precision`,
`ILayer.set_output_type`, `BuilderFlag.PREFER_PRECISION_CONSTRAINTS`) are deprecated in 10 and
removed in 11, so `pin_float_layers` refuses to run there and the builder refuses
`--float-layers` before parsing.

Why this exists: in a Q/DQ network TensorRT takes INT8 from the graph, and the FP16 builder
flag only *allows* FP16 elsewhere. On the SD 1.5 UNet with TensorRT 8.6 every INT8 engine ran
its float transformer blocks 2.6x slower than the FP16 engine, with 14x the activation memory
(docs/int8-engines.md). Pinning the float layers to FP16 is the network-level lever a user of
TensorRT's Python API has before strongly typed networks (TensorRT >= 10), where the graph's
own types decide instead. Measured so far: on the H200 with TensorRT 8.6 and cuBLAS/cuDNN
tactics off, the pinned SD 1.5 build fails (no FP16 kernel for the GroupNorm+SiLU fused
blocks); the builder then says to drop the option.

What is pinned: every layer that computes on floats and is not part of a quantized island.
Left alone, so TensorRT's Q/DQ fusion decides them: Quantize/Dequantize layers, constants
(weights feeding a DequantizeLinear must stay FP32), shape arithmetic, and every layer that
reads a DequantizeLinear output (the quantized Conv/MatMul itself, or a Concat/Add that TensorRT
may run in INT8). A layer that feeds a QuantizeLinear keeps its FP32 output type (so does a
network output): the graph's Q/DQ contract is FP32 in, and TensorRT fuses the conversion into
the producer where it can. The constraints are preferences
(`PREFER_PRECISION_CONSTRAINTS`): a layer with no FP16 kernel still builds, with a warning.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from qdiff.engines.compat import network_typing
from qdiff.core.errors import EngineBuildError

FLOAT_LAYER_PRECISIONS = ("fp16",)


@dataclass
class PinReport:
    pinned: int = 0
    output_types_set: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> layers

    def summary(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"{self.pinned} layers pinned to FP16 ({self.output_types_set} with FP16 outputs); left to TensorRT: {why or 'none'}"


def _layer_types(trt: Any, *names: str) -> set[Any]:
    return {getattr(trt.LayerType, n) for n in names if hasattr(trt.LayerType, n)}


def pin_float_layers(trt: Any, network: Any, config: Any) -> PinReport:
    """Prefer FP16 for the float layers of `network` (see the module docstring)."""
    if not hasattr(trt.BuilderFlag, "PREFER_PRECISION_CONSTRAINTS") or network_typing(trt) == "strong":
        raise EngineBuildError(
            f"--float-layers applies to TensorRT < 10 only (weakly typed networks); TensorRT {getattr(trt, '__version__', '?')} takes every precision from the graph",
            hint="drop --float-layers and build an FP16 graph (`qdiff export --dtype fp16`)",
        )
    quantize, dequantize = _layer_types(trt, "QUANTIZE"), _layer_types(trt, "DEQUANTIZE")
    qdq = quantize | dequantize
    # A Cast layer's output type is its target type: a constraint on it is an error (8.6 asserts).
    structural = _layer_types(trt, "CAST", "CONSTANT", "SHAPE", "ASSERTION", "CONDITION", "CONDITIONAL_INPUT", "CONDITIONAL_OUTPUT", "ITERATOR", "LOOP_OUTPUT", "RECURRENCE", "TRIP_LIMIT")
    floats = {trt.float32, trt.float16}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    dq_outputs = {layer.get_output(0).name for layer in layers if layer.type in dequantize}
    feeds_quantize = {layer.get_input(0).name for layer in layers if layer.type in quantize}
    network_outputs = {network.get_output(i).name for i in range(network.num_outputs)}

    report = PinReport()
    for layer in layers:
        if layer.type in qdq:
            report.skipped["Q/DQ"] += 1
            continue
        if layer.type in structural:
            report.skipped["cast, constant or shape"] += 1
            continue
        inputs = [t for t in (layer.get_input(j) for j in range(layer.num_inputs)) if t is not None]
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if any(t.name in dq_outputs for t in inputs):
            report.skipped["reads a DequantizeLinear"] += 1
            continue
        if any(t.dtype not in floats or getattr(t, "is_shape_tensor", False) for t in inputs + outputs):
            report.skipped["non-float or shape tensors"] += 1
            continue
        layer.precision = trt.float16
        report.pinned += 1
        for j, out in enumerate(outputs):
            if out.name not in feeds_quantize and out.name not in network_outputs:
                layer.set_output_type(j, trt.float16)
                report.output_types_set += 1
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    return report
