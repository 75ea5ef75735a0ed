"""Export: ONNX Runtime must match PyTorch on every UNet family qdiff supports."""

from __future__ import annotations

import onnx
import pytest
import torch

from qdiff.api import export_model, validate_export
from qdiff.core.errors import ExportError
from qdiff.export.onnx_export import denoiser_signature, example_inputs, export_unet
from qdiff.export.validate import Tolerance, error_stats
from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser
from tests.conftest import tiny_cond_unet, tiny_unet2d


@pytest.mark.parametrize("make", [tiny_unet2d, lambda: tiny_cond_unet("sd"), lambda: tiny_cond_unet("sd2"), lambda: tiny_cond_unet("sdxl")], ids=["unet2d", "sd", "sd2", "sdxl"])
def test_export_matches_pytorch(tmp_path, make):
    unet = make()
    path = export_unet(unet, tmp_path / "m.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    session = OnnxRuntimeDenoiser(path)
    assert session.input_names == denoiser_signature(unet).input_names
    # Batch and spatial size differ from the traced ones: the dynamic axes must hold.
    inputs = example_inputs(unet, batch=3, seed=5, size=24, tokens=5)
    sample, t = inputs.pop("sample"), inputs.pop("timestep")
    stats = error_stats(session(sample, t, **inputs), TorchDenoiser(unet)(sample, t, **inputs))
    assert stats.shape == (3, unet.config.out_channels, 24, 24)
    assert Tolerance().violations(stats) == [], str(stats)
    assert stats.rel_l2 < 1e-5


def test_sdxl_export_has_added_condition_inputs(tmp_path):
    unet = tiny_cond_unet("sdxl")
    path = export_unet(unet, tmp_path / "m.onnx")
    names = [i.name for i in onnx.load(str(path)).graph.input]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]


def test_external_data_round_trip(tmp_path):
    unet = tiny_unet2d()
    path = export_unet(unet, tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer if t.dims and max(t.dims) > 64)
    validate_export(unet, path)


def test_validation_catches_a_wrong_graph(tmp_path):
    """A graph of another model must fail validation with numbers, not pass silently."""
    path = export_unet(tiny_unet2d(seed=0), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="relative L2"):
        validate_export(tiny_unet2d(seed=1), path)


def test_export_model_writes_manifest_and_reuses(uncond_model_dir, tmp_path):
    first = export_model(uncond_model_dir, tmp_path)
    assert first.onnx_path.name == "denoiser.onnx" and not first.reused
    assert all(v["ok"] for v in first.validation) and len(first.validation) == 2
    manifest = tmp_path / "denoiser.onnx.manifest.json"
    assert manifest.is_file()
    mtime = first.onnx_path.stat().st_mtime_ns
    second = export_model(uncond_model_dir, tmp_path)
    assert second.reused and first.onnx_path.stat().st_mtime_ns == mtime
    # A changed file on disk is not trusted: its hash no longer matches the manifest.
    with open(first.onnx_path, "ab") as fh:
        fh.write(b"\0")
    assert not export_model(uncond_model_dir, tmp_path).reused
    assert not list(tmp_path.glob(".qdiff-staging-*"))


def test_exported_graph_names_nodes_by_module_scope(tmp_path):
    """The Q/DQ pass relies on scope names; this is the exporter behaviour it depends on."""
    import onnx_graphsurgeon as gs

    from qdiff.export.graph_index import weighted_nodes

    unet = tiny_cond_unet("sd")
    graph = gs.import_onnx(onnx.load(str(export_unet(unet, tmp_path / "m.onnx"))))
    found = {wn.module for wn in weighted_nodes(graph)}
    expected = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert found == expected
