"""QuEST on a tiny diffusers UNet: selective fine-tuning (lower eps error on held-out calibration
inputs, only the selected layers changed, weights on the grid, a Q/DQ graph equal to the
fake-quant reference, resumable per stage, refused for another model), the time-aware activation
quantizer (bucket assignment, K = 1 is the ordinary fake-quant model, K > 1 lowers each bucket's
activation error) and the simulated-only W4A4 preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdiff.api import calibrate, calibrate_time_aware, export_model, finetune, quantize_onnx
from qdiff.calib.fake_quant import FakeQuantLayer, build_fake_quant_model
from qdiff.calib.quant_math import fake_quantize, scale_from_amax
from qdiff.calib.quest.finetune import stage_layers
from qdiff.calib.quest.settings import FinetuneSettings
from qdiff.calib.quest.time_aware import TimeBuckets, build_time_aware_model, collect_bucket_tables, load_time_aware
from qdiff.calib.recipe import PRESETS, Recipe
from qdiff.calib.reconstruct.artifact import ReconstructedWeights
from qdiff.calib.table import CalibrationTable
from qdiff.core.errors import CalibrationError, RecipeError
from qdiff.models import load_model
from qdiff.runtime.backends import TorchDenoiser
from qdiff.runtime.calibration_loop import model_calibration_inputs, model_trajectory_sampler, unet_calls

# histogram_bins 512: the mse search costs bins^2, and the tiny model needs no finer histogram
RECIPE = Recipe(name="w4a8", weight_bits=4, weight_calibrator="mse", activation_calibrator="mse", split_shortcut=True, num_timesteps=4, samples_per_timestep=4, calibration_steps=8, batch_size=4, histogram_bins=512)
SETTINGS = FinetuneSettings(iterations=8, batch_size=4, lr=3e-4, seed=1)


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Training loops of many small ops: one thread is as fast on an idle 2-core machine and
    ~10x faster on a busy one (threads that wait for each other); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def calibrated(uncond_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quest")
    return out, calibrate(uncond_model_dir, out, RECIPE, timestep_stats=False)


@pytest.fixture(scope="module")
def finetuned(uncond_model_dir, calibrated):
    out, cal = calibrated
    return finetune(uncond_model_dir, out / "ft", cal.table_path, SETTINGS)


def _eps_error(unet, calls) -> float:
    err = ref = 0.0
    with torch.no_grad():
        for call, target in calls:
            out = unet(**call, return_dict=False)[0].double()
            err += float((out - target).pow(2).sum())
            ref += float(target.pow(2).sum())
    return err / ref


def _rtn_integers(unet, table: CalibrationTable, name: str) -> dict[str, np.ndarray]:
    """Round-to-nearest integers of a layer's weight(s) with the table's scales."""
    module = unet.get_submodule(name)
    ranges = table.layers[name]
    axis = 1 if isinstance(module, torch.nn.ConvTranspose2d) else 0
    w = module.weight.detach().numpy()
    parts = {"": (w, ranges.weight)} if ranges.split_channels is None else {"_a": (w[:, : ranges.split_channels], ranges.weight_a), "_b": (w[:, ranges.split_channels :], ranges.weight_b)}
    out = {}
    for role, (wp, amax) in parts.items():
        shape = [1] * wp.ndim
        shape[axis] = -1
        out[role] = np.clip(np.round(wp / scale_from_amax(amax, 7).reshape(shape)), -8, 7)
    return out


def test_settings_round_trip_defaults_and_refusals():
    s = FinetuneSettings()
    assert (s.lr, s.stages, s.stage_iterations()) == (1e-5, ("time-embedding", "attention"), (300, 300))
    again = FinetuneSettings.from_json(s.to_json())
    assert again.to_json() == s.to_json()
    assert FinetuneSettings(iterations=(5, 7)).stage_iterations() == (5, 7)
    with pytest.raises(RecipeError, match="stages"):
        FinetuneSettings(stages=("attention", "conv"))
    with pytest.raises(RecipeError, match="one per stage"):
        FinetuneSettings(iterations=(1, 2, 3))


def test_stages_select_time_embedding_then_attention_and_ff_but_not_cross_attention_kv():
    from tests.conftest import tiny_cond_unet

    names = [n for n, m in tiny_cond_unet("sd").named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    time_layers = stage_layers(names, "time-embedding")
    attn = stage_layers(names, "attention")
    assert "time_embedding.linear_1" in time_layers and "time_embedding.linear_2" in time_layers
    assert any(n.endswith("resnets.0.time_emb_proj") for n in time_layers) and all("time_emb" in n for n in time_layers)
    assert any(n.endswith("attn1.to_k") for n in attn) and any(n.endswith("attn2.to_q") for n in attn) and any(".ff.net." in n for n in attn)
    assert not any(n.endswith(("attn2.to_k", "attn2.to_v", "to_out.0")) for n in attn)


def test_finetune_lowers_held_out_eps_error_and_moves_only_selected_layers_on_the_grid(finetuned, calibrated, uncond_model_dir):
    _, cal = calibrated
    bundle = load_model(uncond_model_dir)
    held_out = RECIPE.with_overrides(seed=11)  # other trajectories than the ones trained on
    calls = [(c, bundle.unet(**c, return_dict=False)[0].detach().double()) for c in unet_calls(model_calibration_inputs(bundle, held_out, TorchDenoiser(bundle.unet), conditioning=None))]
    weights = ReconstructedWeights.load(finetuned.weights_path)
    table = CalibrationTable.load(finetuned.table_path)
    assert weights.method == "rtn-ft" and table.to_json()["layers"] == cal.table.to_json()["layers"]  # scales untouched
    start = _eps_error(build_fake_quant_model(bundle.unet, cal.table), calls)
    tuned = _eps_error(build_fake_quant_model(bundle.unet, table, weights=weights), calls)
    assert tuned < start, (tuned, start)
    assert [s["name"] for s in finetuned.stages] == ["time-embedding", "attention"]
    assert all(s["error_after"] < s["error_before"] for s in finetuned.stages), finetuned.stages
    selected = set(stage_layers(list(table.layers), "time-embedding")) | set(stage_layers(list(table.layers), "attention"))
    assert set(weights.layers) == set(table.layers) and selected
    moved = set()
    for name, lw in weights.layers.items():
        rtn = _rtn_integers(bundle.unet, table, name)
        for role, (q, s) in lw.parts.items():
            assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7, name
            if not np.array_equal(q, rtn[role]):
                moved.add(name)
    assert moved and moved <= selected, sorted(moved - selected)
    assert sum(s["integers_changed"] for s in finetuned.stages) > 0


def test_qdq_graph_from_finetune_equals_fake_quant_reference_layer_by_layer(finetuned, calibrated, uncond_model_dir):
    from tests.conftest import layerwise_fake_quant_errors

    out, _ = calibrated
    exported = export_model(uncond_model_dir, out)
    q = quantize_onnx(exported.onnx_path, finetuned.table_path, reconstruction=finetuned.weights_path)
    assert q.onnx_path.name == "denoiser.w4a8-rtn-ft.onnx"
    layers = layerwise_fake_quant_errors(load_model(uncond_model_dir), CalibrationTable.load(finetuned.table_path), q.onnx_path, weights=ReconstructedWeights.load(finetuned.weights_path))
    assert len(layers) == q.coverage["quantized_layers"] and max(layers.values()) < 1e-5


@pytest.mark.slow  # a second fine-tune run / two bucket calibrations: ~30 s on 2 cores
def test_killed_finetune_restarts_at_its_stage_and_matches_an_uninterrupted_run(finetuned, calibrated, uncond_model_dir, tmp_path):
    _, cal = calibrated

    def interrupt(index, _result):
        if index == 0:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        finetune(uncond_model_dir, tmp_path, cal.table_path, SETTINGS, on_stage_done=interrupt)
    assert len(list((tmp_path / ".qdiff-finetune-cache").glob("*/stage-*.safetensors"))) == 1
    resumed = finetune(uncond_model_dir, tmp_path, cal.table_path, SETTINGS)
    assert [s["resumed"] for s in resumed.stages] == [True, False]
    a, b = ReconstructedWeights.load(finetuned.weights_path), ReconstructedWeights.load(resumed.weights_path)
    for name, lw in a.layers.items():
        for role, (q, _) in lw.parts.items():
            assert np.array_equal(q, b.layers[name].parts[role][0]), name
    assert finetune(uncond_model_dir, tmp_path, cal.table_path, SETTINGS).reused


def test_finetune_device_says_where_not_what_and_a_missing_gpu_is_refused_before_the_calls(finetuned, calibrated, uncond_model_dir, tmp_path, monkeypatch):
    """Reuse comes before the device check (a result made on the CPU is reused when cuda is asked
    for); new work on a device this machine lacks is the clear BackendUnavailableError before the
    calibration calls are collected."""
    import qdiff.runtime.calibration_loop as loop
    from qdiff.core.errors import BackendUnavailableError

    out, cal = calibrated
    on_cuda = SETTINGS.with_overrides(device="cuda")
    assert finetune(uncond_model_dir, out / "ft", cal.table_path, on_cuda).reused
    if torch.cuda.is_available():
        return
    monkeypatch.setattr(loop, "model_calibration_inputs", lambda *a, **k: pytest.fail("the calls were collected before the device was checked"))
    with pytest.raises(BackendUnavailableError, match="fine-tuning was asked to run on 'cuda', but this PyTorch sees no CUDA GPU"):
        finetune(uncond_model_dir, tmp_path, cal.table_path, on_cuda)


def test_finetune_for_another_models_table_is_refused(calibrated, class_cond_model_dir, tmp_path):
    with pytest.raises(CalibrationError, match="calibration table was made for model"):
        finetune(class_cond_model_dir, tmp_path, calibrated[1].table_path, SETTINGS)


# ----------------------------------------------------------------------------- time-aware


def test_buckets_hold_equal_counts_in_trajectory_order_and_assign_timesteps_between_them():
    steps, ts = [0, 11, 22, 33, 44, 55, 66, 77, 88, 99], [990.0, 880.0, 770.0, 660.0, 550.0, 440.0, 330.0, 220.0, 110.0, 0.0]
    b4 = TimeBuckets.split(steps[::-1], ts[::-1], 4)  # any input order: trajectory order comes out
    assert [len(g) for g in b4.step_indices] == [3, 3, 2, 2] and b4.step_indices[0] == (0, 11, 22)
    assert b4.boundaries == (715.0, 385.0, 165.0)
    assert b4.bucket_of(torch.tensor([999, 716, 715, 714, 384, 0])).tolist() == [0, 0, 0, 1, 2, 3]  # a tie goes to the earlier bucket
    assert b4.bucket_of(880.0).tolist() == [0] and b4.bucket_of_step(44) == 1 and b4.bucket_of_step(45) is None
    b10 = TimeBuckets.split(steps, ts, 10)
    assert [b10.bucket_of(t).item() for t in ts] == list(range(10))  # QuEST's one per calibration timestep
    assert TimeBuckets.split(steps, ts, 1).bucket_of(torch.arange(1000)).max() == 0
    with pytest.raises(CalibrationError, match="11 time buckets"):
        TimeBuckets.split(steps, ts, 11)
    assert TimeBuckets.from_json(b4.to_json()) == b4


def test_one_bucket_is_the_ordinary_fake_quant_model_and_its_collection_is_the_table(calibrated, uncond_model_dir):
    out, cal = calibrated
    bundle = load_model(uncond_model_dir)
    one = calibrate_time_aware(uncond_model_dir, out, cal.table_path, 1)
    tables, buckets = load_time_aware(one.index_path)
    model = build_time_aware_model(bundle.unet, tables, buckets)
    plain = build_fake_quant_model(bundle.unet, cal.table)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (999, 400, 3):
            assert torch.equal(model(x, torch.tensor(t), return_dict=False)[0], plain(x, torch.tensor(t), return_dict=False)[0])
    sampler = model_trajectory_sampler(bundle, RECIPE, TorchDenoiser(bundle.unet), conditioning=None)
    collected = collect_bucket_tables(bundle.unet, sampler, cal.table, TimeBuckets.of_table(cal.table, 1))[0]
    assert collected.to_json()["layers"] == cal.table.to_json()["layers"]  # the same data, the same calibrator


def _activation_sse(unet, records, tables, buckets) -> np.ndarray:
    """[bucket] summed squared error of every quantized layer's float input under its bucket's
    activation quantizer (split layers per branch), on the calibration inputs."""
    sse = np.zeros(buckets.k)
    state = {}
    handles = []
    for name in tables[0].layers:

        def hook(_m, args, name=name):
            x, r = args[0].detach(), tables[state["b"]].layers[name]
            pieces = [(x, r.input)] if r.split_channels is None else [(x[:, : r.split_channels], r.shortcut_a), (x[:, r.split_channels :], r.shortcut_b)]
            for xp, amax in pieces:
                sse[state["b"]] += float((fake_quantize(xp, torch.tensor(float(scale_from_amax(amax, 127)))) - xp).double().pow(2).sum())

        handles.append(unet.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for rec, call in zip(records, unet_calls(records)):
                state["b"] = buckets.bucket_of_step(rec.step)
                unet(**call, return_dict=False)
    finally:
        for h in handles:
            h.remove()
    return sse


@pytest.mark.slow  # a second fine-tune run / two bucket calibrations: ~30 s on 2 cores
def test_more_buckets_lower_each_buckets_activation_error(calibrated, uncond_model_dir):
    out, cal = calibrated
    bundle = load_model(uncond_model_dir)
    records = list(model_calibration_inputs(bundle, RECIPE, TorchDenoiser(bundle.unet), conditioning=None))
    for k in (2, 4):
        result = calibrate_time_aware(uncond_model_dir, out, cal.table_path, k)
        tables, buckets = load_time_aware(result.index_path)
        assert [t.provenance["time_aware"]["bucket"] for t in tables] == list(range(k))
        assert any(t.layers[n].input != cal.table.layers[n].input for t in tables for n in t.layers)
        assert all(t.layers[n].weight == cal.table.layers[n].weight for t in tables for n in t.layers)
        per_bucket = _activation_sse(bundle.unet, records, tables, buckets)
        single = _activation_sse(bundle.unet, records, [cal.table] * k, buckets)
        assert per_bucket.sum() < single.sum() and np.all(per_bucket <= single * 1.001), (per_bucket, single)
        assert calibrate_time_aware(uncond_model_dir, out, cal.table_path, k).reused
    # a call whose batch mixes buckets is refused, one bucket per call
    model = build_time_aware_model(bundle.unet, tables, buckets)
    with pytest.raises(CalibrationError, match="mixes timesteps"):
        model(torch.zeros(2, 3, 16, 16), torch.tensor([999.0, 0.0]))


# ----------------------------------------------------------------------------- W4A4 (simulated)


def test_w4a4_is_simulated_in_fake_quant_and_refused_by_quantize(calibrated, uncond_model_dir, tmp_path):
    recipe = PRESETS["w4a4"]
    assert (recipe.weight_qmax, recipe.activation_qmax) == (7, 7) and recipe.simulated_only == "simulated: TensorRT has no INT4 activations"
    assert PRESETS["w8a8"].simulated_only is None and PRESETS["w4a8"].simulated_only is None
    obj = calibrated[1].table.to_json()
    obj["recipe"] = recipe.with_overrides(num_timesteps=4, samples_per_timestep=4, calibration_steps=8, batch_size=4).to_json()
    table = CalibrationTable.from_json(obj)
    path = tmp_path / "w4a4.json"
    table.save(path)
    with pytest.raises(RecipeError, match="simulated: TensorRT has no INT4 activations"):
        quantize_onnx(tmp_path / "never-read.onnx", path)
    bundle = load_model(uncond_model_dir)
    model = build_fake_quant_model(bundle.unet, table)
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLayer) and type(m.layer) is torch.nn.Conv2d)
    s = layer.input_scale
    x = torch.randn(1, layer.layer.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)) * 14 * s  # reaches past 7 steps
    with torch.no_grad():
        out = layer(x)
    a4 = torch.clamp(torch.round(x / s), -8, 7)
    assert set(torch.unique(a4).tolist()) == set(range(-8, 8)) and not torch.equal(a4, torch.round(x / s)), name  # the A4 grid, clamped
    expected = layer.layer._conv_forward(a4 * s, layer.quantized_weight(), layer.layer.bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_time_aware_calibration_refuses_a_missing_device_before_any_work(uncond_model_dir, tmp_path, fast_recipe):
    """As calibrate: a device this machine lacks is refused with the device named, before the
    tables are touched; device="cpu" is the default's result, reused as such."""
    from qdiff.core.errors import BackendUnavailableError

    cal = calibrate(uncond_model_dir, tmp_path, fast_recipe)
    first = calibrate_time_aware(uncond_model_dir, tmp_path, cal.table_path, 2)
    before = {p.name: p.read_bytes() for p in first.index_path.parent.iterdir()}
    with pytest.raises(BackendUnavailableError) as info:
        calibrate_time_aware(uncond_model_dir, tmp_path, cal.table_path, 2, device="cuda", force=True)
    assert "time-aware calibration was asked to run on 'cuda'" in info.value.message and "cpu" in info.value.hint
    assert {p.name: p.read_bytes() for p in first.index_path.parent.iterdir()} == before
    assert calibrate_time_aware(uncond_model_dir, tmp_path, cal.table_path, 2, device="cpu").reused
