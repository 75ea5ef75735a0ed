"""tools/results_jobs.py: the job helpers tdac_results, quest_results and reconstruction_results share; and tools/ablation_results.py, built on them."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import results_jobs as rj  # noqa: E402


def _double(job: dict) -> dict:
    return {**job, "value": job["x"] * 2, "seconds": 0.5}


def test_pool_map_inline_keeps_order_and_logs_each_job():
    lines: list[str] = []
    jobs = [{"model": "/m/shapes-ddpm", "preset": "w8a8", "sampling": s, "x": i} for i, s in enumerate(("uniform", "tdac"))]
    done = rj.pool_map(_double, jobs, workers=1, what="calibrate", log=lines.append)
    assert [d["value"] for d in done] == [0, 2]
    assert lines[:2] == ["calibrate: shapes-ddpm w8a8 uniform done in 0.5 s", "calibrate: shapes-ddpm w8a8 tdac done in 0.5 s"]
    assert lines[-1].startswith("calibrate: 2 jobs in ")
    assert rj.pool_map(_double, [], workers=4, what="none", log=lines.append) == []


def test_interval_formatting_marks_significant_differences():
    assert rj.fmt_interval(None) == "-"
    assert rj.fmt_interval({"mean": 0.12345, "ci95": [0.1, 0.15]}, ".2f") == "0.12 [0.10, 0.15]"
    assert rj.fmt_difference({"diff": -0.5, "ci95": [-0.75, -0.25], "significant": True}, ".2f") == "-0.50 [-0.75, -0.25] *"
    assert rj.fmt_difference({"diff": 0.1, "ci95": [-0.1, 0.3], "significant": False}, ".1g") == "+0.1 [-0.1, +0.3]"


def test_model_dir_resolves_shipped_names_and_folders(tmp_path):
    assert rj.model_dir("shapes-ddpm") == ROOT / "qdiff" / "models" / "shapes-ddpm"
    assert rj.model_dir(tmp_path) == tmp_path.resolve()
    assert rj.worker_threads(10**6) == 1


def test_tdac_difference_over_calibration_seeds_is_paired_by_seed():
    """tools/tdac_results.seed_paired: a constant offset across seeds is significant, an offset that
    flips sign between seeds is not, and uniform's own spread across seeds is reported."""
    import tdac_results

    def rows(values):
        return [{"step_rel_l2": {"mean": v}} for v in values]

    steady = tdac_results.seed_paired(rows([0.020, 0.024, 0.022]), rows([0.019, 0.023, 0.021]))["step_rel_l2"]
    assert steady["seeds"] == 3 and steady["significant"] and abs(steady["diff"] + 0.001) < 1e-12
    assert steady["uniform_spread"] == [0.020, 0.024]
    flipping = tdac_results.seed_paired(rows([0.020, 0.024]), rows([0.021, 0.023]))["step_rel_l2"]
    assert not flipping["significant"] and flipping["ci95"][0] < 0 < flipping["ci95"][1]


def test_ablation_results_compares_each_one_setting_variant_with_its_preset(tmp_path):
    """tools/ablation_results.py on the shipped shapes-ddpm (CPU, tiny settings): each variant's
    table really differs from the preset in its one recipe setting, the harness compares it with
    the preset over the same noise (a paired difference with its interval), and the report and
    the harness folder are written."""
    import json

    import ablation_results

    from qdiff.calib.table import CalibrationTable

    rc = ablation_results.main(["--smoke", "--variants", "preset", "no-split", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "ablations.json").read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == {"preset", "preset/weights-only", "preset/activations-only", "no-split"}
    assert not rows["preset"]["vs_preset"]
    diff = rows["no-split"]["vs_preset"]["step_rel_l2"]
    assert diff["ci95"][0] <= diff["diff"] <= diff["ci95"][1]
    tables = {v: CalibrationTable.load(tmp_path / "work" / "shapes-ddpm" / f"w8a8-{v}" / "calibration.json") for v in ("preset", "no-split")}
    assert tables["preset"].recipe["split_shortcut"] is True and tables["no-split"].recipe["split_shortcut"] is False
    md = (tmp_path / "out" / "ablations.md").read_text()
    assert "| w8a8 | no-split | split |" in md and "decomposition: weights-only quantization has" in md
    assert (tmp_path / "out" / "harness-shapes-ddpm-w8a8").is_dir()


def test_peer_results_ranks_the_peers_against_qdiff_in_the_harness(tmp_path):
    """tools/peer_results.py on the shipped shapes-ddpm (CPU, tiny settings): qdiff's row is the
    baseline of ModelOpt's rows and of qdiff's table on ModelOpt's layers (paired differences with
    intervals); ONNX Runtime's quantizer runs as a graph row against qdiff's own graph."""
    import json

    import pytest

    pytest.importorskip("modelopt.torch.quantization")
    import peer_results

    rc = peer_results.main(["--smoke", "--ort-methods", "minmax", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert rc == 0
    rows = {(r["run"], r["candidate"]): r for r in json.loads((tmp_path / "out" / "peers.json").read_text())["rows"]}
    assert set(rows) == {("pytorch", "qdiff"), ("pytorch", "qdiff-on-modelopt-layers"), ("pytorch", "modelopt"), ("pytorch", "modelopt-maxcal"),
                         ("onnxruntime graphs", "qdiff-graph"), ("onnxruntime graphs", "ort-minmax")}
    assert not rows[("pytorch", "qdiff")]["vs_baseline"] and rows[("pytorch", "modelopt")]["baseline"] == "qdiff"
    diff = rows[("pytorch", "modelopt")]["vs_baseline"]["step_rel_l2"]
    assert diff["ci95"][0] <= diff["diff"] <= diff["ci95"][1]
    from qdiff.calib.table import CalibrationTable

    total = len(CalibrationTable.load(tmp_path / "work" / "shapes-ddpm" / "qdiff" / "calibration.json").layers)
    assert 0 < rows[("pytorch", "qdiff-on-modelopt-layers")]["layers"] < total
    assert rows[("onnxruntime graphs", "ort-minmax")]["baseline"] == "qdiff-graph"
    # the same table through its graph and through its PyTorch twin, same noise: the same error up to rounding flips
    graph, twin = rows[("onnxruntime graphs", "qdiff-graph")], rows[("pytorch", "qdiff")]
    assert graph["metrics"]["step_rel_l2"]["mean"] == pytest.approx(twin["metrics"]["step_rel_l2"]["mean"], rel=0.05)
    md = (tmp_path / "out" / "peers.md").read_text()
    assert "| `modelopt` | ModelOpt INT8 recipe" in md and "### onnxruntime graphs" in md
    assert (tmp_path / "out" / "harness-shapes-ddpm" / "harness.json").is_file() and (tmp_path / "out" / "harness-shapes-ddpm-ort" / "harness.json").is_file()
