"""The calibration table: activation and weight ranges keyed by PyTorch module name and role.

Keys are module names (`down_blocks.0.resnets.0.conv1`) and roles (`input`, `weight`, later the
split-shortcut branches), never ONNX node names, so one table serves every export of the same
model. Parsing is strict: a table is refused if its schema is unknown, if it has a field qdiff
does not know, if a range is not a finite non-negative number (or list of them), or if it was made
for another model. A zero range (a channel that is always 0) is legal and handled by the scale
rule in `calib.quant_math.scale_from_amax`; a NaN or infinite one (an overflow during
calibration) is refused both when the table is saved and when it is read, naming the layer, so it
can never become a NaN or zero scale in a graph.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdiff.core.artifacts import write_json_atomic
from qdiff.core.errors import CalibrationError

TABLE_SCHEMA = 1
ROLES = ("input", "weight", "shortcut_a", "shortcut_b", "weight_a", "weight_b")
# A split-shortcut layer has all of these or none (see calib.shortcuts).
SPLIT_FIELDS = ("shortcut_a", "shortcut_b", "weight_a", "weight_b", "split_channels")
# Which recipe setting a split layer belongs to: "shortcut" (the conv reads the skip Concat;
# the default, not written) or "conv1" (it reads the concat after norm1 + SiLU; recipe
# `split_conv1`). The branch roles are the same for both.
SPLIT_KINDS = ("shortcut", "conv1")
TOP_LEVEL_FIELDS = ("schema", "model_sha256", "recipe", "provenance", "degenerate", "layers")


@dataclass
class LayerRanges:
    """Ranges of one quantized layer. `weight` is per output channel; the rest are per tensor."""

    op: str
    input: float | None = None
    weight: list[float] | None = None
    shortcut_a: float | None = None
    shortcut_b: float | None = None
    # Per-output-channel weight ranges of the two input-channel slices W[:, :split], W[:, split:].
    weight_a: list[float] | None = None
    weight_b: list[float] | None = None
    # Input channels of the first concat branch, for split-shortcut layers.
    split_channels: int | None = None
    # "conv1" for a split resnet conv1 (see SPLIT_KINDS); None means "shortcut".
    split_kind: str | None = None
    # Multiply-accumulates per sample at the calibration resolution (for coverage reports).
    macs: int | None = None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"op": self.op}
        for role in ROLES:
            value = getattr(self, role)
            if value is not None:
                obj[role] = value
        for key in ("split_channels", "split_kind", "macs"):
            if getattr(self, key) is not None:
                obj[key] = getattr(self, key)
        return obj


@dataclass
class CalibrationTable:
    """Ranges (amax) per layer plus the provenance that says what they were measured on."""

    model_sha256: str
    recipe: dict[str, Any]
    layers: dict[str, LayerRanges] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    # Ranges that were zero (always-0 tensors); see calib.quant_math.scale_from_amax.
    degenerate: list[str] = field(default_factory=list)
    schema: int = TABLE_SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model_sha256": self.model_sha256,
            "recipe": self.recipe,
            "provenance": self.provenance,
            "degenerate": self.degenerate,
            "layers": {name: ranges.to_json() for name, ranges in sorted(self.layers.items())},
        }

    def save(self, path: str | Path) -> None:
        """Write the table atomically, after checking it parses back (no NaN/Inf range on disk)."""
        obj = self.to_json()
        CalibrationTable.from_json(obj, source=f"calibration table {path}")
        write_json_atomic(path, obj)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationTable:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise CalibrationError(f"calibration table {path} does not exist", hint="run `qdiff calibrate` first") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"calibration table {path} cannot be read: {exc}") from exc
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise CalibrationError(f"calibration table {path} is not valid JSON: {exc}", hint="rerun `qdiff calibrate`") from exc
        return cls.from_json(obj, source=str(path))

    @classmethod
    def from_json(cls, obj: Any, source: str = "calibration table") -> CalibrationTable:
        if not isinstance(obj, dict):
            raise CalibrationError(f"{source}: expected a JSON object, got {type(obj).__name__}")
        if isinstance(obj.get("schema"), bool) or obj.get("schema") != TABLE_SCHEMA:
            raise CalibrationError(
                f"{source}: schema {obj.get('schema')!r} is not {TABLE_SCHEMA}",
                hint="the table was made by another qdiff version; rerun `qdiff calibrate`",
            )
        unknown = sorted(str(k) for k in set(obj) - set(TOP_LEVEL_FIELDS))
        if unknown:
            raise CalibrationError(f"{source}: unknown field(s) {unknown}", hint="the table was edited or made by another tool; rerun `qdiff calibrate`")
        model_sha = obj.get("model_sha256")
        if not isinstance(model_sha, str) or not model_sha:
            raise CalibrationError(f"{source}: 'model_sha256' must be a non-empty string")
        for key in ("recipe", "provenance", "layers"):
            if not isinstance(obj.get(key), dict):
                raise CalibrationError(f"{source}: {key!r} must be a JSON object")
        degenerate = obj.get("degenerate", [])
        if not isinstance(degenerate, list) or not all(isinstance(d, str) for d in degenerate):
            raise CalibrationError(f"{source}: 'degenerate' must be a list of strings")
        layers = {name: _parse_layer(name, entry, source) for name, entry in obj["layers"].items()}
        return cls(
            model_sha256=model_sha,
            recipe=obj["recipe"],
            layers=layers,
            provenance=obj["provenance"],
            degenerate=list(degenerate),
        )

    def split_layers(self, split_shortcut: bool, split_conv1: bool) -> dict[str, LayerRanges]:
        """The split entries a recipe with these settings quantizes per branch, by module name."""
        wanted = {"shortcut": split_shortcut, "conv1": split_conv1}
        return {name: r for name, r in self.layers.items() if r.split_channels is not None and wanted[r.split_kind or "shortcut"]}

    def check_model(self, model_sha256: str, model_label: str) -> None:
        if self.model_sha256 != model_sha256:
            raise CalibrationError(
                f"the calibration table was made for model {self.model_sha256[:12]}, "
                f"not for {model_label} ({model_sha256[:12]})",
                hint="calibrate this model with `qdiff calibrate`",
            )


def _finite_range(value: Any, where: str) -> float:
    """Ranges are amax values: finite and >= 0 (0 is allowed and handled by the scale rule)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalibrationError(f"{where}: range must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    if not math.isfinite(value) or value < 0:
        raise CalibrationError(
            f"{where}: range {value!r} is not a finite non-negative number",
            hint="a NaN/Inf range means the model overflowed on the calibration data; check the weights, "
            "exclude the layer in the recipe, and recalibrate",
        )
    return value


def _parse_layer(name: Any, entry: Any, source: str) -> LayerRanges:
    where = f"{source}: layer {name!r}"
    if not isinstance(name, str) or not name:
        raise CalibrationError(f"{source}: layer names must be non-empty strings")
    if not isinstance(entry, dict):
        raise CalibrationError(f"{where}: expected an object")
    unknown = set(entry) - set(ROLES) - {"op", "split_channels", "split_kind", "macs"}
    if unknown:
        raise CalibrationError(f"{where}: unknown field(s) {sorted(map(str, unknown))}")
    op = entry.get("op")
    if not isinstance(op, str):
        raise CalibrationError(f"{where}: 'op' must be a string")
    ranges = LayerRanges(op=op)
    for role in ("input", "shortcut_a", "shortcut_b"):
        if role in entry:
            setattr(ranges, role, _finite_range(entry[role], f"{where} role {role!r}"))
    if "weight" in entry:
        weight = entry["weight"]
        if not isinstance(weight, list) or not weight:
            raise CalibrationError(f"{where} role 'weight': expected a non-empty list of per-channel ranges")
        ranges.weight = [_finite_range(v, f"{where} role 'weight' channel {i}") for i, v in enumerate(weight)]
    for role in ("weight_a", "weight_b"):
        if role in entry:
            values = entry[role]
            if not isinstance(values, list) or not values:
                raise CalibrationError(f"{where} role {role!r}: expected a non-empty list of per-channel ranges")
            setattr(ranges, role, [_finite_range(v, f"{where} role {role!r} channel {i}") for i, v in enumerate(values)])
    if "split_channels" in entry:
        ranges.split_channels = _int_field(entry["split_channels"], f"{where}: 'split_channels'", minimum=1)
    if "macs" in entry:
        ranges.macs = _int_field(entry["macs"], f"{where}: 'macs'", minimum=0)
    present = [k for k in SPLIT_FIELDS if k in entry]
    if present and len(present) != len(SPLIT_FIELDS):
        raise CalibrationError(
            f"{where}: a split-shortcut entry needs all of {list(SPLIT_FIELDS)}, it has only {present}",
            hint="the table was edited or is incomplete; rerun `qdiff calibrate`",
        )
    if "split_kind" in entry:
        if entry["split_kind"] not in SPLIT_KINDS or not present:
            raise CalibrationError(f"{where}: 'split_kind' must be one of {list(SPLIT_KINDS)} on a split entry, got {entry['split_kind']!r}")
        ranges.split_kind = None if entry["split_kind"] == "shortcut" else entry["split_kind"]
    if present:
        lengths = {len(ranges.weight_a), len(ranges.weight_b)} | ({len(ranges.weight)} if ranges.weight is not None else set())
        if len(lengths) != 1:
            raise CalibrationError(f"{where}: 'weight', 'weight_a' and 'weight_b' must have the same number of output channels")
    return ranges


def _int_field(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CalibrationError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value
