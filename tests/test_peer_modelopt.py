"""The ModelOpt INT8 peer: a real ModelOpt-quantized diffusers UNet, exported with Q/DQ exactly on
the layers ModelOpt's diffusion recipe quantizes, run by ONNX Runtime, close to FP32, with qdiff's
graph interface and manifest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

pytest.importorskip("modelopt.torch.quantization")

from qdiff.api import export_model  # noqa: E402
from qdiff.core.artifacts import read_manifest, sha256_file  # noqa: E402
from qdiff.calib.recipe import Recipe  # noqa: E402
from qdiff.calib.trajectories import count_calibration_calls  # noqa: E402
from qdiff.core.errors import BackendUnavailableError, ModelLoadError, QuantizationError  # noqa: E402
from qdiff.export.onnx_export import example_inputs  # noqa: E402
from qdiff.core.metrics import relative_l2  # noqa: E402
from qdiff.models import load_model  # noqa: E402
from qdiff.peers.modelopt_int8 import ModelOptInt8Settings, step_amax_calibrator_class  # noqa: E402
from qdiff.peers import quantize_with_modelopt  # noqa: E402
from qdiff.runtime.backends import OnnxRuntimeDenoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# What ModelOpt's example keeps float (its filter_func), as they occur in the tiny UNets.
FLOAT = ("conv_in", "conv_out", "conv_shortcut", "time_emb_proj", "time_embedding")
# Measured on the tiny class-conditional UNet (seeds 1-3): 0.033-0.054 relative L2 vs FP32.
REL_L2_BOUND = 0.12


def tiny_recipe() -> Recipe:
    # 2 kept steps of a 2-step loop, 2 trajectories in one batch: 2 calibration calls (CFG batch 4).
    return Recipe(name="w8a8", num_timesteps=2, samples_per_timestep=2, calibration_steps=2, batch_size=2)


@pytest.fixture(scope="module")
def peer(class_cond_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("modelopt")
    fp32 = export_model(class_cond_model_dir, out, check=False).onnx_path
    result = quantize_with_modelopt(class_cond_model_dir, out, tiny_recipe(), fp32_onnx=fp32)
    return fp32, result


def _module(node_name: str) -> str:
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[1:-1])


def _graph(path: Path):
    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    return model, init, producer


def _through(producer, name, ops=("Transpose", "Reshape")):
    node = producer.get(name)
    while node is not None and node.op_type in ops:
        node = producer.get(node.input[0])
    return node


def test_qdq_exactly_on_the_recipe_layers_symmetric_and_smoothquant_on_linear(peer):
    _, result = peer
    model, init, producer = _graph(result.onnx_path)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    int8 = floats = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        module = _module(node.name)
        weight = _through(producer, node.input[1])
        act = producer.get(node.input[0])
        if node.op_type == "MatMul" and (weight is None or weight.op_type != "DequantizeLinear") and node.input[1] not in init:
            # Attention's activation x activation MatMuls: float in ModelOpt's INT8 recipe.
            assert all(producer.get(x) is None or producer[x].op_type != "DequantizeLinear" for x in node.input), node.name
            continue
        if any(p in module for p in FLOAT):
            assert node.input[1] in init or _through(producer, node.input[1]) is None, node.name  # float weight, no DQ
            assert act is None or act.op_type != "DequantizeLinear", node.name
            floats += 1
            continue
        assert weight.op_type == "DequantizeLinear" and act.op_type == "DequantizeLinear", node.name
        wq = producer[weight.input[0]]
        assert wq.op_type == "QuantizeLinear" and wq.input[0] in init, node.name  # float weight behind a Q/DQ pair
        out_channels = init[wq.input[0]].shape[0]
        assert {a.name: a.i for a in weight.attribute}.get("axis", 1) == 0 and init[weight.input[1]].shape == (out_channels,), node.name
        assert init[act.input[1]].shape == (), node.name  # activations per tensor
        for dq in (weight, act):
            zero = init[dq.input[2]]
            assert zero.dtype == np.int8 and not zero.any(), node.name  # symmetric INT8 (TensorRT)
        q = producer[act.input[0]]
        smoothed = producer.get(q.input[0])
        if node.op_type == "Conv":
            assert smoothed is None or smoothed.op_type != "Mul" or "input_quantizer" not in smoothed.name, node.name
        else:  # SmoothQuant: per-channel scale (a Mul) before one per-tensor quantizer
            assert smoothed.op_type == "Mul" and smoothed.name.endswith("input_quantizer/Mul"), node.name
            assert init[smoothed.input[1]].ndim == 1 and (init[smoothed.input[1]] > 0).all(), node.name
        int8 += 1
    assert int8 > 50 and floats >= 10
    # No output quantizers: a Q after a weighted layer only feeds another quantized layer.
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            for q in (c for c in consumers.get(node.output[0], []) if c.op_type == "QuantizeLinear"):
                (dq,) = consumers[q.output[0]]
                assert any(u.op_type in ("Conv", "Gemm", "MatMul") for u in consumers[dq.output[0]]), node.name
    coverage = result.report.to_json()
    assert coverage["quantized_layers"] == int8 and coverage["weighted_layers"] == int8 + floats
    assert {f["module"].split(".")[-1] for f in coverage["float_layers"]} <= {"conv_in", "conv_out", "conv_shortcut", "time_emb_proj", "linear_1", "linear_2"}
    assert all("filter_func" in f["reason"] for f in coverage["float_layers"])


def test_graph_interface_is_qdiffs_and_runs_close_to_fp32(peer, class_cond_model_dir):
    fp32_path, result = peer
    fp32, quant = onnx.load(str(fp32_path), load_external_data=False), onnx.load(str(result.onnx_path), load_external_data=False)

    def io(model):
        dims = lambda t: [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]  # noqa: E731
        return [(t.name, t.type.tensor_type.elem_type, dims(t)) for t in (*model.graph.input, *model.graph.output)]

    assert io(quant) == io(fp32)
    assert all(elem == onnx.TensorProto.FLOAT for _, elem, _ in io(quant))
    assert [i.name for i in quant.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    opset = {o.domain: o.version for o in quant.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == 17
    unet = load_model(class_cond_model_dir).unet
    a, b = OnnxRuntimeDenoiser(fp32_path), OnnxRuntimeDenoiser(result.onnx_path)
    for seed, batch in ((1, 2), (2, 3)):  # a batch the graph was not traced with: dynamic axes work
        inputs = example_inputs(unet, batch=batch, seed=seed, tokens=3)
        sample, t = inputs.pop("sample"), inputs.pop("timestep")
        err = relative_l2(b(sample, t, **inputs), a(sample, t, **inputs))
        assert 1e-3 < err < REL_L2_BOUND, err


def test_manifest_and_reuse(peer, class_cond_model_dir):
    fp32_path, result = peer
    manifest = read_manifest(result.onnx_path)
    assert manifest.kind == "qdq-onnx" and manifest.inputs["quantizer"] == "nvidia-modelopt"
    assert manifest.inputs["model_sha256"] == read_manifest(fp32_path).inputs["model_sha256"]
    assert manifest.outputs["sha256"] == sha256_file(result.onnx_path)
    assert manifest.details["unet_config"] == read_manifest(fp32_path).details["unet_config"]
    assert manifest.details["weight_bits"] == manifest.details["activation_bits"] == 8
    assert manifest.settings["modelopt"] == ModelOptInt8Settings().to_json()
    assert manifest.settings["modelopt"]["alpha"] == 0.8 and manifest.settings["modelopt"]["collect_method"] == "min-mean"
    calibration = manifest.details["calibration"]
    assert calibration["calls"] == count_calibration_calls(tiny_recipe()) == 2 and calibration["rows"] == 2 * 2 * 2  # [uncond; cond]
    assert manifest.details["smoothed_linear_layers"] > 0
    again = quantize_with_modelopt(class_cond_model_dir, result.onnx_path, tiny_recipe(), fp32_onnx=fp32_path)
    assert again.reused and again.onnx_path == result.onnx_path


def test_bad_input_fails_clearly_and_keeps_the_existing_graph(peer, tmp_path, class_cond_model_dir, monkeypatch):
    _, result = peer
    before = result.onnx_path.read_bytes(), read_manifest(result.onnx_path).to_json()
    with pytest.raises(ModelLoadError, match="does not exist"):
        quantize_with_modelopt(tmp_path / "no-such-model", result.onnx_path, tiny_recipe(), force=True)
    with pytest.raises(QuantizationError, match="W8A8 only"):
        quantize_with_modelopt(class_cond_model_dir, result.onnx_path, "w4a8", force=True)
    with pytest.raises(QuantizationError, match="quant_level"):
        quantize_with_modelopt(class_cond_model_dir, result.onnx_path, tiny_recipe(), settings={"quant_level": 4}, force=True)
    with pytest.raises(QuantizationError, match="unknown ModelOpt setting"):
        quantize_with_modelopt(class_cond_model_dir, result.onnx_path, tiny_recipe(), settings={"alfa": 0.5}, force=True)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
            quantize_with_modelopt(class_cond_model_dir, result.onnx_path, tiny_recipe(), device="cuda", force=True)
    import modelopt.torch.quantization as mtq

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(mtq, "quantize", broken)
    with pytest.raises(QuantizationError, match="mtq.quantize failed on .*RuntimeError: boom"):
        quantize_with_modelopt(class_cond_model_dir, result.onnx_path, tiny_recipe(), force=True)
    assert (result.onnx_path.read_bytes(), read_manifest(result.onnx_path).to_json()) == before
    assert not list(result.onnx_path.parent.glob(".qdiff-staging-*"))


def test_step_calibrator_reduces_per_step_then_over_steps():
    cls = step_amax_calibrator_class()
    # 2 trajectory batches x 3 steps, calls in qdiff's order (batch by batch, steps in order).
    amax = {(0, 0): 4.0, (0, 1): 2.0, (0, 2): 6.0, (1, 0): 8.0, (1, 1): 3.0, (1, 2): 1.0}
    expected = {
        ("min-mean", "calls"): min(6.0, 2.5, 3.5),
        ("min-mean", "steps"): min(12.0, 5.0, 7.0) / 3,  # the example's literal rule: sum / steps
        ("global_min", "calls"): min(4.0, 2.0, 1.0),
        ("min-max", "calls"): min(8.0, 3.0, 6.0),
        ("mean-max", "calls"): (8.0 + 3.0 + 6.0) / 3,
    }
    for (method, divisor), want in expected.items():
        cal = cls(total_step=3, collect_method=method, mean_divisor=divisor)
        for batch in (0, 1):
            for step in range(3):
                x = torch.zeros(2, 5)
                x[1, 3] = -amax[(batch, step)]
                cal.collect(x)
        assert float(cal.compute_amax()) == pytest.approx(want), method
    cal = cls(total_step=3, percentile=0.5, collect_method="min-max")  # the first 1 of 3 steps
    for v in (5.0, 1.0, 1.0):
        cal.collect(torch.tensor([v]))
    assert float(cal.compute_amax()) == 5.0


def test_recipe_layer_rules_follow_quant_level():
    from qdiff.peers.modelopt_int8 import modelopt_config

    from conftest import tiny_cond_unet

    unet = tiny_cond_unet("sd")
    names = lambda cfg: {k.rsplit(".", 1)[0] for k in cfg["quant_cfg"] if k.endswith(".weight_quantizer")}  # noqa: E731
    full, skipped = modelopt_config(unet, ModelOptInt8Settings(), total_step=4)
    level2, _ = modelopt_config(unet, ModelOptInt8Settings(quant_level=2.0), total_step=4)
    level1, _ = modelopt_config(unet, ModelOptInt8Settings(quant_level=1.0), total_step=4)
    linear = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    conv = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    kept_float = {n for n in linear | conv if any(p in n for p in FLOAT)}
    assert names(full) == (linear | conv) - kept_float and set(skipped) == kept_float
    assert names(level1) == conv - kept_float
    assert names(level2) == names(level1) | {n for n in linear if "ff.net" in n}
    assert full["algorithm"] == {"method": "smoothquant", "alpha": 0.8}
    assert full["quant_cfg"]["default"] == {"enable": False} and full["quant_cfg"]["*output_quantizer"] == {"enable": False}
    conv_act = full["quant_cfg"]["down_blocks.0.resnets.0.conv1.input_quantizer"]
    assert conv_act["axis"] is None and conv_act["calibrator"][2]["collect_method"] == "min-mean" and conv_act["calibrator"][2]["total_step"] == 4
    assert full["quant_cfg"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.input_quantizer"]["axis"] == -1  # SmoothQuant's per-channel maxima


def test_sd15_mode_runs_on_cpu_with_a_tiny_unet(tmp_path):
    """`tools/peer_modelopt.py sd15` on a bare tiny UNet folder, as `benchmarks/sd15_unet.py export` lays it out."""
    sys.path.insert(0, str(ROOT / "tools"))
    import peer_modelopt

    from conftest import tiny_cond_unet

    tiny_cond_unet("sd").save_pretrained(tmp_path / "sd15-unet", safe_serialization=True)
    assert peer_modelopt.main(["sd15", "--work", str(tmp_path), "--device", "cpu", "--timesteps", "2", "--samples", "1", "--calib-steps", "2"]) == 0
    out = tmp_path / "onnx" / "denoiser.modelopt-int8.onnx"
    manifest = read_manifest(out)
    assert manifest.inputs["conditioning"].startswith("random") and manifest.settings["calibration"]["num_timesteps"] == 2
    assert manifest.details["unet_config"]["cross_attention_dim"] == 24
    graph = onnx.load(str(out), load_external_data=False)
    assert [i.name for i in graph.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) > 100


def test_modelopt_imports_without_pulp():
    """The GPU machine gets no pulp wheel (16 MB): the stand-in must let the INT8 path import."""
    code = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'pulp': raise ImportError('hidden pulp')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from qdiff.peers.modelopt_int8 import _import_modelopt\n"
        "from qdiff.core.errors import BackendUnavailableError\n"
        "modelopt, mtq = _import_modelopt()\n"
        "import pulp\n"
        "assert pulp.__qdiff_stand_in__ and callable(mtq.quantize)\n"
        "try:\n"
        "    pulp.LpProblem('x')\n"
        "except BackendUnavailableError as exc:\n"
        "    print('ok', exc.message)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok ModelOpt's linear-programming searcher needs `pulp`" in done.stdout, done.stderr[-2000:]



def test_symmetry_check_reads_external_zero_points_and_refuses_asymmetric(peer, tmp_path):
    from qdiff.peers.modelopt_int8 import _check_symmetric

    _, result = peer
    model = onnx.load(str(result.onnx_path))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    _check_symmetric(tmp_path / "ext.onnx")  # every zero point is in the .data file here
    model = onnx.load(str(result.onnx_path))
    zero_name = next(n.input[2] for n in model.graph.node if n.op_type == "DequantizeLinear")
    zero = next(i for i in model.graph.initializer if i.name == zero_name)
    zero.CopyFrom(numpy_helper.from_array(np.ones_like(numpy_helper.to_array(zero)), zero_name))
    onnx.save(model, str(tmp_path / "asym.onnx"))
    with pytest.raises(QuantizationError, match="not symmetric INT8"):
        _check_symmetric(tmp_path / "asym.onnx")
