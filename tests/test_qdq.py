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
from qdiff.core.errors import ArtifactMismatchError, QuantizationError
from qdiff.export.onnx_export import example_inputs
from qdiff.export.qdq import insert_qdq
from qdiff.export.validate import error_stats
from qdiff.models import load_model
from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser
from tests.conftest import compare_with_fake_quant, layerwise_fake_quant_errors, per_channel, quantize_model


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
    reference alone (tiny random-weight models amplify such a flip a lot), and how often it
    happens depends on the CPU's float kernels. So: every quantized layer, cut out and fed the
    tensor its fake-quant twin sees, agrees at round-off (on any CPU), and the whole model
    disagrees by less than the quantization error itself on every input.
    """
    bundle, _, table, q = request.getfixturevalue(which)
    layers = layerwise_fake_quant_errors(bundle, table, q.onnx_path)
    assert len(layers) == q.report.to_json()["quantized_layers"]
    worst = max(layers, key=layers.get)
    assert layers[worst] < 1e-5, (worst, layers[worst])
    results = compare_with_fake_quant(bundle, table, q.onnx_path, range(1, 6))
    for qdq_vs_ref, fp32_vs_ref in results:
        assert qdq_vs_ref.rel_l2 < 2 * fp32_vs_ref.rel_l2, (str(qdq_vs_ref), str(fp32_vs_ref))
        assert fp32_vs_ref.rel_l2 > 1e-3  # the quantization error is real, so the check has teeth


def test_optimized_ort_session_runs_the_qdq_graph_close_to_reference(quantized_uncond):
    """With graph optimizations on, the default (exact) arithmetic keeps Q/DQ as float
    simulation: every layer computes the reference's function at round-off, and the whole model
    stays within the quantization error (see the test above for why not closer)."""
    bundle, _, table, q = quantized_uncond
    optimized = OnnxRuntimeDenoiser(q.onnx_path, optimize=True)
    assert optimized.arithmetic == "exact" and "TensorRT" in optimized.describe()["arithmetic"]
    layers = layerwise_fake_quant_errors(bundle, table, q.onnx_path, arithmetic="exact")
    assert len(layers) == q.report.to_json()["quantized_layers"] and max(layers.values()) < 1e-5
    reference = TorchDenoiser(build_fake_quant_model(bundle.unet, table))
    for seed in (3, 4):
        inputs = example_inputs(bundle.unet, batch=2, seed=seed)
        args = inputs["sample"], inputs["timestep"]
        quant_err = error_stats(TorchDenoiser(bundle.unet)(*args), reference(*args)).rel_l2
        assert error_stats(optimized(*args), reference(*args)).rel_l2 < 2 * quant_err


def test_fused_int8_arithmetic_is_opt_in_and_its_difference_shows_where_the_cpu_saturates(quantized_uncond):
    """ORT's fused u8s8 kernels: on x86 without VNNI their int16 pair sums saturate and single
    layers leave the reference by ~1e-2 (measured on an AVX2 EPYC); with VNNI (or on Arm) they
    agree at round-off. The test asserts whichever this CPU is, so it holds on every CPU and
    shows the difference where there is one."""
    from qdiff.runtime.backends import fused_int8_saturates

    bundle, _, table, q = quantized_uncond
    assert "fused" in OnnxRuntimeDenoiser(q.onnx_path, arithmetic="fused-int8").describe()["arithmetic"]
    fused = layerwise_fake_quant_errors(bundle, table, q.onnx_path, arithmetic="fused-int8")
    worst = max(fused, key=fused.get)
    print(f"fused-int8, worst layer {worst}: rel-L2 {fused[worst]:.3g} vs the reference; saturating CPU: {fused_int8_saturates()}")
    if fused_int8_saturates():
        assert fused[worst] > 1e-4
    else:
        assert fused[worst] < 1e-5


def test_saturation_is_predicted_from_the_cpu_flags():
    from qdiff.runtime.backends import fused_int8_saturates

    assert fused_int8_saturates({"avx2", "fma"}, "x86_64") is True  # AMD EPYC Zen 2/3, older Xeons
    assert fused_int8_saturates({"avx2", "avx512f", "avx512_vnni"}, "x86_64") is False
    assert fused_int8_saturates({"avx2", "avx_vnni"}, "x86_64") is False
    assert fused_int8_saturates(set(), "aarch64") is False


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
            levels = np.round(w / per_channel(s, w.ndim, node.attrs["axis"]))
            assert levels.min() >= -8 and levels.max() <= 7
            checked += 1
    assert checked == q.report.to_json()["quantized_layers"]
    bundle = load_model(uncond_model_dir)
    layers = layerwise_fake_quant_errors(bundle, table.table, q.onnx_path)
    assert len(layers) == checked and max(layers.values()) < 1e-5


def _quantized_modules(onnx_path) -> dict[str, str]:
    """module -> op of every node fed by a DequantizeLinear, read from the graph itself."""
    graph = gs.import_onnx(onnx.load(str(onnx_path)))
    out = {}
    for node in graph.nodes:
        if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and node.inputs and node.inputs[0].inputs and node.inputs[0].inputs[0].op == "DequantizeLinear":
            out[node.name] = node.op
    return out


def test_named_placements_narrow_the_graph_and_keep_it_runnable(quantized_cond, tmp_path):
    """`conv`: no quantized Linear at all; `conv-ff`: feed-forward Linears INT8, attention
    projections float; both are real graphs that ONNX Runtime runs close to the full placement."""
    bundle, fp32_onnx, _, full = quantized_cond
    table_path = full.onnx_path.parent / "calibration.json"
    conv = quantize_onnx(fp32_onnx, table_path, tmp_path, placement="conv")
    conv_ff = quantize_onnx(fp32_onnx, table_path, tmp_path, placement="conv-ff")
    assert conv.onnx_path.name == "denoiser.w8a8-conv.onnx" and conv_ff.onnx_path.name == "denoiser.w8a8-conv-ff.onnx"

    q_all, q_conv, q_ff = (_quantized_modules(r.onnx_path) for r in (full, conv, conv_ff))
    assert set(q_conv.values()) == {"Conv"} and set(q_conv) < set(q_all)
    assert {n for n, op in q_all.items() if op == "Conv"} == set(q_conv)  # no convolution lost
    linears = {n for n, op in q_ff.items() if op != "Conv"}
    assert linears and all("/ff/" in n or "time_emb" in n or "time_embedding" in n for n in linears), sorted(linears)
    assert any("/ff/" in n for n in linears)
    assert not any("/attn1/" in n or "/attn2/" in n for n in q_ff)
    assert any("/attn1/" in n for n in q_all)  # the full placement does quantize them

    floats = {f["module"]: f["reason"] for f in conv_ff.report.to_json()["float_layers"]}
    assert any(m.endswith("attn1.to_q") and "*.to_q" in r for m, r in floats.items()), floats

    inputs = example_inputs(bundle.unet, batch=2, seed=4)
    args = [inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]]
    reference = OnnxRuntimeDenoiser(fp32_onnx)(*args)
    for result in (conv, conv_ff):
        err = error_stats(OnnxRuntimeDenoiser(result.onnx_path)(*args), reference)
        assert 0 < err.rel_l2 < 0.2, (result.onnx_path.name, str(err))


def test_placement_and_explicit_ops_are_exclusive(quantized_cond, tmp_path):
    _, fp32_onnx, _, full = quantized_cond
    from qdiff.core.errors import RecipeError

    with pytest.raises(RecipeError, match="not both"):
        quantize_onnx(fp32_onnx, full.onnx_path.parent / "calibration.json", tmp_path, placement="conv", quantize_ops=("Conv",))
    with pytest.raises(RecipeError, match="unknown placement 'attention'") as info:
        quantize_onnx(fp32_onnx, full.onnx_path.parent / "calibration.json", tmp_path, placement="attention")
    assert "conv-ff" in info.value.hint
    assert not list(tmp_path.iterdir())  # nothing written


def test_conv_ff_keeps_unet2d_attention_projections_float(quantized_uncond, tmp_path):
    """UNet2DModel's attention has no transformer block: its to_q/k/v/out sit directly under
    `attentions.N`; the placement must find them there too."""
    _, fp32_onnx, _, full = quantized_uncond
    q = quantize_onnx(fp32_onnx, full.onnx_path.parent / "calibration.json", tmp_path, placement="conv-ff")
    floats = {f["module"] for f in q.report.to_json()["float_layers"]}
    projections = {m for m in floats if m.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or m.endswith("to_out.0")}
    assert len(projections) >= 4, floats
    assert any("/to_q/" in n for n in _quantized_modules(full.onnx_path))
    assert not any("/to_q/" in n or "/to_out" in n for n in _quantized_modules(q.onnx_path))
