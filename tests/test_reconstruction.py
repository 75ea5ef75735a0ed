"""Weight reconstruction (calib.reconstruct) on a tiny diffusers UNet: it beats round-to-nearest
unit by unit, its integers stay on the grid, the Q/DQ graph built from them equals the fake-quant
reference with the same weights under ONNX Runtime, it resumes after a kill at the unit it was
in, it is deterministic for a seed, and it is refused for another model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qdiff.api import calibrate, export_model, quantize_onnx, reconstruct
from qdiff.calib.fake_quant import build_fake_quant_model
from qdiff.calib.recipe import Recipe
from qdiff.calib.reconstruct.adaround import beta_at, hard_rounding, init_rounding_variable, rectified_sigmoid
from qdiff.calib.reconstruct.artifact import ReconstructedWeights
from qdiff.calib.reconstruct.settings import ReconstructionSettings
from qdiff.calib.table import CalibrationTable
from qdiff.core.errors import CalibrationError, QuantizationError, RecipeError
from qdiff.export.onnx_export import example_inputs
from qdiff.export.validate import error_stats
from qdiff.models import load_model
from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser
from tests.conftest import layerwise_fake_quant_errors

RECIPE = Recipe(name="w4a8", weight_bits=4, weight_calibrator="mse", split_shortcut=True, num_timesteps=4, samples_per_timestep=4, calibration_steps=8, batch_size=4)
SETTINGS = ReconstructionSettings(method="adaround-brecq", iterations=60, batch_size=4, device="cpu", seed=3)


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def calibrated(uncond_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("recon")
    exported = export_model(uncond_model_dir, out)
    table = calibrate(uncond_model_dir, out, RECIPE, timestep_stats=False)
    return out, exported.onnx_path, table.table_path


@pytest.fixture(scope="module")
def reconstructed(uncond_model_dir, calibrated):
    out, _, table_path = calibrated
    return reconstruct(uncond_model_dir, out / "adaround", table_path, SETTINGS)


def test_soft_rounding_starts_at_the_float_weight_and_hard_rounding_is_nearest_at_init():
    w_over_s = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    v = init_rounding_variable(w_over_s)
    assert torch.allclose(torch.floor(w_over_s) + rectified_sigmoid(v), w_over_s, atol=1e-5)
    frac = w_over_s - torch.floor(w_over_s)
    away = (frac - 0.5).abs() > 1e-4
    assert torch.equal((torch.floor(w_over_s) + hard_rounding(v))[away], torch.round(w_over_s)[away])
    assert beta_at(10, 100, 0.2, 20, 2) is None and beta_at(20, 100, 0.2, 20, 2) == 20 and beta_at(100, 100, 0.2, 20, 2) == pytest.approx(2)


def test_settings_round_trip_and_resolve_paper_defaults():
    s = ReconstructionSettings(method="fbr")
    assert ReconstructionSettings.from_json(s.to_json()) == s
    r = s.resolved()
    assert (r.iterations, r.qdrop_p, r.learn_activation_steps, r.layer_loss_weight) == (5000, 0.5, True, 0.8)
    a = ReconstructionSettings().resolved()
    assert (a.iterations, a.batch_size, a.weight_lr, a.round_weight, a.qdrop_p, a.learn_activation_steps) == (20000, 32, 1e-3, 0.01, 0.0, False)
    with pytest.raises(RecipeError, match="method"):
        ReconstructionSettings(method="brecq")


def test_every_unit_beats_round_to_nearest(reconstructed):
    units = reconstructed.units
    kinds = {u["kind"] for u in units}
    assert {"ResnetBlock2D", "Attention", "layer"} <= kinds
    for u in units:
        assert u["error"] < u["rtn_error"], u


def test_weights_stay_on_the_grid_and_differ_from_round_to_nearest(reconstructed, calibrated):
    weights = ReconstructedWeights.load(reconstructed.weights_path)
    table = CalibrationTable.load(calibrated[2])
    assert set(weights.layers) == set(table.layers)
    changed = 0
    for name, lw in weights.layers.items():
        for role, (q, s) in lw.parts.items():
            assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7, name
            assert np.all(s > 0)
        assert lw.split == (table.layers[name].split_channels is not None)
    unet = load_model(_model_dir(reconstructed)).unet
    for name, lw in weights.layers.items():
        w = unet.get_submodule(name).weight.detach().numpy()
        axis = 1 if isinstance(unet.get_submodule(name), torch.nn.ConvTranspose2d) else 0
        if lw.split:
            c = table.layers[name].split_channels
            pieces = [(w[:, :c], lw.parts["_a"]), (w[:, c:], lw.parts["_b"])]
        else:
            pieces = [(w, lw.parts[""])]
        for wp, (q, s) in pieces:
            shape = [1] * wp.ndim
            shape[axis] = -1
            rtn = np.clip(np.round(wp / s.reshape(shape)), -8, 7)
            assert np.abs(q - rtn).max() <= 1, name  # AdaRound only chooses floor or ceil
            changed += int((q != rtn).sum())
    assert changed > 0


def _model_dir(result):
    return CalibrationTable.load(result.table_path).provenance["model_path"]


def test_qdq_graph_from_reconstruction_equals_fake_quant_reference(reconstructed, calibrated):
    """Same integers, same scales: every quantized layer of the graph, cut out and fed the tensor
    its fake-quant twin sees, agrees at round-off (on any CPU; conftest.layerwise_fake_quant_errors
    says why whole-model equality depends on the CPU's float kernels: a ~1e-7 difference before an
    activation quantizer now and then flips an INT8 step, which a tiny W4 model amplifies). Whole
    model: the graph stays closer to its own reference than that reference is to the
    round-to-nearest twin on every input."""
    _, onnx_path, _ = calibrated
    q = quantize_onnx(onnx_path, reconstructed.table_path, reconstruction=reconstructed.weights_path)
    assert q.onnx_path.name == "denoiser.w4a8-adaround-brecq.onnx"
    bundle = load_model(_model_dir(reconstructed))
    table = CalibrationTable.load(reconstructed.table_path)
    weights = ReconstructedWeights.load(reconstructed.weights_path)
    layers = layerwise_fake_quant_errors(bundle, table, q.onnx_path, weights=weights)
    assert len(layers) == q.report.to_json()["quantized_layers"]
    worst = max(layers, key=layers.get)
    assert layers[worst] < 1e-5, (worst, layers[worst])
    rtn_layers = layerwise_fake_quant_errors(bundle, table, q.onnx_path)  # the RTN reference against the same graph
    assert max(rtn_layers.values()) > 1e-3  # reconstruction changed integers: the check has teeth
    reference = TorchDenoiser(build_fake_quant_model(bundle.unet, table, weights=weights))
    rtn = TorchDenoiser(build_fake_quant_model(bundle.unet, table))
    session = OnnxRuntimeDenoiser(q.onnx_path, optimize=False)
    for seed in range(1, 5):
        inputs = example_inputs(bundle.unet, batch=2, seed=seed)
        sample, t = inputs.pop("sample"), inputs.pop("timestep")
        ref = reference(sample, t)
        got, other = error_stats(session(sample, t), ref), error_stats(rtn(sample, t), ref)
        assert got.rel_l2 < other.rel_l2, (str(got), str(other))  # closer to its own weights than to RTN's
    # every weight initializer that feeds a weight QuantizeLinear sits on the W4 grid
    model = onnx.load(str(q.onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and "weight_quantizer" in node.name and node.input[0] in inits:
            w, s = inits[node.input[0]], inits[node.input[1]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * w.ndim
            shape[axis] = -1
            k = w / s.reshape(shape)
            assert np.allclose(k, np.round(k), atol=1e-4) and np.round(k).min() >= -8 and np.round(k).max() <= 7, node.name
            assert not np.any(inits[node.input[2]]), node.name  # zero point 0
            checked += 1
    assert checked == len(weights.layers) + sum(lw.split for lw in weights.layers.values())


def test_reconstruction_for_another_model_is_refused(reconstructed, calibrated, tmp_path, class_cond_model_dir):
    weights = ReconstructedWeights.load(reconstructed.weights_path)
    weights.model_sha256 = "0" * 64
    other = tmp_path / "other.safetensors"
    weights.save(other)
    with pytest.raises(CalibrationError, match="reconstructed for model 000000000000"):
        quantize_onnx(calibrated[1], reconstructed.table_path, tmp_path / "x.onnx", reconstruction=other)
    with pytest.raises(CalibrationError, match="calibration table was made for model"):
        reconstruct(class_cond_model_dir, tmp_path, calibrated[2], SETTINGS)


def test_killed_run_resumes_at_its_unit_and_matches_an_uninterrupted_run(uncond_model_dir, calibrated, reconstructed, tmp_path):
    """Same seed, interrupted after unit 2 and rerun: units 0-2 come from checkpoints, and the
    integers and table are bit-identical to the uninterrupted run (determinism on the CPU)."""
    table_path = calibrated[2]

    def interrupt(index, _result):
        if index == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        reconstruct(uncond_model_dir, tmp_path, table_path, SETTINGS, on_unit_done=interrupt)
    cache = list((tmp_path / ".qdiff-reconstruct-cache").glob("*/unit-*.safetensors"))
    assert len(cache) == 3
    resumed = reconstruct(uncond_model_dir, tmp_path, table_path, SETTINGS)
    assert [u["resumed"] for u in resumed.units[:3]] == [True] * 3 and not any(u["resumed"] for u in resumed.units[3:])
    a, b = ReconstructedWeights.load(reconstructed.weights_path), ReconstructedWeights.load(resumed.weights_path)
    for name in a.layers:
        for role in a.layers[name].parts:
            assert np.array_equal(a.layers[name].parts[role][0], b.layers[name].parts[role][0]), name
    assert [u["error"] for u in resumed.units] == [u["error"] for u in reconstructed.units]
    assert not (tmp_path / ".qdiff-reconstruct-cache").joinpath(cache[0].parent.name).exists()  # removed once published
    again = reconstruct(uncond_model_dir, tmp_path, table_path, SETTINGS)
    assert again.reused


def test_learned_activation_steps_stay_positive_and_change_the_table(uncond_model_dir, calibrated, tmp_path):
    settings = ReconstructionSettings(method="fbr", iterations=30, batch_size=4, device="cpu", learn_activation_steps=True, activation_lr=1e-2)
    result = reconstruct(uncond_model_dir, tmp_path, calibrated[2], settings)
    before, after = CalibrationTable.load(calibrated[2]), CalibrationTable.load(result.table_path)
    changed = 0
    for name, r in after.layers.items():
        for role in ("input", "shortcut_a", "shortcut_b"):
            value = getattr(r, role)
            if value is None:
                continue
            assert value > 0, (name, role)
            changed += value != getattr(before.layers[name], role)
        assert r.weight == before.layers[name].weight  # weight ranges (and so scales) unchanged
    assert changed > len(after.layers) // 2
    assert after.provenance["reconstruction"]["learned_activation_steps"] is True
    q = quantize_onnx(calibrated[1], result.table_path, tmp_path / "fbr.onnx", reconstruction=result.weights_path)
    with pytest.raises(QuantizationError, match="scales"):  # the integers belong to their own table's weight scales
        from qdiff.export.qdq import insert_qdq

        bad = CalibrationTable.load(calibrated[2])
        first = next(iter(bad.layers.values()))
        first.weight = [w * 2 for w in first.weight]
        insert_qdq(onnx.load(str(calibrated[1])), bad, weights=ReconstructedWeights.load(result.weights_path))
    assert q.onnx_path.is_file()


def test_cross_attention_model_reconstructs_transformer_blocks_with_fbr(class_cond_model_dir, tmp_path):
    """The SD-style path: BasicTransformerBlock units (attn1 + attn2 + FF) on a class-conditional
    model, with FBR's loss (QDrop, per-layer terms, learned steps); every unit beats RTN and the
    graph from the artifact equals the fake-quant reference with the same weights, layer by layer."""
    from tests.conftest import layerwise_fake_quant_errors

    exported = export_model(class_cond_model_dir, tmp_path)
    table = calibrate(class_cond_model_dir, tmp_path, RECIPE, timestep_stats=False)
    settings = ReconstructionSettings(method="fbr", iterations=40, batch_size=4, device="cpu", seed=1)
    rec = reconstruct(class_cond_model_dir, tmp_path / "fbr", table.table_path, settings)
    kinds = {u["kind"] for u in rec.units}
    assert "BasicTransformerBlock" in kinds, kinds
    worse = [u for u in rec.units if not u["error"] < u["rtn_error"]]
    assert len(worse) <= len(rec.units) // 10, worse  # FBR trains without the rounding regulariser
    q = quantize_onnx(exported.onnx_path, rec.table_path, reconstruction=rec.weights_path)
    bundle = load_model(class_cond_model_dir)
    layers = layerwise_fake_quant_errors(bundle, CalibrationTable.load(rec.table_path), q.onnx_path, weights=ReconstructedWeights.load(rec.weights_path))
    assert len(layers) == q.report.to_json()["quantized_layers"] and max(layers.values()) < 1e-5


def test_the_device_says_where_not_what_so_another_device_reuses_the_result(uncond_model_dir, calibrated, reconstructed):
    """A reconstruction made on one device is reused when asked for on another: reuse happens
    before any work, so asking for cuda here (no GPU) must not touch the device at all."""
    out, _, table_path = calibrated
    again = reconstruct(uncond_model_dir, out / "adaround", table_path, ReconstructionSettings(**{**SETTINGS.to_json(), "device": "cuda"}))
    assert again.reused and again.weights_path == reconstructed.weights_path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_device_this_machine_lacks_is_refused_before_the_calls_are_collected(uncond_model_dir, calibrated, reconstructed, monkeypatch):
    """Where the work would start (no artifact to reuse, here forced), cuda without a GPU is the
    clear BackendUnavailableError, not torch's AssertionError from inside the calls' model copy;
    the finished artifact stays as it was."""
    import qdiff.runtime.calibration_loop as loop
    from qdiff.core.errors import BackendUnavailableError

    out, _, table_path = calibrated
    before = reconstructed.weights_path.read_bytes()
    monkeypatch.setattr(loop, "model_calibration_inputs", lambda *a, **k: pytest.fail("the calls were collected before the device was checked"))
    with pytest.raises(BackendUnavailableError, match="reconstruction was asked to run on 'cuda', but this PyTorch sees no CUDA GPU"):
        reconstruct(uncond_model_dir, out / "adaround", table_path, ReconstructionSettings(**{**SETTINGS.to_json(), "device": "cuda"}), force=True)
    assert reconstructed.weights_path.read_bytes() == before


def test_fake_quant_reference_names_a_reconstructed_weight_it_lacks(uncond_model_dir, calibrated, reconstructed):
    weights = ReconstructedWeights.load(reconstructed.weights_path)
    table = CalibrationTable.load(reconstructed.table_path)
    name = next(n for n, r in table.layers.items() if r.split_channels is None and n in weights.layers)
    weights.layers[name].parts.pop("")
    with pytest.raises(CalibrationError, match=f"{name.replace('.', '[.]')}.*no weight"):
        build_fake_quant_model(load_model(uncond_model_dir).unet, table, weights=weights)


def test_rounding_state_lives_only_while_its_unit_is_reconstructed(uncond_model_dir, calibrated, tmp_path, monkeypatch):
    """AdaRound's floor and V (two FP32 copies of a layer's weight) exist only for the unit being
    reconstructed, and the integers are int8: kept for every layer at once they were ~4x the
    model's weights (SD 1.5 ran out of a 24 GB host). Counted over a real (short) run."""
    from qdiff.calib.reconstruct.qlayer import QuantPart

    live: set[int] = set()
    peak, parts_seen, fixed_dtypes = [0], set(), set()
    begin, fix = QuantPart.begin_rounding, QuantPart.fix_rounding

    def counted_begin(self):
        live.add(id(self))
        parts_seen.add(id(self))
        peak[0] = max(peak[0], len(live))
        return begin(self)

    def counted_fix(self):
        fix(self)
        assert self.floor is None and self.v is None
        fixed_dtypes.add(self.fixed.dtype)
        live.discard(id(self))

    monkeypatch.setattr(QuantPart, "begin_rounding", counted_begin)
    monkeypatch.setattr(QuantPart, "fix_rounding", counted_fix)
    _, _, table_path = calibrated
    reconstruct(uncond_model_dir, tmp_path / "r", table_path, ReconstructionSettings(method="adaround-brecq", iterations=2, batch_size=4, device="cpu", seed=3))
    assert len(parts_seen) > 4 and not live
    assert 0 < peak[0] < len(parts_seen) / 2  # one unit's parts at a time, never the model's
    assert fixed_dtypes == {torch.int8}


def test_paused_forwards_capture_what_a_prefix_pass_captures(uncond_model_dir, calibrated):
    """`UnitCursor` (one forward per call, paused at each unit) hands out the very tensors a
    fresh prefix pass per unit (`capture`) does, also after an earlier unit's integers changed,
    for calls kept paused and calls re-run, and for a unit asked for out of order."""
    from qdiff.calib.reconstruct.capture import UnitCursor, capture
    from qdiff.calib.reconstruct.engine import Reconstructor
    from qdiff.runtime.calibration_loop import model_calibration_inputs, unet_calls

    bundle = load_model(uncond_model_dir)
    table = CalibrationTable.load(calibrated[2])
    recipe = Recipe.from_json(table.recipe)
    calls = unet_calls(model_calibration_inputs(bundle, recipe, TorchDenoiser(bundle.unet), conditioning=None))[:3]
    engine = Reconstructor(bundle.unet, table, SETTINGS, calls)
    units = engine.units()
    names = [u.name for u in units]
    q, fp = engine.q_model, engine.fp_model

    def same(a, b):
        (ca, ta), (cb, tb) = a, b
        assert ca.size == cb.size and ca.batched == cb.batched and ca.spec == cb.spec
        for x, y in zip(ca.leaves, cb.leaves):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        assert (ta is None and tb is None) or torch.equal(ta, tb)

    with UnitCursor(q, names, calls, "cpu", keep=2) as q_cursor, UnitCursor(fp, names, calls, "cpu", output=True) as fp_cursor:
        for unit in units:
            same(q_cursor.capture(unit.name), capture(q, unit.name, calls, "cpu"))
            same(fp_cursor.capture(unit.name), capture(fp, unit.name, calls, "cpu", output=True))
            for name in unit.layers:  # move this unit's integers: every later unit's inputs change
                layer = q.get_submodule(name)
                for part in layer.parts:
                    part.fixed.copy_(torch.clamp(part.fixed.to(torch.int16) + 1, -8, 7).to(torch.int8))
                layer.weight_mode = "fixed"
        early = names[1]
        same(q_cursor.capture(early), capture(q, early, calls, "cpu"))  # passed already: the forwards restart


def test_calls_are_collected_where_the_reconstruction_runs(uncond_model_dir):
    """On the CPU the calls come from the model's own UNet (calibration's inputs bit for bit);
    for a GPU reconstruction from a copy on the GPU, the caller's model left on the CPU."""
    from qdiff.api import _calls_denoiser

    bundle = load_model(uncond_model_dir)
    assert _calls_denoiser(bundle.unet, "cpu").unet is bundle.unet
    if not torch.cuda.is_available():
        return
    denoiser = _calls_denoiser(bundle.unet, "cuda")
    assert next(denoiser.unet.parameters()).is_cuda and next(bundle.unet.parameters()).device.type == "cpu"
    sample = torch.randn(2, 3, 16, 16)
    assert denoiser(sample, torch.tensor(500.0)).device.type == "cpu"
