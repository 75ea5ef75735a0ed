"""The evaluation harness (qdiff.eval_harness) on the shipped shapes models, on the CPU at small n.

What must hold for its numbers to rank methods: FP32 measured as a candidate is exactly the
zero (step error 0, PSNR capped, no significant difference); a coarser quantization is worse
with a significant paired difference; intervals contain their means and narrow as n grows;
seed sets are disjoint and reproducible; a cut-off run keeps the candidates it finished.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qdiff.core import stats
from qdiff.core.errors import EvaluationError
from qdiff.eval_harness import (
    PSNR_CAP,
    Candidate,
    HarnessSettings,
    decomposition_candidates,
    fake_quant_candidate,
    fp32_candidate,
    run_harness,
    seed_sets,
)
from qdiff.models import PACKAGE_MODELS

DDPM = PACKAGE_MODELS / "shapes-ddpm"
COND = PACKAGE_MODELS / "shapes-cond"
TINY_CALIBRATION = {"num_timesteps": 2, "samples_per_timestep": 4, "calibration_steps": 4, "batch_size": 4, "activation_calibrator": "max"}  # mse: minutes here


@pytest.fixture(scope="module")
def ddpm_tables(tmp_path_factory):
    from qdiff.api import calibrate

    out = tmp_path_factory.mktemp("harness-tables")
    return {p: calibrate(DDPM, out / p, p, timestep_stats=False, **TINY_CALIBRATION).table_path for p in ("w8a8", "w4a8")}


def _every_interval_holds_its_mean(result) -> None:
    for label, row in result.rows.items():
        for name, stat in row["metrics"].items():
            lo, hi = stat["ci95"]
            assert lo - 1e-9 <= stat["mean"] <= hi + 1e-9, (label, name, stat)
            assert len(stat["per_seed_set"]) == result.settings["seed_sets"]


def test_seed_sets_are_disjoint_and_deterministic():
    s = HarnessSettings(images=5, seed_sets=3, seed_offset=7)
    sets = seed_sets(s)
    assert [len(x) for x in sets] == [5, 5, 5]
    assert len(set().union(*map(set, sets))) == 15  # disjoint
    assert sets == seed_sets(HarnessSettings(images=5, seed_sets=3, seed_offset=7))
    assert sets[0][0] == 7 and sets[2][-1] == 7 + 14
    with pytest.raises(EvaluationError, match="step_images"):
        HarnessSettings(images=4, step_images=5).check()
    from qdiff.eval_harness import _chunks

    for n, step, batch in ((1000, 256, 250), (8, 2, 8), (5, 5, 2)):
        chunks = _chunks(n, step, batch)
        assert [c[0] for c in chunks[1:]] == [c[1] for c in chunks[:-1]] and chunks[0][0] == 0 and chunks[-1][1] == n
        assert step in {c[1] for c in chunks} and max(b - a for a, b in chunks) <= batch  # step images: batches of their own


def test_bootstrap_intervals_contain_the_mean_and_shrink_with_n():
    rng = np.random.default_rng(3)
    widths = []
    for n in (20, 80, 320):
        groups = [rng.normal(1.0, 1.0, n) for _ in range(3)]
        ci = stats.mean_ci(groups, stats.stratified_counts([n] * 3, 400))
        assert ci["ci95"][0] < ci["mean"] < ci["ci95"][1]
        widths.append(ci["ci95"][1] - ci["ci95"][0])
    assert widths[0] > 1.6 * widths[1] > 1.6**2 * widths[2]  # ~1/sqrt(n): halves per 4x n
    # Paired: a constant offset with shared noise is significant although the two intervals overlap.
    base = [rng.normal(0, 1, 50)]
    counts = stats.stratified_counts([50], 400)
    d = stats.paired_difference([base[0] + 0.05], base, counts)
    assert d["significant"] and d["ci95"][0] == pytest.approx(0.05) and stats.paired_difference(base, base, counts)["significant"] is False


def test_frechet_replicates_equal_the_distance_of_the_resampled_set():
    from qdiff.datasets.shape_classifier import frechet_distance

    rng = np.random.default_rng(0)
    feats, real = rng.normal(size=(40, 16)), rng.normal(0.3, 1.0, size=(200, 16))
    counts = stats.stratified_counts([40], 3, seed=5)[0]
    reps = stats.frechet_replicates(feats, real, counts)
    for r in range(3):
        assert reps[r] == pytest.approx(frechet_distance(feats[np.repeat(np.arange(40), counts[r])], real), rel=1e-9)
    ci, _ = stats.fd_ci([frechet_distance(feats, real)], [feats], real, stats.stratified_counts([40], 200))
    assert ci["ci95"][0] < ci["mean"] < ci["ci95"][1]


def test_fp32_as_candidate_is_zero_and_a_failing_candidate_keeps_the_earlier_rows(uncond_model_dir, tmp_path):
    """The mechanics, on the tiny random-weight model (fast; no dataset classifier, so no shape-FD)."""
    settings = HarnessSettings(images=3, seed_sets=2, steps=2, step_images=2, device="cpu", batch_size=4, bootstrap=50)

    def broken(unet):
        raise RuntimeError("out of memory (simulated)")

    seen = []
    with pytest.raises(EvaluationError, match="'broken'") as err:
        run_harness(uncond_model_dir, [fp32_candidate(), fp32_candidate("fp32-again"), Candidate("broken", broken)], settings, out_dir=tmp_path, on_result=lambda r: seen.append(list(r.rows)))
    assert "out of memory" in str(err.value.message)
    assert seen[0] == ["fp32"] and ["fp32", "fp32-again"] in seen  # written after each candidate
    on_disk = json.loads((tmp_path / "harness.json").read_text())
    assert list(on_disk["rows"]) == ["fp32", "fp32-again"] and "broken" in on_disk["failed"] and on_disk["complete"] is False
    assert "Partial" in (tmp_path / "harness.md").read_text()
    m = on_disk["rows"]["fp32"]["metrics"]
    assert m["step_rel_l2"]["mean"] == 0.0 and m["psnr"]["mean"] == PSNR_CAP and m["ssim"]["mean"] == 1.0
    comparison = on_disk["comparisons"]["fp32-again"]
    assert all(c["diff"] == 0.0 and not c["significant"] for c in comparison.values()) and set(comparison) == {"step_rel_l2", "psnr", "ssim"}
    assert "no dataset classifier" in on_disk["fp32"]["shape_fd_note"]


def test_cli_runs_the_harness_with_decomposition_rows(class_cond_model_dir, tmp_path):
    """`qdiff eval --calib` end to end (tiny class-conditional model: CFG rows, fast)."""
    from qdiff.api import calibrate
    from qdiff.cli import main

    table = calibrate(class_cond_model_dir, tmp_path / "w8", "w8a8", timestep_stats=False, **TINY_CALIBRATION).table_path
    out = tmp_path / "eval"
    rc = main(["--quiet", "eval", "--calib", str(table), "--decomposition", "--device", "cpu", "--images", "3", "--seed-sets", "2", "--step-images", "2",
               "--steps", "2", "--batch-size", "4", "--bootstrap", "50", "-o", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads((out / "harness.json").read_text())
    assert list(result["rows"]) == ["w8a8", "w8a8/weights-only", "w8a8/activations-only"] and result["complete"]
    assert {r["meta"]["mode"] for r in result["rows"].values()} == {"full", "weights", "activations"}
    assert set(result["comparisons"]) == {"w8a8/weights-only", "w8a8/activations-only"}
    assert result["settings"]["guidance_scale"] == 3.0 and result["model"]["unet_class"] == "UNet2DConditionModel"
    for name in ("harness.md", "harness-metrics.png", "harness-steps.png"):
        assert (out / name).stat().st_size > 0
    # the ONNX path of `qdiff eval` is untouched: without --calib it still wants graphs
    assert main(["--quiet", "eval", "-o", str(tmp_path / "x")]) != 0


@pytest.mark.slow
def test_shapes_cond_gets_class_accuracy_shape_fd_and_decomposition(tmp_path):
    from qdiff.api import calibrate, evaluate_table

    table = calibrate(COND, tmp_path / "w8", "w8a8", timestep_stats=False, **TINY_CALIBRATION).table_path
    result = evaluate_table(COND, table, tmp_path / "eval", decomposition=True, images=4, seed_sets=2, step_images=2, steps=3, batch_size=4, bootstrap=100, device="cpu")
    _every_interval_holds_its_mean(result)
    rows = result.rows
    assert "class_accuracy" in rows["w8a8"]["metrics"] and "class_accuracy" in result.fp32
    assert result.fp32["real_floor_shape_fd"] > 0 and result.fp32["shape_fd"]["mean"] > 0
    assert set(result.comparisons["w8a8/weights-only"]) == {"step_rel_l2", "psnr", "ssim", "shape_fd", "class_accuracy"}
    # INT8 weights alone disturb the noise prediction far less than INT8 activations and weights.
    assert rows["w8a8/weights-only"]["metrics"]["step_rel_l2"]["mean"] < 0.5 * rows["w8a8"]["metrics"]["step_rel_l2"]["mean"]


def test_w4a8_is_significantly_worse_than_w8a8(ddpm_tables, tmp_path):
    """At 2 x 8 images the W4A8 - W8A8 step-error difference is ~10x its interval's half-width."""
    settings = HarnessSettings(images=8, seed_sets=2, steps=4, step_images=4, device="cpu", batch_size=8, bootstrap=300)
    candidates = [fp32_candidate(), fake_quant_candidate("w8a8", ddpm_tables["w8a8"]), fake_quant_candidate("w4a8", ddpm_tables["w4a8"])]
    result = run_harness(DDPM, candidates, settings, baseline="w8a8", out_dir=tmp_path)
    _every_interval_holds_its_mean(result)
    worse = result.comparisons["w4a8"]
    assert worse["step_rel_l2"]["significant"] and worse["step_rel_l2"]["diff"] > 0
    assert worse["psnr"]["significant"] and worse["psnr"]["diff"] < 0
    assert result.comparisons["fp32"]["step_rel_l2"]["significant"] and result.rows["fp32"]["metrics"]["step_rel_l2"]["mean"] == 0.0
    assert "**" in (tmp_path / "harness.md").read_text()  # the table marks the significant differences


def test_feature_space_follows_the_model_folders_dataset(uncond_model_dir, tmp_path):
    """An undeclared random model gets no shape-FD; the same weights declared as a scenes model get
    the scenes classifier and its real images, the shipped shapes model the shapes ones."""
    import shutil

    from qdiff.datasets.registry import get_dataset, write_dataset_file
    from qdiff.eval_harness import _feature_space
    from qdiff.models import load_model

    assert _feature_space(load_model(uncond_model_dir, components=False), "cpu") is None
    declared = tmp_path / "declared"
    shutil.copytree(uncond_model_dir, declared)
    write_dataset_file(declared, "scenes")
    space = _feature_space(load_model(declared, components=False), "cpu")
    assert space is not None and space.name == "scenes"
    scenes_real = get_dataset("scenes").real_features("test", len(space.real))
    assert np.array_equal(space.real, scenes_real)
    shapes = _feature_space(load_model(DDPM, components=False), "cpu")
    assert shapes is not None and shapes.name == "shapes" and not np.array_equal(shapes.real, space.real)
    assert space.class_names == get_dataset("scenes").class_names and len(space.class_names) == 8
