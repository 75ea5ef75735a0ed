"""The ONNX Runtime peer: a real Q/DQ graph by TensorRT's placement rules, close to FP32, made
from exactly the denoiser calls qdiff's own calibration observes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qdiff.api import export_model
from qdiff.calib.collect import collect_ranges
from qdiff.calib.trajectories import count_calibration_calls, iter_calibration_inputs
from qdiff.core.conditioning import resolve_conditioning
from qdiff.core.errors import ArtifactMismatchError, QuantizationError
from qdiff.export.onnx_export import example_inputs
from qdiff.core.metrics import relative_l2
from qdiff.models import load_model
from qdiff.peers import quantize_with_onnxruntime
from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser
from qdiff.runtime.calibration_loop import trajectory_sampler
from qdiff.runtime.schedulers import make_scheduler


@pytest.fixture(scope="module")
def peer(uncond_model_dir, tmp_path_factory, fast_recipe):
    out = tmp_path_factory.mktemp("peer")
    fp32 = export_model(uncond_model_dir, out).onnx_path
    return fp32, quantize_with_onnxruntime(uncond_model_dir, fp32, recipe=fast_recipe, method="minmax")


def test_peer_graph_runs_close_to_fp32_but_not_equal(peer, uncond_model_dir):
    fp32_path, result = peer
    unet = load_model(uncond_model_dir).unet
    fp32, int8 = OnnxRuntimeDenoiser(fp32_path), OnnxRuntimeDenoiser(result.onnx_path)
    for seed in (1, 2):
        inputs = example_inputs(unet, batch=2, seed=seed)
        ref = fp32(inputs["sample"], inputs["timestep"])
        err = relative_l2(int8(inputs["sample"], inputs["timestep"]), ref)
        assert 1e-4 < err < 0.1, err


def test_peer_quantizes_conv_weights_per_channel_and_activations_per_tensor(peer):
    _, result = peer
    model = onnx.load(str(result.onnx_path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    quantized = 0
    for conv in convs:
        act, weight = (producer.get(name) for name in conv.input[:2])
        if conv.name in ("/unet/conv_in/Conv", "/unet/conv_out/Conv"):  # the recipe keeps them in float
            assert weight is None and (act is None or act.op_type != "DequantizeLinear"), conv.name
            continue
        assert act.op_type == weight.op_type == "DequantizeLinear", conv.name
        scale, zero = init[weight.input[1]], init[weight.input[2]]
        axis = {a.name: a.i for a in weight.attribute}.get("axis", 1)
        assert axis == 0 and scale.shape == (init[weight.input[0]].shape[0],), conv.name  # one scale per output channel
        assert zero.dtype == np.int8 and not zero.any()  # symmetric INT8, as TensorRT needs
        assert init[act.input[1]].shape == () and init[act.input[2]].dtype == np.int8 and not init[act.input[2]].any()
        quantized += 1
    assert quantized == len(convs) - 2
    # Attention's activation x activation MatMuls stay float, as in qdiff (ORT's QDQ path would
    # quantize them: it ignores MatMulConstBOnly).
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    weighted = [n for n in matmuls if getattr(producer.get(n.input[1]), "op_type", None) == "DequantizeLinear" and producer[n.input[1]].input[0] in init]
    assert weighted and len(weighted) < len(matmuls)
    for n in matmuls:
        if n not in weighted:
            assert all(producer.get(x) is None or producer[x].op_type != "DequantizeLinear" for x in n.input), n.name
    coverage = result.report.to_json()
    assert coverage["weighted_layers"] - coverage["quantized_layers"] == 2 and 0.9 < coverage["mac_share"] < 1.0
    assert {f["module"] for f in coverage["float_layers"]} == {"conv_in", "conv_out"}
    # No output quantizers (TensorRT's rule): a Q/DQ pair after a Conv exists only because a
    # quantized layer reads that tensor. (ORT then also feeds the float readers of the tensor,
    # here the next block's GroupNorm and a skip Concat, from the DequantizeLinear.)
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for conv in convs:
        for q in (c for c in consumers.get(conv.output[0], []) if c.op_type == "QuantizeLinear"):
            (dq,) = consumers[q.output[0]]
            assert any(u.op_type in ("Conv", "Gemm", "MatMul") for u in consumers[dq.output[0]]), conv.name


def test_calibration_calls_are_the_ones_collect_ranges_observes(class_cond_model_dir, fast_recipe):
    """Same trajectories, kept steps, timesteps and tensors (CFG batch and conditioning included)."""
    bundle = load_model(class_cond_model_dir)
    # Two batches of trajectories, the second one short; 2 kept steps of a 4-step loop.
    recipe = fast_recipe.with_overrides(num_timesteps=2, calibration_steps=4, samples_per_timestep=3, batch_size=2)
    conditioning = resolve_conditioning(bundle, recipe.samples_per_timestep, seed=recipe.seed)
    shape = (bundle.in_channels, bundle.sample_size, bundle.sample_size)
    calls = []

    def spy(sample, timestep, **kwargs):
        calls.append((sample.clone(), float(timestep), {k: v.clone() for k, v in kwargs.items()}))
        return TorchDenoiser(bundle.unet)(sample, timestep, **kwargs)

    table = collect_ranges(
        bundle.unet, trajectory_sampler(spy, make_scheduler("ddim", bundle.scheduler_config), sample_shape=shape, conditioning=conditioning, scheduler_name="ddim"),
        recipe, model_sha256="x",
    )  # fmt: skip
    steps = table.provenance["step_indices"]
    per_batch = max(steps) + 1  # each trajectory batch stops after the last kept step
    seen = [call for k, call in enumerate(calls) if k % per_batch in steps]

    recorded = list(iter_calibration_inputs(
        trajectory_sampler(TorchDenoiser(bundle.unet), make_scheduler("ddim", bundle.scheduler_config), sample_shape=shape, conditioning=conditioning, scheduler_name="ddim"), recipe
    ))  # fmt: skip
    assert len(recorded) == len(seen) == count_calibration_calls(recipe) == 2 * len(steps)
    assert [r.timestep for r in recorded[: len(steps)]] == table.provenance["timesteps"]
    assert [r.step for r in recorded] == steps * 2 and [r.trajectory_start for r in recorded] == [0] * len(steps) + [2] * len(steps)
    for rec, (sample, t, kwargs) in zip(recorded, seen):
        assert rec.timestep == t and torch.equal(rec.sample, sample)
        assert rec.conditioning.keys() == kwargs.keys() == {"encoder_hidden_states"}
        assert torch.equal(rec.conditioning["encoder_hidden_states"], kwargs["encoder_hidden_states"])
        feeds = rec.graph_feeds()
        assert feeds["sample"].shape[0] == 2 * (2 if rec.trajectory_start == 0 else 1)  # [uncond; cond]
        assert feeds["timestep"].dtype == np.float32 and (feeds["timestep"] == t).all() and feeds["timestep"].shape == (feeds["sample"].shape[0],)


def test_reuse_and_errors(peer, uncond_model_dir, class_cond_model_dir, fast_recipe, monkeypatch):
    fp32_path, result = peer
    again = quantize_with_onnxruntime(uncond_model_dir, fp32_path, result.onnx_path, recipe=fast_recipe, method="minmax")
    assert again.reused and again.onnx_path == result.onnx_path
    with pytest.raises(QuantizationError, match="unknown ONNX Runtime calibration method"):
        quantize_with_onnxruntime(uncond_model_dir, fp32_path, recipe=fast_recipe, method="mse")
    with pytest.raises(QuantizationError, match="W8A8 only"):
        quantize_with_onnxruntime(uncond_model_dir, fp32_path, recipe="w4a8", method="minmax")
    with pytest.raises(ArtifactMismatchError, match="exported from model"):
        quantize_with_onnxruntime(class_cond_model_dir, fp32_path, recipe=fast_recipe, method="minmax")

    import onnxruntime.quantization

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", broken)
    with pytest.raises(QuantizationError, match=f"quantize_static failed on .*{fp32_path.name}: RuntimeError: boom"):
        quantize_with_onnxruntime(uncond_model_dir, fp32_path, recipe=fast_recipe, method="entropy")
    assert not fp32_path.with_name(f"{fp32_path.stem}.ort-entropy.onnx").exists()


def test_feeds_reader_follows_ort_ranges_and_names_missing_inputs(tmp_path):
    from qdiff.calib.trajectories import CalibrationInput
    from qdiff.peers.onnxruntime_static import CalibrationFeeds

    def calls(n, cond=True):
        for i in range(n):
            kwargs = {"encoder_hidden_states": torch.zeros(2, 3, 4)} if cond else {}
            yield CalibrationInput(0, i, 900.0 - i, torch.zeros(2, 4, 8, 8), torch.tensor(900 - i), kwargs)

    reader = CalibrationFeeds(calls(3), 3, ["sample", "timestep", "encoder_hidden_states"], tmp_path / "g.onnx")
    assert len(reader) == 3
    reader.set_range(0, 1)
    feed = reader.get_next()
    assert sorted(feed) == ["encoder_hidden_states", "sample", "timestep"] and feed["timestep"].tolist() == [900.0, 900.0]
    assert reader.get_next() is None  # end of ORT's stride
    with pytest.raises(QuantizationError, match="in order"):
        reader.set_range(2, 3)
    reader.set_range(1, 3)
    assert reader.get_next() is not None and reader.get_next() is not None and reader.get_next() is None
    unconditional = CalibrationFeeds(calls(1, cond=False), 1, ["sample", "timestep", "encoder_hidden_states"], tmp_path / "g.onnx")
    with pytest.raises(QuantizationError, match="g.onnx needs input.*encoder_hidden_states"):
        unconditional.get_next()
