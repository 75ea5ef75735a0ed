"""End to end through the CLI, as a user runs it: every stage, then `qdiff run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def qdiff(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "QDIFF_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "qdiff.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.slow  # > 30 s on 2 cores; fast substitute: tests/test_cli_help.py
def test_every_stage_through_the_cli(class_cond_model_dir, tmp_path):
    out = tmp_path / "art"
    r = qdiff("export", class_cond_model_dir, "-o", out)
    assert r.returncode == 0, r.stderr
    onnx_path = Path(r.stdout.strip().splitlines()[-1])
    assert onnx_path == out / "denoiser.onnx" and onnx_path.is_file()

    r = qdiff("calibrate", class_cond_model_dir, "-o", out, "--recipe", "w8a8", "--calibrator", "percentile", "--timesteps", "3", "--samples", "4", "--calib-steps", "6", "--no-split-shortcut")
    assert r.returncode == 0, r.stderr
    table = json.loads((out / "calibration.json").read_text())
    assert table["recipe"]["activation_calibrator"] == "percentile" and table["provenance"]["step_indices"] == [0, 2, 5]
    assert table["recipe"]["split_shortcut"] is False and not any("shortcut_a" in e for e in table["layers"].values())

    r = qdiff("quantize", onnx_path, "--calib", out / "calibration.json")
    assert r.returncode == 0, r.stderr
    qdq = out / "denoiser.w8a8.onnx"
    assert qdq.is_file() and (out / "denoiser.w8a8.onnx.manifest.json").is_file()

    for sampler in ("ddim", "dpm++", "euler"):
        r = qdiff("sample", class_cond_model_dir, "--onnx", qdq, "-o", tmp_path / sampler, "--sampler", sampler, "--steps", "4", "--num-images", "2", "--class", "1")
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in (tmp_path / sampler).glob("*.png")) == ["grid.png", "sample_00000.png", "sample_00001.png"]


@pytest.mark.slow  # > 30 s on 2 cores; fast substitute: tests/test_cli_help.py
def test_run_writes_grid_report_and_artifacts(uncond_model_dir, tmp_path):
    out = tmp_path / "run"
    r = qdiff("run", uncond_model_dir, "-o", out, "--steps", "10", "--num-images", "3", "--timesteps", "4", "--samples", "4", "--calib-steps", "8")
    assert r.returncode == 0, r.stderr
    for name in ("grid.png", "report.json", "report.md", "denoiser.onnx", "denoiser.onnx.manifest.json", "calibration.json", "calibration.json.manifest.json", "denoiser.w8a8.onnx", "denoiser.w8a8.onnx.manifest.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert len(report["images"]) == 3 and len(report["steps"]) == 10
    assert all(0 < row["rel_l2"] < 1 for row in report["steps"])
    assert all(row["psnr"] > 10 and -1 <= row["ssim"] <= 1 for row in report["images"])
    assert "| step | timestep | relative L2 | cosine |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "/no/such/folder", "-o", "x"], "does not exist"),
        (["quantize", "missing.onnx", "--calib", "missing.json"], "does not exist"),
        (["calibrate", "/no/such", "-o", "x", "--recipe", "w3a3"], "neither a preset nor a file"),
    ],
)
def test_user_errors_are_one_or_two_lines(tmp_path, args, message):
    r = qdiff(*args, cwd=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_calibrate_device_flag_reaches_the_api(uncond_model_dir, tmp_path, capsys, monkeypatch):
    """`qdiff calibrate --device`: cpu calibrates (the device in the table's provenance), the same
    table as without the flag; a device this machine lacks is the API's two-line refusal
    (exit 1), and the table already there is left as it was."""
    import torch

    from qdiff import cli

    monkeypatch.setenv("QDIFF_QUIET", "1")
    tiny = ["--timesteps", "2", "--samples", "2", "--calib-steps", "4", "--calib-batch", "2"]
    assert cli.main(["calibrate", str(uncond_model_dir), "-o", str(tmp_path / "default"), *tiny]) == 0
    assert cli.main(["calibrate", str(uncond_model_dir), "-o", str(tmp_path / "cpu"), "--device", "cpu", *tiny]) == 0
    table = tmp_path / "cpu" / "calibration.json"
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == table
    assert json.loads(table.read_text())["provenance"]["device"] == "cpu"
    assert table.read_bytes() == (tmp_path / "default" / "calibration.json").read_bytes()
    if torch.cuda.is_available():
        return
    before = {p.name: p.read_bytes() for p in (tmp_path / "cpu").iterdir() if p.is_file()}
    assert cli.main(["calibrate", str(uncond_model_dir), "-o", str(tmp_path / "cpu"), "--device", "cuda", "--force", *tiny]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("qdiff calibrate: error: calibration was asked to run on 'cuda', but this PyTorch sees no CUDA GPU"), err
    assert err[1].startswith("  hint: use device cpu here (--device cpu)"), err
    assert {p.name: p.read_bytes() for p in (tmp_path / "cpu").iterdir() if p.is_file()} == before
