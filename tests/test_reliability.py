"""Reliability (issue 6): untrusted inputs are refused by name, artifacts survive SIGKILL and
concurrent writers, degenerate ranges never become bad scales, user errors stay short.

docs/reliability.md lists each failure mode with what the user sees and the test below that
covers it. Everything here runs on the CPU in well under a minute.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qdiff.core.artifacts import remove_stale_temps, write_json_atomic
from qdiff.calib.recipe import Recipe
from qdiff.calib.table import CalibrationTable, LayerRanges
from qdiff.core.errors import BackendUnavailableError, CalibrationError, ModelLoadError, OnnxModelError
from qdiff.export.onnx_io import load_onnx, save_onnx
from tests.conftest import tiny_cond_unet, tiny_unet2d

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- model weights


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bin_unet_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bin_unet")
    tiny_unet2d().save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    return folder


def test_plain_state_dict_bin_loads(bin_unet_dir):
    """A normal `.bin` state dict passes `torch.load(weights_only=True)` and loads."""
    from qdiff.models import load_model

    assert load_model(bin_unet_dir).unet_class == "UNet2DModel"


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused(bin_unet_dir, tmp_path, zip_format):
    from qdiff.models import load_model

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_bytes((bin_unet_dir / "config.json").read_bytes())
    marker = tmp_path / "pwned"
    weights = folder / "diffusion_pytorch_model.bin"
    torch.save({"conv_in.weight": torch.zeros(1), "payload": _RunsCode(marker)}, weights, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ModelLoadError, match="would run code") as info:
        load_model(folder)
    assert str(weights) in info.value.message and "posix.system" in info.value.message
    assert not marker.exists()


def test_diffusers_itself_does_not_run_the_pickle(bin_unet_dir, tmp_path):
    """Defence in depth, not reliance: diffusers loads `.bin` with weights_only too."""
    from diffusers import UNet2DModel

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_bytes((bin_unet_dir / "config.json").read_bytes())
    marker = tmp_path / "pwned"
    torch.save({"payload": _RunsCode(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="Unable to load weights"):
        UNet2DModel.from_pretrained(folder)
    assert not marker.exists()


def test_truncated_safetensors_is_refused_by_name(uncond_model_dir, tmp_path):
    import shutil

    from qdiff.models import load_model

    folder = tmp_path / "model"
    shutil.copytree(uncond_model_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="not a valid safetensors file") as info:
        load_model(folder)
    assert str(weights) in info.value.message


def test_nonfinite_embeddings_file_is_refused(bare_cond_unet_dir, tmp_path):
    from safetensors.torch import save_file

    from qdiff.core.conditioning import from_embeddings_file
    from qdiff.core.errors import ConditioningError
    from qdiff.models import load_model

    states = torch.randn(2, 5, 24)
    states[0, 0, 0] = float("nan")
    path = tmp_path / "emb.safetensors"
    save_file({"encoder_hidden_states": states}, str(path))
    with pytest.raises(ConditioningError, match="encoder_hidden_states hold NaN"):
        from_embeddings_file(path, load_model(bare_cond_unet_dir).unet.config, 2)


# ----------------------------------------------------------------------------- ONNX in


def _small_model(opset: int = 17, values: np.ndarray | None = None) -> onnx.ModelProto:
    w = values if values is not None else np.arange(4096, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [w.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [w.size])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _with_location(path: Path, location: str) -> None:
    """Rewrite every external-data location of the graph at `path` (an attacker's edit)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


@pytest.fixture
def no_reading(monkeypatch):
    """Fail the test if anything reads external data or runs the checker (which opens it)."""
    import onnx.external_data_helper as edh

    def boom(*args, **kwargs):
        raise AssertionError("external data was read before the location was refused")

    monkeypatch.setattr(edh, "load_external_data_for_model", boom)
    monkeypatch.setattr(onnx.checker, "check_model", boom)


def test_good_graph_with_external_data_loads(tmp_path):
    path = save_onnx(_small_model(), tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    model = load_onnx(path)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), np.arange(4096, dtype=np.float32))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "not a readable ONNX model|holds no graph nodes|fails the ONNX checker"),
        (lambda b: b[:-7], "not a readable ONNX model|holds no graph nodes|fails the ONNX checker"),
        (lambda b: random.Random(0).randbytes(len(b)), "not a readable ONNX model|holds no graph nodes|fails the ONNX checker"),
        (lambda b: b"", "holds no graph nodes"),
    ],
    ids=["half", "tail-cut", "random-bytes", "empty"],
)
def test_damaged_onnx_file_is_refused_by_name(tmp_path, damage, message):
    path = save_onnx(_small_model(), tmp_path / "m.onnx")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(OnnxModelError, match=message) as info:
        load_onnx(path)
    assert str(path) in info.value.message


def test_truncated_external_data_is_refused_by_name(tmp_path):
    path = save_onnx(_small_model(), tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(OnnxModelError, match="external data cannot be read") as info:
        load_onnx(path)
    assert str(path) in info.value.message


@pytest.mark.parametrize("opset", [9, 99])
def test_wrong_opset_is_refused(tmp_path, opset):
    path = tmp_path / "m.onnx"
    path.write_bytes(_small_model(opset=opset).SerializeToString())
    with pytest.raises(OnnxModelError, match=f"opset {opset}") as info:
        load_onnx(path)
    assert str(path) in info.value.message and "--opset 17" in info.value.hint


def test_strict_shape_inference_refuses_inconsistent_shapes(tmp_path):
    """check_model(path, full_check=True) runs shape inference in strict mode: a declared output
    shape that contradicts the graph is an error, not a warning."""
    model = _small_model()
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 7
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(OnnxModelError, match="fails the ONNX checker") as info:
        load_onnx(path)
    assert str(path) in info.value.message
    load_onnx(path, check=False)  # parses; only the check refuses it


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "sub/../../outside.data", ""], ids=["dotdot", "absolute", "nested-dotdot", "empty"])
def test_external_data_leaving_the_folder_is_refused_before_reading(tmp_path, no_reading, location):
    folder = tmp_path / "model"
    path = save_onnx(_small_model(), folder / "m.onnx", external_data=True)
    (tmp_path / "outside.data").write_bytes((folder / "m.onnx.data").read_bytes())
    _with_location(path, location)
    with pytest.raises(OnnxModelError, match="leaves the model's folder") as info:
        load_onnx(path)
    assert str(path) in info.value.message


def test_symlinked_external_data_pointing_out_is_refused(tmp_path, no_reading):
    folder = tmp_path / "model"
    path = save_onnx(_small_model(), folder / "m.onnx", external_data=True)
    outside = tmp_path / "secret.data"
    (folder / "m.onnx.data").rename(outside)
    (folder / "m.onnx.data").symlink_to(outside)
    with pytest.raises(OnnxModelError, match="resolves outside the model's folder"):
        load_onnx(path)


def test_external_data_in_a_constant_node_is_checked_too(tmp_path, no_reading):
    """External data can hide in a node attribute, not only in initializers."""
    folder = tmp_path / "model"
    folder.mkdir()
    value = numpy_helper.from_array(np.ones(4, np.float32), "c")
    value.data_location = TensorProto.EXTERNAL
    value.ClearField("raw_data")
    for key, val in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "16")):
        entry = value.external_data.add()
        entry.key, entry.value = key, val
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=value)], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(OnnxModelError, match="leaves the model's folder"):
        load_onnx(path)


@pytest.mark.parametrize("make, external", [(tiny_unet2d, True), (lambda: tiny_cond_unet("sd"), False)], ids=["unet2d-external", "sd"])
def test_exported_denoisers_pass_the_full_checks(tmp_path, make, external):
    from qdiff.export.onnx_export import export_unet

    path = export_unet(make(), tmp_path / "m.onnx", external_data=external)
    model = load_onnx(path)  # checker + strict shape inference by path, external data followed
    assert len(model.graph.node) > 50


# ----------------------------------------------------------------------------- calibration tables


@pytest.fixture(scope="module")
def exported_uncond(tmp_path_factory) -> Path:
    from qdiff.export.onnx_export import export_unet

    return export_unet(tiny_unet2d(), tmp_path_factory.mktemp("deg") / "m.onnx")


def _table_for(model: onnx.ModelProto) -> CalibrationTable:
    """A table with exact max ranges for every weighted layer of `model` (no calibration run)."""
    import onnx_graphsurgeon as gs

    from qdiff.export.graph_index import weighted_nodes

    table = CalibrationTable(model_sha256="test", recipe=Recipe().to_json())
    for wn in weighted_nodes(gs.import_onnx(model)):
        w = np.moveaxis(np.abs(wn.weight.values), wn.weight_axis, 0).reshape(wn.weight.values.shape[wn.weight_axis], -1)
        table.layers[wn.module] = LayerRanges(op=wn.op, input=4.0, weight=[float(v) for v in w.max(1)])
    return table


def test_zero_ranges_give_positive_scales_and_a_graph_that_runs(exported_uncond, tmp_path):
    """An always-zero input and an all-zero weight channel: scale 1/qmax, listed in the report,
    and ONNX Runtime's output stays finite."""
    import onnx_graphsurgeon as gs

    from qdiff.export.graph_index import weighted_nodes
    from qdiff.export.qdq import insert_qdq
    from qdiff.runtime.backends import OnnxRuntimeDenoiser

    model = onnx.load(str(exported_uncond))
    graph = gs.import_onnx(model)
    nodes = [wn for wn in weighted_nodes(graph) if wn.op == "Conv" and wn.module not in ("conv_in", "conv_out")]
    zero_input, zero_channel = nodes[0].module, nodes[1]
    values = zero_channel.weight.values.copy()
    values[2] = 0.0  # output channel 2 of a Conv: always 0
    zero_channel.weight.values = values
    model = gs.export_onnx(graph)
    table = _table_for(model)
    table.layers[zero_input].input = 0.0
    assert table.layers[zero_channel.module].weight[2] == 0.0
    qdq, report = insert_qdq(model, table)
    assert report.degenerate_ranges == [f"{zero_input}:input", f"{zero_channel.module}:weight[2]"]
    assert report.to_json()["degenerate_ranges"] == report.degenerate_ranges
    assert "zero range(s) got scale 1/qmax" in report.summary()
    scales = [numpy_helper.to_array(t) for t in qdq.graph.initializer if t.name.endswith("/scale")]
    assert scales and all(np.isfinite(s).all() and (s > 0).all() for s in scales)
    path = tmp_path / "q.onnx"
    onnx.save(qdq, str(path))
    load_onnx(path)
    gen = torch.Generator().manual_seed(0)
    out = OnnxRuntimeDenoiser(path)(torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([10.0, 500.0]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 10**400, -0.5, True, "1.0"])
def test_nonfinite_or_negative_ranges_are_refused_at_parse(bad):
    obj = {"schema": 1, "model_sha256": "x", "recipe": {}, "provenance": {}, "layers": {"conv": {"op": "Conv", "input": 1.0, "weight": [1.0, bad]}}}
    with pytest.raises(CalibrationError, match=r"layer 'conv' role 'weight' channel 1"):
        CalibrationTable.from_json(obj)


def test_a_table_with_nan_is_never_written(tmp_path):
    """An overflow during calibration fails the stage naming the layer; no table reaches disk."""
    table = CalibrationTable(model_sha256="x", recipe={}, layers={"down.conv": LayerRanges(op="Conv", input=float("nan"), weight=[1.0])})
    target = tmp_path / "calibration.json"
    with pytest.raises(CalibrationError, match="layer 'down.conv' role 'input'"):
        table.save(target)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_unknown_top_level_field_is_refused():
    obj = {"schema": 1, "model_sha256": "x", "recipe": {}, "provenance": {}, "layers": {}, "scales": {}}
    with pytest.raises(CalibrationError, match="unknown field"):
        CalibrationTable.from_json(obj)


def test_quantize_checks_its_input_graph(exported_uncond, tmp_path):
    from qdiff.export.qdq import insert_qdq_file

    damaged = tmp_path / "m.onnx"
    damaged.write_bytes(exported_uncond.read_bytes()[:-1000])
    with pytest.raises(OnnxModelError) as info:
        insert_qdq_file(damaged, _table_for(onnx.load(str(exported_uncond))), tmp_path / "q.onnx")
    assert str(damaged) in info.value.message and not (tmp_path / "q.onnx").exists()


# ----------------------------------------------------------------------------- atomic artifacts

_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    import json
    from qdiff.core.artifacts import atomic_path
    from qdiff.export.onnx_io import save_onnx

    target, mode, first, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    for version in range(first, first + count):
        if mode == "json":  # json.dump streams in small chunks: a kill lands inside the write
            with atomic_path(target) as tmp, open(tmp, "w") as fh:
                json.dump({"version": version, "payload": [version] * size}, fh)
        else:
            w = numpy_helper.from_array(np.full(size, version, np.float32), "w")
            graph = helper.make_graph(
                [helper.make_node("Add", ["x", "w"], ["y"])], "g",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])], [w])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string=str(version))
            model.ir_version = 8
            save_onnx(model, target, external_data=(mode == "external"))
        print(version, flush=True)
    """
)
ONNX_FLOATS = 2_000_000  # 8 MB per version: a write takes long enough to be killed inside
JSON_INTS = 300_000


def _writer(tmp_path: Path, target: Path, mode: str, first: int, count: int) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    if not script.exists():
        script.write_text(_WRITER)
    size = JSON_INTS if mode == "json" else ONNX_FLOATS
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(script), str(target), mode, str(first), str(count), str(size)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _read_version(target: Path, mode: str) -> int | None:
    """The version of the artifact at `target`, checking that it is whole and self-consistent."""
    if not target.exists():
        return None
    if mode == "json":
        obj = json.loads(target.read_text())
        assert obj["payload"] == [obj["version"]] * JSON_INTS
        return obj["version"]
    model = load_onnx(target)
    version = int(model.doc_string)
    weights = numpy_helper.to_array(model.graph.initializer[0])
    assert weights.shape == (ONNX_FLOATS,) and (weights == version).all(), "graph and weights of different versions"
    return version


@pytest.mark.parametrize("mode", ["json", "onnx", "external"])
def test_sigkill_leaves_the_previous_artifact_or_none(tmp_path, mode):
    rng = random.Random(mode)
    target = tmp_path / "out" / ("artifact.json" if mode == "json" else "artifact.onnx")
    last_seen = 0
    for round_ in range(4):
        first = 1000 * (round_ + 1)
        proc = _writer(tmp_path, target, mode, first, 1000)
        # Synchronise on what the writer has done, not on the clock: wait until it has published
        # its first version (it prints each version after publishing it), then kill it at a random
        # moment of the writes that follow, so the kill lands inside a write on any machine.
        published = proc.stdout.readline()
        assert published.strip() == str(first), (published, proc.stderr.read() if proc.poll() is not None else "")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        printed = [int(v) for v in (published + out).split()]
        version = _read_version(target, mode)
        allowed = {last_seen, *printed, (printed[-1] + 1) if printed else first}
        # A whole file of the previous or a newer version; "none" only where publishing takes two
        # renames (external data) and only if there was nothing before.
        assert version in allowed or (version is None and mode == "external"), (version, allowed)
        last_seen = version if version is not None else last_seen
    # The next successful write publishes a whole artifact and removes what killed writers left.
    proc = _writer(tmp_path, target, mode, 99, 1)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert _read_version(target, mode) == 99
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name] + ([target.name + ".data"] if mode == "external" else []))


def test_two_processes_writing_the_same_artifact_leave_one_whole_version(tmp_path):
    target = tmp_path / "artifact.onnx"
    a = _writer(tmp_path, target, "external", 100, 6)
    b = _writer(tmp_path, target, "external", 200, 6)
    for proc in (a, b):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err  # neither writer broke the other (temp files, renames)
    assert _read_version(target, "external") in {105, 205}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.onnx", "artifact.onnx.data", "writer.py"]


def test_stale_temp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    target = tmp_path / "table.json"
    stale = [tmp_path / f".table.json.~{dead_pid}~abc123.tmp", tmp_path / f".table.json.~{dead_pid}~xyz.tmp.data"]
    live = tmp_path / f".table.json.~{os.getppid()}~live.tmp"  # the parent of this test is alive
    other = tmp_path / f".table.json.manifest.json.~{dead_pid}~abc.tmp"  # another artifact's
    for path in (*stale, live, other):
        path.write_text("partial")
    write_json_atomic(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()
    assert remove_stale_temps(tmp_path / "table.json.manifest.json") == [other]


def test_failed_write_keeps_the_previous_artifact(tmp_path):
    target = tmp_path / "m.onnx"
    save_onnx(_small_model(), target, external_data=True)
    before = (target.read_bytes(), (tmp_path / "m.onnx.data").read_bytes())
    with pytest.raises(OSError, match="No space left"):
        _fail_midway(_small_model(values=np.ones(4096, np.float32)), target)
    assert (target.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def _fail_midway(model: onnx.ModelProto, target: Path) -> None:
    """save_onnx with onnx.save failing after the data file was written (e.g. a full disk)."""
    from unittest import mock

    real_save = onnx.save
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    with mock.patch.object(onnx, "save", flaky):
        save_onnx(model, target, external_data=True)


# ----------------------------------------------------------------------------- runtime


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_tensorrt_backend_without_gpu_is_one_line_naming_what_works():
    from qdiff.runtime.backends import check_backend

    check_backend("pytorch")
    check_backend("onnxruntime")
    with pytest.raises(BackendUnavailableError) as info:
        check_backend("tensorrt")
    assert "\n" not in str(info.value) and info.value.hint is None
    assert "CUDA GPU" in info.value.message and "onnxruntime backend" in info.value.message


def test_missing_onnxruntime_provider_is_one_line(exported_uncond):
    import onnxruntime as ort

    from qdiff.runtime.backends import OnnxRuntimeDenoiser

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(BackendUnavailableError) as info:
        OnnxRuntimeDenoiser(exported_uncond, providers=["CUDAExecutionProvider"])
    assert "\n" not in str(info.value) and "CPUExecutionProvider" in info.value.message


# ----------------------------------------------------------------------------- CLI


def test_no_shell_anywhere():
    """No `shell=True`, `os.system` or `os.popen` in qdiff's own code (this file excepted)."""
    needles = ("shell" + "=True", "os." + "system(", "os." + "popen(")
    offenders = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0].startswith(".") or rel.parts[0] in ("build", "dist") or path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{rel}: {n}" for n in needles if n in text]
    assert not offenders


def _cli(capsys, *args: str) -> tuple[int, list[str]]:
    from qdiff.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def _table_file(tmp_path: Path) -> Path:
    path = tmp_path / "table.json"
    CalibrationTable(model_sha256="x", recipe={}).save(path)
    return path


def test_verbose_shows_the_traceback_before_or_after_the_subcommand(capsys, tmp_path):
    code, lines = _cli(capsys, "quantize", tmp_path / "missing.onnx", "--calib", tmp_path / "missing.json")
    assert code == 1 and len(lines) == 2 and not any("Traceback" in line for line in lines)
    for args in (["--verbose", "quantize"], ["quantize", "--verbose"]):
        code, lines = _cli(capsys, *args, tmp_path / "missing.onnx", "--calib", tmp_path / "missing.json")
        assert code == 1 and lines[0].startswith("Traceback") and "does not exist" in lines[-2]


def test_multiline_library_errors_are_shown_in_two_lines(capsys, tmp_path):
    """The ONNX checker's messages span lines; the CLI still prints one error and one hint."""
    model = _small_model()
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 7
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    code, lines = _cli(capsys, "quantize", path, "--calib", _table_file(tmp_path))
    assert code == 1 and len(lines) == 2, lines
    assert lines[0].startswith("qdiff quantize: error:") and str(path) in lines[0] and lines[1].startswith("  hint:")


def test_usage_errors_are_two_lines(capsys):
    from qdiff.cli import main

    with pytest.raises(SystemExit) as info:
        main(["export"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 2
    assert "required" in lines[0] and "qdiff export --help" in lines[1]


def test_os_errors_are_two_lines(capsys, uncond_model_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, lines = _cli(capsys, "export", uncond_model_dir, "-o", blocker / "out.onnx", "--no-check")
    assert code == 1 and len(lines) == 2 and str(blocker) in lines[0] and "hint" in lines[1], lines
