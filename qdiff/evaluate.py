"""Quality of a quantized denoiser against its FP32 original, sampled from the same seeds.

Three views, because each one alone misleads:

- **per-step noise-prediction error**: the quantized denoiser is called on the inputs the FP32
  model saw along its own trajectory (`step_errors`), so the error of each step is measured
  without the drift of earlier steps. It says where in the trajectory quantization hurts.
- **final-sample PSNR/SSIM** vs the FP32 image of the same seed: what a user sees, but it
  also counts harmless drift (a background that changed colour) as error.
- **shape-FD** to the dataset (`qdiff.datasets.shape_fd`): whether the samples are still
  as close to the data *distribution*, which is what quantization must preserve. It needs a
  model trained on the shapes dataset, so it is computed for the shipped shapes models only.

`compare` is the shared core: `qdiff run`, `qdiff eval` and the ablation driver call it with an
FP32 reference sampled once (`reference_samples`), so every quantized variant is measured
against the same FP32 trajectory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qdiff.core.artifacts import check_made_from_model, read_manifest
from qdiff.core.conditioning import Conditioning, resolve_conditioning
from qdiff.core.errors import ArtifactMismatchError, EvaluationError
from qdiff.models import ModelBundle
from qdiff.core.progress import log
from qdiff.runtime.sampling_spec import SamplingSpec

EVAL_NAME = "eval"  # eval.json, eval.md, eval-grid.png, eval-steps.png


@dataclass(frozen=True)
class SamplingPlan:
    """What both models sample: same scheduler, steps, seeds, conditioning and guidance."""

    scheduler: str
    steps: int
    seeds: tuple[int, ...]
    conditioning: Conditioning | None
    guidance_scale: float

    def to_json(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler,
            "steps": self.steps,
            "num_images": len(self.seeds),
            "seeds": list(self.seeds),
            "guidance_scale": self.guidance_scale if self.conditioning is not None else 1.0,
            "conditioning": self.conditioning.source if self.conditioning is not None else "none (unconditional model)",
        }


def sampling_plan(bundle: ModelBundle, spec: SamplingSpec | None = None, **sampling: Any) -> SamplingPlan:
    """Seeds `seed .. seed + num_images - 1` and the model's conditioning for them, from a
    `SamplingSpec` (or its fields as keywords)."""
    spec = SamplingSpec.of(spec, **sampling)
    conditioning = resolve_conditioning(bundle, spec.num_images, **spec.conditioning_kwargs())
    return SamplingPlan(spec.scheduler, spec.steps, tuple(spec.seeds), conditioning, spec.guidance_scale)


def reference_samples(bundle: ModelBundle, denoiser, plan: SamplingPlan, desc: str = "sample fp32"):
    """FP32 samples with every step's denoiser inputs and outputs recorded (for `compare`)."""
    from qdiff.runtime.sampler import generate

    return generate(bundle, denoiser, record_steps=True, desc=desc, **_generate_kwargs(plan))


def _generate_kwargs(plan: SamplingPlan) -> dict[str, Any]:
    return {"scheduler": plan.scheduler, "steps": plan.steps, "seeds": list(plan.seeds), "conditioning": plan.conditioning, "guidance_scale": plan.guidance_scale}


@dataclass
class Comparison:
    """A candidate denoiser measured against an FP32 reference (all fields JSON-ready but images)."""

    images: list[dict[str, float]]
    steps: list[dict[str, float]]
    summary: dict[str, Any]
    shape_fd: dict[str, Any]
    reference_images: list[np.ndarray] = field(repr=False, default_factory=list)
    candidate_images: list[np.ndarray] = field(repr=False, default_factory=list)
    seconds: float = 0.0


def compare(bundle: ModelBundle, reference, candidate, plan: SamplingPlan, *, label: str = "quantized", shape_fd: bool = True, allow_nonfinite: bool = False) -> Comparison:
    """Sample `candidate` from the plan's seeds and measure it against `reference`
    (`reference_samples` of the FP32 model under the same plan)."""
    from qdiff.runtime.sampler import generate, step_errors
    from qdiff.core.metrics import psnr, ssim

    started = time.perf_counter()
    if not reference.steps or len(reference.images) != len(plan.seeds):
        raise EvaluationError(
            f"the reference ({len(reference.images)} images, {len(reference.steps)} recorded steps) was not sampled with this plan ({len(plan.seeds)} images)",
            hint="make it with qdiff.evaluate.reference_samples(bundle, fp32, plan) for the same plan",
        )
    got = generate(bundle, candidate, desc=f"sample {label}", allow_nonfinite=allow_nonfinite, **_generate_kwargs(plan))
    per_step = step_errors(reference.steps, candidate)
    images = [{"seed": s, "psnr": psnr(a, b), "ssim": ssim(a, b)} for s, a, b in zip(plan.seeds, reference.images, got.images, strict=True)]
    fd = shape_fd_section(bundle, reference.images, got.images) if shape_fd else {"available": False, "reason": "not requested"}
    comparison = Comparison(images, per_step, summarize(images, per_step, fd), fd, list(reference.images), list(got.images))
    comparison.seconds = round(time.perf_counter() - started, 1)
    return comparison


def summarize(images: list[dict[str, float]], per_step: list[dict[str, float]], fd: dict[str, Any] | None = None) -> dict[str, Any]:
    """The headline numbers, keyed as the reports print them."""
    finite = [r["psnr"] for r in images if np.isfinite(r["psnr"])]
    summary = {
        "mean PSNR (dB)": float(np.mean(finite)) if finite else float("inf"),
        "min PSNR (dB)": float(np.min(finite)) if finite else float("inf"),
        "mean SSIM": float(np.mean([r["ssim"] for r in images])),
        "mean step rel-L2 (eps)": float(np.mean([r["rel_l2"] for r in per_step])),
        "max step rel-L2 (eps)": float(np.max([r["rel_l2"] for r in per_step])),
    }
    if fd and fd.get("available"):
        summary["shape-FD fp32"] = fd["fp32"]
        summary["shape-FD quantized"] = fd["quantized"]
        summary[f"shape-FD real-vs-real floor (n={fd['n_generated']})"] = fd["real_reference"]
    return summary


def shape_fd_section(bundle: ModelBundle, reference_images: list[np.ndarray], candidate_images: list[np.ndarray]) -> dict[str, Any]:
    """shape-FD of FP32 and candidate samples, or why it was skipped (never silently)."""
    from qdiff.datasets import shape_fd as sfd

    name = sfd.shipped_shapes_model(bundle.model_sha256)
    if name is None:
        return {"available": False, "reason": f"{bundle.label} is not one of the shipped shapes models ({', '.join(sfd.SHAPES_MODELS)}); shape-FD needs a model trained on the shapes dataset, so it was skipped"}
    if len(candidate_images) < 2:
        return {"available": False, "reason": "shape-FD needs at least 2 images"}
    n = len(candidate_images)
    return {
        "available": True,
        "model": name,
        "fp32": sfd.shape_fd(reference_images),
        "quantized": sfd.shape_fd(candidate_images),
        "real_reference": sfd.real_reference(n),
        "n_generated": n,
        "n_real": sfd.DEFAULT_REAL_IMAGES,
        "classifier_accuracy": sfd.classifier_info().get("held_out_accuracy", {}).get("overall"),
    }


# ----------------------------------------------------------------------------- qdiff eval


@dataclass
class EvalResult:
    out_dir: Path
    report: dict[str, Any]
    paths: dict[str, Path]


def resolve_graphs(run_dir: str | Path | None, fp32_onnx: str | Path | None, quantized_onnx: str | Path | None) -> tuple[Path, Path]:
    """The FP32 and quantized graphs: given explicitly, or found in a `qdiff run` output folder."""
    fp32 = Path(fp32_onnx) if fp32_onnx is not None else None
    quantized = Path(quantized_onnx) if quantized_onnx is not None else None
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise EvaluationError(f"run folder {run_dir} does not exist", hint="pass the -o folder of `qdiff run`, or --fp32 and --quantized")
        fp32 = fp32 or run_dir / "denoiser.onnx"
        quantized = quantized or _quantized_in(run_dir)
    if fp32 is None or quantized is None:
        raise EvaluationError("qdiff eval needs an FP32 and a quantized graph", hint="pass --fp32 A.onnx --quantized B.onnx, or --run-dir with the output folder of `qdiff run`")
    for role, path in (("FP32", fp32), ("quantized", quantized)):
        if not path.is_file():
            raise EvaluationError(f"{role} graph {path} does not exist", hint="run `qdiff run` (or export + quantize) first, or fix the path")
    return fp32, quantized


def _quantized_in(run_dir: Path) -> Path:
    """The Q/DQ graph of a run folder: the one its report names, else the only one there."""
    report = run_dir / "report.json"
    if report.is_file():
        try:
            named = json.loads(report.read_text(encoding="utf-8")).get("artifacts", {}).get("qdq_onnx")
        except (ValueError, AttributeError):
            named = None
        if isinstance(named, str) and (run_dir / named).is_file():
            return run_dir / named
    candidates = sorted(p for p in run_dir.glob("denoiser.*.onnx") if _kind(p) == "qdq-onnx")
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise EvaluationError(f"{run_dir} holds {len(candidates)} quantized graphs ({found}); expected exactly one", hint="pass --quantized PATH")
    return candidates[0]


def _kind(path: Path) -> str | None:
    try:
        manifest = read_manifest(path)
    except ArtifactMismatchError:
        return None
    return manifest.kind if manifest else None


def check_graph_model(path: Path, bundle: ModelBundle) -> str:
    """Refuse a graph whose manifest names another model; say so when there is no manifest."""
    return check_made_from_model(path, bundle.model_sha256, bundle.label, EvaluationError)


def _model_for(model, fp32: Path):
    """The model argument, or the folder the FP32 graph's manifest says it was exported from."""
    if model is not None:
        return model
    try:
        manifest = read_manifest(fp32)
    except ArtifactMismatchError:
        manifest = None
    recorded = manifest.details.get("model_path") if manifest else None
    if isinstance(recorded, str) and Path(recorded).is_dir():
        log(f"eval: model {recorded} (from {fp32.name}'s manifest)")
        return recorded
    return None


def evaluate(
    model: str | Path | ModelBundle | None = None,
    fp32_onnx: str | Path | None = None,
    quantized_onnx: str | Path | None = None,
    out_dir: str | Path = "qdiff-eval",
    *,
    run_dir: str | Path | None = None,
    spec: SamplingSpec | None = None,
    shape_fd: bool = True,
    allow_nonfinite: bool = False,
    ort_arithmetic: str = "exact",
    **sampling: Any,
) -> EvalResult:
    """Compare a quantized graph with its FP32 graph (both under ONNX Runtime) from the same
    seeds; write eval.json, eval.md, eval-grid.png and eval-steps.png into `out_dir`.
    What to sample: `spec` (a `SamplingSpec`) or its fields as keywords."""
    spec = SamplingSpec.of(spec, **sampling)
    from qdiff.models import load_model
    from qdiff.runtime.backends import OnnxRuntimeDenoiser

    started = time.perf_counter()
    fp32_path, quantized_path = resolve_graphs(run_dir, fp32_onnx, quantized_onnx)
    model = _model_for(model, fp32_path)
    bundle = model if isinstance(model, ModelBundle) else load_model(model)
    checks = {"fp32": check_graph_model(fp32_path, bundle), "quantized": check_graph_model(quantized_path, bundle)}
    plan = sampling_plan(bundle, spec)
    fp32 = OnnxRuntimeDenoiser(fp32_path, arithmetic=ort_arithmetic)
    candidate = fp32 if fp32_path.resolve() == quantized_path.resolve() else OnnxRuntimeDenoiser(quantized_path, arithmetic=ort_arithmetic)
    label = _graph_label(quantized_path)
    reference = reference_samples(bundle, fp32, plan)
    comparison = compare(bundle, reference, candidate, plan, label=label, shape_fd=shape_fd, allow_nonfinite=allow_nonfinite)
    out_dir = Path(out_dir)
    report = {
        "title": f"qdiff eval: {bundle.label}, {label} vs FP32",
        "model": model_json(bundle),
        "graphs": {"fp32": str(fp32_path), "quantized": str(quantized_path), "checks": checks},
        "sampling": {**candidate.describe(), **plan.to_json()},
        "summary": {**comparison.summary, "wall time (s)": round(time.perf_counter() - started, 1)},
        "images": comparison.images,
        "steps": comparison.steps,
        "shape_fd": comparison.shape_fd,
    }
    paths = write_comparison(out_dir, report, comparison, label=label, name=EVAL_NAME)
    log(f"eval: mean PSNR {comparison.summary['mean PSNR (dB)']:.2f} dB, mean step rel-L2 {comparison.summary['mean step rel-L2 (eps)']:.4f} -> {paths['markdown']}")
    return EvalResult(out_dir, report, paths)


def model_json(bundle: ModelBundle) -> dict[str, str]:
    return {"label": bundle.label, "path": str(bundle.path), "unet_class": bundle.unet_class, "sha256": bundle.model_sha256, "output": bundle.output_kind}


def _graph_label(path: Path) -> str:
    """`denoiser.w8a8.onnx` -> `w8a8`; any other name -> its stem."""
    parts = path.name.split(".")
    return parts[-2] if len(parts) >= 3 else path.stem


def write_comparison(out_dir: Path, report: dict[str, Any], comparison: Comparison, *, label: str, name: str, extra_figures: list[dict[str, str]] | None = None) -> dict[str, Path]:
    """The image grid, the step-error plot and the JSON + Markdown report, each written atomically.

    `report` gets `artifacts` (file names) and `figures` added; `extra_figures` are linked too.
    """
    from qdiff.plots import plot_step_errors
    from qdiff.report import image_grid, save_png, write_quality_report

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = "" if name == "report" else f"{name}-"
    grid = image_grid([comparison.reference_images, comparison.candidate_images], labels=["fp32", label], scale=max(1, 96 // comparison.reference_images[0].shape[0]))
    grid_path = save_png(grid, out_dir / f"{prefix}grid.png")
    steps_path = plot_step_errors({label: comparison.steps}, out_dir / f"{prefix}steps.png", title=f"{label} vs FP32: noise-prediction error per step")
    report.setdefault("artifacts", {}).update({"grid": grid_path.name, "step_plot": steps_path.name})
    report["figures"] = [{"title": "Noise-prediction error vs timestep", "path": steps_path.name}] + list(extra_figures or [])
    json_path, md_path = write_quality_report(out_dir, report, name=name)
    return {"json": json_path, "markdown": md_path, "grid": grid_path, "step_plot": steps_path}
