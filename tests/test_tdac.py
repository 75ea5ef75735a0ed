"""TDAC (EDA-DM's temporal distribution alignment calibration): the math on hand-computable
tensors, the timestep plan's partly observed batches, and calibration of a shipped model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qdiff.calib.recipe import Recipe, load_recipe
from qdiff.calib.tdac import (
    allocate_counts,
    auto_radius,
    density,
    diversity,
    mid_block_attention,
    minmax_normalise,
    pairwise_mse,
    tdac_weights,
    window_steps,
)
from qdiff.calib.trajectories import TimestepPlan, TrajectoryBatch, count_calibration_calls
from qdiff.core.errors import CalibrationError, RecipeError

SHAPES_DDPM = Path(__file__).resolve().parents[1] / "qdiff" / "models" / "shapes-ddpm"


def _line_features() -> torch.Tensor:
    """Three steps of one sample, one position, two channels: (0,0), (1,1), (3,3)."""
    return torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0]]).reshape(3, 1, 2, 1)


def test_pairwise_mse_and_density_by_hand():
    mse = pairwise_mse(_line_features())
    assert mse.tolist() == [[0.0, 1.0, 9.0], [1.0, 0.0, 4.0], [9.0, 4.0, 0.0]]
    assert density(mse, 4.0).tolist() == [1, 2, 1]  # the middle step has both others within r
    assert density(mse, 0.5).tolist() == [0, 0, 0]  # the diagonal never counts
    assert auto_radius(mse) == 4.0  # median of the off-diagonal {1, 9, 4, 1, 9, 4}


def test_diversity_by_hand():
    # [steps, batch 1, channels 2, positions 2]; columns are the channel vectors at each position
    steps = [((1, 0), (0, 1)), ((1, 0), (1, 0)), ((-1, 0), (0, 2))]
    features = torch.tensor([[list(zip(*pos))] for pos in steps], dtype=torch.float32)
    assert features.shape == (3, 1, 2, 2)
    # pair gaps sum_p (1 - cos): (0,1) = 0 + 1, (0,2) = 2 + 0, (1,2) = 2 + 1
    assert diversity(features).tolist() == pytest.approx([3.0, 4.0, 5.0])


def test_diversity_is_the_reference_codes_channel_cosine():
    """EDA-DM's loop: V_i = sum_{j != i} sum(1 - nn.CosineSimilarity(dim=1)(F_i, F_j)) on NCHW maps."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(5, 3, 4, 2, 3, generator=gen)
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-6)
    reference = [sum(float(torch.sum(1 - cos(features[i], features[j]))) for j in range(5) if j != i) for i in range(5)]
    assert diversity(features).tolist() == pytest.approx(reference, rel=1e-6)


def test_weights_guard_all_equal_scores():
    assert minmax_normalise(torch.tensor([3, 3, 3])).tolist() == [0.0, 0.0, 0.0]
    assert minmax_normalise(torch.tensor([1.0, 3.0, 2.0])).tolist() == [0.0, 1.0, 0.5]
    # equal densities drop out; diversity alone decides
    assert tdac_weights(torch.tensor([2, 2, 2]), torch.tensor([1.0, 3.0, 2.0]), 1.2).tolist() == pytest.approx([0.0, 1.2, 0.6])
    # nothing to tell the steps apart: uniform, never NaN
    assert tdac_weights(torch.tensor([2, 2]), torch.tensor([5.0, 5.0]), 1.2).tolist() == [1.0, 1.0]
    assert tdac_weights(torch.tensor([0, 4, 2]), torch.tensor([1.0, 3.0, 2.0]), 0.5).tolist() == pytest.approx([0.0, 1.5, 0.75])


def test_allocate_counts_is_proportional_exact_and_capped():
    assert allocate_counts([1, 1, 2], 8) == [2, 2, 4]
    assert allocate_counts([1, 1, 1], 10) == [4, 3, 3]  # largest remainder, ties to the earlier step
    assert allocate_counts([0.0, 1.0, 3.0], 4) == [0, 1, 3]
    # quota 7.5 above the cap: fixed at 4, the other 5 shared by the rest's weights
    assert allocate_counts([10, 1, 1], 9, cap=4) == [4, 3, 2]
    # every weighted step full: the rest of the budget goes to the zero-weight ones
    assert allocate_counts([0, 1], 3, cap=2) == [1, 2]
    counts = allocate_counts(np.random.default_rng(0).random(37), 1000, cap=40)
    assert sum(counts) == 1000 and max(counts) <= 40 and min(counts) >= 0
    with pytest.raises(CalibrationError, match="does not fit"):
        allocate_counts([1, 1], 9, cap=4)
    with pytest.raises(CalibrationError, match="not all 0"):
        allocate_counts([0, 0], 3)


def test_window_steps_and_plan_rows():
    assert window_steps(10, (0.0, 1.0)) == list(range(10))
    assert window_steps(50, (0.8, 1.0)) == list(range(39, 50))
    plan = TimestepPlan({0: 3, 2: 5, 4: 0})
    assert plan.steps == [0, 2] and plan.trajectories == 5 and plan.total == 8
    assert [plan.rows(0, TrajectoryBatch(0, 4)), plan.rows(2, TrajectoryBatch(0, 4)), plan.rows(0, TrajectoryBatch(4, 1)), plan.rows(2, TrajectoryBatch(4, 1))] == [3, 4, 0, 1]
    assert TimestepPlan.from_json(plan.to_json()) == TimestepPlan({0: 3, 2: 5})
    recipe = Recipe(num_timesteps=2, samples_per_timestep=5, calibration_steps=5, batch_size=4)
    assert count_calibration_calls(recipe, plan) == 3  # batch 0: steps 0 and 2; batch 1: step 2
    with pytest.raises(CalibrationError, match="needs a TimestepPlan"):
        count_calibration_calls(recipe.with_overrides(timestep_sampling="tdac"))


def test_recipe_settings_validate_and_old_recipes_keep_their_json():
    assert "timestep_sampling" not in Recipe().to_json()  # tables made before TDAC keep their hash
    tdac = load_recipe("w8a8", timestep_sampling="tdac", tdac_r=3.0)
    assert Recipe.from_json(tdac.to_json()) == tdac and tdac.to_json()["tdac_r"] == 3.0
    for bad in ({"timestep_sampling": "random"}, {"tdac_r": -1.0}, {"tdac_r": "median"}, {"tdac_lambda": -0.5}):
        with pytest.raises(RecipeError):
            Recipe(**bad)


def test_partly_observed_steps_record_only_their_rows_and_keep_the_trajectory(uncond_model_dir):
    from qdiff.models import load_model
    from qdiff.runtime.backends import TorchDenoiser
    from qdiff.runtime.calibration_loop import model_calibration_inputs

    bundle = load_model(uncond_model_dir)
    recipe = Recipe(num_timesteps=2, samples_per_timestep=5, calibration_steps=4, batch_size=4)
    calls = list(model_calibration_inputs(bundle, recipe, TorchDenoiser(bundle.unet), conditioning=None, plan=TimestepPlan({0: 3, 2: 5})))
    assert [(c.trajectory_start, c.step, c.sample.shape[0]) for c in calls] == [(0, 0, 3), (0, 2, 4), (4, 2, 1)]
    full = list(model_calibration_inputs(bundle, recipe, TorchDenoiser(bundle.unet), conditioning=None, plan=TimestepPlan({0: 5, 2: 5})))
    assert torch.equal(full[0].sample[:3], calls[0].sample)
    # the split call at step 0 continues the trajectory as the whole call does
    torch.testing.assert_close(calls[1].sample, full[1].sample, rtol=1e-5, atol=1e-5)


def test_partly_observed_guidance_batches_take_the_same_trajectories(class_cond_model_dir):
    from qdiff.core.conditioning import resolve_conditioning
    from qdiff.models import load_model
    from qdiff.runtime.backends import TorchDenoiser
    from qdiff.runtime.calibration_loop import model_calibration_inputs

    bundle = load_model(class_cond_model_dir)
    recipe = Recipe(num_timesteps=1, samples_per_timestep=3, calibration_steps=2, batch_size=3, guidance_scale=3.0)
    cond = resolve_conditioning(bundle, 3, class_labels=[0, 1, 2])
    (call,) = model_calibration_inputs(bundle, recipe, TorchDenoiser(bundle.unet), conditioning=cond, plan=TimestepPlan({1: 2}))
    assert call.sample.shape[0] == 4  # [uncond of trajectories 0, 1; cond of trajectories 0, 1]
    expected = torch.cat([cond.uncond["encoder_hidden_states"][:2], cond.cond["encoder_hidden_states"][:2]])
    assert torch.equal(call.conditioning["encoder_hidden_states"], expected)


def test_models_without_mid_block_attention_are_refused():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, add_attention=False,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(CalibrationError, match="UNet2DModel has no mid-block attention"):
        mid_block_attention(unet)


def test_tdac_calibration_of_the_shipped_ddpm(tmp_path):
    """Non-uniform counts that spend exactly the uniform budget, recorded in the table, plotted."""
    from qdiff.api import calibrate
    from qdiff.calib.table import CalibrationTable
    from qdiff.plots import calibration_figures

    result = calibrate(SHAPES_DDPM, tmp_path, "w8a8", timestep_sampling="tdac", num_timesteps=3, samples_per_timestep=4, calibration_steps=6, batch_size=4)
    prov = CalibrationTable.load(result.table_path).provenance
    tdac, plan = prov["tdac"], prov["timestep_plan"]
    assert prov["timestep_sampling"] == "tdac"
    assert sum(tdac["counts"]) == 3 * 4 == tdac["budget"] and len(tdac["counts"]) == 6
    assert len(set(tdac["counts"])) > 1 and max(tdac["counts"]) <= 4
    assert plan["counts"] == [c for c in tdac["counts"] if c > 0]
    assert len(tdac["density"]) == len(tdac["diversity"]) == len(tdac["weights"]) == 6 and tdac["r_quantile"] == pytest.approx(0.5, abs=0.1)
    assert prov["denoiser_inputs"] == 12 and prov["step_indices"] == plan["step_indices"]
    assert "mid_block.attentions.0" in tdac["hook"]
    figures = calibration_figures(result.stats_path, tmp_path, provenance=prov)
    assert (tmp_path / "calib-tdac-samples.png").stat().st_size > 1000
    assert figures[0]["path"] == "calib-tdac-samples.png"
    # QuEST's time-aware tables replay the table's own TDAC counts (no plan-less uniform loop)
    from qdiff.api import calibrate_time_aware
    from qdiff.calib.quest.time_aware import load_time_aware

    tables, buckets = load_time_aware(calibrate_time_aware(SHAPES_DDPM, tmp_path / "ta", result.table_path, 2).index_path)
    assert len(tables) == 2 and sorted(s for b in buckets.step_indices for s in b) == sorted(plan["step_indices"])
