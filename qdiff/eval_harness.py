"""The evaluation harness: quantized candidates vs FP32 at n >= 1000, with intervals that rank them.

Why it exists: at 16 images and one seed set, PSNR differences under ~1 dB and shape-FD
differences are noise, so quantization methods cannot be told apart. Here every candidate is
sampled from the same noise as the FP32 model, over `seed_sets` disjoint seed ranges of
`images` images each, and every metric comes with a bootstrap 95% interval (images resampled
within each seed set) and the per-seed-set means. Comparisons against a baseline candidate
are paired: the same resampled images on both sides, so the noise they share cancels.

Metrics, per candidate (`METRICS`):

- `step_rel_l2` (primary): the candidate's noise prediction on the inputs the FP32 model saw
  along its own trajectory, relative L2 per image (both CFG halves together), averaged over the
  steps; the first `step_images` images of each seed set. No drift of earlier steps in it.
- `psnr` / `ssim` of the final image vs the FP32 image of the same noise (identical images: PSNR
  capped at `PSNR_CAP` dB so means stay finite).
- `shape_fd`: Frechet distance of classifier features to held-out real images, per seed set at
  n = `images`; `fp32` holds FP32's own value and the real-vs-real floor at the same n.
- `class_accuracy`: class-conditional models, the classifier's agreement with the asked class.

The hot path is batched and stays on `settings.device`: `batch_size` images per UNet call (CFG
doubles the rows), the noise drawn once per seed set, metrics as tensor ops over all images.
`harness.json` / `harness.md` / plots are rewritten (atomically) after every candidate, so a
run cut off by a time limit keeps every row it finished.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from qdiff.core import stats
from qdiff.core.errors import EvaluationError, QdiffError
from qdiff.core.progress import log, progress
from qdiff.harness_settings import HarnessSettings, seed_sets  # noqa: F401 - public here too
from qdiff.runtime.backends import DeviceDenoiser

if TYPE_CHECKING:
    from qdiff.calib.reconstruct.artifact import ReconstructedWeights
    from qdiff.calib.table import CalibrationTable
    from qdiff.models import ModelBundle

HARNESS_NAME = "harness"  # harness.json, harness.md, harness-metrics.png, harness-steps.png
PSNR_CAP = 100.0
METRICS = ("step_rel_l2", "psnr", "ssim", "shape_fd", "class_accuracy")
# Which way is better, for the words in the comparison table.
HIGHER_IS_BETTER = {"step_rel_l2": False, "psnr": True, "ssim": True, "shape_fd": False, "class_accuracy": True}
METRIC_TITLES = {"step_rel_l2": "step rel-L2 (eps)", "psnr": "PSNR vs FP32 (dB)", "ssim": "SSIM vs FP32", "shape_fd": "shape-FD", "class_accuracy": "class accuracy"}
MODES = ("full", "weights", "activations")


@dataclass
class Candidate:
    label: str
    # Gets a deep copy of the FP32 UNet on CPU; returns a module called like the diffusers UNet
    # (sample, timestep, encoder_hidden_states=..., return_dict=...). The harness moves it to
    # settings.device.
    make_unet: Callable[[torch.nn.Module], torch.nn.Module]
    meta: dict = field(default_factory=dict)  # free-form, copied into the result row


def fp32_candidate(label: str = "fp32") -> Candidate:
    """The FP32 UNet itself as a candidate: the harness's zero (step error 0, PSNR capped)."""
    return Candidate(label, lambda unet: unet, {"kind": "fp32"})


def fake_quant_candidate(
    label: str,
    table: CalibrationTable | str | Path,
    *,
    weights: ReconstructedWeights | str | Path | None = None,
    mode: Literal["full", "weights", "activations"] = "full",
    layers: Sequence[str] | None = None,
    meta: dict | None = None,
) -> Candidate:
    """The PyTorch fake-quant model of a calibration table (the function its Q/DQ graph computes),
    optionally with reconstructed weights; `mode` "weights"/"activations" quantizes only that side
    (the decomposition rows); `layers` quantizes only those of the table's layers (the others
    stay float: the table placed on another tool's INT8 layers, as `quantize_onnx(exclude=)`)."""
    from qdiff.calib.fake_quant import build_fake_quant_model
    from qdiff.calib.reconstruct.artifact import ReconstructedWeights
    from qdiff.calib.table import CalibrationTable

    if mode not in MODES:
        raise EvaluationError(f"candidate {label!r}: mode {mode!r} is not one of {', '.join(MODES)}")
    table_obj = table if isinstance(table, CalibrationTable) else CalibrationTable.load(table)
    weights_obj = weights if weights is None or isinstance(weights, ReconstructedWeights) else ReconstructedWeights.load(weights)
    info = {"recipe": table_obj.recipe.get("name"), "mode": mode, "table": str(table) if not isinstance(table, CalibrationTable) else None}
    if weights_obj is not None:
        info.update({"weights": weights_obj.source, "method": weights_obj.method})
    if layers is not None:
        info["layers"] = len(layers)

    def make(unet: torch.nn.Module) -> torch.nn.Module:
        return build_fake_quant_model(unet, table_obj, weights=weights_obj, only=None if mode == "full" else mode, layers=layers)

    return Candidate(label, make, {**info, **(meta or {})})


class _OnnxGraphUnet(torch.nn.Module):
    """An ONNX denoiser graph behind the diffusers UNet's call signature, so the harness samples it
    like any candidate; ONNX Runtime runs it on the CPU (its output comes back on the caller's
    device)."""

    def __init__(self, path: Path, threads: int | None, optimize: bool) -> None:
        from qdiff.runtime.backends import OnnxRuntimeDenoiser

        super().__init__()
        self.graph = OnnxRuntimeDenoiser(path, threads=threads, optimize=optimize)

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        return (self.graph(sample, timestep, encoder_hidden_states, **(added_cond_kwargs or {})),)


def onnx_graph_candidate(label: str, graph: str | Path, *, threads: int | None = None, optimize: bool = False, meta: dict | None = None) -> Candidate:
    """Any denoiser graph with qdiff's interface (FP32, or Q/DQ from qdiff or a peer quantizer) as a
    candidate, run by ONNX Runtime on the CPU with exact Q/DQ arithmetic. For graphs that have no
    PyTorch twin (ONNX Runtime's own quantizer); slower than a PyTorch candidate on a GPU, so
    such rows usually run at a smaller n. `optimize=False` (the default) runs node by node, the
    arithmetic the fake-quant references are checked against; ORT's graph optimizations reorder
    float work around Q/DQ and move rounding-boundary values."""
    path = Path(graph)
    if not path.is_file():
        raise EvaluationError(f"candidate {label!r}: no ONNX graph at {path}", hint="quantize first (the peer tools write it), or fix the path")
    return Candidate(label, lambda unet: _OnnxGraphUnet(path, threads, optimize), {"kind": "onnx-graph", "graph": str(path), "ort_optimize": optimize, **(meta or {})})


def decomposition_candidates(label: str, table: CalibrationTable | str | Path, *, weights: ReconstructedWeights | str | Path | None = None, meta: dict | None = None) -> list[Candidate]:
    """`label` (full), `label/weights-only` and `label/activations-only` of one table."""
    return [
        fake_quant_candidate(label, table, weights=weights, mode="full", meta=meta),
        fake_quant_candidate(f"{label}/weights-only", table, weights=weights, mode="weights", meta=meta),
        fake_quant_candidate(f"{label}/activations-only", table, weights=weights, mode="activations", meta=meta),
    ]


# ----------------------------------------------------------------------------- the feature space


@dataclass
class FeatureSpace:
    """A dataset's classifier, as shape-FD and class accuracy need it (today: the shapes dataset).

    `features`/`predict` take [N, H, W, C] uint8 images (numpy or a tensor on any device);
    `real` are held-out real features, `floor(n)` the real-vs-real distance at n images;
    `class_index` maps a model's class names to the classifier's ids."""

    name: str
    features: Callable[[Any], np.ndarray]
    predict: Callable[[Any], np.ndarray]
    real: np.ndarray
    floor: Callable[[int], float]
    class_names: tuple[str, ...]

    def class_ids(self, model_names: Sequence[str] | None, labels: Sequence[int]) -> np.ndarray | None:
        """The classifier id of each model label, or None when the model's classes are not ours."""
        if not model_names or any(n not in self.class_names for n in model_names):
            return None
        return np.array([self.class_names.index(model_names[label]) for label in labels], dtype=np.int64)


def _feature_space(bundle: ModelBundle, device: str) -> FeatureSpace | None:
    """The dataset classifier for `bundle`'s samples, or None (shape-FD means nothing for it).

    The one place that knows which dataset a model was trained on: a model folder that declares
    one (`dataset.json`, qdiff.datasets.registry) uses that dataset's classifier and real images;
    an undeclared folder counts only if it is one of the shipped shapes models (by UNet hash), since
    shape-FD of an arbitrary model against the shapes classifier would be a number without meaning."""
    from qdiff.datasets import shape_classifier as sc
    from qdiff.datasets import shape_fd as sfd
    from qdiff.datasets.registry import dataset_file, dataset_for

    if dataset_file(bundle.path) is None and sfd.shipped_shapes_model(bundle.model_sha256) is None:
        return None
    spec = dataset_for(bundle)
    classifier = copy.deepcopy(spec.classifier()).to(device)
    return FeatureSpace(
        name=spec.name,
        features=lambda images: sc.features(classifier, images),
        predict=lambda images: sc.predict(classifier, images),
        real=spec.real_features("test", sfd.DEFAULT_REAL_IMAGES),
        floor=lambda count: sfd.real_reference(count, dataset=spec.name),
        class_names=spec.class_names,
    )


# ----------------------------------------------------------------------------- results


@dataclass
class HarnessResult:
    model: dict[str, Any]
    settings: dict[str, Any]
    baseline: str | None = None
    fp32: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparisons: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    complete: bool = False
    environment: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        from qdiff.harness_report import harness_markdown

        return harness_markdown(self)


# ----------------------------------------------------------------------------- sampling


@contextlib.contextmanager
def _precision(settings: HarnessSettings) -> Iterator[None]:
    """inference_mode, and TF32 as the settings say while the harness runs (restored after)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = settings.allow_tf32
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _chunks(n: int, step_images: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches over n images; the first `step_images` form batches of their own, so their FP32
    steps can be recorded from the main FP32 pass without slicing rows."""
    bounds = []
    for lo, hi in ((0, step_images), (step_images, n)):
        parts = -(-(hi - lo) // batch_size)  # as few batches as batch_size allows, of equal size
        edges = [lo + (hi - lo) * k // parts for k in range(parts + 1)] if parts else []
        bounds += list(zip(edges[:-1], edges[1:]))
    return bounds


@dataclass
class _SeedSet:
    seeds: list[int]
    noise: torch.Tensor  # [n, C, H, W] on the device
    conditioning: Any  # Conditioning | None
    labels: list[int] | None
    reference: torch.Tensor | None = None  # FP32 images [n, H, W, C] uint8
    records: list[list[tuple]] = field(default_factory=list)  # per step batch: (input, t, cond, output) per step


class _Sampler:
    """Batched DDIM (or any scheduler) sampling on one device, as `runtime.sampler.generate`
    does it for one batch: noise from per-seed CPU generators, the same scheduler loop."""

    def __init__(self, bundle: ModelBundle, settings: HarnessSettings) -> None:
        from qdiff.runtime.sampler import initial_noise
        from qdiff.evaluate import sampling_plan

        self.bundle, self.settings = bundle, settings
        self.device = torch.device(settings.device)
        shape = (bundle.in_channels, bundle.sample_size, bundle.sample_size)
        num_classes = bundle.class_embeddings.shape[0] - 1 if getattr(bundle, "class_embeddings", None) is not None else None
        self.sets = []
        for seeds in seed_sets(settings):
            labels = [i % num_classes for i in range(len(seeds))] if num_classes else None
            plan = sampling_plan(bundle, scheduler=settings.scheduler, steps=settings.steps, num_images=len(seeds), seed=seeds[0], guidance_scale=settings.guidance_scale, class_labels=tuple(labels) if labels else None)
            noise = torch.cat([initial_noise((1, *shape), s) for s in seeds]).to(self.device)
            self.sets.append(_SeedSet(seeds, noise, plan.conditioning, labels))
        self.guidance = settings.guidance_scale if self.sets[0].conditioning is not None else 1.0
        self.chunks = _chunks(settings.images, settings.step_images, settings.batch_size)
        self.step_chunks = [c for c in self.chunks if c[1] <= settings.step_images]
        if bundle.vae is not None:
            bundle.vae.to(self.device)

    def unet_calls(self) -> int:
        """UNet calls per candidate (for its progress bar)."""
        return len(self.sets) * (len(self.chunks) + len(self.step_chunks)) * self.settings.steps

    def sample(self, denoiser, seed_set: _SeedSet, bar, record: bool = False) -> torch.Tensor:
        from qdiff.runtime.sampler import decode, denoise
        from qdiff.runtime.schedulers import make_scheduler

        images = []
        for lo, hi in self.chunks:
            steps: list[tuple] = []
            keep = record and hi <= self.settings.step_images
            cond = seed_set.conditioning.select(lo, hi) if seed_set.conditioning is not None else None
            latents = denoise(
                denoiser,
                make_scheduler(self.settings.scheduler, self.bundle.scheduler_config),
                seed_set.noise[lo:hi],
                self.settings.steps,
                conditioning=cond,
                guidance_scale=self.guidance,
                seed=seed_set.seeds[lo],
                after_step=(lambda r: steps.append((r.model_input, r.timestep, r.denoiser_kwargs, r.model_output))) if keep else None,
                progress=lambda it: _ticking(it, bar),
            )
            if keep:
                seed_set.records.append(steps)
            images.append((decode(latents, self.bundle.vae) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
        return torch.cat(images)

    def step_errors(self, denoiser, seed_set: _SeedSet, bar) -> np.ndarray:
        """[steps, step_images] relative L2 of the candidate's eps on the FP32 trajectory."""
        per_batch = []
        for steps in seed_set.records:
            rows = []
            for model_input, t, cond, ref in steps:
                q = denoiser(model_input, torch.tensor(t), **cond)
                d2 = (q.double() - ref.double()).pow(2).flatten(1).sum(1)
                r2 = ref.double().pow(2).flatten(1).sum(1)
                if self.guidance != 1.0:  # rows [uncond, cond] of the same images: one value per image
                    d2, r2 = d2.view(2, -1).sum(0), r2.view(2, -1).sum(0)
                rows.append((d2 / r2.clamp_min(1e-24)).sqrt())
                bar.update(1)
            per_batch.append(torch.stack(rows))
        return torch.cat(per_batch, dim=1).cpu().numpy()


def _ticking(iterable, bar):
    for item in iterable:
        yield item
        bar.update(1)


# ----------------------------------------------------------------------------- the harness


@dataclass
class _Values:
    """Per-image values of one candidate (per seed set), kept for paired comparisons."""

    per_image: dict[str, list[np.ndarray]]
    fd_point: list[float] | None = None
    fd_replicates: np.ndarray | None = None


class _Harness:
    def __init__(self, bundle: ModelBundle, settings: HarnessSettings, space: FeatureSpace | None) -> None:
        self.bundle, self.settings, self.space = bundle, settings, space
        self.sampler = _Sampler(bundle, settings)
        self.counts = stats.stratified_counts([settings.images] * settings.seed_sets, settings.bootstrap, seed=0)
        self.step_counts = stats.stratified_counts([settings.step_images] * settings.seed_sets, settings.bootstrap, seed=1)
        labels = self.sampler.sets[0].labels
        self.class_ids = space.class_ids(bundle.class_names, labels) if space is not None and labels is not None else None

    def reference(self) -> dict[str, Any]:
        """Sample FP32 once per seed set (recording the step batches); its FD and accuracy."""
        fp32 = DeviceDenoiser(copy.deepcopy(self.bundle.unet), self.sampler.device)
        calls = len(self.sampler.sets) * len(self.sampler.chunks) * self.settings.steps
        bar = progress(total=calls, desc="fp32 reference", unit="unet call")
        with bar:
            for s in self.sampler.sets:
                s.reference = self.sampler.sample(fp32, s, bar, record=True)
        out: dict[str, Any] = {"n": self.settings.images, "seed_sets": self.settings.seed_sets}
        values = self._image_metrics([s.reference for s in self.sampler.sets])
        out.update({k: v for k, v in values[0].items() if k in ("shape_fd", "class_accuracy")})
        if self.space is not None and self.settings.shape_fd:
            out["real_floor_shape_fd"] = float(self.space.floor(self.settings.images))
            out["real_images"] = int(len(self.space.real))
        return out

    def _image_metrics(self, images: list[torch.Tensor], with_reference: bool = False) -> tuple[dict[str, Any], _Values]:
        from qdiff.core.metrics import psnr_batch, ssim_batch

        metrics: dict[str, Any] = {}
        values = _Values({})
        if with_reference:
            psnr = [psnr_batch(img, s.reference).clamp(max=PSNR_CAP).cpu().numpy() for img, s in zip(images, self.sampler.sets)]
            ssim = [ssim_batch(img, s.reference).cpu().numpy() for img, s in zip(images, self.sampler.sets)]
            values.per_image.update({"psnr": psnr, "ssim": ssim})
        if self.space is not None and self.settings.shape_fd:
            feats = [self.space.features(img) for img in images]
            from qdiff.datasets.shape_classifier import frechet_distance

            values.fd_point = [frechet_distance(f, self.space.real) for f in feats]
            metrics["shape_fd"], values.fd_replicates = stats.fd_ci(values.fd_point, feats, self.space.real, self.counts, device=self.sampler.device)
        if self.space is not None and self.class_ids is not None:
            values.per_image["class_accuracy"] = [(self.space.predict(img) == self.class_ids).astype(np.float64) for img in images]
        for name in ("psnr", "ssim", "class_accuracy"):
            if name in values.per_image:
                metrics[name] = stats.mean_ci(values.per_image[name], self.counts)
        return metrics, values

    def candidate(self, cand: Candidate) -> tuple[dict[str, Any], _Values]:
        started = time.perf_counter()
        unet = cand.make_unet(copy.deepcopy(self.bundle.unet))
        denoiser = DeviceDenoiser(unet, self.sampler.device)
        bar = progress(total=self.sampler.unet_calls(), desc=cand.label, unit="unet call")
        with bar:
            images, step = [], []
            for s in self.sampler.sets:
                images.append(self.sampler.sample(denoiser, s, bar))
                step.append(self.sampler.step_errors(denoiser, s, bar))
        metrics, values = self._image_metrics(images, with_reference=True)
        per_image_step = [e.mean(0) for e in step]
        values.per_image["step_rel_l2"] = per_image_step
        metrics = {"step_rel_l2": stats.mean_ci(per_image_step, self.step_counts), **metrics}
        curve = np.concatenate(step, axis=1).mean(1)
        timesteps = [t for _, t, _, _ in self.sampler.sets[0].records[0]]
        del unet, denoiser
        if self.sampler.device.type == "cuda":
            torch.cuda.empty_cache()
        row = {
            "metrics": {k: metrics[k] for k in METRICS if k in metrics},
            "meta": dict(cand.meta),
            "seconds": round(time.perf_counter() - started, 2),
            "step_curve": [{"step": i, "timestep": t, "rel_l2": float(e)} for i, (t, e) in enumerate(zip(timesteps, curve))],
        }
        return row, values

    def compare(self, cand: _Values, base: _Values) -> dict[str, dict[str, Any]]:
        out = {}
        for name in METRICS:
            if name == "shape_fd":
                if cand.fd_replicates is not None and base.fd_replicates is not None:
                    out[name] = stats.fd_difference(cand.fd_point, cand.fd_replicates, base.fd_point, base.fd_replicates)
            elif name in cand.per_image and name in base.per_image:
                counts = self.step_counts if name == "step_rel_l2" else self.counts
                out[name] = stats.paired_difference(cand.per_image[name], base.per_image[name], counts)
        return out


def _environment(device: str) -> dict[str, Any]:
    env = {"device": device, "torch": torch.__version__}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def write_outputs(result: HarnessResult, out_dir: Path) -> dict[str, Path]:
    """harness.json, harness.md and the plots, each written atomically."""
    from qdiff.core.artifacts import write_json_atomic, write_text_atomic
    from qdiff.plots import plot_metric_intervals, plot_step_errors

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{HARNESS_NAME}.json", "markdown": out_dir / f"{HARNESS_NAME}.md"}
    if result.rows:
        paths["metrics_plot"] = plot_metric_intervals(result, out_dir / f"{HARNESS_NAME}-metrics.png")
        paths["step_plot"] = plot_step_errors({k: r["step_curve"] for k, r in result.rows.items()}, out_dir / f"{HARNESS_NAME}-steps.png", title="noise-prediction error per step on the FP32 trajectory")
    write_json_atomic(paths["json"], result.to_json())
    write_text_atomic(paths["markdown"], result.to_markdown())
    return paths


def run_harness(
    model: ModelBundle | str | Path,
    candidates: Sequence[Candidate],
    settings: HarnessSettings,
    *,
    baseline: str | None = None,
    out_dir: Path | None = None,
    on_result: Callable[[HarnessResult], None] | None = None,
) -> HarnessResult:
    """Evaluate `candidates` against the FP32 model (see the module docstring).

    `baseline` (a candidate label; default: the first candidate) is what every other candidate
    is compared with. A candidate that raises stops the run with an EvaluationError naming it;
    the rows finished before it are already in `out_dir`."""
    from qdiff.evaluate import model_json
    from qdiff.models import as_bundle

    settings.check()
    labels = [c.label for c in candidates]
    if not candidates:
        raise EvaluationError("the harness needs at least one candidate")
    if len(set(labels)) != len(labels):
        raise EvaluationError(f"candidate labels must be unique, got {labels}")
    baseline = baseline if baseline is not None else labels[0]
    if baseline not in labels:
        raise EvaluationError(f"baseline {baseline!r} is not a candidate ({', '.join(labels)})")
    started = time.perf_counter()
    bundle = as_bundle(model)
    device = settings.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"device {device!r} asked for, but torch sees no CUDA GPU here", hint="pass --device cpu (small n) or run on the GPU machine")
    result = HarnessResult(model_json(bundle), asdict(settings), baseline=baseline, environment=_environment(device))

    def publish() -> None:
        result.seconds = round(time.perf_counter() - started, 1)
        if out_dir is not None:
            write_outputs(result, Path(out_dir))
        if on_result is not None:
            on_result(result)

    with _precision(settings):
        space = _feature_space(bundle, device) if settings.shape_fd else None
        harness = _Harness(bundle, settings, space)
        log(f"harness: {bundle.label}, {settings.seed_sets} seed sets x {settings.images} images, {settings.steps} {settings.scheduler} steps on {device}; {len(candidates)} candidates")
        result.fp32 = harness.reference()
        if space is None:
            result.fp32["shape_fd_note"] = f"no dataset classifier for {bundle.label}: shape-FD and class accuracy skipped" if settings.shape_fd else "shape-FD not asked for"
        result.fp32["seconds"] = round(time.perf_counter() - started, 1)
        values: dict[str, _Values] = {}
        for cand in candidates:
            try:
                row, values[cand.label] = harness.candidate(cand)
            except Exception as exc:
                result.failed[cand.label] = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
                publish()
                hint = exc.hint if isinstance(exc, QdiffError) else None
                raise EvaluationError(f"harness candidate {cand.label!r} failed: {result.failed[cand.label]}", hint=hint or (f"the rows before it are in {out_dir}" if out_dir else None)) from exc
            result.rows[cand.label] = row
            if baseline in values:
                result.comparisons = {k: harness.compare(v, values[baseline]) for k, v in values.items() if k != baseline}
            m = row["metrics"]
            log(f"harness: {cand.label}: step rel-L2 {m['step_rel_l2']['mean']:.4f}, PSNR {m['psnr']['mean']:.2f} dB ({row['seconds']} s)")
            publish()
    result.complete = True
    publish()
    return result


def table_candidates(
    tables: Sequence[str | Path],
    *,
    weights: Sequence[str | Path | None] | None = None,
    labels: Sequence[str | None] | None = None,
    decomposition: bool = False,
) -> list[Candidate]:
    """Candidates from calibration tables (`qdiff eval --calib`): one per table, named by its
    label or its recipe (`w8a8`, `w4a8-fbr` with reconstructed weights), and with
    `decomposition` its weights-only and activations-only rows too. `weights[i]` (or None)
    belongs to `tables[i]`."""
    from qdiff.calib.reconstruct.artifact import ReconstructedWeights
    from qdiff.calib.table import CalibrationTable

    weights = list(weights or [])
    labels = list(labels or [])
    if len(weights) > len(tables) or len(labels) > len(tables):
        raise EvaluationError(f"{len(tables)} table(s) but {len(weights)} reconstruction(s) and {len(labels)} label(s)", hint="give at most one reconstruction and one label per --calib, in the same order")
    out: list[Candidate] = []
    for i, path in enumerate(tables):
        table = CalibrationTable.load(path)
        w = ReconstructedWeights.load(weights[i]) if i < len(weights) and weights[i] is not None else None
        label = labels[i] if i < len(labels) and labels[i] else str(table.recipe.get("name") or Path(path).stem) + (f"-{w.method}" if w is not None and w.method else "")
        base, k = label, 2
        while any(c.label == label for c in out):
            label, k = f"{base}#{k}", k + 1
        meta = {"table": str(path)} | ({"weights": str(weights[i])} if w is not None else {})
        out += decomposition_candidates(label, table, weights=w, meta=meta) if decomposition else [fake_quant_candidate(label, table, weights=w, meta=meta)]
    return out


def model_of_tables(tables: Sequence[str | Path]) -> str | None:
    """The model folder the first table's provenance names (what `qdiff calibrate` ran on)."""
    from qdiff.calib.table import CalibrationTable

    recorded = CalibrationTable.load(tables[0]).provenance.get("model_path") if tables else None
    return recorded if isinstance(recorded, str) and Path(recorded).is_dir() else None
