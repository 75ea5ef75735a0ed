"""What the quantization passes share in their reports: the per-layer decisions and how much
of the model they cover.

`QdqReport` (`qdiff.export.qdq`, INT8/W4A8 Q/DQ) and `Int4Report`
(`qdiff.export.int4_weight_only`) each keep `layers`, one decision per weighted layer with a
`quantized` flag, `macs` and a `reason` when it stayed float, plus the graph's float type and
its FP32 islands; this base gives both the same coverage properties and report lines.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence


class LayerDecisionLike(Protocol):
    module: str
    op: str
    reason: str

    @property
    def quantized(self) -> bool: ...

    @property
    def macs(self) -> int | None: ...


class CoverageReport:
    """Coverage properties shared by the quantization reports (a mixin: the subclasses are
    dataclasses declaring `layers`, `dtype` and `fp32_islands`)."""

    layers: Sequence[LayerDecisionLike]
    dtype: str
    fp32_islands: list[dict]

    @property
    def quantized(self) -> list[Any]:
        """The layers the pass quantized."""
        return [d for d in self.layers if d.quantized]

    @property
    def skipped(self) -> list[Any]:
        """The layers left in float, each with its reason."""
        return [d for d in self.layers if not d.quantized]

    def share_of(self, total: int | None) -> float | None:
        """The quantized layers' MACs as a share of `total`; None when `total` is 0 or unknown,
        or a layer's MACs are unknown."""
        if not total or any(d.macs is None for d in self.layers):
            return None
        return sum(d.macs for d in self.quantized) / total

    def float_layers_json(self) -> list[dict[str, Any]]:
        return [{"module": d.module, "op": d.op, "reason": d.reason, "macs": d.macs} for d in self.skipped]

    def fp16_lines(self) -> list[str]:
        """The summary lines of an FP16 graph's FP32 islands (none for an FP32 graph)."""
        if self.dtype != "fp16":
            return []
        return [f"  FP16 graph: {len(self.fp32_islands)} node(s) kept in FP32 (FP16 would overflow)"] + [
            f"  fp32: {i['node']} ({i['op']}): {i['reason']}" for i in self.fp32_islands
        ]


def shown(names: Sequence[str], most: int = 5) -> str:
    """The first `most` names, comma-separated, with ' ...' when there are more."""
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")
