"""The shipped default models: they load, and W8A8 stays close to FP32 on them."""

from __future__ import annotations

import pytest

from qdiff.api import run
from qdiff.models import DEFAULT_MODEL, PACKAGE_MODELS, default_model_dir, load_model


def test_default_model_is_the_trained_one():
    assert default_model_dir() == PACKAGE_MODELS / DEFAULT_MODEL
    bundle = load_model()
    assert bundle.unet_class == "UNet2DModel" and bundle.sample_size == 32
    assert sum(p.numel() for p in bundle.unet.parameters()) > 4_000_000


def test_class_conditional_model_loads_with_its_classes():
    bundle = load_model(PACKAGE_MODELS / "shapes-cond")
    assert bundle.is_conditional
    assert bundle.class_names == ["circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart"]
    assert tuple(bundle.class_embeddings.shape) == (9, 4, 128)


@pytest.mark.slow  # > 30 s on 2 cores; fast substitute: tests/test_cli_help.py
@pytest.mark.parametrize("model, min_psnr", [(None, 24.0), (PACKAGE_MODELS / "shapes-cond", 20.0)], ids=["ddpm", "cond"])
def test_w8a8_stays_close_to_fp32_on_trained_models(tmp_path, model, min_psnr):
    """The baseline recorded in the README; later work must not fall below it."""
    result = run(model, tmp_path, steps=20, num_images=4, samples_per_timestep=16, num_timesteps=10, calibration_steps=50)
    summary = result.report["summary"]
    assert summary["mean PSNR (dB)"] > min_psnr, summary
    assert summary["mean SSIM"] > 0.8, summary
    assert summary["mean step rel-L2 (eps)"] < 0.1, summary
