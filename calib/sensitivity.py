"""Which layers carry the quantization error: a per-layer-group sensitivity table.

QuEST's premise is that a few layer kinds (the time embedding and the resnets' timestep
projections) are where a diffusion UNet is fragile. The project saw a hint of it: on
shapes-ddpm, leaving `time_emb_proj`, `time_embedding` and `conv_shortcut` in float lowered the
W8A8 per-step error from 0.0236 to 0.0192 (docs/results/peer-modelopt.md). This module splits
that: every weighted layer goes into one group by its name (first matching pattern wins), and
for each group the PyTorch fake-quant model (`calib.fake_quant`, the same function as the Q/DQ
graph) is measured twice,

- with ONLY that group quantized (the error the group adds on its own), and
- with everything quantized EXCEPT that group (the error left when the group is kept in float;
  the gap to the fully quantized model is what keeping it float buys).

The two disagree where errors interact; both are reported. How a model is measured is the
caller's (`measure(model) -> per-step errors`, e.g. the noise-prediction rel-L2 on an FP32
trajectory's recorded inputs, tools/sensitivity_results.py), so calib stays free of runtime.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from qdiff.calib.fake_quant import build_fake_quant_model
from qdiff.calib.table import CalibrationTable
from qdiff.calib.targets import layer_op
from qdiff.core.errors import CalibrationError

# (group, name patterns), in matching order. "skip_concat_conv1" is filled from
# calib.shortcuts (observed, not from names) and so wins over "resnet_conv1".
GROUP_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("time_embedding", ("time_embedding.*", "class_embedding.*", "add_embedding.*")),
    ("time_emb_proj", ("*time_emb_proj",)),
    ("conv_shortcut", ("*conv_shortcut",)),
    ("skip_concat_conv1", ()),
    ("resnet_conv1", ("*resnets.*.conv1",)),
    ("resnet_conv2", ("*resnets.*.conv2",)),
    ("attn_qkv", ("*.to_q", "*.to_k", "*.to_v")),
    ("attn_out", ("*.to_out.0",)),
    ("ff", ("*.ff.net.*",)),
    ("proj_in_out", ("*.proj_in", "*.proj_out")),
    ("conv_in_out", ("conv_in", "conv_out")),
    ("resamplers", ("*downsamplers.*", "*upsamplers.*")),
)
OTHER = "other"

# Error of one model: the per-step errors of whatever the caller measures.
Measure = Callable[[nn.Module], Sequence[float]]


def layer_groups(model: nn.Module, skip_concat_conv1: Iterable[str] = ()) -> dict[str, list[str]]:
    """{group: weighted layer names} for every Conv/Linear layer of `model`, each in exactly
    one group (the first whose patterns match; `OTHER` if none). `skip_concat_conv1` are the
    resnet conv1s that read a skip concat (`calib.shortcuts.find_split_layers(..., conv1=True)[1]`)."""
    concat = set(skip_concat_conv1)
    groups: dict[str, list[str]] = {name: [] for name, _ in GROUP_PATTERNS}
    groups[OTHER] = []
    for name, module in model.named_modules():
        if layer_op(module) is None:
            continue
        if name in concat:
            groups["skip_concat_conv1"].append(name)
            continue
        for group, patterns in GROUP_PATTERNS:
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                groups[group].append(name)
                break
        else:
            groups[OTHER].append(name)
    return {g: names for g, names in groups.items() if names}


@dataclass
class SensitivityResult:
    """Rows per group (and per combination), plus the fully and never quantized references."""

    all_quantized: dict[str, float]  # mean / max of the base set quantized
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"all_quantized": self.all_quantized, "rows": self.rows}


def _summary(errors: Sequence[float]) -> dict[str, float]:
    values = np.asarray(list(errors), dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise CalibrationError(f"the sensitivity measure returned {values.size} errors, not all finite")
    return {"mean": float(values.mean()), "max": float(values.max())}


def group_sensitivity(
    model: nn.Module,
    table: CalibrationTable,
    groups: dict[str, list[str]],
    measure: Measure,
    *,
    base: Iterable[str] | None = None,
    combinations: dict[str, Sequence[str]] | None = None,
    weights: Any = None,
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[SensitivityResult], None] | None = None,
) -> SensitivityResult:
    """Measure `model`'s fake-quant twin with only each group quantized and with all but it.

    `base` is the set "everything" means (default: every layer of the table; pass the preset's
    layers when the table also calibrated layers the preset keeps float, e.g. conv_in/conv_out).
    A group's layers outside the table are left float (they were never calibrated; the row
    says how many were quantized). `combinations` adds rows for unions of groups, such as the
    three ModelOpt keeps float. `weights` (reconstructed) are passed to the fake-quant build.
    `on_row` sees the result after the reference and after every row (a caller writes partial
    reports, so a run stopped halfway keeps what it measured).
    """
    base_set = set(table.layers) if base is None else set(base) & set(table.layers)
    if not base_set:
        raise CalibrationError("the sensitivity base set quantizes no layer of the table")

    def run(layers: set[str], label: str) -> dict[str, float]:
        if progress:
            progress(f"{label}: {len(layers)} layers quantized")
        return _summary(measure(build_fake_quant_model(model, table, weights=weights, layers=layers)))

    result = SensitivityResult(all_quantized=run(base_set, "all"))
    if on_row:
        on_row(result)
    entries = [(g, [g]) for g in groups] + list((combinations or {}).items())
    for label, members in entries:
        unknown = [m for m in members if m not in groups]
        if unknown:
            raise CalibrationError(f"sensitivity row {label!r} names unknown group(s) {unknown}", hint=f"groups: {', '.join(groups)}")
        names = {n for m in members for n in groups[m]}
        in_table = names & set(table.layers)
        only = run(in_table, f"only {label}") if in_table else None
        rest = base_set - names
        all_but = run(rest, f"all but {label}") if rest != base_set else dict(result.all_quantized)
        result.rows.append({
            "group": label,
            "members": list(members),
            "layers": len(names),
            "quantized_layers": len(in_table),
            "in_base": len(names & base_set),
            "only": only["mean"] if only else None,
            "only_max": only["max"] if only else None,
            "all_but": all_but["mean"],
            "all_but_max": all_but["max"],
            "float_gain": result.all_quantized["mean"] - all_but["mean"],
        })
        if on_row:
            on_row(result)
    return result


def markdown_rows(result: SensitivityResult) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the sensitivity table as the reports print it."""
    header = ["group", "layers (quantized in base)", "only this group quantized", "all but this group", "gain from keeping it float", "share of the all-quantized error"]
    total = result.all_quantized["mean"]
    rows = [["(all quantized)", "", "", total, "", ""]]
    for r in result.rows:
        rows.append([
            r["group"], f"{r['layers']} ({r['in_base']})", r["only"] if r["only"] is not None else "-", r["all_but"], r["float_gain"],
            f"{r['float_gain'] / total:.0%}" if total > 0 else "-",
        ])
    return header, rows
