"""INT4 weight-only MatMul/Gemm weights: the graph is valid opset 21 with real INT4 tensors, and
ONNX Runtime computes exactly the model whose weights are those INT4 values times their scales."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qdiff.core.errors import OnnxModelError, QuantizationError
from qdiff.export import int4_weight_only as i4
from qdiff.export.graph_index import module_name


@pytest.fixture(scope="module")
def exports(uncond_model_dir, class_cond_model_dir, tmp_path_factory):
    from qdiff.api import export_model

    out = tmp_path_factory.mktemp("int4wo")
    return {
        "uncond": (uncond_model_dir, export_model(uncond_model_dir, out / "uncond" / "denoiser.onnx", check=False).onnx_path),
        "cond": (class_cond_model_dir, export_model(class_cond_model_dir, out / "cond" / "denoiser.onnx", check=False).onnx_path),
    }


def _int4_dqs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto, onnx.TensorProto]]:
    inits = {t.name: t for t in model.graph.initializer}
    return [(n, inits[n.input[0]], inits[n.input[1]]) for n in model.graph.node if n.op_type == "DequantizeLinear" and inits[n.input[0]].data_type == TensorProto.INT4]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dequantized_torch_model(unet: torch.nn.Module, quantized: onnx.ModelProto) -> tuple[torch.nn.Module, int]:
    """The PyTorch model with every converted weight replaced by its INT4 values x scales,
    dequantized in numpy: the function the graph must compute."""
    reference = copy.deepcopy(unet)
    graph = gs.import_onnx(quantized)
    replaced = 0
    for node in graph.nodes:
        if node.op not in i4.MATMUL_OPS or not node.inputs[1].inputs or node.inputs[1].inputs[0].op != "DequantizeLinear":
            continue
        dq = node.inputs[1].inputs[0]
        q = np.asarray(dq.inputs[0].values).astype(np.int8)
        weight = i4.dequantize_blocks(q, dq.inputs[1].values, dq.attrs["axis"], dq.attrs["block_size"])
        linear = reference.get_submodule(module_name(node))
        # ONNX MatMul stores x @ W as W [in, out]; Gemm(transB=1) and torch store [out, in].
        value = torch.from_numpy(np.ascontiguousarray(weight.T if node.op == "MatMul" else weight))
        assert linear.weight.shape == value.shape
        linear.weight.data = value
        replaced += 1
    return reference, replaced


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("axis", [0, 1])
def test_block_quantize_ragged_blocks_and_zero_blocks(axis):
    rng = np.random.default_rng(0)
    k, n, block = 200, 6, 64  # 200 = 3 x 64 + 8: the last block is short
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[64:128, 2] = 0.0  # an all-zero block
    w = w if axis == 0 else np.ascontiguousarray(w.T)
    q, scale = i4.block_quantize(w, axis, block)
    assert q.shape == w.shape and q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7
    assert scale.shape == ((4, n) if axis == 0 else (n, 4)) and scale.dtype == np.float32
    assert np.moveaxis(scale, axis, 0)[1, 2] == np.float32(1 / 7)  # the zero block: 1 / qmax, never 0
    deq = i4.dequantize_blocks(q, scale, axis, block)
    step = np.repeat(scale, block, axis=axis).take(np.arange(k), axis=axis)
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-7)  # max calibration: rounding error only
    _, mse_scale = i4.block_quantize(w, axis, block, clip="mse")
    assert np.all(mse_scale <= scale)


def test_int4_tensor_is_packed_two_per_byte():
    q = np.array([[-8, 7, 1], [2, -1, 0], [3, 4, -5]], dtype=np.int8)
    t = i4.int4_tensor("w", q)
    assert t.data_type == TensorProto.INT4 and len(t.raw_data) == 5  # ceil(9 / 2)
    assert np.array_equal(numpy_helper.to_array(t).astype(np.int8), q)


# ----------------------------------------------------------------------------- tiny UNets under ONNX Runtime


def test_class_cond_unet_int4_graph_runs_exactly(exports, tmp_path):
    from qdiff.api import quantize_int4_weight_only
    from qdiff.core.artifacts import read_manifest
    from qdiff.engines.builder import check_precision, graph_facts
    from qdiff.export.onnx_export import example_inputs
    from qdiff.models import load_model
    from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser

    model_dir, fp32 = exports["cond"]
    result = quantize_int4_weight_only(fp32, tmp_path)
    path = result.onnx_path
    assert path == tmp_path / "denoiser.int4wo.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model, source = onnx.load(str(path)), onnx.load(str(fp32))
    assert i4.default_opset(model) == 21 and model.ir_version >= 10

    dqs = _int4_dqs(model)
    report = result.report
    assert len(dqs) == len(report.converted) == len(report.layers) > 0
    for node, q, scale in dqs:
        attrs = _attrs(node)
        assert attrs["block_size"] == 128 and len(node.input) == 2  # no zero point: symmetric
        k = q.dims[attrs["axis"]]
        expected = list(q.dims)
        expected[attrs["axis"]] = -(-k // 128)
        assert list(scale.dims) == expected and scale.data_type == TensorProto.FLOAT
    # Convolutions keep their FP32 weights; only MatMul/Gemm changed.
    conv_weights = lambda m: sorted(n.input[1] for n in m.graph.node if n.op_type == "Conv")  # noqa: E731
    assert conv_weights(model) == conv_weights(source)
    assert report.bytes_after < report.bytes_before / 6 and report.model_bytes_after < report.model_bytes_before
    assert report.matmul_mac_share == 1.0 and 0 < report.mac_share < 1

    manifest = read_manifest(path)
    assert manifest.kind == "int4-weight-only-onnx"
    assert manifest.details["weight_bits"] == 4 and manifest.details["int4_weight_only"] is True and manifest.details["block_size"] == 128
    assert manifest.details["unet_config"] == read_manifest(fp32).details["unet_config"]
    assert quantize_int4_weight_only(fp32, tmp_path).reused

    facts = graph_facts(path)
    assert facts.int4_dq_nodes == len(dqs) and facts.opset == 21
    assert "INT4" in check_precision("int4-weight-only", facts, path)
    with pytest.raises(Exception, match="int4-weight-only"):
        check_precision("w4a8", facts, path)

    bundle = load_model(model_dir, components=False)
    reference, replaced = _dequantized_torch_model(bundle.unet, model)
    assert replaced == len(dqs)
    inputs = example_inputs(bundle.unet, batch=2, seed=5, tokens=1)
    sample, t = inputs.pop("sample"), inputs.pop("timestep")
    want = TorchDenoiser(reference)(sample, t, **inputs)
    fp32_out = OnnxRuntimeDenoiser(fp32, optimize=False)(sample, t, **inputs)
    for optimize in (False, True):  # True: ORT's MatMulNBits fusion, activations kept in float
        got = OnnxRuntimeDenoiser(path, optimize=optimize)(sample, t, **inputs)
        assert _rel_l2(got, want) < 2e-6, optimize
    assert 1e-4 < _rel_l2(want, fp32_out) < 0.1  # close to FP32, but not FP32


def test_uncond_unet_block_size_that_divides_nothing(exports, tmp_path):
    from qdiff.export.onnx_export import example_inputs
    from qdiff.models import load_model
    from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser

    model_dir, fp32 = exports["uncond"]
    out = tmp_path / "q.onnx"
    report = i4.int4_weight_only_file(fp32, out, i4.Int4WeightOnlyConfig(block_size=7, exclude=("*to_v",)))
    model = onnx.load(str(out))
    ks = [q.dims[_attrs(n)["axis"]] for n, q, _ in _int4_dqs(model)]
    assert ks and all(k % 7 for k in ks) and len(report.ragged_blocks) == len(ks)
    assert [d.module for d in report.skipped] and all(d.module.endswith("to_v") and "pattern" in d.reason for d in report.skipped)

    bundle = load_model(model_dir, components=False)
    reference, replaced = _dequantized_torch_model(bundle.unet, model)
    assert replaced == len(ks)
    inputs = example_inputs(bundle.unet, batch=2, seed=6)
    sample, t = inputs.pop("sample"), inputs.pop("timestep")
    got = OnnxRuntimeDenoiser(out, optimize=False)(sample, t, **inputs)
    assert _rel_l2(got, TorchDenoiser(reference)(sample, t, **inputs)) < 2e-6
    assert _rel_l2(got, OnnxRuntimeDenoiser(fp32, optimize=False)(sample, t, **inputs)) > 1e-5


# ----------------------------------------------------------------------------- small hand-made graphs


def _graph(nodes, inits, opset=17, x_shape=(3, 200), y_shape=(3, 8)) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _gemm_model(trans_b: int) -> tuple[onnx.ModelProto, np.ndarray]:
    w = np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32)
    stored = w.T.copy() if trans_b else w
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="/unet/proj/Gemm", transB=trans_b)]
    return _graph(nodes, [numpy_helper.from_array(stored, "w")]), stored


@pytest.mark.parametrize("trans_b, scale_dtype", [(1, "float32"), (0, "float16")])
def test_gemm_weights_and_fp16_scales(trans_b, scale_dtype):
    model, stored = _gemm_model(trans_b)
    out, report = i4.int4_weight_only(model, i4.Int4WeightOnlyConfig(block_size=64, scale_dtype=scale_dtype))
    onnx.checker.check_model(out, full_check=True)
    (node, q, scale), = _int4_dqs(out)
    axis = _attrs(node)["axis"]
    assert axis == trans_b and list(scale.dims) == ([8, 4] if trans_b else [4, 8])
    assert scale.data_type == (TensorProto.FLOAT16 if scale_dtype == "float16" else TensorProto.FLOAT)
    deq = i4.dequantize_blocks(numpy_helper.to_array(q).astype(np.int8), numpy_helper.to_array(scale), axis, 64).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((3, 200)).astype(np.float32)
    want = x @ (deq.T if trans_b else deq)
    np.testing.assert_allclose(_run(out, x), want, rtol=1e-5, atol=1e-5)
    assert report.converted[0].module == "proj" and report.mac_share == 1.0


def test_graph_without_matmul_or_gemm_is_refused():
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="/unet/conv_in/Conv", pads=[1, 1, 1, 1])]
    model = _graph(nodes, [w], x_shape=(1, 3, 8, 8), y_shape=(1, 4, 8, 8))
    with pytest.raises(QuantizationError, match="no MatMul/Gemm with a constant weight"):
        i4.int4_weight_only(model)


def test_direct_opset_bump_when_the_converter_fails(monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    model, _ = _gemm_model(1)
    out, report = i4.int4_weight_only(model)
    onnx.checker.check_model(out, full_check=True)
    assert "direct bump" in report.opset_upgrade and i4.default_opset(out) == 21

    # ReduceMean's axes moved from attribute to input in opset 18: a bare bump would break it.
    reduce = helper.make_node("ReduceMean", ["y0"], ["y"], axes=[1], keepdims=1)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y0"], name="/unet/proj/Gemm", transB=1), reduce]
    w = numpy_helper.from_array(np.ones((8, 200), np.float32), "w")
    with pytest.raises(OnnxModelError, match="ReduceMean"):
        i4.int4_weight_only(_graph(nodes, [w], y_shape=(3, 1)))


# ----------------------------------------------------------------------------- CLI


def test_cli_int4_weight_only_and_calib_rule(exports, tmp_path, capsys):
    from qdiff.cli import main

    _, fp32 = exports["cond"]
    out = tmp_path / "cli.onnx"
    assert main(["quantize", str(fp32), "--int4-weight-only", "--block-size", "64", "-o", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert all(_attrs(n)["block_size"] == 64 for n, _, _ in _int4_dqs(onnx.load(str(out))))

    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(fp32)])
    assert exc.value.code == 2 and "--calib" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(fp32), "--int4-weight-only", "--calib", "table.json"])
