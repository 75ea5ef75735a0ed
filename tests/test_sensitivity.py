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
    seen = []  # on_row: the result as it grows, after the reference and after each row
    result = group_sensitivity(unet, table, {g: groups[g] for g in ("conv_shortcut", "attn_qkv", "conv_in_out")}, measure, base=base, combinations={"both": ("conv_shortcut", "attn_qkv")},
                               on_row=lambda partial: seen.append([r["group"] for r in partial.rows]))
    assert seen == [[], ["conv_shortcut"], ["conv_shortcut", "attn_qkv"], ["conv_shortcut", "attn_qkv", "conv_in_out"], ["conv_shortcut", "attn_qkv", "conv_in_out", "both"]]
    rows = {r["group"]: r for r in result.rows}
    assert result.all_quantized["mean"] > 0
    assert all(0 < r["only"] for r in rows.values())
    assert rows["conv_in_out"]["all_but"] == result.all_quantized["mean"] and rows["conv_in_out"]["in_base"] == 0  # already float in the base
    assert rows["both"]["layers"] == rows["conv_shortcut"]["layers"] + rows["attn_qkv"]["layers"]
    for r in rows.values():
        assert r["float_gain"] == result.all_quantized["mean"] - r["all_but"]


def test_the_tool_keeps_the_rows_of_a_run_stopped_halfway(tmp_path, monkeypatch):
    """tools/sensitivity_results.py writes its report after every row: stopped after the reference
    and two rows (shipped shapes-ddpm, CPU, smoke settings), the JSON and Markdown hold those rows,
    marked partial; a finished run marks its entry complete."""
    import json
    import sys
    from pathlib import Path

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import sensitivity_results

    writes = []
    real = sensitivity_results.write_outputs

    def stop_after_three(entries, out, settings):
        real(entries, out, settings)
        writes.append(len(entries[-1]["rows"]))
        if len(writes) == 3:
            raise KeyboardInterrupt("stopped by the test")

    monkeypatch.setattr(sensitivity_results, "write_outputs", stop_after_three)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        sensitivity_results.main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work")])
    entry = json.loads((out / "sensitivity.json").read_text())["entries"][0]
    assert writes == [0, 1, 2] and entry["complete"] is False and len(entry["rows"]) == 2
    assert "Partial: 2 rows measured so far" in (out / "sensitivity.md").read_text()
    monkeypatch.setattr(sensitivity_results, "write_outputs", real)
    assert sensitivity_results.main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    entry = json.loads((out / "sensitivity.json").read_text())["entries"][0]
    assert entry["complete"] is True and len(entry["rows"]) > 2 and "Partial" not in (out / "sensitivity.md").read_text()
