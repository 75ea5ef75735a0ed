"""Reading and writing ONNX files safely, including models above protobuf's 2 GB limit.

Files are checked by path (the checker then follows external data and works above 2 GB), and
every write goes to temporary files in the destination folder first: the external-data file is
renamed into place before the graph that references it, so a reader never sees a graph whose
weights are missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from qdiff.artifacts import atomic_path
from qdiff.errors import OnnxModelError

TWO_GB = 2**31
SUPPORTED_OPSETS = range(13, 22)


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    locations = []
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.append(entry.value)
    return sorted(set(locations))


def check_external_data_paths(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external-data locations that leave the model's folder, before anything is read."""
    root = path.resolve().parent
    for location in external_data_locations(model):
        candidate = Path(location)
        if candidate.is_absolute() or ".." in candidate.parts:
            raise OnnxModelError(f"{path}: external data location {location!r} leaves the model's folder; refusing to read it")
        resolved = (root / candidate).resolve()
        if root not in resolved.parents:
            raise OnnxModelError(f"{path}: external data {location!r} resolves outside the model's folder (symlink?); refusing to read it")
        if not resolved.is_file():
            raise OnnxModelError(f"{path}: external data file {location!r} is missing", hint="keep the .data file beside the .onnx file")


def load_onnx(path: str | os.PathLike[str], *, load_weights: bool = True, check: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX model; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise OnnxModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})", hint="the file may be truncated; re-export it") from exc
    if not model.graph.node:
        raise OnnxModelError(f"{path} holds no graph nodes", hint="the file may be truncated or not an ONNX model; re-export it")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in SUPPORTED_OPSETS:
        raise OnnxModelError(f"{path} uses ONNX opset {opset}; qdiff supports opsets {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
    check_external_data_paths(model, path)
    if check:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise OnnxModelError(f"{path} fails the ONNX checker: {exc}") from exc
    if load_weights and external_data_locations(model):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(path.parent))
    return model


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Write `model` atomically; weights go to `<name>.data` beside it when large or asked."""
    path = Path(path)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if external_data is None:
        external_data = size > TWO_GB - (64 << 20)
    if not external_data:
        with atomic_path(path) as tmp:
            onnx.save(model, str(tmp))
        stale = path.with_name(path.name + ".data")
        if stale.exists():
            stale.unlink()
        return path
    data_name = path.name + ".data"
    with atomic_path(path) as tmp_graph:
        # The data file gets a temporary name of its own; onnx writes it beside the graph.
        tmp_data_name = tmp_graph.name + ".data"
        onnx.save(model, str(tmp_graph), save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data_name, size_threshold=1024)
        # Point the graph at the final data name, then move the data into place first.
        graph = onnx.load(str(tmp_graph), load_external_data=False)
        for tensor in graph.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name
        onnx.save(graph, str(tmp_graph))
        os.replace(path.parent / tmp_data_name, path.parent / data_name)
    return path


def publish_onnx(staged: Path, final: Path) -> Path:
    """Move a graph (and its `.data` file) staged in a temporary folder into place.

    Both live on the same file system, so each move is an atomic rename; the data goes first,
    so the graph that appears never points at weights that are not there yet.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staged_data = staged.with_name(staged.name + ".data")
    final_data = final.with_name(final.name + ".data")
    if staged.name != final.name and staged_data.exists():
        raise OnnxModelError(f"staged graph {staged} must have the final file name {final.name} (its external data refers to it)")
    if staged_data.exists():
        os.replace(staged_data, final_data)
    elif final_data.exists():
        final_data.unlink()
    os.replace(staged, final)
    return final
