"""The sampling core: the denoising loop over a diffusers scheduler, and images from a model.

`denoise` is diffusers' own loop (set_timesteps, scale_model_input, step) written out plainly,
with classifier-free guidance done by batching [unconditional, conditional] into one denoiser
call, as pipelines do. Callbacks let calibration record activations at chosen steps and let
reports compare backends step by step. On top of it, `generate` turns a loaded model and any
backend (`make_denoiser`) into images from per-image seeds, and `step_errors` measures a
quantized denoiser on a reference trajectory's recorded inputs. They live here, below the API
and evaluation, so both use one sampling core without importing each other.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from qdiff.core.conditioning import Conditioning
from qdiff.core.errors import SamplingError
from qdiff.core.metrics import cosine, relative_l2
from qdiff.core.progress import progress as progress_bar
from qdiff.runtime.backends import Denoiser
from qdiff.runtime.schedulers import make_scheduler


@dataclass
class StepRecord:
    """What the denoiser saw and returned at one step (inputs as the backend received them)."""

    index: int
    timestep: float
    model_input: torch.Tensor
    denoiser_kwargs: dict[str, torch.Tensor]
    model_output: torch.Tensor


StepCallback = Callable[[StepRecord], None]


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise from a CPU generator, so every backend and device starts from the same tensor."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _cfg_inputs(conditioning: Conditioning | None, guidance_scale: float) -> tuple[dict[str, torch.Tensor], bool]:
    if conditioning is None:
        return {}, False
    if guidance_scale == 1.0:
        return dict(conditioning.cond), False
    return {k: torch.cat([conditioning.uncond[k], conditioning.cond[k]]) for k in conditioning.cond}, True


def denoise(
    denoiser: Denoiser,
    scheduler,
    noise: torch.Tensor,
    num_inference_steps: int,
    *,
    conditioning: Conditioning | None = None,
    guidance_scale: float = 1.0,
    seed: int = 0,
    before_step: Callable[[int, float], None] | None = None,
    after_step: StepCallback | None = None,
    stop_after_step: int | None = None,
    allow_nonfinite: bool = False,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Run the scheduler loop from `noise`; return the final (latent or pixel) sample."""
    device = noise.device
    # 1. Timesteps for this many inference steps.
    scheduler.set_timesteps(num_inference_steps)
    # 2. The starting sample: unit Gaussian noise scaled as the scheduler expects.
    latents = noise * scheduler.init_noise_sigma
    # 3. Conditioning, batched [uncond, cond] for classifier-free guidance.
    cond_inputs, use_cfg = _cfg_inputs(conditioning, guidance_scale)
    cond_inputs = {k: v.to(device) for k, v in cond_inputs.items()}
    step_kwargs = {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = torch.Generator(device=device).manual_seed(seed + 1)
    timesteps = scheduler.timesteps
    iterator = progress(timesteps) if progress else timesteps
    for i, t in enumerate(iterator):
        if before_step:
            before_step(i, float(t))
        # 4. Scale the input for this timestep and duplicate it for guidance.
        model_input = torch.cat([latents, latents]) if use_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        # 5. Predict.
        output = denoiser(model_input, t, **cond_inputs)
        if not allow_nonfinite and not torch.isfinite(output).all():
            bad = int((~torch.isfinite(output)).sum())
            raise SamplingError(
                f"the denoiser returned {bad} NaN/Inf values at step {i} (timestep {float(t):g})",
                hint="the quantized model overflows here; recalibrate, or pass --allow-nonfinite to continue",
            )
        if after_step:
            after_step(StepRecord(i, float(t), model_input, cond_inputs, output))
        # 6. Classifier-free guidance.
        if use_cfg:
            uncond_out, cond_out = output.chunk(2)
            output = uncond_out + guidance_scale * (cond_out - uncond_out)
        # 7. One scheduler step: x_t -> x_{t-1}.
        latents = scheduler.step(output, t, latents, **step_kwargs, return_dict=False)[0]
        if stop_after_step is not None and i >= stop_after_step:
            break
    return latents


@torch.no_grad()
def decode(latents: torch.Tensor, vae: torch.nn.Module | None = None) -> torch.Tensor:
    """Images in [0, 1], NCHW: the VAE decode for latent models, a rescale for pixel models."""
    if vae is not None:
        scale = getattr(vae.config, "scaling_factor", 0.18215)
        weight = next(vae.parameters())
        latents = vae.decode(latents.to(device=weight.device, dtype=weight.dtype) / scale, return_dict=False)[0].float()
    return (latents / 2 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> "list":
    """NCHW [0, 1] tensors to a list of HWC uint8 numpy arrays. A NaN pixel (only where the caller
    allowed non-finite outputs) becomes 0, black, by rule rather than by the cast's undefined
    result; +-inf clip to 255 / 0."""
    arrays = (torch.nan_to_num(images.float(), nan=0.0).permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype("uint8")
    return list(arrays)


# ----------------------------------------------------------------------------- images from a model


class SamplingModel(Protocol):
    """What sampling reads from a loaded model (`qdiff.models.ModelBundle` is one)."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None
    scheduler_config: dict[str, Any] | None

    @property
    def in_channels(self) -> int: ...

    @property
    def sample_size(self) -> int: ...


@dataclass
class SampleResult:
    """Images (HWC uint8) from `generate`, their seeds, where `sample` wrote them, and the
    recorded steps when asked for (`StepRecord`s)."""

    images: list[np.ndarray]
    seeds: list[int]
    paths: list[Path] = field(default_factory=list)
    steps: list[Any] = field(default_factory=list)


def make_denoiser(bundle: SamplingModel, backend: str = "pytorch", onnx_path: str | Path | None = None, optimize: bool = True, engine: str | Path | None = None, ort_arithmetic: str = "exact") -> Denoiser:
    """The denoiser of `backend`: the PyTorch UNet, an ONNX graph under ONNX Runtime, or a TensorRT engine."""
    from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser, check_backend

    check_backend(backend)
    if backend == "pytorch":
        return TorchDenoiser(bundle.unet)
    if backend == "onnxruntime":
        if onnx_path is None:
            raise SamplingError("the onnxruntime backend needs an ONNX file", hint="pass --onnx PATH")
        return OnnxRuntimeDenoiser(onnx_path, optimize=optimize, arithmetic=ort_arithmetic)
    if backend == "tensorrt":
        if engine is None:
            raise SamplingError("the tensorrt backend needs an engine", hint="pass --engine ENGINE_DIR (made by `qdiff build`)")
        from qdiff.runtime.tensorrt_backend import TensorRTDenoiser

        return TensorRTDenoiser(engine)
    raise AssertionError(f"check_backend accepted {backend!r} without a denoiser for it")


def generate(
    bundle: SamplingModel,
    denoiser: Denoiser,
    *,
    scheduler: str = "ddim",
    steps: int = 50,
    seeds: list[int],
    conditioning: Conditioning | None = None,
    guidance_scale: float = 1.0,
    record_steps: bool = False,
    allow_nonfinite: bool = False,
    desc: str = "sample",
) -> SampleResult:
    """Images from `denoiser`, one seed per image, all images in one batch."""
    if not seeds:
        raise SamplingError("asked for 0 images; need at least 1")
    sched = make_scheduler(scheduler, bundle.scheduler_config)
    shape = (bundle.in_channels, bundle.sample_size, bundle.sample_size)
    # Noise is drawn on the CPU (same start on every backend), then the loop runs where the
    # denoiser lives, so a GPU backend never round-trips through host memory between steps.
    noise = torch.cat([initial_noise((1, *shape), s) for s in seeds]).to(getattr(denoiser, "device", "cpu"))
    records = []
    latents = denoise(
        denoiser,
        sched,
        noise,
        steps,
        conditioning=conditioning,
        guidance_scale=guidance_scale if conditioning is not None else 1.0,
        seed=seeds[0],
        after_step=records.append if record_steps else None,
        allow_nonfinite=allow_nonfinite,
        progress=lambda it: progress_bar(it, desc=desc, unit="step"),
    )
    return SampleResult(to_uint8(decode(latents, bundle.vae)), list(seeds), steps=records)


def step_errors(records: list[StepRecord], quantized: Denoiser) -> list[dict[str, float]]:
    """The quantized denoiser on the FP32 trajectory's inputs, step by step."""
    rows = []
    for rec in progress_bar(records, desc="step errors", unit="step"):
        q = quantized(rec.model_input, torch.tensor(rec.timestep), **rec.denoiser_kwargs)
        rows.append({"step": rec.index, "timestep": rec.timestep, "rel_l2": relative_l2(q, rec.model_output), "cosine": cosine(q, rec.model_output)})
    return rows
