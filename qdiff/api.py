"""The public Python API: one function per stage, and `run` for all of them.

The CLI only parses arguments and calls these. Each stage reads and writes artifacts with
manifests (`qdiff.core.artifacts`), skips its work when the manifest on disk says the artifact was
made from the same inputs and settings, and stages its output in a temporary folder so a
failure or a kill leaves the previous artifact intact.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qdiff.core.artifacts import CachedStage, Manifest, config_sample_size, read_manifest, sha256_file, write_manifest
from qdiff.calib.recipe import Recipe, load_recipe
from qdiff.calib.table import CalibrationTable
from qdiff.core.errors import ArtifactMismatchError, OnnxModelError, QuantizationError, RecipeError, SamplingError
from qdiff.models import ModelBundle, as_bundle, unet_config_of
from qdiff.core.progress import Phases, log, progress
from qdiff.runtime.sampling_spec import SamplingSpec  # public as qdiff.api.SamplingSpec too

# The sampling core (`SampleResult`, `generate`, `make_denoiser`, `step_errors`) lives in
# runtime.sampler (evaluate and the tools reach it without the API); it is re-exported here
# under its old names by `__getattr__` below, so `qdiff.api.generate(...)` works and importing
# the API does not import torch.
if TYPE_CHECKING:
    from qdiff.export.coverage import CoverageReport
    from qdiff.runtime.sampler import SampleResult

# torch and the conditioning helpers are imported inside the functions that use them, so a
# command that fails on its arguments (or needs no torch) starts fast.

ONNX_NAME = "denoiser.onnx"
ONNX_FP16_NAME = "denoiser.fp16.onnx"
TABLE_NAME = "calibration.json"

ModelLike = str | Path | ModelBundle | None


# ----------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    onnx_path: Path
    validation: list[dict[str, Any]]
    reused: bool = False


def _onnx_target(out: str | Path, dtype: str = "fp32") -> Path:
    out = Path(out)
    return out if out.suffix == ".onnx" else out / (ONNX_NAME if dtype == "fp32" else ONNX_FP16_NAME)


def export_model(
    model: ModelLike, out: str | Path, *, opset: int = 17, external_data: bool | None = None, force: bool = False, check: bool = True, dtype: str = "fp32"
) -> ExportResult:
    """Export the model's denoiser to ONNX and check it against PyTorch.

    `dtype="fp32"` (default; what TensorRT 8.6 builds with its FP16 flag) or `"fp16"`: FP16
    weights and activations with FP32 graph I/O (one Cast per input/output) and FP32 islands only
    where the FP32 graph's tensors would overflow FP16 on the validation inputs
    (`qdiff.export.fp16`); what a strongly typed TensorRT >= 10 build needs. A folder `out` gets
    `denoiser.onnx` or `denoiser.fp16.onnx`; the dtype is part of the manifest's settings, so an
    FP32 export is never reused for FP16."""
    from qdiff.export.fp16 import check_dtype
    from qdiff.export.onnx_io import publish_onnx

    check_dtype(dtype)
    bundle = as_bundle(model, components=False)
    from qdiff.export.onnx_export import export_unet  # torch: after the cheap checks above
    from qdiff.runtime.export_check import convert_export_to_fp16, export_tolerance, validate_export
    target = _onnx_target(out, dtype)
    wanted = Manifest(kind="onnx-export", inputs={"model_sha256": bundle.model_sha256}, settings={"opset": opset, "unet_class": bundle.unet_class, "dtype": dtype})
    cached = CachedStage(target, wanted, log_as="export", why="same model and settings")
    if (have := cached.reusable(force)) is not None:
        return ExportResult(target, have.details.get("validation", []), reused=True)
    started = time.perf_counter()
    with cached.staging() as stage:
        staged = stage / target.name
        log(f"export: tracing {bundle.unet_class} from {bundle.path} ...")
        islands = None
        if dtype == "fp16":
            fp32_staged = stage / "fp32" / "denoiser.onnx"
            fp32_staged.parent.mkdir()
            export_unet(bundle.unet, fp32_staged, opset=opset, external_data=external_data)
            islands = convert_export_to_fp16(bundle.unet, fp32_staged, staged, external_data)
        else:
            export_unet(bundle.unet, staged, opset=opset, external_data=external_data)
        validation = validate_export(bundle.unet, staged, export_tolerance(dtype)) if check else []
        publish_onnx(staged, target)
    details = {"validation": validation, "seconds": round(time.perf_counter() - started, 2), "model_path": str(bundle.path), "unet_config": unet_config_of(bundle)}
    if islands is not None:
        details["fp32_islands"] = [i.to_json() for i in islands]
        log(f"export: FP16 graph, {len(islands)} node(s) kept in FP32" + "".join(f"\n  fp32: {i.node} ({i.op}): {i.reason}" for i in islands))
    cached.record(details)
    for v in validation:
        log(f"export: batch {v['batch']}: max|d|={v['max_abs']:.2e} relL2={v['rel_l2']:.2e} vs PyTorch")
    return ExportResult(target, validation)


# ----------------------------------------------------------------------------- calibrate


@dataclass
class CalibrateResult:
    table_path: Path
    table: CalibrationTable
    reused: bool = False
    # Per-timestep ranges and branch histograms beside the table (calib.timestep_stats).
    stats_path: Path | None = None
    # Wall seconds per phase (collect_ranges' phases); empty when the table was reused.
    phases: dict[str, float] = field(default_factory=dict)


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
    timestep_stats: bool = True,
    trajectory_denoiser: Any = None,
    device: Any = "cpu",
    **recipe_overrides: Any,
) -> CalibrateResult:
    """Timestep-uniform calibration over the model's own sampler; writes the calibration table,
    and with `timestep_stats` the per-timestep statistics beside it (`calibration.stats.npz`).

    `device` ("cpu", "cuda", "cuda:N") is where the trajectories run and the ranges are
    recorded. The default, the CPU, is calibration as it always ran, bit for bit. On a GPU the
    UNet is moved there for the calibration and back to its own device afterwards (also when
    calibration fails); it is moved, not copied, because a `trajectory_denoiser` calls
    `bundle.unet` itself, so the hooks must sit on that very module, and a copy would hold an
    SD-sized UNet (3.4 GB) twice in host memory. Moving back hands the bundle to the stages after
    (export, quantize, reconstruct) as it was given, the same weights bit for bit. The noise is
    drawn on the CPU as always and moved; latents, conditioning, timesteps and the scheduler's
    arithmetic stay on the device, with TF32 off (FP32 math, as on the CPU). Observers, histogram
    searches and the per-timestep statistics end as plain floats and CPU numpy, so the table and
    the statistics file have one format on every device and, with a deterministic calibration
    scheduler (DDIM, the recipes'), differ only in the last bits of the ranges (a stochastic one,
    ddpm or euler-a, draws its step noise from a generator on the device, so its trajectories
    differ as well). That is why the device type is part of the manifest's settings: a table measured on another
    device type is recalibrated, not reused silently (the CPU adds no key, so tables made before
    this option stay reusable); the provenance names the device (and the GPU). A device this
    machine lacks is a `BackendUnavailableError` before the model is loaded or anything written.

    `trajectory_denoiser` drives the calibration trajectories instead of the model's PyTorch
    UNet; it must call that UNet (`bundle.unet`) at the calibration steps, whose hooks record the
    ranges, and gets its inputs on `device`. A driver that calibrates many recipes of one model
    passes a memoizing one, so the trajectory steps all recipes share are computed once
    (tools/ablations.py).
    """
    recipe = load_recipe(recipe, scheduler=scheduler, **recipe_overrides)  # fail fast, before loading
    if device != "cpu":  # a device this machine lacks fails before the model loads (the CPU needs no check, nor torch yet)
        _checked_device(device, "calibration")
    bundle = as_bundle(model)
    # torch and diffusers: after the cheap checks above, so a wrong path fails fast
    from qdiff.calib.collect import collect_ranges
    from qdiff.calib.timestep_stats import TimestepStatsRecorder, stats_path_for
    from qdiff.core.conditioning import conditioning_key, resolve_conditioning
    from qdiff.runtime.backends import TorchDenoiser
    from qdiff.runtime.calibration_loop import model_trajectory_sampler

    dev = _checked_device(device, "calibration")
    out = Path(out)
    target = out if out.suffix == ".json" else out / TABLE_NAME
    conditioning = resolve_conditioning(
        bundle, recipe.samples_per_timestep, prompts=prompts, class_labels=class_labels, embeddings=embeddings, random=random_conditioning, seed=recipe.seed
    )
    wanted = Manifest(
        kind="calibration-table",
        inputs={"model_sha256": bundle.model_sha256, "conditioning": conditioning_key(conditioning)},
        settings=_calibration_settings(recipe, dev),
    )
    stats_path = stats_path_for(target)
    cached = CachedStage(target, wanted, log_as="calibrate", why="same model, conditioning, recipe and device", companions={"stats_sha256": stats_path} if timestep_stats else {})
    if cached.reusable(force) is not None:
        return CalibrateResult(target, CalibrationTable.load(target), reused=True, stats_path=stats_path if stats_path.is_file() else None)
    log(
        f"calibrate: {recipe.samples_per_timestep} trajectories x {recipe.num_timesteps} timesteps of a {recipe.calibration_steps}-step "
        f"{recipe.scheduler} loop, {recipe.activation_calibrator} calibrator, on {dev}"
        + (f"; TDAC spreads the {recipe.num_timesteps * recipe.samples_per_timestep} samples over the steps (lambda {recipe.tdac_lambda}, r {recipe.tdac_r})" if recipe.timestep_sampling == "tdac" else "")
    )
    started = time.perf_counter()
    recorder = TimestepStatsRecorder(seed=recipe.seed) if timestep_stats else None
    phases = Phases()
    with _calibrating_on(bundle.unet, dev):
        denoiser = trajectory_denoiser if trajectory_denoiser is not None else TorchDenoiser(bundle.unet)
        sampler = model_trajectory_sampler(bundle, recipe, denoiser, conditioning=conditioning, device=dev)
        table = collect_ranges(bundle.unet, sampler, recipe, model_sha256=bundle.model_sha256, progress=progress, timestep_stats=recorder, phases=phases)
    table.provenance["model_path"] = str(bundle.path)
    table.save(target)
    if recorder is not None:
        recorder.result().save(stats_path)
    else:
        stats_path.unlink(missing_ok=True)  # an older table's statistics would describe other ranges
    cached.record({"seconds": round(time.perf_counter() - started, 2), "layers": len(table.layers), "degenerate": table.degenerate, "device": str(dev), "phases": phases.rounded()})
    log(f"calibrate: {len(table.layers)} layers calibrated in {wanted.details['seconds']} s on {dev} -> {target}")
    return CalibrateResult(target, table, stats_path=stats_path if recorder is not None else None, phases=phases.rounded())


def _calibration_settings(recipe: Recipe, device: Any) -> dict[str, Any]:
    """The manifest settings a calibration table is reused for: its recipe, and the device type
    unless it is the CPU. Ranges measured on a GPU differ from the CPU's in the last bits, so a
    CPU run must not silently take a GPU table (nor the reverse); the CPU adds no key so that the
    tables made before calibration had a device keep their manifests, as `Recipe.to_json` leaves
    TDAC's defaults out. The type, not the index: cuda:0 and cuda:1 of one machine compute alike."""
    settings: dict[str, Any] = {"recipe": recipe.to_json()}
    if device.type != "cpu":
        settings["device"] = device.type
    return settings


def _checked_device(device: Any, what: str) -> Any:
    """`device` as a torch.device, checked (`qdiff.runtime.backends.check_device`): an unknown
    device or one this machine lacks is a BackendUnavailableError naming it and what to do."""
    from qdiff.runtime.backends import check_device

    return check_device(device, what=what)


@contextlib.contextmanager
def _calibrating_on(unet: Any, device: Any) -> Iterator[None]:
    """`unet` on `device` for the block, TF32 off there (`exact_float`), and back on its own
    device afterwards, whatever happens. A no-op where it already is (the CPU default: nothing
    is moved, so the calibration is the one that always ran)."""
    from qdiff.calib.collect import model_device
    from qdiff.runtime.backends import exact_float

    home = model_device(unet)
    if home == device:
        with exact_float(device):
            yield
        return
    unet.to(device)
    try:
        with exact_float(device):
            yield
    finally:
        unet.to(home)


# ----------------------------------------------------------------------------- reconstruct

RECONSTRUCTION_NAME = "reconstruction.safetensors"
RECONSTRUCTION_CACHE = ".qdiff-reconstruct-cache"


@dataclass
class ReconstructResult:
    weights_path: Path  # reconstruction.safetensors: integer weights + scales
    table_path: Path  # reconstruction.calibration.json: the table, with learned activation ranges
    units: list[dict[str, Any]]
    reused: bool = False
    seconds: float = 0.0
    # Wall seconds per phase (the calls, the model copies, per-unit inputs / targets / training /
    # error measurement summed over units, the artifact); empty when the artifact was reused.
    phases: dict[str, float] = field(default_factory=dict)


def reconstruct(
    model: ModelLike,
    out: str | Path,
    table_path: str | Path,
    settings: Any = None,
    *,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    embeddings: str | Path | None = None,
    random_conditioning: bool = False,
    force: bool = False,
    on_unit_done: Any = None,
    **setting_overrides: Any,
) -> ReconstructResult:
    """Weight reconstruction (AdaRound-BRECQ or FBR) of a calibrated model.

    The calibration calls are re-collected with the seeded loop `calibrate` ran (same recipe,
    seeds and conditioning, so the same denoiser inputs; calibration itself keeps no tensors).
    The loop's UNet runs on the reconstruction's device (a copy; the scheduler stays on the
    CPU): on a GPU the calls then carry that device's rounding (TF32 convolutions included),
    as the reconstruction's own forwards do, instead of taking a CPU pass of the whole loop
    (SD 1.5: minutes of a 16-core host). On the CPU they are calibration's inputs bit for bit.
    Writes `reconstruction.safetensors` (integer weights + scales) and
    `reconstruction.calibration.json` (the table; activation ranges updated when steps are
    learned), each with a manifest. Finished units are checkpointed under
    `<out>/.qdiff-reconstruct-cache/<key>/`; a killed run resumes at the unit it was in.
    `on_unit_done(index, result)` runs after each unit (tests interrupt there).
    """
    import hashlib

    from qdiff.calib.reconstruct.artifact import weights_from_model
    from qdiff.calib.reconstruct.engine import Reconstructor
    from qdiff.core.conditioning import conditioning_key, resolve_conditioning
    from qdiff.calib.reconstruct.settings import ReconstructionSettings
    from qdiff.calib.trajectories import TimestepPlan
    from qdiff.runtime.calibration_loop import model_calibration_inputs, unet_calls

    settings = (settings or ReconstructionSettings()).with_overrides(**setting_overrides).resolved()
    table_path = Path(table_path)
    table = CalibrationTable.load(table_path)
    bundle = as_bundle(model)
    table.check_model(bundle.model_sha256, str(bundle.path))
    recipe = Recipe.from_json(table.recipe)
    out = Path(out)
    target = out if out.suffix == ".safetensors" else out / RECONSTRUCTION_NAME
    table_target = target.with_name(target.name.removesuffix(".safetensors") + ".calibration.json")
    conditioning = resolve_conditioning(
        bundle, recipe.samples_per_timestep, prompts=prompts, class_labels=class_labels, embeddings=embeddings, random=random_conditioning, seed=recipe.seed
    )
    table_sha = sha256_file(table_path)
    wanted = Manifest(
        kind="weight-reconstruction",
        inputs={"model_sha256": bundle.model_sha256, "table_sha256": table_sha, "conditioning": conditioning_key(conditioning)},
        # The device says where it runs, not what it makes: a CPU rerun reuses (or resumes) a
        # GPU reconstruction of the same settings instead of starting over.
        settings={"reconstruction": {k: v for k, v in settings.to_json().items() if k != "device"}, "recipe": recipe.to_json()},
    )
    cached = CachedStage(target, wanted, log_as="reconstruct", why="same model, table and settings", companions={"table_sha256": table_target})
    if (have := cached.reusable(force)) is not None:
        return ReconstructResult(target, table_target, have.details.get("units", []), reused=True)
    _checked_device(settings.device, "reconstruction")  # after reuse (the device says where, not what), before the calls
    started = time.perf_counter()
    phases = Phases()
    log(f"reconstruct: re-collecting the calibration calls ({recipe.samples_per_timestep} trajectories x {recipe.num_timesteps} timesteps, seed {recipe.seed})")
    plan = TimestepPlan.of_table(table.provenance, recipe)  # TDAC's counts as calibration drew them
    with phases("calibration calls"):
        calls = unet_calls(model_calibration_inputs(bundle, recipe, _calls_denoiser(bundle.unet, settings.device), conditioning=conditioning, progress=progress, plan=plan))
    key = hashlib.sha256(json.dumps({"inputs": wanted.inputs, "settings": wanted.settings}, sort_keys=True).encode()).hexdigest()[:16]
    cache = target.parent / RECONSTRUCTION_CACHE / key
    cache.mkdir(parents=True, exist_ok=True)
    log(f"reconstruct: {settings.method}, {settings.iterations} iterations per unit, batch {settings.batch_size}, on {settings.device}; checkpoints in {cache}")
    with phases("model copies"):
        engine = Reconstructor(bundle.unet, table, settings, calls, checkpoint_dir=cache, progress=progress, on_unit_done=on_unit_done, phases=phases)
    outcome = engine.run()
    with phases("artifact"):
        weights = weights_from_model(outcome.model, bundle.model_sha256, recipe.weight_bits, settings.method)
        new_table = _table_with_learned_steps(table, outcome, settings, recipe)
        new_table.provenance["reconstruction"] = {"method": settings.method, "from_table_sha256": table_sha, "weights": target.name, "learned_activation_steps": bool(settings.learn_activation_steps)}
        weights.save(target)
        new_table.save(table_target)
    units = [vars(u) | {"resumed": u.resumed} for u in outcome.units]
    seconds = round(time.perf_counter() - started, 2)
    cached.record({"seconds": seconds, "calibration_calls": len(calls), "samples": sum(int(c["sample"].shape[0]) for c in calls), "units": units, "table": table_target.name, "phases": phases.rounded()})
    table_manifest = Manifest(kind="calibration-table", inputs={"model_sha256": bundle.model_sha256, "reconstruction_sha256": wanted.outputs["sha256"]}, settings={"recipe": recipe.to_json()}, outputs={"sha256": wanted.outputs["table_sha256"]})
    write_manifest(table_target, table_manifest)
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    better = sum(u["error"] < u["rtn_error"] for u in units)
    log(f"reconstruct: {len(units)} units in {seconds} s; error below round-to-nearest in {better}/{len(units)} -> {target}")
    return ReconstructResult(target, table_target, units, seconds=seconds, phases=phases.rounded())


def _table_with_learned_steps(table: CalibrationTable, outcome, settings, recipe: Recipe) -> CalibrationTable:
    """A copy of `table`; with learned steps, each input (or branch) range becomes step x qmax."""
    new = CalibrationTable.from_json(table.to_json())
    if not settings.learn_activation_steps:
        return new
    for name, layer in outcome.layers().items():
        ranges = new.layers[name]
        for part in layer.parts:
            amax = part.input.amax
            if part.role:
                setattr(ranges, f"shortcut_{part.role}", amax)
            else:
                ranges.input = amax
    return new


# ----------------------------------------------------------------------------- finetune (QuEST)

FINETUNE_NAME = "finetune.safetensors"
FINETUNE_CACHE = ".qdiff-finetune-cache"


@dataclass
class FinetuneResult:
    weights_path: Path  # finetune.safetensors: integer weights + scales (a ReconstructedWeights)
    table_path: Path  # finetune.calibration.json: the table (activation ranges updated if steps were trained)
    stages: list[dict[str, Any]]
    reused: bool = False
    seconds: float = 0.0


def finetune(
    model: ModelLike,
    out: str | Path,
    table_path: str | Path,
    settings: Any = None,
    *,
    reconstruction: str | Path | None = None,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    embeddings: str | Path | None = None,
    random_conditioning: bool = False,
    force: bool = False,
    on_stage_done: Any = None,
    **setting_overrides: Any,
) -> FinetuneResult:
    """QuEST's selective fine-tuning (`calib.quest.finetune`) of a calibrated model, starting from
    round-to-nearest or from `reconstruction` (a `reconstruct` artifact; pass the table written
    beside it). Distils the quantized model's eps into the float model's on the calibration
    calls (re-collected with calibration's seeded loop, as `reconstruct` does, the UNet a copy
    on the fine-tuning's device), the time-embedding layers first, then attention; weights stay
    on their integer grid.

    Writes `finetune.safetensors` (the same format as a reconstruction: `qdiff quantize
    --reconstruction` and the fake-quant reference take it) and `finetune.calibration.json`,
    each with a manifest. A finished stage is checkpointed under
    `<out>/.qdiff-finetune-cache/<key>/`; a killed run restarts at the stage it was in.
    """
    import hashlib
    import shutil

    from qdiff.calib.quest.finetune import SelectiveFinetuner
    from qdiff.calib.quest.time_aware import copy_table
    from qdiff.calib.quest.settings import FinetuneSettings
    from qdiff.calib.reconstruct.artifact import ReconstructedWeights, weights_from_model
    from qdiff.calib.trajectories import TimestepPlan
    from qdiff.core.conditioning import conditioning_key, resolve_conditioning
    from qdiff.runtime.calibration_loop import model_calibration_inputs, unet_calls

    settings = (settings or FinetuneSettings()).with_overrides(**setting_overrides)
    table_path = Path(table_path)
    table = CalibrationTable.load(table_path)
    bundle = as_bundle(model)
    table.check_model(bundle.model_sha256, str(bundle.path))
    recipe = Recipe.from_json(table.recipe)
    start = None
    if reconstruction is not None:
        start = ReconstructedWeights.load(reconstruction)
        start.check_model(bundle.model_sha256, str(bundle.path))
    base_method = start.method if start is not None else "rtn"
    out = Path(out)
    target = out if out.suffix == ".safetensors" else out / FINETUNE_NAME
    table_target = target.with_name(target.name.removesuffix(".safetensors") + ".calibration.json")
    conditioning = resolve_conditioning(
        bundle, recipe.samples_per_timestep, prompts=prompts, class_labels=class_labels, embeddings=embeddings, random=random_conditioning, seed=recipe.seed
    )
    inputs = {"model_sha256": bundle.model_sha256, "table_sha256": sha256_file(table_path), "conditioning": conditioning_key(conditioning)}
    if reconstruction is not None:
        inputs["reconstruction_sha256"] = sha256_file(reconstruction)
    wanted = Manifest(
        kind="selective-finetune",
        inputs=inputs,
        settings={"finetune": {k: v for k, v in settings.to_json().items() if k != "device"}, "recipe": recipe.to_json()},  # the device says where, not what
    )
    cached = CachedStage(target, wanted, log_as="finetune", why="same model, table, starting weights and settings", companions={"table_sha256": table_target})
    if (have := cached.reusable(force)) is not None:
        return FinetuneResult(target, table_target, have.details.get("stages", []), reused=True)
    _checked_device(settings.device, "fine-tuning")  # after reuse (the device says where, not what), before the calls
    started = time.perf_counter()
    log(f"finetune: re-collecting the calibration calls ({recipe.samples_per_timestep} trajectories x {recipe.num_timesteps} timesteps, seed {recipe.seed})")
    plan = TimestepPlan.of_table(table.provenance, recipe)  # TDAC's counts as calibration drew them, not a new probe
    # As reconstruction's: the UNet (a copy) on the fine-tuning's device, the calls back on the CPU.
    calls = unet_calls(model_calibration_inputs(bundle, recipe, _calls_denoiser(bundle.unet, settings.device), conditioning=conditioning, progress=progress, plan=plan))
    key = hashlib.sha256(json.dumps({"inputs": wanted.inputs, "settings": wanted.settings}, sort_keys=True).encode()).hexdigest()[:16]
    cache = target.parent / FINETUNE_CACHE / key
    cache.mkdir(parents=True, exist_ok=True)
    log(f"finetune: stages {', '.join(settings.stages)}, iterations {list(settings.stage_iterations())}, batch {settings.batch_size}, lr {settings.lr}, from {base_method}, on {settings.device}; checkpoints in {cache}")
    engine = SelectiveFinetuner(bundle.unet, table, settings, calls, weights=start, checkpoint_dir=cache, progress=progress, on_stage_done=on_stage_done)
    outcome = engine.run()
    weights = weights_from_model(outcome.model, bundle.model_sha256, recipe.weight_bits, f"{base_method}-ft")
    new_table = copy_table(table)
    if settings.learn_activation_steps:  # only the trained layers' steps moved
        trained = {name for stage in outcome.stages for name in stage.layers}
        for name, layer in outcome.layers().items():
            if name in trained:
                for part in layer.parts:
                    setattr(new_table.layers[name], f"shortcut_{part.role}" if part.role else "input", part.input.amax)
    new_table.provenance["finetune"] = {"from": base_method, "from_table_sha256": inputs["table_sha256"], "weights": target.name, "settings": settings.to_json()}
    weights.save(target)
    new_table.save(table_target)
    stages = [vars(st) | {"layers": len(st.layers)} for st in outcome.stages]
    seconds = round(time.perf_counter() - started, 2)
    cached.record({"seconds": seconds, "calibration_calls": len(calls), "stages": stages, "table": table_target.name, "method": weights.method})
    write_manifest(table_target, Manifest(kind="calibration-table", inputs={"model_sha256": bundle.model_sha256, "finetune_sha256": wanted.outputs["sha256"]}, settings={"recipe": recipe.to_json()}, outputs={"sha256": wanted.outputs["table_sha256"]}))
    shutil.rmtree(cache, ignore_errors=True)
    summary = "; ".join(f"{st['name']}: {st['error_before']:.4g} -> {st['error_after']:.4g} ({st['integers_changed']} integers moved)" for st in stages)
    log(f"finetune: {summary}; {seconds} s -> {target}")
    return FinetuneResult(target, table_target, stages, seconds=seconds)


# ----------------------------------------------------------------------------- time-aware activation scales (QuEST)


@dataclass
class TimeAwareResult:
    index_path: Path  # buckets.json: the buckets and the names of the K tables beside it
    table_paths: list[Path]
    reused: bool = False


def calibrate_time_aware(
    model: ModelLike,
    out: str | Path,
    table_path: str | Path,
    buckets: int = 4,
    *,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    embeddings: str | Path | None = None,
    random_conditioning: bool = False,
    force: bool = False,
    device: Any = "cpu",
) -> TimeAwareResult:
    """QuEST's time-aware activation quantizer, simulated: K calibration tables whose activation
    ranges are measured per bucket of the calibration timesteps (`calib.quest.time_aware`).

    Writes `<out>/time-aware-k<K>/` (or `out` itself if it ends with the K folder name):
    `bucket-NN.calibration.json` per bucket and `buckets.json` with its manifest. The trajectories
    are calibration's own (same recipe, seeds and conditioning). Evaluate the result with
    `qdiff.quest.time_aware_candidate` (fake-quant); there is no engine for it (yet).

    `device` is where the trajectories run and the per-bucket ranges are measured, as in
    `calibrate` (the UNet moved there and back, TF32 off, the device type in the manifest's
    settings unless it is the CPU, a device this machine lacks refused before any work)."""
    from qdiff.calib.quest.time_aware import INDEX_NAME, bucket_table_name, bucket_tables, save_time_aware
    from qdiff.core.conditioning import conditioning_key, resolve_conditioning
    from qdiff.runtime.backends import TorchDenoiser
    from qdiff.runtime.calibration_loop import model_trajectory_sampler

    dev = _checked_device(device, "time-aware calibration")
    table_path = Path(table_path)
    table = CalibrationTable.load(table_path)
    bundle = as_bundle(model)
    table.check_model(bundle.model_sha256, str(bundle.path))
    recipe = Recipe.from_json(table.recipe)
    folder = Path(out)
    if folder.name != f"time-aware-k{buckets}":
        folder = folder / f"time-aware-k{buckets}"
    index = folder / INDEX_NAME
    conditioning = resolve_conditioning(
        bundle, recipe.samples_per_timestep, prompts=prompts, class_labels=class_labels, embeddings=embeddings, random=random_conditioning, seed=recipe.seed
    )
    table_sha = sha256_file(table_path)
    paths = [folder / bucket_table_name(b) for b in range(buckets)]
    wanted = Manifest(
        kind="time-aware-tables",
        inputs={"model_sha256": bundle.model_sha256, "table_sha256": table_sha, "conditioning": conditioning_key(conditioning)},
        settings={"buckets": buckets, **_calibration_settings(recipe, dev)},
    )
    cached = CachedStage(index, wanted, log_as="time-aware", why="same model, table and K", companions={f"bucket_{b:02d}_sha256": p for b, p in enumerate(paths)})
    if cached.reusable(force) is not None:
        return TimeAwareResult(index, paths, reused=True)
    started = time.perf_counter()
    log(f"time-aware: {buckets} buckets over the {len(table.provenance.get('timesteps', []))} calibration timesteps of {table_path.name}")
    with _calibrating_on(bundle.unet, dev):
        sampler = model_trajectory_sampler(bundle, recipe, TorchDenoiser(bundle.unet), conditioning=conditioning, device=dev)
        tables, time_buckets = bucket_tables(bundle.unet, sampler, table, buckets, base_sha256=table_sha, progress=progress)
    index.unlink(missing_ok=True)  # a half-rewritten folder must not look complete
    save_time_aware(folder, tables, time_buckets)
    cached.record({"seconds": round(time.perf_counter() - started, 2), "boundaries": list(time_buckets.boundaries), "timesteps": [list(t) for t in time_buckets.timesteps]})
    log(f"time-aware: {buckets} tables -> {folder}")
    return TimeAwareResult(index, paths)


# ----------------------------------------------------------------------------- quantize


@dataclass
class QuantizeResult:
    onnx_path: Path
    # A QdqReport or Int4Report when the graph was just written; its JSON when it was up to date.
    report: CoverageReport | dict[str, Any] | None
    reused: bool = False

    @property
    def coverage(self) -> dict[str, Any]:
        """The coverage report as JSON, however the graph came about."""
        return self.report.to_json() if hasattr(self.report, "to_json") else dict(self.report or {})


# Recipe fields that only decide where Q/DQ goes, so they may differ between calibration and
# quantization (a placement may quantize fewer layers than were calibrated, never more).
PLACEMENT_FIELDS = ("quantize_ops", "exclude")


def _calls_denoiser(unet: Any, device: str) -> Any:
    """The denoiser that re-collects calibration calls for a stage running on `device`: the
    model's own UNet on the CPU, else a copy of it on the device (the caller's model stays where
    it is). The calls come back on the CPU either way."""
    import copy

    import torch

    from qdiff.runtime.backends import DeviceDenoiser, TorchDenoiser

    if torch.device(device).type == "cpu":
        return TorchDenoiser(unet)
    return DeviceDenoiser(copy.deepcopy(unet), device)


def quantize_onnx(
    onnx_path: str | Path,
    table_path: str | Path,
    out: str | Path | None = None,
    *,
    force: bool = False,
    placement: str | None = None,
    quantize_ops: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] | None = None,
    dtype: str = "fp32",
    reconstruction: str | Path | None = None,
    opset: int | None = None,
) -> QuantizeResult:
    """Insert Q/DQ nodes into an exported graph from a calibration table.

    `reconstruction` (a `reconstruction.safetensors` from `reconstruct`) gives the weights their
    reconstructed integers instead of round-to-nearest; pass the table written beside it.

    `placement` (a name from `qdiff.export.placement.PLACEMENTS`: all, conv, conv-ff) or
    `quantize_ops`/`exclude` narrow the set of layers the table was calibrated for (e.g. INT8
    only on convolutions, leaving attention to fused FP16 kernels); the output name says so.

    `dtype="fp16"` (from the FP32 export) writes the FP16 Q/DQ graph TensorRT >= 10 builds
    strongly typed: opset 19, FP16 weights/activations/scales, FP16 DequantizeLinear outputs
    feeding their layers directly, FP32 graph I/O, FP32 islands where FP16 would overflow
    (listed in the report); named `<stem>.<recipe>.fp16.onnx`. The default FP32 graph is the
    one TensorRT 8.6 parses (its parser stops at opset 17).

    `dtype="fp16", opset=17` writes the FP16 graph TensorRT 8.6 can parse: every Q/DQ pair an
    FP32 island (FP16 -> Cast to FLOAT -> Q/DQ with FP32 scales -> Cast to FLOAT16 -> the layer;
    weights INT8 initializers -> DequantizeLinear -> Cast), named `<stem>.<recipe>.fp16-op17.onnx`.
    `opset` is for `dtype="fp16"` only (default 19); 17 and 19 are the choices."""
    from qdiff.export.placement import get_placement
    from qdiff.export.fp16 import QDQ_FP32_ISLANDS_OPSET, check_qdq_opset, qdq_dtype_of
    from qdiff.export.onnx_io import publish_onnx
    from qdiff.export.qdq import insert_qdq_file

    opset = check_qdq_opset(dtype, opset)  # None for fp32 (the export's opset)
    onnx_path, table_path = Path(onnx_path), Path(table_path)
    table = CalibrationTable.load(table_path)
    recipe = Recipe.from_json(table.recipe)
    recipe.check_deployable("a Q/DQ graph")  # before hashing anything
    if placement is not None:
        if quantize_ops is not None or exclude is not None:
            raise RecipeError("give a named placement or quantize_ops/exclude, not both", hint="a placement already sets both")
        recipe = get_placement(placement).apply(recipe)
    narrowing = {k: tuple(v) for k, v in (("quantize_ops", quantize_ops), ("exclude", exclude)) if v is not None}
    if narrowing:
        extra_ops = set(narrowing.get("quantize_ops", ())) - set(recipe.quantize_ops)
        if extra_ops:
            raise ArtifactMismatchError(
                f"{table_path.name} was calibrated for {', '.join(recipe.quantize_ops)}; it has no ranges for {', '.join(sorted(extra_ops))}",
                hint="recalibrate with those ops in the recipe, or quantize a subset",
            )
        tag = "-".join(op.lower() for op in narrowing.get("quantize_ops", recipe.quantize_ops)) if "quantize_ops" in narrowing else "custom"
        recipe = recipe.with_overrides(name=f"{recipe.name}-{tag}", **narrowing)
    export_manifest = read_manifest(onnx_path)
    if export_manifest is not None:
        exported_from = export_manifest.model_sha256
        if exported_from and exported_from != table.model_sha256:
            raise ArtifactMismatchError(
                f"{onnx_path.name} was exported from model {exported_from[:12]}, but {table_path.name} calibrates model {table.model_sha256[:12]}",
                hint="export and calibrate the same model folder",
            )
    weights = None
    tag = recipe.name
    if reconstruction is not None:
        from qdiff.calib.reconstruct.artifact import ReconstructedWeights

        weights = ReconstructedWeights.load(reconstruction)
        weights.check_model(table.model_sha256, f"the model of {table_path.name}")
        tag = f"{recipe.name}-{weights.method}"
    suffix = "" if dtype == "fp32" else ".fp16-op17" if opset == QDQ_FP32_ISLANDS_OPSET else ".fp16"
    name = f"{onnx_path.stem}.{tag}{suffix}.onnx"
    target = Path(out) if out is not None else onnx_path.with_name(name)
    if target.suffix != ".onnx":
        target = target / name
    settings = {"recipe": recipe.to_json(), "dtype": dtype}
    if opset is not None:  # FP16 only; an FP32 graph's manifest keeps its old settings (and cache)
        settings |= {"opset": opset, "qdq_dtype": qdq_dtype_of(opset)}
    wanted = Manifest(
        kind="qdq-onnx",
        inputs={"onnx_sha256": sha256_file(onnx_path), "table_sha256": sha256_file(table_path), "model_sha256": table.model_sha256},
        settings=settings,
    )
    if reconstruction is not None:
        wanted.inputs["reconstruction_sha256"] = sha256_file(reconstruction)
    cached = CachedStage(target, wanted, log_as="quantize")
    if (have := cached.reusable(force)) is not None:
        return QuantizeResult(target, have.coverage, reused=True)
    with cached.staging() as stage:
        staged = stage / target.name
        report = insert_qdq_file(onnx_path, table, staged, recipe, weights, dtype=dtype, probe_size=_probe_size(export_manifest), opset=opset)
        publish_onnx(staged, target)
    details = {"coverage": report.to_json(), "weight_bits": recipe.weight_bits, "activation_bits": recipe.activation_bits}
    details |= {"dtype": report.dtype, "opset": report.opset, "qdq_dtype": report.qdq_dtype}
    if export_manifest is not None and "unet_config" in export_manifest.details:
        details["unet_config"] = export_manifest.unet_config
    cached.record(details)
    log("quantize: " + report.summary())
    return QuantizeResult(target, report)


def _probe_size(export_manifest: Manifest | None) -> int:
    """Latent size of the FP16 overflow probe: the model's own sample_size where the export
    recorded it, else SD's 64."""
    size = export_manifest.sample_size if export_manifest is not None else None
    return 64 if size is None else size


def quantize_int4_weight_only(
    onnx_path: str | Path,
    out: str | Path | None = None,
    *,
    block_size: int = 128,
    exclude: tuple[str, ...] = (),
    force: bool = False,
    dtype: str = "fp32",
    opset: int | None = None,
) -> QuantizeResult:
    """INT4 block-quantized MatMul/Gemm weights (weight-only, opset 21) for TensorRT >= 10.

    Needs no calibration: scales come from the weights. Writes `<stem>.int4wo.onnx`
    (`<stem>.int4wo.fp16.onnx` with `dtype="fp16"`: FP16 graph, FP16 block scales); see
    `qdiff.export.int4_weight_only` for the format. `opset` may only be 21 (or None): INT4
    tensors and block scales do not exist below it, so there is no opset-17 form."""
    from qdiff.export.fp16 import check_dtype
    from qdiff.export.int4_weight_only import TARGET_OPSET, Int4WeightOnlyConfig, int4_weight_only_file
    from qdiff.export.onnx_io import publish_onnx

    check_dtype(dtype)
    if opset is not None and opset != TARGET_OPSET:
        raise QuantizationError(
            f"INT4 weight-only graphs are written at opset {TARGET_OPSET} (INT4 DequantizeLinear with block scales); opset {opset} cannot hold them",
            hint="drop --opset; for an INT4-weight graph TensorRT 8.6 parses, calibrate a w4a8 table and `qdiff quantize --calib TABLE --dtype fp16 --opset 17`",
        )
    onnx_path = Path(onnx_path)
    config = Int4WeightOnlyConfig(block_size=block_size, exclude=tuple(exclude or ()))
    name = f"{onnx_path.stem}.int4wo.onnx" if dtype == "fp32" else f"{onnx_path.stem}.int4wo.fp16.onnx"
    target = Path(out) if out is not None else onnx_path.with_name(name)
    if target.suffix != ".onnx":
        target = target / name
    if not onnx_path.is_file():
        raise OnnxModelError(f"ONNX file {onnx_path} does not exist", hint="export one with `qdiff export`")
    export_manifest = read_manifest(onnx_path)
    inputs = {"onnx_sha256": sha256_file(onnx_path)}
    if export_manifest is not None and export_manifest.model_sha256:
        inputs["model_sha256"] = export_manifest.model_sha256
    wanted = Manifest(kind="int4-weight-only-onnx", inputs=inputs, settings={"int4_weight_only": config.to_json(), "dtype": dtype})
    cached = CachedStage(target, wanted, log_as="quantize")
    if (have := cached.reusable(force)) is not None:
        return QuantizeResult(target, have.coverage, reused=True)
    unet_config = export_manifest.unet_config if export_manifest is not None else None
    size = config_sample_size(unet_config)
    dims = {"height": size, "width": size} if size is not None else None  # MACs at the model's own size
    with cached.staging() as stage:
        staged = stage / target.name
        report = int4_weight_only_file(onnx_path, staged, config, dims=dims, dtype=dtype)
        publish_onnx(staged, target)
    details = {"coverage": report.to_json(), "weight_bits": 4, "int4_weight_only": True, "block_size": config.block_size}
    if unet_config is not None:
        details["unet_config"] = unet_config
    cached.record(details)
    log("quantize: " + report.summary())
    return QuantizeResult(target, report)


# ----------------------------------------------------------------------------- build / inspect


def build_engine(
    onnx: str | Path,
    out_dir: str | Path,
    *,
    precision: str = "fp16",
    batch: tuple[int, ...] | int = (1, 2, 4),
    size: tuple[int, ...] | int | None = None,
    tokens: tuple[int, ...] | int = 77,
    shapes: dict[str, Any] | None = None,
    workspace_gib: float | None = None,
    optimization_level: int | None = None,
    tactic_sources: str | None = None,
    timing_cache: str | Path | None = None,
    strongly_typed: bool = False,
    float_layers: str | None = None,
    force: bool = False,
    verbose: bool = False,
):
    """Build a TensorRT engine folder from an exported (fp16/fp32) or quantized (int8/w4a8) graph.

    The profile covers `batch` x `size` (in the sample's own pixels: latent pixels for latent
    models; default: the model's sample_size) x `tokens`; `shapes` overrides any input's range.
    """
    from qdiff.engines.builder import BuildSettings, graph_facts
    from qdiff.engines.builder import build_engine as _build
    from qdiff.engines.profiles import derive_profile, graph_inputs

    onnx = Path(onnx)
    if not onnx.exists():
        raise OnnxModelError(f"no ONNX file at {onnx}", hint="export one with `qdiff export` (and `qdiff quantize` for INT8)")
    graph_manifest = read_manifest(onnx)
    if graph_manifest is not None and isinstance(graph_manifest.settings.get("recipe"), dict):
        Recipe.from_json(graph_manifest.settings["recipe"]).check_deployable("a TensorRT engine")  # W4A4 is simulated only
    facts = graph_facts(onnx)
    default_size = config_sample_size(facts.unet_config)
    profile = derive_profile(graph_inputs(onnx), batch=batch, height=size, tokens=tokens, overrides=shapes, default_size=default_size)
    settings = BuildSettings(
        precision=precision,
        profile=profile,
        workspace_gib=workspace_gib,
        optimization_level=optimization_level,
        tactic_sources=tactic_sources,
        strongly_typed=strongly_typed,
        float_layers=float_layers,
        timing_cache=None if timing_cache is None else Path(timing_cache),
        verbose=verbose,
    )
    return _build(onnx, out_dir, settings, force=force)


def inspect_engine(engine: str | Path, *, onnx: str | Path | None = None, profile: bool = False, runs: int = 20, out: str | Path | None = None):
    """Per-layer precision (and with `profile`, time) of an engine; writes inspect.json/.md.

    Reads the inspector JSON saved at build time, so it runs without a GPU unless asked to
    profile (or the engine folder lacks that file)."""
    from qdiff.core.artifacts import write_json_atomic, write_text_atomic
    from qdiff.engines.inspector import inspect, to_markdown
    from qdiff.engines.manifest import read_engine_manifest

    info = read_engine_manifest(engine)
    onnx = Path(onnx) if onnx is not None else Path(info.manifest.details.get("onnx_path", ""))
    if not onnx.is_file():
        raise OnnxModelError(f"the graph {info.path.name} was built from is not at {onnx}", hint="pass --onnx PATH to the graph the engine was built from")
    layers_file = info.path.parent / "layers.json"
    if layers_file.exists():
        layer_info = json.loads(layers_file.read_text(encoding="utf-8"), strict=False)
    else:
        from qdiff.engines.builder import layer_information
        from qdiff.engines.runner import TensorRTEngine

        runner = TensorRTEngine(info.path)
        layer_info = layer_information(runner.trt, runner.engine, info.profile)
    opt = {name: rng.opt for name, rng in info.profile.items()}
    timings = None
    if profile:
        import torch

        from qdiff.engines.profiler import profile_layers

        gen = torch.Generator().manual_seed(0)
        feeds = {name: torch.randn(shape, generator=gen) for name, shape in opt.items()}
        if "timestep" in feeds:
            feeds["timestep"] = torch.full(opt["timestep"], 500.0)
        timings = profile_layers(info.path, feeds, runs=runs)
    report = inspect(onnx, layer_info, opt, timings)
    out_dir = Path(out) if out is not None else info.path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{info.path} ({info.precision}, {info.manifest.inputs.get('gpu')}, TensorRT {info.manifest.inputs.get('tensorrt')}) at " + ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in opt.items())
    write_json_atomic(out_dir / "inspect.json", {"engine": str(info.path), "precision": info.precision, "shapes": {n: list(s) for n, s in opt.items()}, **report.to_json()})
    write_text_atomic(out_dir / "inspect.md", to_markdown(report, title=title))
    return report


# ----------------------------------------------------------------------------- sample


def sample(
    model: ModelLike,
    out_dir: str | Path,
    *,
    backend: str = "pytorch",
    onnx: str | Path | None = None,
    engine: str | Path | None = None,
    spec: SamplingSpec | None = None,
    allow_nonfinite: bool = False,
    ort_arithmetic: str = "exact",
    **sampling: Any,
) -> SampleResult:
    """Sample images with any backend and write them as PNGs (plus a grid).

    What to sample: `spec` (a `SamplingSpec`) or its fields as keywords (`steps=25`, ...)."""
    spec = SamplingSpec.of(spec, **sampling)
    from PIL import Image

    from qdiff.core.conditioning import resolve_conditioning
    from qdiff.runtime.sampler import generate, make_denoiser
    from qdiff.report import image_grid, save_png

    bundle = as_bundle(model)
    if onnx is not None and backend == "onnxruntime":
        from qdiff.core.artifacts import check_made_from_model

        check_made_from_model(onnx, bundle.model_sha256, bundle.label, SamplingError)
    conditioning = resolve_conditioning(bundle, spec.num_images, **spec.conditioning_kwargs())
    denoiser = make_denoiser(bundle, backend, onnx, engine=engine, ort_arithmetic=ort_arithmetic)
    if bundle.vae is not None and hasattr(denoiser, "device"):
        bundle.vae.to(denoiser.device)  # the VAE decodes where the latents are
    seeds = spec.seeds
    result = generate(bundle, denoiser, scheduler=spec.scheduler, steps=spec.steps, seeds=seeds, conditioning=conditioning, guidance_scale=spec.guidance_scale, allow_nonfinite=allow_nonfinite)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, img in zip(seeds, result.images):
        result.paths.append(save_png(Image.fromarray(img), out_dir / f"sample_{s:05d}.png"))
    save_png(image_grid([result.images], scale=max(1, 128 // img.shape[0])), out_dir / "grid.png")
    if bundle.writes_latents:
        log(f"sample: note: {bundle.output_kind}")
    log(f"sample: {len(seeds)} images ({backend}, {spec.scheduler}, {spec.steps} steps) -> {out_dir}")
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


def run(
    model: ModelLike = None,
    out_dir: str | Path = "qdiff-out",
    *,
    recipe: str | Path | Recipe = "w8a8",
    spec: SamplingSpec | None = None,
    ort_arithmetic: str = "exact",
    force: bool = False,
    reconstruct_method: str | None = None,
    reconstruct_settings: dict[str, Any] | None = None,
    calib_device: Any = "cpu",
    **overrides: Any,
) -> RunResult:
    """The main job: export, calibrate, quantize, then sample FP32 and quantized from the same
    seeds through ONNX Runtime and report how far apart they are (`qdiff.evaluate.compare`),
    with plots of the per-step error and of the calibration statistics.

    What to sample: `spec` (a `SamplingSpec`) or its fields as keywords; every other keyword
    overrides a recipe setting (`activation_calibrator="max"`, ...). `scheduler` and `seed` are
    fields of both, and go to sampling here; set the calibration ones in the recipe (a `Recipe`
    or `load_recipe(..., scheduler=...)`, as `qdiff run --calib-scheduler` does). The conditioning of the
    spec also conditions the calibration trajectories. `calib_device` is calibration's `device`
    (`calibrate`); sampling and the comparison run in ONNX Runtime on the CPU either way."""
    sampling = {k: overrides.pop(k) for k in list(overrides) if k in SamplingSpec.field_names()}
    spec = SamplingSpec.of(spec, **sampling)
    conditioning = spec.conditioning_sources()
    from qdiff.evaluate import compare, model_json, reference_samples, sampling_plan, write_comparison
    from qdiff.plots import calibration_figures
    from qdiff.report import coverage_text
    from qdiff.runtime.backends import OnnxRuntimeDenoiser

    started = time.perf_counter()
    out_dir = Path(out_dir)
    overrides = {**RUN_CALIBRATION, **overrides}  # what is left after the sampling keys
    load_recipe(recipe, **overrides).check_deployable("the ONNX Runtime comparison of `run`")  # fail fast, before loading the model
    if calib_device != "cpu":
        _checked_device(calib_device, "calibration")
    # Progress for the phases that printed nothing on a rerun (~20 s on 2 cores with every
    # artifact up to date): loading and hashing the model, the per-step errors, the plots.
    log(f"run: loading the model ({model if model is not None else 'built-in'}) and hashing its weights ...")
    bundle = as_bundle(model)
    exported = export_model(bundle, out_dir, force=force)
    calibrated = calibrate(bundle, out_dir, recipe, **conditioning, force=force, device=calib_device, **overrides)
    recipe_obj = Recipe.from_json(calibrated.table.recipe)
    if reconstruct_method is not None:
        from qdiff.calib.reconstruct.settings import ReconstructionSettings

        rec = reconstruct(bundle, out_dir, calibrated.table_path, ReconstructionSettings(method=reconstruct_method).with_overrides(**(reconstruct_settings or {})), **conditioning, force=force)
        quantized = quantize_onnx(exported.onnx_path, rec.table_path, force=force, reconstruction=rec.weights_path)
        recipe_obj = recipe_obj.with_overrides(name=f"{recipe_obj.name}-{reconstruct_method}")
    else:
        quantized = quantize_onnx(exported.onnx_path, calibrated.table_path, force=force)

    plan = sampling_plan(bundle, spec)
    reference = reference_samples(bundle, OnnxRuntimeDenoiser(exported.onnx_path, arithmetic=ort_arithmetic), plan)
    candidate = OnnxRuntimeDenoiser(quantized.onnx_path, arithmetic=ort_arithmetic)
    comparison = compare(bundle, reference, candidate, plan, label=recipe_obj.name)
    if calibrated.stats_path:
        log("run: plotting the calibration statistics ...")
    figures = calibration_figures(calibrated.stats_path, out_dir, provenance=calibrated.table.provenance) if calibrated.stats_path else []
    coverage = quantized.report
    coverage_json = coverage.to_json() if hasattr(coverage, "to_json") else coverage
    artifacts = {"fp32_onnx": exported.onnx_path.name, "qdq_onnx": quantized.onnx_path.name, "calibration_table": calibrated.table_path.name}
    if calibrated.stats_path:
        artifacts["calibration_stats"] = calibrated.stats_path.name
    report = {
        "model": model_json(bundle),
        "recipe": recipe_obj.to_json(),
        "sampling": {**candidate.describe(), **plan.to_json()},
        "summary": {
            **comparison.summary,
            "quantized layers": f"{coverage_json['quantized_layers']}/{coverage_json['weighted_layers']}",
            "quantized MAC share": coverage_json["mac_share"],
            "wall time (s)": round(time.perf_counter() - started, 1),
        },
        "images": comparison.images,
        "steps": comparison.steps,
        "shape_fd": comparison.shape_fd,
        "coverage": coverage_json,
        "coverage_text": coverage_text(coverage_json),
        "artifacts": artifacts,
    }
    paths = write_comparison(out_dir, report, comparison, label=recipe_obj.name, name="report", extra_figures=figures)
    log(f"run: mean PSNR {report['summary']['mean PSNR (dB)']:.2f} dB, mean SSIM {report['summary']['mean SSIM']:.4f} -> {paths['markdown']}")
    return RunResult(out_dir, report, paths["grid"], (paths["json"], paths["markdown"]))


# ----------------------------------------------------------------------------- evaluation harness


def evaluate_table(
    model: ModelLike,
    tables: str | Path | list[str | Path],
    out_dir: str | Path | None = "qdiff-eval",
    *,
    weights: list[str | Path | None] | None = None,
    labels: list[str | None] | None = None,
    decomposition: bool = False,
    baseline: str | None = None,
    settings: Any = None,
    **setting_overrides: Any,
):
    """The evaluation harness (`qdiff.eval_harness`) on the fake-quant models of calibration
    tables (optionally with reconstructed weights, `weights[i]` for `tables[i]`): FP32 reference
    and every candidate from the same noise over several seed sets, means with bootstrap 95%
    intervals, paired differences to `baseline` (default: the first table's row). Settings: a
    `HarnessSettings` and/or its fields as keywords (`device="cuda"`, `images=1000`, ...).
    `model=None`: the folder the first table was calibrated on. Writes harness.json/.md and
    plots into `out_dir` after every candidate; returns the `HarnessResult`."""
    import dataclasses

    from qdiff.eval_harness import HarnessSettings, model_of_tables, run_harness, table_candidates

    from qdiff.core.errors import EvaluationError

    tables = [tables] if isinstance(tables, (str, Path)) else list(tables)
    unknown = sorted(set(setting_overrides) - {f.name for f in dataclasses.fields(HarnessSettings)})
    if unknown:
        raise EvaluationError(f"unknown harness setting(s) {', '.join(unknown)}", hint=f"HarnessSettings has {', '.join(f.name for f in dataclasses.fields(HarnessSettings))}")
    settings = dataclasses.replace(settings or HarnessSettings(), **setting_overrides).check()
    candidates = table_candidates(tables, weights=weights, labels=labels, decomposition=decomposition)
    bundle = as_bundle(model if model is not None else model_of_tables(tables))
    for t in tables:
        CalibrationTable.load(t).check_model(bundle.model_sha256, str(bundle.path))
    return run_harness(bundle, candidates, settings, baseline=baseline, out_dir=Path(out_dir) if out_dir is not None else None)


# `qdiff eval` lives in its own module (its core is shared with `run`); re-exported here so the
# public API stays in one place: `qdiff.api.evaluate(model, fp32_onnx, quantized_onnx, out_dir)`.
# Resolved on first use (PEP 562), so importing the API does not import torch.
_SAMPLING_CORE = ("SampleResult", "generate", "make_denoiser", "step_errors")
# The evaluation harness (qdiff.eval_harness): candidates vs FP32 at n >= 1000 with intervals.
_HARNESS = ("run_harness", "HarnessSettings", "HarnessResult", "Candidate", "fake_quant_candidate", "decomposition_candidates", "fp32_candidate")
_EXPORT_CHECK = ("validate_export",)  # runtime.export_check


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from qdiff.evaluate import evaluate

        return evaluate
    if name in _SAMPLING_CORE:
        from qdiff.runtime import sampler

        return getattr(sampler, name)
    if name in _HARNESS:
        from qdiff import eval_harness

        return getattr(eval_harness, name)
    if name in _EXPORT_CHECK:
        from qdiff.runtime import export_check

        return getattr(export_check, name)
    raise AttributeError(f"module 'qdiff.api' has no attribute {name!r}")
