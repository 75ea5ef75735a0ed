"""Calibration: timestep-uniform sampling of the trajectory, the calibrators, the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pytorch_quantization import calib as pq_calib
from pytorch_quantization.calib import histogram as pq_histogram

from qdiff.api import calibrate
from qdiff.calib.collect import calibration_step_indices
from qdiff.calib.observers import ActivationObserver, entropy_amax_from_histogram, mse_amax_from_histogram
from qdiff.calib.recipe import Recipe, load_recipe
from qdiff.calib.table import CalibrationTable
from qdiff.core.errors import CalibrationError, ConditioningError, RecipeError
from qdiff.models import load_model


def test_step_indices_are_uniform_over_the_whole_trajectory():
    assert calibration_step_indices(100, 20) == [round(i * 99 / 19) for i in range(20)]
    first_third = calibration_step_indices(100, 10, (0.0, 1 / 3))
    assert first_third[0] == 0 and first_third[-1] == 33
    last = calibration_step_indices(50, 5, (0.8, 1.0))
    assert last[0] == 39 and last[-1] == 49
    with pytest.raises(CalibrationError, match="distinct steps"):
        calibration_step_indices(10, 8, (0.0, 0.3))


def test_cpu_mse_search_is_pytorch_quantizations_search(monkeypatch):
    """Same histogram, same answer as pytorch-quantization's own (CUDA-only) MSE search."""
    torch.manual_seed(0)
    calibrator = pq_calib.HistogramCalibrator(8, None, False, num_bins=512, torch_hist=True)
    calibrator.collect(torch.randn(20000) * torch.rand(20000) ** 3 * 4)
    ours = mse_amax_from_histogram(calibrator._calib_hist, calibrator._calib_bin_edges, 8)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    theirs = float(pq_histogram._compute_amax_mse(calibrator._calib_hist.numpy(), calibrator._calib_bin_edges.numpy(), 8, False))
    assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_vectorized_entropy_search_is_pytorch_quantizations_search(scale):
    """Bit for bit pytorch-quantization's KL search (its Python loops took 5-20 min per model)."""
    gen = torch.Generator().manual_seed(1)
    calibrator = pq_calib.HistogramCalibrator(8, None, False, num_bins=400, torch_hist=True)
    for _ in range(2):
        calibrator.collect(torch.cat([torch.randn(5000, generator=gen), scale * torch.randn(100, generator=gen)]))
    hist, edges = calibrator._calib_hist.int().numpy(), calibrator._calib_bin_edges.numpy()
    theirs = float(calibrator.compute_amax("entropy"))
    assert entropy_amax_from_histogram(hist, edges, 8) == theirs
    assert entropy_amax_from_histogram(hist, edges, 8, stride=3) == float(pq_histogram._compute_amax_entropy(hist.copy(), edges, 8, False, stride=3))


@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy"])
def test_every_calibrator_gives_a_range_within_the_data(method):
    recipe = Recipe(activation_calibrator=method, percentile=99.0, num_timesteps=1, calibration_steps=1)
    observer = ActivationObserver(recipe)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4096, generator=gen) * (1 + i) for i in range(3)]
    data[0][0] = 40.0  # one outlier
    for x in data:
        observer.collect(x)
    amax = observer.amax()
    assert 0 < amax <= 40.0
    if method == "max":
        assert amax == pytest.approx(40.0)
    else:
        assert amax < 40.0  # the histogram methods clip the lone outlier


def test_recipe_json_round_trip_and_validation(tmp_path):
    recipe = load_recipe("w4a8", num_timesteps=5)
    assert recipe.weight_qmax == 7 and recipe.num_timesteps == 5
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe.to_json()))
    assert load_recipe(path) == recipe
    with pytest.raises(RecipeError, match="activation_calibrator"):
        Recipe(activation_calibrator="minmax")
    with pytest.raises(RecipeError, match="unknown recipe setting"):
        recipe.with_overrides(bits=3)
    with pytest.raises(RecipeError, match="neither a preset nor a file"):
        load_recipe("w2a2")


def test_calibrate_uncond_model(uncond_model_dir, tmp_path, fast_recipe):
    result = calibrate(uncond_model_dir, tmp_path, fast_recipe)
    table = result.table
    prov = table.provenance
    assert prov["step_indices"] == [0, 2, 5, 7] and len(prov["timesteps"]) == 4
    assert prov["timesteps"] == sorted(prov["timesteps"], reverse=True)  # noisy to clean
    assert prov["denoiser_inputs"] == 16 and prov["conditioning"].startswith("none")
    assert "conv_in" not in table.layers and {f["module"] for f in prov["float_layers"]} == {"conv_in", "conv_out"}
    unet = load_model(uncond_model_dir).unet
    for name, ranges in table.layers.items():
        module = unet.get_submodule(name)
        assert ranges.input > 0 and ranges.macs > 0
        expected = module.weight.detach().abs().flatten(1).amax(1)
        np.testing.assert_allclose(ranges.weight, expected.numpy(), rtol=1e-6)
    # The saved table parses back to the same content, and a second call reuses it.
    assert CalibrationTable.load(result.table_path).to_json() == table.to_json()
    assert calibrate(uncond_model_dir, tmp_path, fast_recipe).reused


def test_calibration_sees_conditional_and_unconditional_inputs(class_cond_model_dir, tmp_path, fast_recipe):
    table = calibrate(class_cond_model_dir, tmp_path, fast_recipe).table
    assert table.provenance["denoiser_inputs"] == 2 * 16
    assert table.provenance["conditioning"] == "class embeddings"
    assert any("attn2.to_k" in name for name in table.layers)


def test_bare_conditional_unet_needs_an_explicit_source(bare_cond_unet_dir, tmp_path, fast_recipe):
    with pytest.raises(ConditioningError, match="--random-conditioning"):
        calibrate(bare_cond_unet_dir, tmp_path, fast_recipe)
    table = calibrate(bare_cond_unet_dir, tmp_path, fast_recipe, random_conditioning=True).table
    assert table.provenance["conditioning"].startswith("random")
    assert any("add_embedding" in name for name in table.layers)  # SDXL-style added conditions ran


def test_embeddings_file_conditioning(bare_cond_unet_dir, tmp_path, fast_recipe):
    from safetensors.torch import save_file

    emb = tmp_path / "emb.safetensors"
    save_file({"encoder_hidden_states": torch.randn(2, 5, 24), "text_embeds": torch.randn(2, 16)}, str(emb))
    table = calibrate(bare_cond_unet_dir, tmp_path, fast_recipe, embeddings=emb).table
    assert table.provenance["conditioning"] == "embeddings file emb.safetensors"
    bad = tmp_path / "bad.safetensors"
    save_file({"encoder_hidden_states": torch.randn(2, 5, 7)}, str(bad))
    with pytest.raises(ConditioningError, match=r"\[N, tokens, 24\]"):
        calibrate(bare_cond_unet_dir, tmp_path / "x", fast_recipe, embeddings=bad)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.update(schema=99), "schema"),
        (lambda t: t["layers"][next(iter(t["layers"]))].update(input=float("nan")), "not a finite"),
        (lambda t: t["layers"][next(iter(t["layers"]))].update(input=-1.0), "not a finite"),
        (lambda t: t["layers"][next(iter(t["layers"]))].update(weight=[]), "non-empty list"),
        (lambda t: t["layers"][next(iter(t["layers"]))].update(scale=1.0), "unknown field"),
        (lambda t: t.pop("model_sha256"), "model_sha256"),
    ],
)
def test_table_parsing_is_strict(uncond_model_dir, tmp_path, fast_recipe, mutate, message):
    obj = calibrate(uncond_model_dir, tmp_path, fast_recipe).table.to_json()
    mutate(obj)
    with pytest.raises(CalibrationError, match=message):
        CalibrationTable.from_json(json.loads(json.dumps(obj)))


def test_mse_weight_search_in_blocks_equals_the_whole_search():
    """The MSE weight clip is searched in blocks of channels (speed): exactly the same clips as
    one search over all channels, also when the channel count does not divide into blocks."""
    from qdiff.calib.observers import _mse_weight_amax_block, mse_weight_amax

    g = torch.Generator().manual_seed(0)
    for shape in ((333, 1000), (7, 300000), (1, 5)):
        w = torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)
        assert torch.equal(mse_weight_amax(w, 7), _mse_weight_amax_block(w, 7, 100))


# ----------------------------------------------------------------------------- the device option


def _stage_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_calibrating_on_the_cpu_explicitly_is_the_default_byte_for_byte(uncond_model_dir, tmp_path, fast_recipe):
    """device="cpu" is today's calibration: the same table bytes and statistics as the default,
    the device in the provenance and the manifest's details, and no device key in the
    manifest's settings, so the CPU tables made before the option stay reusable."""
    from qdiff.core.artifacts import read_manifest
    from qdiff.calib.timestep_stats import TimestepStats

    default = calibrate(uncond_model_dir, tmp_path / "default", fast_recipe)
    explicit = calibrate(uncond_model_dir, tmp_path / "cpu", fast_recipe, device="cpu")
    assert default.table_path.read_bytes() == explicit.table_path.read_bytes()
    a, b = TimestepStats.load(default.stats_path), TimestepStats.load(explicit.stats_path)
    for key in ("step_indices", "timesteps", "amax", "branch_amax", "branch_hist", "branch_edges"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key
    assert a.layers == b.layers and a.split_layers == b.split_layers
    assert explicit.table.provenance["device"] == "cpu" and "device_name" not in explicit.table.provenance
    manifest = read_manifest(explicit.table_path)
    assert manifest.settings == {"recipe": fast_recipe.to_json()} and manifest.details["device"] == "cpu"
    assert calibrate(uncond_model_dir, tmp_path / "default", fast_recipe, device=torch.device("cpu")).reused


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize(
    "device, message, hint",
    [
        ("cuda", "asked to run on 'cuda', but this PyTorch sees no CUDA GPU", "use device cpu here"),
        ("cuda:1", "asked to run on 'cuda:1', but this PyTorch sees no CUDA GPU", "use device cpu here"),
        ("mps", "on cpu or cuda only", "use cpu, or cuda"),
        ("gpu", "'gpu', which is not a torch device", "use cpu, or cuda"),
    ],
)
def test_a_device_this_machine_lacks_fails_before_any_work_and_keeps_the_table(uncond_model_dir, tmp_path, fast_recipe, monkeypatch, device, message, hint):
    """The refusal names the device and what to do, comes before the model is loaded (the
    loader is made to fail loudly), and leaves the table, its statistics and manifest as they were,
    also with force."""
    import qdiff.api as api
    from qdiff.core.errors import BackendUnavailableError

    calibrate(uncond_model_dir, tmp_path, fast_recipe)
    before = _stage_files(tmp_path)
    assert {"calibration.json", "calibration.stats.npz", "calibration.json.manifest.json"} <= set(before)
    monkeypatch.setattr(api, "as_bundle", lambda *a, **k: pytest.fail("the model was loaded before the device was checked"))
    for force in (False, True):
        with pytest.raises(BackendUnavailableError) as info:
            calibrate(uncond_model_dir, tmp_path, fast_recipe, device=device, force=force)
        assert message in info.value.message and "calibration" in info.value.message
        assert hint in info.value.hint
    assert _stage_files(tmp_path) == before


def test_a_table_measured_on_another_device_type_is_recalibrated_not_reused(uncond_model_dir, tmp_path, fast_recipe):
    """The device type is part of the manifest's settings (not its index: cuda:0 and cuda:1 of a
    machine compute alike), so a CPU run does not silently take a GPU table. The GPU table is
    stood in for by a CPU one whose manifest says cuda, as a GPU run writes it."""
    from qdiff.api import _calibration_settings
    from qdiff.core.artifacts import read_manifest, write_manifest

    assert _calibration_settings(fast_recipe, torch.device("cpu")) == {"recipe": fast_recipe.to_json()}
    cuda = _calibration_settings(fast_recipe, torch.device("cuda"))
    assert cuda == {"recipe": fast_recipe.to_json(), "device": "cuda"} == _calibration_settings(fast_recipe, torch.device("cuda:1"))
    first = calibrate(uncond_model_dir, tmp_path, fast_recipe)
    manifest = read_manifest(first.table_path)
    manifest.settings = cuda
    write_manifest(first.table_path, manifest)
    again = calibrate(uncond_model_dir, tmp_path, fast_recipe)
    assert not again.reused and read_manifest(again.table_path).settings == {"recipe": fast_recipe.to_json()}
    assert calibrate(uncond_model_dir, tmp_path, fast_recipe).reused


def test_the_mse_search_takes_tensors_on_their_device_as_it_takes_numpy():
    """The observers hand their (possibly CUDA) histogram tensors to the search as they are;
    numpy cannot read a CUDA tensor, so tensors are no longer passed through it: on the CPU the
    answer is the one the numpy arrays give, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    calibrator = pq_calib.HistogramCalibrator(8, None, False, num_bins=300, torch_hist=True)
    for scale in (1.0, 3.0):  # the second batch grows the histogram (new edges)
        calibrator.collect(torch.randn(5000, generator=gen) * scale)
    hist, edges = calibrator._calib_hist, calibrator._calib_bin_edges
    assert mse_amax_from_histogram(hist, edges, 8) == mse_amax_from_histogram(hist.numpy(), edges.numpy(), 8)
