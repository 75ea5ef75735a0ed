"""Fuzzing the parsers of the files qdiff reads back: calibration tables and manifests.

Property: for any input, the parser returns a valid object (one that survives a round trip and
holds only finite non-negative ranges) or raises the project's own error for that file type;
never a TypeError, KeyError, OverflowError, RecursionError or anything else. Example counts are
kept small so the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdiff.core.artifacts import Manifest, read_manifest
from qdiff.calib.table import ROLES, TABLE_SCHEMA, CalibrationTable
from qdiff.core.errors import ArtifactMismatchError, CalibrationError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.integers(min_value=2**1024, max_value=2**1100) | st.floats() | st.text(max_size=8)
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
# Values a range field might hold, legal or not.
legal_ranges = st.floats(min_value=0, max_value=1e6) | st.integers(min_value=0, max_value=10**6)
range_values = st.one_of(
    legal_ranges, legal_ranges, legal_ranges, st.floats(), st.integers(min_value=2**1024, max_value=2**1100), st.booleans(), st.none(), st.text(max_size=3)
)


@st.composite
def near_valid_tables(draw) -> dict:
    """A well-formed table, then a few fields replaced by anything: reaches the deep checks."""
    layers = {}
    for name in draw(st.lists(st.text(max_size=6), min_size=1, max_size=4)):
        entry = {"op": draw(st.sampled_from(["Conv", "MatMul", "Gemm", 3]))}
        for role in draw(st.lists(st.sampled_from([*ROLES, "macs", "split_channels", "scale"]), max_size=4, unique=True)):
            if role == "weight":
                entry[role] = draw(st.lists(range_values, max_size=4) | range_values)
            else:
                entry[role] = draw(range_values)
        layers[name] = draw(json_like) if draw(st.integers(0, 9)) == 0 else entry
    obj = {"schema": TABLE_SCHEMA, "model_sha256": "ab" * 32, "recipe": {}, "provenance": {}, "degenerate": [], "layers": layers}
    if draw(st.integers(0, 4)) == 0:
        for key in draw(st.lists(st.sampled_from([*obj, "extra"]), max_size=2, unique=True)):
            obj[key] = draw(json_like)
    return obj


def _check_table(obj) -> None:
    try:
        table = CalibrationTable.from_json(obj)
    except CalibrationError:
        return
    for ranges in table.layers.values():
        values = [getattr(ranges, r) for r in ROLES if r != "weight"] + list(ranges.weight or [])
        assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in values if v is not None)
    text = json.dumps(table.to_json(), allow_nan=False)  # only finite ranges reach the table
    assert CalibrationTable.from_json(json.loads(text)).to_json() == table.to_json()


@FUZZ
@given(json_like)
def test_table_parser_on_arbitrary_json(obj):
    _check_table(obj)


@settings(FUZZ, max_examples=400)
@given(near_valid_tables())
def test_table_parser_on_near_valid_tables(obj):
    _check_table(obj)


@st.composite
def near_valid_manifests(draw) -> dict:
    obj = Manifest(kind="onnx-export", inputs={"model_sha256": "ab"}, outputs={"sha256": "cd"}, versions={}).to_json()
    for key in draw(st.lists(st.sampled_from(list(obj)), max_size=3, unique=True)):
        obj[key] = draw(json_like)
    return obj


def _check_manifest(obj) -> None:
    try:
        manifest = Manifest.from_json(obj)
    except ArtifactMismatchError:
        return
    assert isinstance(manifest.kind, str) and isinstance(manifest.created, str)
    assert all(isinstance(v, str) for part in (manifest.inputs, manifest.outputs, manifest.versions) for v in part.values())
    again = Manifest.from_json(manifest.to_json())
    assert again.matches(manifest) and again.to_json() == manifest.to_json()


@FUZZ
@given(json_like | near_valid_manifests())
def test_manifest_parser(obj):
    _check_manifest(obj)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_files_of_any_bytes_give_the_files_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "t.json"
        table.write_bytes(data)
        with pytest.raises(CalibrationError):
            CalibrationTable.load(table)
        artifact = Path(tmp) / "a.onnx"
        Path(str(artifact) + ".manifest.json").write_bytes(data)
        try:
            read_manifest(artifact)
        except ArtifactMismatchError:
            pass


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000, "1" * 5000, '{"schema": 1e999}', "NaN"])
def test_pathological_json(tmp_path, text):
    """Deep nesting (RecursionError in json), huge numbers, bare NaN: still the file's error."""
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(CalibrationError):
        CalibrationTable.load(path)
    Path(str(tmp_path / "a") + ".manifest.json").write_text(text)
    with pytest.raises(ArtifactMismatchError):
        read_manifest(tmp_path / "a")
