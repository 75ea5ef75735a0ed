"""Per-layer-group sensitivity: disjoint groups covering every weighted layer, and the
only-this-group / all-but-this-group fake-quant measurements on a real tiny UNet."""

from __future__ import annotations

import torch

from qdiff.calib.recipe import Recipe
from qdiff.calib.sensitivity import group_sensitivity, layer_groups
from qdiff.calib.targets import layer_op


def test_groups_partition_the_weighted_layers_and_sensitivity_rows_are_consistent(uncond_model_dir, tmp_path):
    from qdiff.api import calibrate
    from qdiff.models import load_model

    bundle = load_model(uncond_model_dir)
    unet = bundle.unet
    groups = layer_groups(unet, skip_concat_conv1=["up_blocks.0.resnets.0.conv1"])
    names = [n for names in groups.values() for n in names]
    assert sorted(names) == sorted(n for n, m in unet.named_modules() if layer_op(m) is not None) and len(names) == len(set(names))
    assert groups["skip_concat_conv1"] == ["up_blocks.0.resnets.0.conv1"] and "up_blocks.0.resnets.0.conv1" not in groups["resnet_conv1"]
    assert groups["conv_in_out"] == ["conv_in", "conv_out"] and all(n.endswith("time_emb_proj") for n in groups["time_emb_proj"])
    recipe = Recipe(num_timesteps=2, samples_per_timestep=2, calibration_steps=2, batch_size=2, exclude=())
    table = calibrate(uncond_model_dir, tmp_path, recipe, timestep_stats=False).table
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        ref = unet(x, t).sample

    def measure(model):
        with torch.no_grad():
            return [float((model(x, t).sample - ref).norm() / ref.norm())]

    base = [n for n in table.layers if n not in ("conv_in", "conv_out")]
    result = group_sensitivity(unet, table, {g: groups[g] for g in ("conv_shortcut", "attn_qkv", "conv_in_out")}, measure, base=base, combinations={"both": ("conv_shortcut", "attn_qkv")})
    rows = {r["group"]: r for r in result.rows}
    assert result.all_quantized["mean"] > 0
    assert all(0 < r["only"] for r in rows.values())
    assert rows["conv_in_out"]["all_but"] == result.all_quantized["mean"] and rows["conv_in_out"]["in_base"] == 0  # already float in the base
    assert rows["both"]["layers"] == rows["conv_shortcut"]["layers"] + rows["attn_qkv"]["layers"]
    for r in rows.values():
        assert r["float_gain"] == result.all_quantized["mean"] - r["all_but"]
