"""Optimization profiles: the (min, opt, max) shape of every engine input.

An engine only runs shapes inside its profile, and TensorRT's own error for one outside it is
a line about "binding dimensions" with no input name. So the profile is kept in the engine's
manifest, and every call is checked against it first: the error names the input, the
dimension, the value and the range it had to be in.

Shapes come from the ONNX graph's inputs. Static dimensions are taken as they are; the dynamic
axes qdiff's exporter names (`batch`, `height`, `width`, `tokens`) are filled from the ranges the
user asks for; any other dynamic axis needs an explicit `--shape`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qdiff.core.errors import ProfileShapeError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ProfileShapeError(f"min/opt/max ranks differ: {self.min}, {self.opt}, {self.max}")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not (0 < lo <= mid <= hi):
                raise ProfileShapeError(f"shape range {_fmt(self.min)}:{_fmt(self.opt)}:{_fmt(self.max)} must have 0 < min <= opt <= max in every dimension")

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Sequence[int]]) -> ShapeRange:
        try:
            return cls(tuple(int(v) for v in obj["min"]), tuple(int(v) for v in obj["opt"]), tuple(int(v) for v in obj["max"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileShapeError(f"malformed shape range {obj!r}: {exc}") from exc


Profile = dict[str, ShapeRange]


@dataclass(frozen=True)
class GraphInput:
    """An ONNX input: its name and its dims, each an int or the name of a dynamic axis."""

    name: str
    dims: tuple[int | str, ...]


def graph_inputs(onnx_path: str | Path) -> list[GraphInput]:
    """The graph's inputs without loading its weights (engines are built from multi-GB files)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims: list[int | str] = []
        for d in value.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        out.append(GraphInput(value.name, tuple(dims)))
    return out


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(v) for v in shape)


def _triple(values: Sequence[int] | int, what: str) -> tuple[int, int, int]:
    if isinstance(values, int):
        return (values, values, values)
    values = tuple(int(v) for v in values)
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) != 3:
        raise ProfileShapeError(f"{what} needs one value or three (min,opt,max), got {values}")
    return values  # type: ignore[return-value]


def parse_range(text: str, what: str) -> tuple[int, int, int]:
    """'2' -> (2,2,2); '1,2,4' -> (1,2,4)."""
    try:
        return _triple([int(v) for v in text.split(",")], what)
    except ValueError as exc:
        raise ProfileShapeError(f"{what}: {text!r} is not one integer or three comma-separated integers (min,opt,max)") from exc


def parse_shape_spec(spec: str) -> tuple[str, ShapeRange]:
    """'sample=1x4x64x64:2x4x64x64:4x4x64x64' (or one shape for a fixed input)."""
    name, sep, shapes = spec.partition("=")
    if not sep or not name:
        raise ProfileShapeError(f"--shape {spec!r}: expected NAME=MINxDIMS:OPTxDIMS:MAXxDIMS, e.g. sample=1x4x64x64:2x4x64x64:4x4x64x64")
    parts = shapes.split(":")
    if len(parts) not in (1, 3):
        raise ProfileShapeError(f"--shape {spec!r}: give one shape or three (min:opt:max)")
    try:
        dims = [tuple(int(v) for v in p.lower().split("x")) for p in parts]
    except ValueError as exc:
        raise ProfileShapeError(f"--shape {spec!r}: dimensions must be integers joined by 'x'") from exc
    if len(dims) == 1:
        dims *= 3
    return name, ShapeRange(*dims)


def derive_profile(
    inputs: Sequence[GraphInput],
    *,
    batch: Sequence[int] | int = (1, 2, 4),
    height: Sequence[int] | int | None = None,
    width: Sequence[int] | int | None = None,
    tokens: Sequence[int] | int = 77,
    overrides: Mapping[str, ShapeRange] | None = None,
    default_size: int | None = None,
) -> Profile:
    """One profile for every input of the graph. `height`/`width` are in the sample's own
    units (latent pixels for latent models); they default to `default_size` (the model's
    sample_size)."""
    overrides = dict(overrides or {})
    unknown = [n for n in overrides if n not in {i.name for i in inputs}]
    if unknown:
        raise ProfileShapeError(f"--shape names input(s) {', '.join(unknown)} the graph does not have", hint=f"its inputs are {', '.join(i.name for i in inputs)}")
    if height is None:
        height = default_size
    if width is None:
        width = height
    axes: dict[str, tuple[int, int, int] | None] = {
        "batch": _triple(batch, "batch"),
        "height": None if height is None else _triple(height, "height"),
        "width": None if width is None else _triple(width, "width"),
        "tokens": _triple(tokens, "tokens"),
    }
    profile: Profile = {}
    for inp in inputs:
        if inp.name in overrides:
            rng = overrides[inp.name]
            if len(rng.min) != len(inp.dims):
                raise ProfileShapeError(f"--shape {inp.name}: rank {len(rng.min)} but the graph's input has rank {len(inp.dims)} ({inp.dims})")
            profile[inp.name] = rng
            continue
        lo, mid, hi = [], [], []
        for i, dim in enumerate(inp.dims):
            if isinstance(dim, int) and dim > 0:
                lo.append(dim), mid.append(dim), hi.append(dim)
                continue
            triple = axes.get(str(dim))
            if triple is None:
                raise ProfileShapeError(
                    f"input {inp.name!r} dimension {i} is dynamic ({dim!r}) and no range is known for it",
                    hint=f"give it with --shape {inp.name}=MIN:OPT:MAX (e.g. --size for height/width)",
                )
            lo.append(triple[0]), mid.append(triple[1]), hi.append(triple[2])
        profile[inp.name] = ShapeRange(tuple(lo), tuple(mid), tuple(hi))
    return profile


def profile_to_json(profile: Profile) -> dict[str, dict[str, list[int]]]:
    return {name: rng.to_json() for name, rng in profile.items()}


def profile_from_json(obj: Mapping[str, Mapping[str, Sequence[int]]]) -> Profile:
    if not isinstance(obj, Mapping):
        raise ProfileShapeError(f"malformed profile {obj!r}")
    return {str(name): ShapeRange.from_json(rng) for name, rng in obj.items()}


def check_shapes(profile: Profile, shapes: Mapping[str, Sequence[int]], where: str = "engine") -> None:
    """Raise `ProfileShapeError` naming the first input/dimension outside `profile`."""
    missing = [n for n in profile if n not in shapes]
    if missing:
        raise ProfileShapeError(f"{where} needs input(s) {', '.join(missing)} that the call did not give")
    extra = [n for n in shapes if n not in profile]
    if extra:
        raise ProfileShapeError(f"{where} has no input(s) {', '.join(extra)}", hint=f"its inputs are {', '.join(profile)}")
    for name, rng in profile.items():
        shape = tuple(int(v) for v in shapes[name])
        if len(shape) != len(rng.min):
            raise ProfileShapeError(f"{where}: input {name!r} has shape {_fmt(shape)}, rank {len(shape)}; the engine expects rank {len(rng.min)}")
        for i, (v, lo, hi) in enumerate(zip(shape, rng.min, rng.max)):
            if not lo <= v <= hi:
                raise ProfileShapeError(
                    f"{where}: input {name!r} dimension {i} is {v}, outside the engine's profile range [{lo}, {hi}] (shape {_fmt(shape)}, profile {_fmt(rng.min)} .. {_fmt(rng.max)})",
                    hint="rebuild the engine with a profile that covers it (qdiff build --batch/--size/--shape)",
                )
