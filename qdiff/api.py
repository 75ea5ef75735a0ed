"""The public Python API: one function per stage, and `run` for all of them.

The CLI only parses arguments and calls these. Each stage reads and writes artifacts with
manifests (`qdiff.artifacts`), skips its work when the manifest on disk says the artifact was
made from the same inputs and settings, and stages its output in a temporary folder so a
failure or a kill leaves the previous artifact intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdiff.artifacts import Manifest, is_up_to_date, read_manifest, sha256_file, write_manifest
from qdiff.calib.recipe import Recipe, load_recipe
from qdiff.calib.table import CalibrationTable
from qdiff.conditioning import Conditioning, resolve_conditioning
from qdiff.errors import ArtifactMismatchError, ExportError, SamplingError
from qdiff.models import ModelBundle, load_model
from qdiff.progress import log, progress

ONNX_NAME = "denoiser.onnx"
TABLE_NAME = "calibration.json"

ModelLike = str | Path | ModelBundle | None


def _bundle(model: ModelLike, components: bool = True) -> ModelBundle:
    return model if isinstance(model, ModelBundle) else load_model(model, components=components)


STAGING_PREFIX = ".qdiff-staging-"


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A temporary folder inside `out_dir` (same file system, so publishing is a rename).

    Named with the writer's pid; folders of writers that were killed are removed here.
    """
    import shutil

    from qdiff.artifacts import pid_alive

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{STAGING_PREFIX}*"):
        pid = stale.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out_dir) as tmp:
        yield Path(tmp)


# ----------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    onnx_path: Path
    validation: list[dict[str, Any]]
    reused: bool = False


def _onnx_target(out: str | Path) -> Path:
    out = Path(out)
    return out if out.suffix == ".onnx" else out / ONNX_NAME


def validate_export(unet: torch.nn.Module, onnx_path: Path, tolerance=None, batches: tuple[int, ...] = (1, 3)) -> list[dict[str, Any]]:
    """ONNX Runtime vs PyTorch on seeded random inputs; raises ExportError above tolerance.

    Two batch sizes, neither the one traced with, so a broken dynamic axis shows up here.
    """
    from qdiff.export.onnx_export import example_inputs
    from qdiff.export.validate import Tolerance, error_stats
    from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser

    tolerance = tolerance or Tolerance()
    session = OnnxRuntimeDenoiser(onnx_path)
    reference = TorchDenoiser(unet)
    results = []
    for seed, batch in enumerate(batches):
        inputs = example_inputs(unet, batch=batch, seed=100 + seed, tokens=7 + seed)
        sample, t = inputs.pop("sample"), inputs.pop("timestep")
        stats = error_stats(session(sample, t, **inputs), reference(sample, t, **inputs))
        problems = tolerance.violations(stats)
        results.append({"batch": batch, **stats.to_json(), "ok": not problems})
        if problems:
            raise ExportError(f"ONNX Runtime disagrees with PyTorch on {onnx_path.name} at batch {batch}: " + "; ".join(problems) + f" [{stats}]")
    return results


def export_model(model: ModelLike, out: str | Path, *, opset: int = 17, external_data: bool | None = None, force: bool = False, check: bool = True) -> ExportResult:
    """Export the model's denoiser to ONNX (FP32) and check it against PyTorch."""
    from qdiff.export.onnx_export import export_unet
    from qdiff.export.onnx_io import publish_onnx

    bundle = _bundle(model, components=False)
    target = _onnx_target(out)
    wanted = Manifest(kind="onnx-export", inputs={"model_sha256": bundle.model_sha256}, settings={"opset": opset, "unet_class": bundle.unet_class})
    if not force and is_up_to_date(target, wanted):
        log(f"export: {target} is up to date (same model and settings); skipping")
        return ExportResult(target, read_manifest(target).details.get("validation", []), reused=True)
    started = time.perf_counter()
    with _staging(target.parent) as stage:
        staged = stage / target.name
        log(f"export: tracing {bundle.unet_class} from {bundle.path} ...")
        export_unet(bundle.unet, staged, opset=opset, external_data=external_data)
        validation = validate_export(bundle.unet, staged) if check else []
        publish_onnx(staged, target)
    wanted.outputs = {"sha256": sha256_file(target)}
    wanted.details = {"validation": validation, "seconds": round(time.perf_counter() - started, 2), "model_path": str(bundle.path)}
    write_manifest(target, wanted)
    for v in validation:
        log(f"export: batch {v['batch']}: max|d|={v['max_abs']:.2e} relL2={v['rel_l2']:.2e} vs PyTorch")
    return ExportResult(target, validation)


# ----------------------------------------------------------------------------- calibrate


@dataclass
class CalibrateResult:
    table_path: Path
    table: CalibrationTable
    reused: bool = False


def _conditioning_key(cond: Conditioning | None) -> str:
    if cond is None:
        return "none"
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(cond.cond):
        digest.update(cond.cond[key].numpy().tobytes())
        digest.update(cond.uncond[key].numpy().tobytes())
    return f"{cond.source}:{digest.hexdigest()[:16]}"


def calibrate(
    model: ModelLike,
    out: str | Path,
    recipe: str | Path | Recipe = "w8a8",
    *,
    scheduler: str | None = None,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    embeddings: str | Path | None = None,
    random_conditioning: bool = False,
    force: bool = False,
    **recipe_overrides: Any,
) -> CalibrateResult:
    """Timestep-uniform calibration over the model's own sampler; writes the calibration table."""
    from qdiff.calib.collect import collect_ranges
    from qdiff.runtime.backends import TorchDenoiser
    from qdiff.runtime.sampler import denoise
    from qdiff.runtime.schedulers import make_scheduler

    recipe = load_recipe(recipe, scheduler=scheduler, **recipe_overrides)  # fail fast, before loading
    bundle = _bundle(model)
    out = Path(out)
    target = out if out.suffix == ".json" else out / TABLE_NAME
    conditioning = resolve_conditioning(
        bundle, recipe.samples_per_timestep, prompts=prompts, class_labels=class_labels, embeddings=embeddings, random=random_conditioning, seed=recipe.seed
    )
    wanted = Manifest(
        kind="calibration-table",
        inputs={"model_sha256": bundle.model_sha256, "conditioning": _conditioning_key(conditioning)},
        settings={"recipe": recipe.to_json()},
    )
    if not force and is_up_to_date(target, wanted):
        log(f"calibrate: {target} is up to date (same model, conditioning and recipe); skipping")
        return CalibrateResult(target, CalibrationTable.load(target), reused=True)
    sched = make_scheduler(recipe.scheduler, bundle.scheduler_config)
    log(
        f"calibrate: {recipe.samples_per_timestep} trajectories x {recipe.num_timesteps} timesteps of a {recipe.calibration_steps}-step "
        f"{recipe.scheduler} loop, {recipe.activation_calibrator} calibrator"
    )
    started = time.perf_counter()
    table = collect_ranges(
        bundle.unet,
        TorchDenoiser(bundle.unet),
        sched,
        recipe,
        denoise,
        sample_shape=(bundle.in_channels, bundle.sample_size, bundle.sample_size),
        conditioning=conditioning,
        model_sha256=bundle.model_sha256,
        scheduler_name=recipe.scheduler,
        progress=progress,
    )
    table.provenance["model_path"] = str(bundle.path)
    table.save(target)
    wanted.outputs = {"sha256": sha256_file(target)}
    wanted.details = {"seconds": round(time.perf_counter() - started, 2), "layers": len(table.layers), "degenerate": table.degenerate}
    write_manifest(target, wanted)
    log(f"calibrate: {len(table.layers)} layers calibrated in {wanted.details['seconds']} s -> {target}")
    return CalibrateResult(target, table)


# ----------------------------------------------------------------------------- quantize


@dataclass
class QuantizeResult:
    onnx_path: Path
    report: Any
    reused: bool = False


def quantize_onnx(onnx_path: str | Path, table_path: str | Path, out: str | Path | None = None, *, force: bool = False) -> QuantizeResult:
    """Insert Q/DQ nodes into an exported graph from a calibration table."""
    from qdiff.export.onnx_io import publish_onnx
    from qdiff.export.qdq import quantize_file

    onnx_path, table_path = Path(onnx_path), Path(table_path)
    table = CalibrationTable.load(table_path)
    recipe = Recipe.from_json(table.recipe)
    export_manifest = read_manifest(onnx_path)
    if export_manifest is not None:
        exported_from = export_manifest.inputs.get("model_sha256")
        if exported_from and exported_from != table.model_sha256:
            raise ArtifactMismatchError(
                f"{onnx_path.name} was exported from model {exported_from[:12]}, but {table_path.name} calibrates model {table.model_sha256[:12]}",
                hint="export and calibrate the same model folder",
            )
    target = Path(out) if out is not None else onnx_path.with_name(f"{onnx_path.stem}.{recipe.name}.onnx")
    if target.suffix != ".onnx":
        target = target / f"{onnx_path.stem}.{recipe.name}.onnx"
    wanted = Manifest(
        kind="qdq-onnx",
        inputs={"onnx_sha256": sha256_file(onnx_path), "table_sha256": sha256_file(table_path), "model_sha256": table.model_sha256},
        settings={"recipe": recipe.to_json()},
    )
    if not force and is_up_to_date(target, wanted):
        log(f"quantize: {target} is up to date; skipping")
        return QuantizeResult(target, read_manifest(target).details.get("coverage"), reused=True)
    with _staging(target.parent) as stage:
        staged = stage / target.name
        report = quantize_file(onnx_path, table, staged, recipe)
        publish_onnx(staged, target)
    wanted.outputs = {"sha256": sha256_file(target)}
    wanted.details = {"coverage": report.to_json()}
    write_manifest(target, wanted)
    log("quantize: " + report.summary())
    return QuantizeResult(target, report)


# ----------------------------------------------------------------------------- sample


@dataclass
class SampleResult:
    images: list[np.ndarray]
    seeds: list[int]
    paths: list[Path] = field(default_factory=list)
    steps: list[Any] = field(default_factory=list)


def make_denoiser(bundle: ModelBundle, backend: str = "pytorch", onnx_path: str | Path | None = None, optimize: bool = True):
    from qdiff.runtime.backends import OnnxRuntimeDenoiser, TorchDenoiser, check_backend

    check_backend(backend)
    if backend == "pytorch":
        return TorchDenoiser(bundle.unet)
    if backend == "onnxruntime":
        if onnx_path is None:
            raise SamplingError("the onnxruntime backend needs an ONNX file", hint="pass --onnx PATH")
        return OnnxRuntimeDenoiser(onnx_path, optimize=optimize)
    raise AssertionError(f"check_backend accepted {backend!r} without a denoiser for it")


def generate(
    bundle: ModelBundle,
    denoiser,
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
    from qdiff.runtime.sampler import decode, denoise, initial_noise, to_uint8
    from qdiff.runtime.schedulers import make_scheduler

    if not seeds:
        raise SamplingError("asked for 0 images; need at least 1")
    sched = make_scheduler(scheduler, bundle.scheduler_config)
    shape = (bundle.in_channels, bundle.sample_size, bundle.sample_size)
    noise = torch.cat([initial_noise((1, *shape), s) for s in seeds])
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
        progress=lambda it: progress(it, desc=desc, unit="step"),
    )
    return SampleResult(to_uint8(decode(latents, bundle.vae)), list(seeds), steps=records)


def sample(
    model: ModelLike,
    out_dir: str | Path,
    *,
    backend: str = "pytorch",
    onnx: str | Path | None = None,
    scheduler: str = "ddim",
    steps: int = 50,
    num_images: int = 8,
    seed: int = 0,
    guidance_scale: float = 3.0,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    embeddings: str | Path | None = None,
    random_conditioning: bool = False,
    allow_nonfinite: bool = False,
) -> SampleResult:
    """Sample images with any backend and write them as PNGs (plus a grid)."""
    from PIL import Image

    from qdiff.report import image_grid, save_png

    bundle = _bundle(model)
    conditioning = resolve_conditioning(bundle, num_images, prompts=prompts, class_labels=class_labels, embeddings=embeddings, random=random_conditioning, seed=seed)
    denoiser = make_denoiser(bundle, backend, onnx)
    seeds = list(range(seed, seed + num_images))
    result = generate(bundle, denoiser, scheduler=scheduler, steps=steps, seeds=seeds, conditioning=conditioning, guidance_scale=guidance_scale, allow_nonfinite=allow_nonfinite)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, img in zip(seeds, result.images):
        result.paths.append(save_png(Image.fromarray(img), out_dir / f"sample_{s:05d}.png"))
    save_png(image_grid([result.images], scale=max(1, 128 // img.shape[0])), out_dir / "grid.png")
    log(f"sample: {len(seeds)} images ({backend}, {scheduler}, {steps} steps) -> {out_dir}")
    return result


# ----------------------------------------------------------------------------- run


# Settings of the main job: small enough for a 2-core CPU in well under 3 minutes, large enough
# that calibration sees every part of the trajectory.
RUN_CALIBRATION = {"num_timesteps": 10, "samples_per_timestep": 32, "calibration_steps": 50, "batch_size": 32}


@dataclass
class RunResult:
    out_dir: Path
    report: dict[str, Any]
    grid_path: Path
    report_paths: tuple[Path, Path]


def step_errors(records: list, quantized) -> list[dict[str, float]]:
    """The quantized denoiser on the FP32 trajectory's inputs, step by step."""
    from qdiff.metrics import cosine, relative_l2

    rows = []
    for rec in records:
        q = quantized(rec.model_input, torch.tensor(rec.timestep), **rec.denoiser_kwargs)
        rows.append({"step": rec.index, "timestep": rec.timestep, "rel_l2": relative_l2(q, rec.model_output), "cosine": cosine(q, rec.model_output)})
    return rows


def run(
    model: ModelLike = None,
    out_dir: str | Path = "qdiff-out",
    *,
    recipe: str | Path | Recipe = "w8a8",
    scheduler: str = "ddim",
    steps: int = 50,
    num_images: int = 8,
    seed: int = 0,
    guidance_scale: float = 3.0,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    embeddings: str | Path | None = None,
    random_conditioning: bool = False,
    force: bool = False,
    **recipe_overrides: Any,
) -> RunResult:
    """The main job: export, calibrate, quantize, then sample FP32 and quantized from the same
    seeds through ONNX Runtime and report how far apart they are."""
    from qdiff.metrics import psnr, ssim
    from qdiff.report import image_grid, save_png, write_quality_report
    from qdiff.runtime.backends import OnnxRuntimeDenoiser

    started = time.perf_counter()
    out_dir = Path(out_dir)
    overrides = {**RUN_CALIBRATION, **recipe_overrides}
    load_recipe(recipe, **overrides)  # fail fast on a bad recipe, before loading the model
    bundle = _bundle(model)
    exported = export_model(bundle, out_dir, force=force)
    calibrated = calibrate(bundle, out_dir, recipe, prompts=prompts, class_labels=class_labels, embeddings=embeddings, random_conditioning=random_conditioning, force=force, **overrides)
    quantized = quantize_onnx(exported.onnx_path, calibrated.table_path, force=force)
    recipe_obj = Recipe.from_json(calibrated.table.recipe)

    seeds = list(range(seed, seed + num_images))
    conditioning = resolve_conditioning(bundle, num_images, prompts=prompts, class_labels=class_labels, embeddings=embeddings, random=random_conditioning, seed=seed)
    fp32 = OnnxRuntimeDenoiser(exported.onnx_path)
    int8 = OnnxRuntimeDenoiser(quantized.onnx_path)
    common = {"scheduler": scheduler, "steps": steps, "seeds": seeds, "conditioning": conditioning, "guidance_scale": guidance_scale}
    ref = generate(bundle, fp32, record_steps=True, desc="sample fp32", **common)
    got = generate(bundle, int8, desc=f"sample {recipe_obj.name}", **common)
    per_step = step_errors(ref.steps, int8)

    image_rows = [{"seed": s, "psnr": psnr(a, b), "ssim": ssim(a, b)} for s, a, b in zip(seeds, ref.images, got.images)]
    grid = image_grid([ref.images, got.images], labels=["fp32", recipe_obj.name], scale=max(1, 96 // ref.images[0].shape[0]))
    grid_path = save_png(grid, out_dir / "grid.png")
    finite_psnr = [r["psnr"] for r in image_rows if np.isfinite(r["psnr"])]
    coverage = quantized.report
    coverage_json = coverage.to_json() if hasattr(coverage, "to_json") else coverage
    report = {
        "model": {"label": bundle.label, "path": str(bundle.path), "unet_class": bundle.unet_class, "sha256": bundle.model_sha256},
        "recipe": recipe_obj.to_json(),
        "sampling": {"backend": "onnxruntime (CPU)", "scheduler": scheduler, "steps": steps, "num_images": num_images, "seeds": seeds, "guidance_scale": guidance_scale if conditioning else 1.0},
        "summary": {
            "mean PSNR (dB)": float(np.mean(finite_psnr)) if finite_psnr else float("inf"),
            "min PSNR (dB)": float(np.min(finite_psnr)) if finite_psnr else float("inf"),
            "mean SSIM": float(np.mean([r["ssim"] for r in image_rows])),
            "mean step rel-L2 (eps)": float(np.mean([r["rel_l2"] for r in per_step])),
            "max step rel-L2 (eps)": float(np.max([r["rel_l2"] for r in per_step])),
            "quantized layers": f"{coverage_json['quantized_layers']}/{coverage_json['weighted_layers']}",
            "quantized MAC share": coverage_json["mac_share"],
            "wall time (s)": round(time.perf_counter() - started, 1),
        },
        "images": image_rows,
        "steps": per_step,
        "coverage": coverage_json,
        "coverage_text": _coverage_text(coverage_json),
        "artifacts": {"fp32_onnx": exported.onnx_path.name, "qdq_onnx": quantized.onnx_path.name, "calibration_table": calibrated.table_path.name, "grid": grid_path.name},
    }
    paths = write_quality_report(out_dir, report)
    log(f"run: mean PSNR {report['summary']['mean PSNR (dB)']:.2f} dB, mean SSIM {report['summary']['mean SSIM']:.4f} -> {paths[1]}")
    return RunResult(out_dir, report, grid_path, paths)


def _coverage_text(coverage: dict[str, Any]) -> str:
    lines = [f"{coverage['quantized_layers']} of {coverage['weighted_layers']} weighted layers quantized ({coverage['mac_share']:.1%} of their MACs).", ""]
    for layer in coverage["float_layers"]:
        lines.append(f"- float: `{layer['module']}` ({layer['op']}): {layer['reason']}")
    return "\n".join(lines)
