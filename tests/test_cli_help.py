"""The CLI as a person meets it: help texts, deprecated spellings, --quiet output. Fast: the
API is replaced by fakes, so nothing is exported or calibrated here."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qdiff import api, cli


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_has_help_showing_its_default():
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or action.dest in ("help", "verbose", "quiet"):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.option_strings and not action.required:
                assert "default" in action.help or "required" in action.help, f"{name} {action.option_strings}: help does not say the default"


def test_calibrate_help_shows_the_recipe_defaults_and_run_its_own():
    from qdiff.calib.recipe import PRESETS

    subs = _subparsers()
    calib = subs["calibrate"].format_help()
    r = PRESETS["w8a8"]
    for value in (r.num_timesteps, r.samples_per_timestep, r.calibration_steps, r.batch_size):
        assert f"the presets': {value})" in " ".join(calib.split())
    run = " ".join(subs["run"].format_help().split())
    c = api.RUN_CALIBRATION
    assert f"{c['num_timesteps']} timesteps x {c['samples_per_timestep']} samples x {c['calibration_steps']}-step loop, batch {c['batch_size']}" in run
    assert "--calib-scheduler" in calib and "--sampler" in run and "--calib-scheduler" in run


@pytest.mark.parametrize("command", ["calibrate", "run"])
def test_old_scheduler_spelling_still_works_with_a_warning(command, capsys):
    argv = [command, "m", "-o", "x", "--scheduler", "ddpm"] if command == "calibrate" else [command, "-o", "x", "--scheduler", "ddpm"]
    args = cli.build_parser().parse_args(argv)
    assert args.calib_scheduler == "ddpm"
    err = capsys.readouterr().err
    assert "--scheduler is deprecated" in err and "--calib-scheduler" in err
    assert cli.build_parser().parse_args([*argv[:-2], "--calib-scheduler", "euler"]).calib_scheduler == "euler"
    assert "deprecated" not in capsys.readouterr().err


def test_run_passes_the_calibration_scheduler_into_the_recipe(monkeypatch, tmp_path):
    seen = {}

    def fake_run(model, out, **kw):
        seen.update(kw)
        return SimpleNamespace(report_paths=(Path(out) / "report.json", Path(out) / "report.md"))

    monkeypatch.setattr(api, "run", fake_run)
    assert cli.main(["run", "-o", str(tmp_path), "--calib-scheduler", "ddpm", "--sampler", "euler"]) == 0
    assert seen["recipe"].scheduler == "ddpm" and seen["recipe"].name == "w8a8" and seen["scheduler"] == "euler"
    assert cli.main(["run", "-o", str(tmp_path)]) == 0
    assert seen["recipe"] == "w8a8"


def _fakes(monkeypatch, out: Path) -> None:
    import qdiff.engines.inspector as inspector
    import qdiff.evaluate as evaluate

    monkeypatch.setattr(api, "export_model", lambda *a, **k: SimpleNamespace(onnx_path=out / "denoiser.onnx"))
    monkeypatch.setattr(api, "calibrate", lambda *a, **k: SimpleNamespace(table_path=out / "calibration.json"))
    monkeypatch.setattr(api, "reconstruct", lambda *a, **k: SimpleNamespace(weights_path=out / "reconstruction.safetensors"))
    monkeypatch.setattr(api, "quantize_onnx", lambda *a, **k: SimpleNamespace(onnx_path=out / "denoiser.w8a8.onnx"))
    monkeypatch.setattr(api, "build_engine", lambda *a, **k: SimpleNamespace(engine_path=out / "engine.plan"))
    monkeypatch.setattr(api, "inspect_engine", lambda *a, **k: object())
    monkeypatch.setattr(inspector, "to_markdown", lambda report, title: "| layer |\n")
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: SimpleNamespace(paths={"markdown": out / "eval.md"}))
    monkeypatch.setattr(api, "run", lambda *a, **k: SimpleNamespace(report_paths=(out / "report.json", out / "report.md")))
    monkeypatch.setattr(api, "sample", lambda *a, **k: None)


@pytest.mark.parametrize(
    "argv, printed",
    [
        (["export", "m", "-o", "{out}"], "denoiser.onnx"),
        (["calibrate", "m", "-o", "{out}"], "calibration.json"),
        (["reconstruct", "m", "-o", "{out}", "--calib", "t.json", "--device", "cpu"], "reconstruction.safetensors"),
        (["quantize", "g.onnx", "--calib", "t.json"], "denoiser.w8a8.onnx"),
        (["build", "g.onnx", "-o", "{out}"], "engine.plan"),
        (["inspect", "{out}"], "inspect.md"),
        (["eval", "--run-dir", "{out}", "-o", "{out}"], "eval.md"),
        (["run", "-o", "{out}"], "report.md"),
        (["sample", "-o", "{out}"], "grid.png"),
    ],
)
def test_quiet_still_prints_where_the_results_went(argv, printed, monkeypatch, tmp_path, capsys):
    _fakes(monkeypatch, tmp_path)
    monkeypatch.setenv("QDIFF_QUIET", "0")
    assert cli.main(["--quiet", *(a.replace("{out}", str(tmp_path)) for a in argv)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(last) == tmp_path / printed


def test_a_failing_command_does_not_import_torch(tmp_path):
    """Startup: a wrong path is reported before torch (seconds to import) is loaded."""
    code = "import sys; from qdiff import cli; rc = cli.main(['quantize', 'missing.onnx', '--calib', 'missing.json']); print('torch' in sys.modules, rc)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "QDIFF_QUIET": "1"}, timeout=120)
    assert r.stdout.split() == ["False", "1"], r.stdout + r.stderr


def test_run_small_end_to_end_then_reused(uncond_model_dir, tmp_path, capsys, monkeypatch):
    """The fast stand-in for the slow `qdiff run` tests: the real pipeline on the tiny model with
    tiny settings, then a rerun that reuses every artifact and says so per stage."""
    monkeypatch.setenv("QDIFF_QUIET", "0")
    out = tmp_path / "run"
    argv = ["--quiet", "run", str(uncond_model_dir), "-o", str(out), "--steps", "2", "--num-images", "1", "--timesteps", "2", "--samples", "2", "--calib-steps", "2", "--calib-batch", "2"]
    assert cli.main(argv) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == out / "report.md"
    for name in ("grid.png", "report.json", "denoiser.onnx", "calibration.json", "denoiser.w8a8.onnx"):
        assert (out / name).is_file(), name
    monkeypatch.setenv("QDIFF_QUIET", "0")
    assert cli.main(argv[1:]) == 0
    logged = capsys.readouterr().out
    for stage in ("export", "calibrate", "quantize"):
        assert f"{stage}: " in logged and "up to date" in logged


def test_cli_refuses_int4_weight_only_with_a_reconstruction(capsys):
    from qdiff.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["quantize", "g.onnx", "--int4-weight-only", "--reconstruction", "r.safetensors"])
    assert exit_.value.code == 2 and "--reconstruction" in capsys.readouterr().err


def test_device_flags_reach_calibrate_and_run(monkeypatch, tmp_path):
    """`calibrate --device` is calibrate's `device` and `run --calib-device` run's `calib_device`,
    both cpu unless given (not cuda-if-available: the device is part of the table's identity)."""
    seen: dict[str, dict] = {}

    def fake(stage: str, result: SimpleNamespace):
        def call(*args, **kwargs):
            seen[stage] = kwargs
            return result

        return call

    monkeypatch.setattr(api, "calibrate", fake("calibrate", SimpleNamespace(table_path=tmp_path / "calibration.json")))
    monkeypatch.setattr(api, "run", fake("run", SimpleNamespace(report_paths=(tmp_path / "report.json", tmp_path / "report.md"))))
    assert cli.main(["calibrate", "m", "-o", str(tmp_path), "--device", "cuda:1"]) == 0
    assert cli.main(["run", "-o", str(tmp_path), "--calib-device", "cuda"]) == 0
    assert seen["calibrate"]["device"] == "cuda:1" and seen["run"]["calib_device"] == "cuda"
    assert cli.build_parser().parse_args(["calibrate", "m", "-o", "x"]).device == "cpu"
    assert cli.build_parser().parse_args(["run"]).calib_device == "cpu"
