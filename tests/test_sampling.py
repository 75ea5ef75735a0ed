"""The sampling loop: diffusers schedulers as they are, any backend, CFG, latent models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qdiff.api import export_model, generate, make_denoiser, sample
from qdiff.core.conditioning import resolve_conditioning
from qdiff.core.errors import ConditioningError, SamplingError
from qdiff.models import load_model
from qdiff.runtime.sampler import denoise, initial_noise
from qdiff.runtime.schedulers import make_scheduler


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_onnxruntime_and_pytorch_backends_give_the_same_images(uncond_model_dir, tmp_path, scheduler):
    bundle = load_model(uncond_model_dir)
    onnx_path = export_model(bundle, tmp_path).onnx_path
    kwargs = {"scheduler": scheduler, "steps": 10, "seeds": [3, 4]}
    a = generate(bundle, make_denoiser(bundle, "pytorch"), **kwargs)
    b = generate(bundle, make_denoiser(bundle, "onnxruntime", onnx_path), **kwargs)
    for x, y in zip(a.images, b.images):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    assert not np.array_equal(a.images[0], a.images[1])  # different seeds, different images


def test_loop_matches_diffusers_ddpm_pipeline(uncond_model_dir):
    """Our loop and diffusers' own DDIMPipeline agree from the same initial noise."""
    from diffusers import DDIMPipeline

    bundle = load_model(uncond_model_dir)
    sched = make_scheduler("ddim", bundle.scheduler_config)
    noise = initial_noise((1, 3, 16, 16), 0)
    ours = denoise(make_denoiser(bundle), sched, noise, 10)
    pipe = DDIMPipeline(unet=bundle.unet, scheduler=make_scheduler("ddim", bundle.scheduler_config))
    theirs = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=0.0, output_type="np").images
    ref = torch.from_numpy(theirs).permute(0, 3, 1, 2)
    assert torch.allclose(((ours / 2 + 0.5).clamp(0, 1)), ref, atol=1e-5)


def test_guidance_uses_both_branches(class_cond_model_dir):
    bundle = load_model(class_cond_model_dir)
    cond = resolve_conditioning(bundle, 2, class_labels=[0, 1])
    calls = []

    def spy(sample, t, encoder_hidden_states=None, **kw):
        calls.append(encoder_hidden_states)
        return make_denoiser(bundle)(sample, t, encoder_hidden_states, **kw)

    out1 = generate(bundle, spy, steps=3, seeds=[0, 1], conditioning=cond, guidance_scale=3.0).images
    assert calls[0].shape[0] == 4
    assert torch.equal(calls[0][:2], bundle.class_embeddings[-1:].repeat(2, 1, 1))  # null class first
    out2 = generate(bundle, make_denoiser(bundle), steps=3, seeds=[0, 1], conditioning=cond, guidance_scale=1.0).images
    assert not np.array_equal(out1[0], out2[0])


def test_class_labels_are_checked(class_cond_model_dir):
    bundle = load_model(class_cond_model_dir)
    with pytest.raises(ConditioningError, match="out of range"):
        resolve_conditioning(bundle, 1, class_labels=[7])


def test_nonfinite_output_stops_sampling_and_names_the_step(uncond_model_dir):
    bundle = load_model(uncond_model_dir)

    def broken(sample, t, **kw):
        out = torch.zeros_like(sample)
        if float(t) < 500:
            out[0, 0, 0, 0] = float("nan")
        return out

    with pytest.raises(SamplingError, match=r"at step \d+ \(timestep"):
        generate(bundle, broken, steps=10, seeds=[0])
    generate(bundle, broken, steps=10, seeds=[0], allow_nonfinite=True)


def test_latent_model_decodes_through_its_vae_and_encodes_prompts(tmp_path):
    """A text-to-image pipeline folder: CLIP text encoder + tokenizer, UNet, VAE, scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.conftest import tiny_cond_unet

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "red</w>": 3, "circle</w>": 4, "!": 5}
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=6, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4)
    folder = tmp_path / "pipe"
    for name, obj in {"unet": tiny_cond_unet("sd"), "text_encoder": text_encoder, "tokenizer": tokenizer, "vae": vae, "scheduler": DDPMScheduler()}.items():
        obj.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    bundle = load_model(folder)
    assert bundle.vae is not None and bundle.text_encoder is not None
    result = sample(folder, tmp_path / "out", prompts=["a red circle"], num_images=2, steps=3)
    assert result.images[0].shape == (16, 16, 3)  # the VAE here has no downsampling: 16 -> 16
    assert len(result.paths) == 2 and all(p.is_file() for p in result.paths)
    assert (tmp_path / "out" / "grid.png").is_file()
    with pytest.raises(ConditioningError, match="nothing says"):
        sample(folder, tmp_path / "out2", num_images=1, steps=2)
