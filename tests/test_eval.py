"""`qdiff eval`: a quantized graph against its FP32 graph, on real ONNX Runtime sessions and files."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import quantize_model
from qdiff.core.errors import EvaluationError
from qdiff.evaluate import evaluate, resolve_graphs


@pytest.fixture(scope="module")
def quantized(uncond_model_dir, tmp_path_factory, fast_recipe):
    """(bundle, fp32 graph, Q/DQ graph) of the tiny unconditional model, in a run-like folder."""
    out = tmp_path_factory.mktemp("eval-art")
    bundle, fp32, _table, q = quantize_model(uncond_model_dir, out, fast_recipe.with_overrides(split_shortcut=True))
    return bundle, fp32, q.onnx_path


def test_fp32_against_itself_is_exact(quantized, tmp_path):
    bundle, fp32, _ = quantized
    result = evaluate(bundle, fp32, fp32, tmp_path, steps=4, num_images=2)
    summary = result.report["summary"]
    assert math.isinf(summary["mean PSNR (dB)"]) and summary["mean SSIM"] == pytest.approx(1.0)
    assert all(row["rel_l2"] == 0.0 and row["cosine"] == pytest.approx(1.0) for row in result.report["steps"])
    # A model that is not one of the shipped shapes models: shape-FD is skipped, and says why.
    assert result.report["shape_fd"]["available"] is False and "not one of the shipped shapes models" in result.report["shape_fd"]["reason"]


def test_quantized_graph_report_files(quantized, tmp_path):
    bundle, fp32, qdq = quantized
    result = evaluate(bundle, fp32, qdq, tmp_path / "out", steps=5, num_images=3, seed=7)
    out = tmp_path / "out"
    report = json.loads((out / "eval.json").read_text())
    assert [row["seed"] for row in report["images"]] == [7, 8, 9]
    assert len(report["steps"]) == 5 and all(0 < row["rel_l2"] < 1 for row in report["steps"])
    assert all(np.isfinite(row["psnr"]) and row["psnr"] > 10 for row in report["images"])
    assert report["graphs"]["checks"] == {"fp32": "manifest matches the model", "quantized": "manifest matches the model"}
    md = (out / "eval.md").read_text()
    for text in ("## Summary", "## Noise-prediction error per denoising step", "![Noise-prediction error vs timestep](eval-steps.png)", "Skipped: "):
        assert text in md
    grid = Image.open(out / "eval-grid.png")
    assert grid.size[1] > 2 * bundle.sample_size  # two rows: FP32 and quantized
    assert Image.open(out / "eval-steps.png").size[0] > 100
    assert result.paths["markdown"] == out / "eval.md"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing behind


def test_graphs_from_a_run_folder_and_refusals(quantized, class_cond_model_dir, tmp_path):
    _, fp32, qdq = quantized
    assert resolve_graphs(fp32.parent, None, None) == (fp32, qdq)
    with pytest.raises(EvaluationError, match="does not exist"):
        resolve_graphs(tmp_path / "missing", None, None)
    with pytest.raises(EvaluationError, match="needs an FP32 and a quantized graph"):
        resolve_graphs(None, fp32, None)
    # Two Q/DQ graphs and no report saying which: ambiguous, so refused with both names.
    run = tmp_path / "run"
    run.mkdir()
    for name in ("denoiser.onnx", "denoiser.onnx.manifest.json"):
        shutil.copy(fp32.parent / name, run / name)
    for name in ("denoiser.w8a8.onnx", "denoiser.w4a8.onnx"):
        shutil.copy(qdq, run / name)
        shutil.copy(qdq.parent / f"{qdq.name}.manifest.json", run / f"{name}.manifest.json")
    with pytest.raises(EvaluationError, match="2 quantized graphs .*denoiser.w4a8.onnx, denoiser.w8a8.onnx"):
        resolve_graphs(run, None, None)
    # Graphs made from another model are refused before anything is sampled.
    with pytest.raises(EvaluationError, match="was made from model"):
        evaluate(class_cond_model_dir, fp32, qdq, tmp_path / "never", steps=2, num_images=1)
    assert not (tmp_path / "never").exists()


def test_shape_fd_separates_real_images_from_noise():
    from qdiff.datasets import shape_fd
    from qdiff.datasets.shapes import generate
    from qdiff.models import PACKAGE_MODELS, unet_sha256

    assert shape_fd.shipped_shapes_model(unet_sha256(PACKAGE_MODELS / "shapes-cond" / "unet")) == "shapes-cond"
    assert shape_fd.shipped_shapes_model("0" * 64) is None
    real, _ = generate(32, seed=0, split="train", start=5000)
    noise = np.random.default_rng(0).integers(0, 256, size=real.shape, dtype=np.uint8)
    fd_real, fd_noise = shape_fd.shape_fd(real), shape_fd.shape_fd(noise)
    assert fd_real < 3 * shape_fd.real_reference(32) and fd_noise > 5 * fd_real


def test_cli_eval_on_a_run_folder(quantized, tmp_path, capsys):
    """In-process `qdiff eval` (parser, dispatch, error printing): a subprocess would add seconds
    of imports and test nothing more."""
    from qdiff.cli import main

    _, fp32, _ = quantized
    assert main(["--quiet", "eval", "--run-dir", str(fp32.parent), "-o", str(tmp_path / "ev"), "--steps", "3", "--num-images", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "ev" / "eval.md")
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["sampling"]["num_images"] == 2 and len(report["steps"]) == 3
    assert report["graphs"]["quantized"].endswith("denoiser.w8a8.onnx")
    # The model came from the FP32 graph's manifest, not from the built-in default.
    assert report["model"]["sha256"] == json.loads((fp32.parent / "denoiser.onnx.manifest.json").read_text())["inputs"]["model_sha256"]
    assert main(["eval", "--fp32", str(tmp_path / "no.onnx"), "--quantized", str(fp32)]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 2 and "Traceback" not in err
