"""The peers through the evaluation harness (issue 15, item 3): ModelOpt's calibrated PyTorch module
is the function its exported Q/DQ graph computes; any denoiser graph runs as a harness candidate
and scores like its PyTorch twin; qdiff's table can be placed on ModelOpt's INT8 layers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

from qdiff.api import calibrate, export_model, quantize_onnx  # noqa: E402
from qdiff.calib.recipe import Recipe  # noqa: E402
from qdiff.core.conditioning import resolve_conditioning  # noqa: E402
from qdiff.core.errors import EvaluationError  # noqa: E402
from qdiff.core.metrics import relative_l2  # noqa: E402
from qdiff.eval_harness import HarnessSettings, fake_quant_candidate, onnx_graph_candidate, run_harness  # noqa: E402
from qdiff.export.onnx_export import example_inputs  # noqa: E402
from qdiff.models import load_model  # noqa: E402
from qdiff.peers import quantize_with_modelopt  # noqa: E402
from qdiff.peers.candidates import modelopt_candidate, modelopt_int8_layers  # noqa: E402
from qdiff.peers.modelopt_int8 import calibration_calls  # noqa: E402
from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser  # noqa: E402


def tiny_recipe() -> Recipe:
    return Recipe(name="w8a8", num_timesteps=2, samples_per_timestep=2, calibration_steps=2, batch_size=2)


@pytest.fixture(scope="module")
def setup(class_cond_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("peer-candidates")
    bundle = load_model(class_cond_model_dir)
    recipe = tiny_recipe()
    calls = list(calibration_calls(bundle, recipe, resolve_conditioning(bundle, recipe.samples_per_timestep, seed=recipe.seed)))
    fp32 = export_model(class_cond_model_dir, out, check=False).onnx_path
    peer = quantize_with_modelopt(bundle, out / "modelopt", recipe, fp32_onnx=fp32, calibration_inputs=calls)
    table = calibrate(class_cond_model_dir, out / "qdiff", recipe)
    qdq = quantize_onnx(fp32, table.table_path, out / "qdiff" / "denoiser.w8a8.onnx").onnx_path
    return {"bundle": bundle, "recipe": recipe, "calls": calls, "peer": peer.onnx_path, "table": table, "qdq": qdq}


def test_modelopt_candidate_computes_what_its_exported_graph_computes(setup):
    bundle = setup["bundle"]
    cand = modelopt_candidate("modelopt", bundle, setup["recipe"], calibration_inputs=setup["calls"])
    module = cand.make_unet(_copy(bundle.unet))
    torch_side, graph = TorchDenoiser(module), OnnxRuntimeDenoiser(setup["peer"], optimize=False)
    fp32 = TorchDenoiser(bundle.unet)
    for seed in (1, 2):
        inputs = example_inputs(bundle.unet, batch=2, seed=seed, tokens=3)
        sample, t = inputs.pop("sample"), inputs.pop("timestep")
        a, b, ref = torch_side(sample, t, **inputs), graph(sample, t, **inputs), fp32(sample, t, **inputs)
        assert relative_l2(a, b) < 1e-4, seed  # the same function (float rounding at grid boundaries only)
        assert 1e-4 < relative_l2(a, ref) < 0.2, seed  # and really quantized
    assert cand.meta["kind"] == "modelopt-int8" and cand.meta["modelopt"]["alpha"] == 0.8


def _copy(unet):
    import copy

    return copy.deepcopy(unet)


def test_peers_in_the_harness_graph_rows_match_their_pytorch_twins(setup, tmp_path):
    """qdiff's Q/DQ graph under ONNX Runtime scores like qdiff's fake-quant model; the table on
    ModelOpt's INT8 layers quantizes fewer layers and is a different row; ModelOpt's module runs."""
    table = setup["table"]
    on_modelopt_layers = modelopt_int8_layers(setup["bundle"].unet, list(table.table.layers))
    assert 0 < len(on_modelopt_layers) < len(table.table.layers)
    assert not any("conv_shortcut" in n or "time_emb_proj" in n or n in ("conv_in", "conv_out") for n in on_modelopt_layers)
    candidates = [
        fake_quant_candidate("qdiff", table.table_path),
        onnx_graph_candidate("qdiff-graph", setup["qdq"], threads=1),
        fake_quant_candidate("qdiff-modelopt-layers", table.table_path, layers=on_modelopt_layers),
        modelopt_candidate("modelopt", setup["bundle"], setup["recipe"], calibration_inputs=setup["calls"]),
    ]
    settings = HarnessSettings(images=3, seed_sets=1, steps=3, step_images=2, device="cpu", batch_size=4, bootstrap=50)
    result = run_harness(setup["bundle"], candidates, settings, out_dir=tmp_path)
    step = {k: r["metrics"]["step_rel_l2"]["mean"] for k, r in result.rows.items()}
    psnr = {k: r["metrics"]["psnr"]["mean"] for k, r in result.rows.items()}
    # per call (the step error, on the FP32 trajectory) the graph and its twin agree to 0.1%; over a
    # sampling loop the rare rounding-boundary flips compound (0.4 dB on this random-weight model)
    assert step["qdiff-graph"] == pytest.approx(step["qdiff"], rel=1e-3) and psnr["qdiff-graph"] == pytest.approx(psnr["qdiff"], abs=1.0)
    # fewer layers quantized (the shortcuts, timestep MLPs, conv_in/out float): less error, and a paired difference
    assert step["qdiff-modelopt-layers"] < step["qdiff"]
    assert result.comparisons["qdiff-modelopt-layers"]["step_rel_l2"]["diff"] < 0
    assert step["modelopt"] != pytest.approx(step["qdiff"], rel=1e-2) and step["modelopt"] != pytest.approx(step["qdiff-modelopt-layers"], rel=1e-2)
    assert all(0 < v < 0.5 for v in step.values()) and result.complete
    assert result.rows["qdiff-graph"]["meta"]["kind"] == "onnx-graph" and result.rows["qdiff-modelopt-layers"]["meta"]["layers"] == len(on_modelopt_layers)


def test_modelopt_candidate_refuses_other_recipes_before_the_harness_runs(class_cond_model_dir):
    from qdiff.core.errors import QuantizationError

    with pytest.raises(QuantizationError, match="W8A8 only; recipe 'w4a8'"):
        modelopt_candidate("modelopt", class_cond_model_dir, "w4a8")


def test_a_missing_graph_is_refused_by_name(tmp_path):
    with pytest.raises(EvaluationError, match="no ONNX graph at .*missing.onnx"):
        onnx_graph_candidate("peer", tmp_path / "missing.onnx")
