"""Per-timestep calibration statistics and the report plots drawn from them (real calibration
of a tiny model, real files)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qdiff.api import calibrate
from qdiff.calib.timestep_stats import TimestepStats, stats_path_for
from qdiff.core.errors import CalibrationError
from qdiff.models import load_model
from qdiff.plots import calibration_figures, plot_step_errors


@pytest.fixture(scope="module")
def bundle(uncond_model_dir):
    return load_model(uncond_model_dir)


@pytest.fixture(scope="module")
def calibrated(bundle, tmp_path_factory, fast_recipe):
    out = tmp_path_factory.mktemp("stats")
    return calibrate(bundle, out, fast_recipe.with_overrides(split_shortcut=True))


def test_stats_file_has_one_entry_per_calibration_timestep(calibrated):
    table = calibrated.table
    assert calibrated.stats_path == stats_path_for(calibrated.table_path) and calibrated.stats_path.name == "calibration.stats.npz"
    stats = TimestepStats.load(calibrated.stats_path)
    assert stats.step_indices.tolist() == table.provenance["step_indices"]
    assert stats.timesteps.tolist() == pytest.approx(table.provenance["timesteps"])
    assert sorted(stats.layers) == sorted(table.layers) and stats.amax.shape == (len(table.layers), 4)
    # The max calibrator's range is the max over all calibration steps of the per-step maxima.
    for name, ranges in table.layers.items():
        assert stats.layer_amax(name).max() == pytest.approx(ranges.input, rel=1e-6)
    splits = sorted(n for n, r in table.layers.items() if r.split_channels)
    assert splits and sorted(stats.split_layers) == splits
    for p, name in enumerate(stats.split_layers):
        assert stats.branch_amax[p, 0].max() == pytest.approx(table.layers[name].shortcut_a, rel=1e-6)
        assert stats.branch_amax[p, 1].max() == pytest.approx(table.layers[name].shortcut_b, rel=1e-6)
        widths = np.diff(stats.branch_edges[p])
        assert np.allclose((stats.branch_hist[p] * widths).sum(-1), 1.0, atol=1e-3)  # densities


def test_stats_are_reused_with_the_table_and_redone_when_missing(calibrated, bundle, fast_recipe):
    recipe = fast_recipe.with_overrides(split_shortcut=True)
    again = calibrate(bundle, calibrated.table_path.parent, recipe)
    assert again.reused and again.stats_path == calibrated.stats_path
    before = calibrated.stats_path.read_bytes()
    calibrated.stats_path.unlink()
    redone = calibrate(bundle, calibrated.table_path.parent, recipe)
    assert not redone.reused and redone.stats_path.read_bytes() == before  # seeded: the same bytes


def test_damaged_stats_file_is_refused(tmp_path):
    bad = tmp_path / "calibration.stats.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(CalibrationError, match="not a qdiff per-timestep statistics file"):
        TimestepStats.load(bad)
    with pytest.raises(CalibrationError, match="do not exist"):
        TimestepStats.load(tmp_path / "missing.npz")


def test_calibration_and_step_plots_are_pngs(calibrated, tmp_path):
    figures = calibration_figures(calibrated.stats_path, tmp_path)
    assert [f["path"] for f in figures] == ["calib-amax-vs-timestep.png", "calib-shortcut-histograms.png"]
    for fig in figures:
        with Image.open(tmp_path / fig["path"]) as img:
            assert img.format == "PNG" and min(img.size) > 200
    rows = [{"timestep": t, "rel_l2": e} for t, e in ((900, 0.1), (500, 0.02), (100, 0.0))]
    path = plot_step_errors({"w8a8": rows, "w4a8": [dict(r, rel_l2=2 * r["rel_l2"]) for r in rows]}, tmp_path / "steps.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
    assert not list(tmp_path.glob("*.tmp"))
