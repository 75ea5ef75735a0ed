"""Reading and writing ONNX files safely, including models above protobuf's 2 GB limit.

Reading: a file is parsed without its external data first; external-data locations that leave
the model's folder (`../`, absolute paths, symlinks pointing out) are refused before any of them
is opened; then the file is checked by path with the full checker, which also runs strict shape
and type inference and works above 2 GB. Every failure names the file and the problem.

Writing: every write goes to temporary files in the destination folder first. A graph with
external data is two files, so publishing them is three renames under a folder lock: the old
graph is removed, the data is renamed into place, then the graph. A kill at any point leaves the
previous graph with its own data, or no graph, never a graph with another graph's weights; two
processes publishing the same graph take turns.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import onnx

from qdiff.core.artifacts import folder_lock, fsync_dir, new_temp_path, remove_stale_temps
from qdiff.core.errors import OnnxModelError

TWO_GB = 2**31
SUPPORTED_OPSETS = range(13, 22)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph stores, subgraphs included: external data can hide in any of them
    (a Constant node's attribute as well as an initializer)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for sparse in attr.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def default_opset(model: onnx.ModelProto) -> int:
    """The graph's default-domain (ai.onnx) opset; 0 when it imports none."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    locations = []
    for tensor in _graph_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.append(entry.value)
    return sorted(set(locations))


def check_external_data_paths(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external-data locations that leave the model's folder, before anything is read."""
    root = path.resolve().parent
    hint = "external data must be a file beside the .onnx file (or below its folder); re-export the model"
    for location in external_data_locations(model):
        candidate = Path(location)
        if not location or candidate.is_absolute() or ".." in candidate.parts or "\\" in location:
            raise OnnxModelError(f"{path}: external data location {location!r} leaves the model's folder; refusing to read it", hint=hint)
        resolved = (root / candidate).resolve()
        if root not in resolved.parents:
            raise OnnxModelError(f"{path}: external data {location!r} resolves outside the model's folder (symlink?); refusing to read it", hint=hint)
        if not resolved.is_file():
            raise OnnxModelError(f"{path}: external data file {location!r} is missing", hint="keep the .data file beside the .onnx file")


def load_onnx(path: str | os.PathLike[str], *, load_weights: bool = True, check: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX model; errors name the file and what is wrong with it.

    `check` runs `onnx.checker.check_model(path, full_check=True)`: by path, so it works above
    2 GB, and `full_check` adds shape and type inference in strict mode (an inconsistent shape
    or an unknown op is an error, not a skipped node).
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        hint = "the file may be truncated or not an ONNX model; re-export it"
        if path.stat().st_size >= TWO_GB:
            hint = "ONNX files above 2 GB must keep their weights in a .data file; re-export with --external-data"
        raise OnnxModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})", hint=hint) from exc
    if not model.graph.node:
        raise OnnxModelError(f"{path} holds no graph nodes", hint="the file may be truncated or not an ONNX model; re-export it")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in SUPPORTED_OPSETS:
        raise OnnxModelError(
            f"{path} uses ONNX opset {opset}; qdiff supports opsets {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}",
            hint="re-export with `qdiff export --opset 17`",
        )
    check_external_data_paths(model, path)
    if check:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise OnnxModelError(
                f"{path} fails the ONNX checker (full check, strict shape inference): {exc}",
                hint="the file may be truncated or damaged; re-export it",
            ) from exc
    if load_weights and external_data_locations(model):
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise OnnxModelError(f"{path}: its external data cannot be read ({type(exc).__name__}: {exc})", hint="the .data file may be truncated; re-export it") from exc
    return model


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _publish(graph_src: Path, data_src: Path | None, graph_dst: Path) -> None:
    """Rename a graph (and its data file) into place so a reader never pairs a graph with
    another version's weights; see the module docstring."""
    data_dst = graph_dst.with_name(graph_dst.name + ".data")
    with folder_lock(graph_dst.parent):
        if data_src is not None:
            with contextlib.suppress(FileNotFoundError):
                graph_dst.unlink()  # the old graph must never meet the new data
            # Renaming over the old data would free its blocks inside the window without a graph
            # (milliseconds for large files); moving it aside first keeps that window to renames.
            old_data = graph_dst.with_name(f".{graph_dst.name}.~{os.getpid()}~{os.urandom(4).hex()}.old.tmp.data")
            try:
                os.replace(data_dst, old_data)
            except FileNotFoundError:
                old_data = None
            os.replace(data_src, data_dst)
            os.replace(graph_src, graph_dst)
            if old_data is not None:
                old_data.unlink()
        else:
            os.replace(graph_src, graph_dst)
            with contextlib.suppress(FileNotFoundError):
                data_dst.unlink()  # a previous external-data version's weights
        fsync_dir(graph_dst.parent)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Write `model` atomically; weights go to `<name>.data` beside it when large or asked.

    With external data, `onnx.save` moves the weights out of `model` (it is modified in place).
    """
    path = Path(path)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if external_data is None:
        external_data = size > TWO_GB - (64 << 20)
    tmp_graph = new_temp_path(path)
    # The data file gets a temporary name of its own; onnx writes it beside the graph.
    tmp_data = tmp_graph.with_name(tmp_graph.name + ".data")
    try:
        if not external_data:
            onnx.save(model, str(tmp_graph))
            _fsync_file(tmp_graph)
            _publish(tmp_graph, None, path)
        else:
            onnx.save(model, str(tmp_graph), save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=1024)
            # Point the graph at the final data name before publishing both.
            for tensor in _graph_tensors(model.graph):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = path.name + ".data"
            onnx.save(model, str(tmp_graph))
            _fsync_file(tmp_data)
            _fsync_file(tmp_graph)
            _publish(tmp_graph, tmp_data, path)
    finally:
        for leftover in (tmp_graph, tmp_data):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    remove_stale_temps(path)
    return path


def publish_onnx(staged: Path, final: Path) -> Path:
    """Move a graph (and its `.data` file) staged in a temporary folder into place.

    Both live on the same file system, so each move is an atomic rename, done in the order
    `_publish` gives (old graph out, data in, graph in) under a folder lock.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staged_data = staged.with_name(staged.name + ".data")
    if staged.name != final.name and staged_data.exists():
        raise OnnxModelError(f"staged graph {staged} must have the final file name {final.name} (its external data refers to it)")
    _publish(staged, staged_data if staged_data.exists() else None, final)
    remove_stale_temps(final)
    return final
