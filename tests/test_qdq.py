"""The Q/DQ graph: placement by TensorRT's rules, and numerics equal to the PyTorch fake-quant
reference built from the same calibration table."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qdiff.api import calibrate, export_model, quantize_onnx
from qdiff.calib.fake_quant import build_fake_quant_model
from qdiff.calib.table import CalibrationTable
from qdiff.errors import ArtifactMismatchError, QuantizationError
from qdiff.export.onnx_export import example_inputs
from qdiff.export.qdq import insert_qdq
from qdiff.export.validate import error_stats
from qdiff.models import load_model
from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser
from tests.conftest import compare_with_fake_quant, quantize_model


@pytest.fixture(scope="module")
def quantized_uncond(uncond_model_dir, tmp_path_factory, fast_recipe):
    return quantize_model(uncond_model_dir, tmp_path_factory.mktemp("q_uncond"), fast_recipe)


@pytest.fixture(scope="module")
def quantized_cond(class_cond_model_dir, tmp_path_factory, fast_recipe):
    return quantize_model(class_cond_model_dir, tmp_path_factory.mktemp("q_cond"), fast_recipe)


@pytest.mark.parametrize("which", ["quantized_uncond", "quantized_cond"])
def test_qdq_graph_equals_fake_quant_reference(which, request):
    """Same tensors quantized with the same scales: agreement at float32 round-off.

    ONNX Runtime and PyTorch compute float ops (GroupNorm, softmax) with round-off differences
    of ~1e-7; now and then a value sits that close to a rounding boundary, lands one INT8 step
    away, and the flip propagates. A 1e-6 perturbation of the input does the same to the
    reference alone (tiny random-weight models amplify such a flip a lot). A wrong scale or a
    misplaced Q/DQ would instead show on every input. So: most inputs agree to ~1e-6, and none
    disagrees by more than the order of the quantization error itself.
    """
    bundle, _, table, q = request.getfixturevalue(which)
    results = compare_with_fake_quant(bundle, table, q.onnx_path, range(1, 6))
    exact = [qdq.rel_l2 < 1e-5 for qdq, _ in results]
    assert sum(exact) >= 3, [str(qdq) for qdq, _ in results]
    for qdq_vs_ref, fp32_vs_ref in results:
        assert qdq_vs_ref.rel_l2 < 2 * fp32_vs_ref.rel_l2, (str(qdq_vs_ref), str(fp32_vs_ref))
        assert fp32_vs_ref.rel_l2 > 1e-3  # the quantization error is real, so the check has teeth


def test_optimized_ort_session_runs_the_qdq_graph_close_to_reference(quantized_uncond):
    """With graph optimizations on, ORT fuses Q/DQ into integer kernels: still the same function."""
    bundle, _, table, q = quantized_uncond
    reference = TorchDenoiser(build_fake_quant_model(bundle.unet, table))
    inputs = example_inputs(bundle.unet, batch=2, seed=3)
    out = OnnxRuntimeDenoiser(q.onnx_path, optimize=True)(inputs["sample"], inputs["timestep"])
    assert error_stats(out, reference(inputs["sample"], inputs["timestep"])).rel_l2 < 1e-3


def test_placement_follows_tensorrt_rules(quantized_cond):
    bundle, _, table, q = quantized_cond
    graph = gs.import_onnx(onnx.load(str(q.onnx_path)))
    quantized = 0
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        producers = [i.inputs[0] if i.inputs else None for i in node.inputs[:2]]
        is_qdq = [p is not None and p.op == "DequantizeLinear" for p in producers]
        if not any(is_qdq):
            continue
        quantized += 1
        assert all(is_qdq), f"{node.name}: only one of activation/weight is quantized"
        act_dq, w_dq = producers
        # Activations per tensor, weights per output channel, all with zero point 0.
        assert act_dq.inputs[1].values.ndim == 0
        w = w_dq.inputs[0].inputs[0].inputs[0]
        assert isinstance(w, gs.Constant)
        axis = w_dq.attrs["axis"]
        assert w_dq.inputs[1].values.shape == (w.values.shape[axis],)
        output_axis = {"Conv": 0, "MatMul": 1, "Gemm": 0 if node.attrs.get("transB", 0) else 1}[node.op]
        assert axis == output_axis, node.name
        for dq in (act_dq, w_dq):
            assert dq.inputs[2].values.dtype == np.int8 and not dq.inputs[2].values.any()
    assert quantized == q.report.to_json()["quantized_layers"] == len(table.layers) > 20
    # Q/DQ exists only to feed quantized layers: no pair is an "output quantizer" of its own.
    for dq in (n for n in graph.nodes if n.op == "DequantizeLinear"):
        assert {c.op for c in dq.outputs[0].outputs} <= {"Conv", "Gemm", "MatMul"}, dq.name


def test_coverage_names_float_layers_and_mac_share(quantized_uncond):
    _, _, table, q = quantized_uncond
    report = q.report.to_json()
    floats = {f["module"]: f["reason"] for f in report["float_layers"]}
    assert set(floats) == {"conv_in", "conv_out"}
    assert "recipe excludes it" in floats["conv_in"]
    total = sum(e.macs for e in table.layers.values()) + sum(f["macs"] for f in report["float_layers"])
    assert report["mac_share"] == pytest.approx(sum(e.macs for e in table.layers.values()) / total)
    assert 0.5 < report["mac_share"] < 1.0


def test_missing_layer_in_table_fails_and_names_it(quantized_uncond):
    bundle, onnx_path, table, _ = quantized_uncond
    broken = CalibrationTable.from_json(table.to_json())
    victim = sorted(broken.layers)[3]
    del broken.layers[victim]
    with pytest.raises(QuantizationError, match=victim.replace(".", r"\.")):
        insert_qdq(onnx.load(str(onnx_path)), broken)


def test_table_with_wrong_channel_count_is_refused(quantized_uncond):
    _, onnx_path, table, _ = quantized_uncond
    broken = CalibrationTable.from_json(table.to_json())
    name = sorted(broken.layers)[0]
    broken.layers[name].weight = broken.layers[name].weight[:-1]
    with pytest.raises(QuantizationError, match="output channels"):
        insert_qdq(onnx.load(str(onnx_path)), broken)


def test_table_of_another_model_is_refused(quantized_uncond, quantized_cond):
    _, onnx_path, _, _ = quantized_uncond
    _, _, cond_table, _ = quantized_cond
    table_path = onnx_path.parent / "other.json"
    cond_table.save(table_path)
    with pytest.raises(ArtifactMismatchError, match="exported from model"):
        quantize_onnx(onnx_path, table_path)


def test_w4_weights_take_at_most_16_levels(uncond_model_dir, tmp_path, fast_recipe):
    exported = export_model(uncond_model_dir, tmp_path)
    table = calibrate(uncond_model_dir, tmp_path, fast_recipe.with_overrides(name="w4a8", weight_bits=4, weight_calibrator="mse"))
    q = quantize_onnx(exported.onnx_path, table.table_path)
    graph = gs.import_onnx(onnx.load(str(q.onnx_path)))
    checked = 0
    for node in graph.nodes:
        if node.op == "QuantizeLinear" and isinstance(node.inputs[0], gs.Constant):
            w, s = node.inputs[0].values, node.inputs[1].values
            shape = [1] * w.ndim
            shape[node.attrs["axis"]] = -1
            levels = np.round(w / s.reshape(shape))
            assert levels.min() >= -8 and levels.max() <= 7
            checked += 1
    assert checked == q.report.to_json()["quantized_layers"]
    bundle = load_model(uncond_model_dir)
    results = compare_with_fake_quant(bundle, table.table, q.onnx_path, range(1, 4))
    assert sum(qdq.rel_l2 < 1e-5 for qdq, _ in results) >= 2
