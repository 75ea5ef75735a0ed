"""NVIDIA ModelOpt's INT8 recipe for diffusion UNets as a peer of qdiff's W8A8.

ModelOpt (`nvidia-modelopt`, the `modelopt.torch.quantization` library) quantizes the PyTorch
UNet, calibrates it with `mtq.quantize(model, config, forward_loop)` and exports Q/DQ ONNX for
TensorRT. Its recipe for diffusion backbones is not part of the library: it lives in the example
scripts of NVIDIA/TensorRT-Model-Optimizer (now NVIDIA/Model-Optimizer),
`examples/diffusers/quantization/`. This module rebuilds that recipe on the library API, in our
own code (no example code is copied), and feeds it exactly the calibration denoiser calls
qdiff's own calibration observes (`qdiff.calib.trajectories.iter_calibration_inputs`, the same
recipe fields as the ONNX Runtime peer), so a gap in quality is the quantizer's.

The recipe, setting by setting, and where each comes from (paths in that repository; "config.py
get_int8_config" is the version of 2025-07-31, commit 4c611e47, the last one that spells out
`quant_level`; later versions keep the same per-layer settings in `reset_set_int8_config`):

- which layers (`quant_level`, config.py `get_int8_config` and utils.py `quantize_lvl`): every
  `nn.Conv2d`; `nn.Linear` by level: 2 adds the feed-forward layers (`ff.net`), 2.5 also the
  attention projections `to_q/to_k/to_v`, 3 (the default of quantize.py and of the README's
  INT8 command) every Linear. Level 4 (FP8 attention) is FP8 only.
- what stays float (utils.py `filter_func`, applied with `mtq.disable_quantizer` after
  calibration): modules whose name contains time_emb_proj, time_embedding, conv_in, conv_out,
  conv_shortcut, add_embedding, pos_embed, time_text_embed, context_embedder, norm_out or
  x_embedder. So unlike qdiff, the 1x1 residual shortcuts and the timestep MLPs stay float.
  Output quantizers and everything not listed (attention's q/k/v/softmax BMM quantizers
  included) are disabled (`"default": {"enable": False}`).
- weights (config.py): INT8 per output channel (`axis=0`), max calibration.
- Linear inputs (config.py + quantize.py, README "alpha ... used for linear layers only"):
  SmoothQuant (`"algorithm": {"method": "smoothquant", "alpha": alpha}`; quantize.py of that
  version refuses INT8 without it) with alpha 0.8 (README: "Recommendation: 0.8 for SDXL";
  `build_sdxl_8bit_engine.sh`). The library collects per-channel maxima (`axis=-1`), folds the
  smoothing factor into the weight and keeps a per-channel `Mul` before one per-tensor input
  quantizer, which is what TensorRT receives.
- Conv inputs (config.py): per tensor, with the example's `PercentileCalibrator` plugin
  (`calib/plugin_calib.py`) at `percentile` 1.0 (README: "Recommendation: 1.0") and
  `collect_method` "min-mean" (README INT8 command and `build_sdxl_8bit_engine.sh`).
  That calibrator groups the calls by denoising step (call index modulo `total_step`, the number
  of steps), reduces each step's maxima over the calibration batches (min-mean: a mean;
  global_min: a min; min-max/mean-max: a max), then takes the min over the first
  `percentile * total_step` steps (mean-max: the mean). It is example-only code, not in the
  wheel, so `StepAmaxCalibrator` below is our own calibrator with those semantics on the
  library's `MaxCalibrator` base. Here `total_step` is the number of kept calibration steps
  (qdiff keeps `num_timesteps` of each trajectory, in order, so call k is kept step
  k mod num_timesteps), where the example calibrates on every step of its pipeline.
- precision of the float side (`trt_high_precision_dtype`): "Float", since qdiff's graphs are
  FP32 in and out; the example loads the model in FP16 and uses "Half".
- export (onnx_utils/export.py `modelopt_export_sd`): TorchScript exporter (`dynamo=False`) with
  constant folding; the library's TensorQuantizer emits QuantizeLinear/DequantizeLinear. Here
  the graph is traced by qdiff's own exporter (`qdiff.export.onnx_export.export_unet`) so the
  input/output names, FP32 types and dynamic axes are qdiff's and `qdiff build`/`qdiff eval` use
  it unchanged; opset 17 (qdiff's) instead of the example's 20, which INT8 does not need.

Deviations, and why:

- min-mean divides by the number of calls seen at each step (a mean). The example divides the
  per-step sum by `total_step` instead, which is the mean times (batches / steps): 16/20 = 0.8 for
  its SDXL command (32 prompts in batches of 2, 20 steps), but 1/10 for qdiff's `qdiff run`
  calibration (one batch of 32 trajectories, 10 kept steps), an accidental clip that would turn
  on qdiff's batching. `mean_divisor="steps"` reproduces the example literally.
- the calibration data are qdiff's calls (FP32 model, qdiff's scheduler, seeds, conditioning and
  CFG batches), not the example's prompt dataset run through a diffusers pipeline in FP16.
- the Q/DQ scales the exporter writes as Constant nodes are moved to initializers (same values),
  as in qdiff's graphs; nothing else in the exported graph is touched.

Devices: calibration runs where `device` says (CPU, or CUDA on the GPU machine) with TF32 off, so
a CUDA run sees qdiff's calls up to float round-off; the sampler that makes the calls stays on the
CPU, as in `qdiff calibrate`. The quantized model is exported on the CPU. Memory: two copies of
the UNet (the FP32 one drives the trajectories lazily, ModelOpt rewrites the other in place).
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qdiff.core.artifacts import CachedStage, Manifest, read_manifest
from qdiff.calib.recipe import Recipe, load_recipe
from qdiff.core.errors import ArtifactMismatchError, BackendUnavailableError, OnnxModelError, QuantizationError, strict_fields
from qdiff.export.qdq import LayerDecision, QdqReport
from qdiff.peers.onnxruntime_static import RECIPE_FIELDS, PeerResult
from qdiff.runtime.backends import exact_float
from qdiff.core.progress import log, progress

ONNX_NAME = "denoiser.modelopt-int8.onnx"
MODELOPT_VERSION = "0.47.0"  # the version this recipe was written and checked against

# The recipe fields that decide which calls calibration sees. `exclude` and `quantize_ops` are
# qdiff's placement; ModelOpt's recipe decides its own (quant level, filter), so they are unused.
CALIBRATION_FIELDS = tuple(f for f in RECIPE_FIELDS if f not in ("exclude", "quantize_ops"))

# utils.py `filter_func` of the example: these modules keep float weights and activations.
FLOAT_MODULES = (
    "time_emb_proj", "time_embedding", "conv_in", "conv_out", "conv_shortcut", "add_embedding",
    "pos_embed", "time_text_embed", "context_embedder", "norm_out", "x_embedder",
)  # fmt: skip
QUANT_LEVELS = (1.0, 2.0, 2.5, 3.0)
COLLECT_METHODS = ("min-mean", "global_min", "min-max", "mean-max")


@dataclass(frozen=True)
class ModelOptInt8Settings:
    """ModelOpt's INT8 diffusion recipe (see the module docstring for the source of each)."""

    quant_level: float = 3.0
    algorithm: str = "smoothquant"  # "max": no smoothing (an ablation, not the recipe)
    alpha: float = 0.8
    conv_calibrator: str = "percentile"  # the example's step calibrator; "max": the library's MaxCalibrator
    percentile: float = 1.0
    collect_method: str = "min-mean"
    mean_divisor: str = "calls"  # "steps": the example's literal min-mean (see the docstring)
    float_modules: tuple[str, ...] = FLOAT_MODULES
    trt_high_precision_dtype: str = "Float"
    opset: int = 17

    def __post_init__(self) -> None:
        problems = []
        if self.quant_level not in QUANT_LEVELS:
            problems.append(f"quant_level={self.quant_level} (INT8 levels: {', '.join(map(str, QUANT_LEVELS))}; 4 is FP8 attention)")
        if self.algorithm not in ("smoothquant", "max"):
            problems.append(f"algorithm={self.algorithm!r} (smoothquant or max)")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha={self.alpha} (SmoothQuant's alpha lies in [0, 1])")
        if self.conv_calibrator not in ("percentile", "max"):
            problems.append(f"conv_calibrator={self.conv_calibrator!r} (percentile or max)")
        if not 0.0 < self.percentile <= 1.0:
            problems.append(f"percentile={self.percentile} (a fraction of the steps, in (0, 1])")
        if self.collect_method not in COLLECT_METHODS:
            problems.append(f"collect_method={self.collect_method!r} (one of {', '.join(COLLECT_METHODS)})")
        if self.mean_divisor not in ("calls", "steps"):
            problems.append(f"mean_divisor={self.mean_divisor!r} (calls or steps)")
        if self.trt_high_precision_dtype not in ("Float", "Half", "BFloat16"):
            problems.append(f"trt_high_precision_dtype={self.trt_high_precision_dtype!r}")
        if not 13 <= self.opset <= 21:
            problems.append(f"opset={self.opset} (per-channel QuantizeLinear needs >= 13)")
        if problems:
            raise QuantizationError("ModelOpt INT8 settings are invalid: " + "; ".join(problems), hint="see qdiff/peers/modelopt_int8.py for each setting's range")

    @classmethod
    def coerce(cls, value: ModelOptInt8Settings | dict[str, Any] | None) -> ModelOptInt8Settings:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise QuantizationError(f"ModelOpt settings must be a dict or ModelOptInt8Settings, not {type(value).__name__}")
        value = strict_fields(cls, value, error=QuantizationError, what="ModelOpt", tuples=("float_modules",))
        if "quant_level" in value:
            value["quant_level"] = float(value["quant_level"])
        return cls(**value)

    def with_overrides(self, **overrides: Any) -> ModelOptInt8Settings:
        return ModelOptInt8Settings.coerce({**self.to_json(), **overrides})

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        obj["float_modules"] = list(self.float_modules)
        return obj

    def is_float(self, module_name: str) -> str | None:
        """The filter pattern that keeps `module_name` float (the example's regex is a substring match)."""
        return next((p for p in self.float_modules if p in module_name), None)

    def linear_quantized(self, module_name: str) -> bool:
        """quant_level's rule for Linear layers (config.py get_int8_config)."""
        return (
            self.quant_level >= 3.0
            or (self.quant_level >= 2.0 and "ff.net" in module_name)
            or (self.quant_level >= 2.5 and any(p in module_name for p in ("to_q", "to_k", "to_v")))
        )


# ----------------------------------------------------------------------------- the calibrator


def step_amax_calibrator_class():
    """`StepAmaxCalibrator`, built on first use so that importing qdiff does not import modelopt."""
    global _STEP_CALIBRATOR
    if _STEP_CALIBRATOR is None:
        from modelopt.torch.quantization import utils as quant_utils
        from modelopt.torch.quantization.calib.max import MaxCalibrator

        class StepAmaxCalibrator(MaxCalibrator):
            """Per-step maxima reduced over batches, then over steps (the example's
            PercentileCalibrator semantics, our code; see the module docstring)."""

            def __init__(self, num_bits=8, axis=None, unsigned=False, track_amax=False, *, total_step, percentile=1.0, collect_method="min-mean", mean_divisor="calls"):
                super().__init__(num_bits, axis, unsigned, track_amax)
                self.total_step = int(total_step)
                self.percentile = float(percentile)
                self.collect_method = collect_method
                self.mean_divisor = mean_divisor
                self.per_step: dict[int, torch.Tensor] = {}
                self.counts: dict[int, int] = {}
                self.calls = 0

            @torch.no_grad()
            def collect(self, x):
                local = quant_utils.reduce_amax(x, axis=quant_utils.convert_quantization_axis_to_reduce_axis(x, self._axis)).detach().float()
                if not torch.isfinite(local).all():
                    raise QuantizationError(f"a calibration activation holds NaN or Inf (call {self.calls})")
                step = self.calls % self.total_step
                have = self.per_step.get(step)
                if have is None:
                    self.per_step[step] = local.clone()
                elif self.collect_method == "global_min":
                    self.per_step[step] = torch.minimum(have, local)
                elif self.collect_method in ("min-max", "mean-max"):
                    self.per_step[step] = torch.maximum(have, local)
                else:  # min-mean: summed here, divided in compute_amax
                    self.per_step[step] = have + local
                self.counts[step] = self.counts.get(step, 0) + 1
                self.calls += 1

            def reset(self):
                super().reset()
                self.per_step, self.counts, self.calls = {}, {}, 0

            def step_amax(self) -> list[torch.Tensor]:
                """The reduced maximum of each step, in step order."""
                out = []
                for step in sorted(self.per_step):
                    value = self.per_step[step]
                    if self.collect_method == "min-mean":
                        value = value / (self.counts[step] if self.mean_divisor == "calls" else self.total_step)
                    out.append(value)
                return out

            def compute_amax(self):
                if not self.per_step:
                    return None
                values = self.step_amax()[: max(1, int(self.total_step * self.percentile))]
                stacked = torch.stack(values)
                amax = stacked.mean(dim=0) if self.collect_method == "mean-max" else stacked.amin(dim=0)
                self._calib_amax = amax
                return amax

        _STEP_CALIBRATOR = StepAmaxCalibrator
    return _STEP_CALIBRATOR


_STEP_CALIBRATOR = None


# ----------------------------------------------------------------------------- the config


def modelopt_config(unet: torch.nn.Module, settings: ModelOptInt8Settings, total_step: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The `mtq.quantize` config for `unet`, and why each weighted layer left out stays float.

    Keys name each quantizer exactly (`<module>.weight_quantizer`); the example's
    `<module>*weight_quantizer` wildcards select the same quantizers on diffusers UNets.
    """
    high = {"trt_high_precision_dtype": settings.trt_high_precision_dtype}
    quant_cfg: dict[str, Any] = {"*output_quantizer": {"enable": False}, "default": {"enable": False}}
    skipped: dict[str, str] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            if isinstance(module, (torch.nn.ConvTranspose2d, torch.nn.Conv1d, torch.nn.Conv3d)):
                skipped[name] = "not a Conv2d/Linear (the recipe quantizes those only)"
            continue
        pattern = settings.is_float(name)
        if pattern is not None:
            skipped[name] = f"ModelOpt's filter_func keeps it float (pattern {pattern!r})"
            continue
        weight = {"num_bits": 8, "axis": 0, **high}
        if isinstance(module, torch.nn.Linear):
            if not settings.linear_quantized(name):
                skipped[name] = f"quant_level {settings.quant_level:g} leaves this Linear float"
                continue
            # axis -1: per-channel maxima for SmoothQuant, which then makes the quantizer per tensor.
            act = {"num_bits": 8, "axis": -1 if settings.algorithm == "smoothquant" else None, **high}
        else:
            act = {"num_bits": 8, "axis": None, **high}
            if settings.conv_calibrator == "percentile":
                act["calibrator"] = (
                    step_amax_calibrator_class(),
                    (),
                    {
                        "num_bits": 8,
                        "axis": None,
                        "total_step": total_step,
                        "percentile": settings.percentile,
                        "collect_method": settings.collect_method,
                        "mean_divisor": settings.mean_divisor,
                    },
                )
        quant_cfg[f"{name}.weight_quantizer"] = weight
        quant_cfg[f"{name}.input_quantizer"] = act
    algorithm: Any = {"method": "smoothquant", "alpha": settings.alpha} if settings.algorithm == "smoothquant" else "max"
    return {"quant_cfg": quant_cfg, "algorithm": algorithm}, skipped


# ----------------------------------------------------------------------------- graph facts


_PASS_THROUGH = ("Transpose", "Reshape", "Identity", "Cast", "Unsqueeze", "Squeeze")


def constants_to_initializers(model) -> int:
    """Move tensor-valued Constant nodes (the exporter's Q/DQ scales and zero points) to
    initializers of the same name and value; returns how many moved."""
    keep, moved = [], 0
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and len(attrs) == 1 and "value" in attrs and len(node.output) == 1:
            tensor = attrs["value"].t
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return moved


def modelopt_coverage(graph_path: Path, macs: dict[str, int], reasons: dict[str, str]) -> QdqReport:
    """Which weighted layers of the ModelOpt graph run in INT8, in qdiff's report form.

    A weighted layer is a Conv/ConvTranspose/Gemm/MatMul under the UNet scope whose weight comes
    from an initializer (possibly through Q/DQ and a Transpose, as the exporter writes Linear
    weights). It counts as INT8 when its activation arrives from a DequantizeLinear and its weight
    passes through one, which is what TensorRT (and ORT's CPU kernels) fuse into INT8 layers.
    """
    import onnx

    from qdiff.export.graph_index import WEIGHTED_OPS, module_name

    model = onnx.load(str(graph_path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}

    def weight_path(name: str) -> tuple[bool, bool]:
        """(comes from an initializer, passes a DequantizeLinear) walking up input 0."""
        dq = False
        for _ in range(8):
            if name in init:
                return True, dq
            node = producer.get(name)
            if node is None:
                return False, dq
            if node.op_type == "DequantizeLinear":
                dq = True
            elif node.op_type not in ("QuantizeLinear", *_PASS_THROUGH):
                return False, dq
            name = node.input[0]
        return False, dq

    report = QdqReport()
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        module = module_name(_Named(node.name))
        constant, weight_dq = weight_path(node.input[1])
        if module is None or not constant:
            continue  # attention's activation x activation MatMuls, nodes outside the UNet
        act = producer.get(node.input[0])
        quantized = weight_dq and act is not None and act.op_type == "DequantizeLinear"
        decision = LayerDecision(module, node.op_type, quantized, macs=int(macs.get(module, 0)))
        if not quantized:
            decision.reason = reasons.get(module, "ModelOpt left it float")
        report.layers.append(decision)
    report.qdq_pairs = sum(1 for node in model.graph.node if node.op_type == "QuantizeLinear")
    return report


@dataclass
class _Named:  # graph_index.module_name reads `.name`
    name: str


# ----------------------------------------------------------------------------- calibration


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device ModelOpt can calibrate on here (cpu, or cuda with a GPU), or a clear refusal."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise QuantizationError(f"unknown device {device!r}", hint="use cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} was asked for, but this PyTorch sees no CUDA GPU", hint="run with device='cpu' here, or on the GPU machine")
    if dev.type not in ("cpu", "cuda"):
        raise QuantizationError(f"device {device!r} is not supported", hint="use cpu or cuda")
    return dev


class _PulpUnavailable:
    """Stands in for every name of the `pulp` package when it is not installed (see below)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise BackendUnavailableError(
            "ModelOpt's linear-programming searcher needs `pulp`, which is not installed",
            hint="pip install pulp (qdiff's INT8 peer never calls it)",
        )


def _pulp_stand_in() -> bool:
    """Let modelopt import without `pulp` (16 MB of LP solver binaries).

    `modelopt.torch.opt.searcher` imports pulp at the top for its LP searcher (used by NAS and
    AutoQuantize), so `import modelopt.torch.quantization` fails without it although quantize,
    SmoothQuant and export never touch it. On machines without pulp (the GPU machine gets its
    packages as wheels) a module whose every attribute is `_PulpUnavailable` takes its place:
    anything that does call the solver gets a clear BackendUnavailableError. Returns whether the
    stand-in was installed.
    """
    import importlib.util
    import types

    try:
        if "pulp" in sys.modules or importlib.util.find_spec("pulp") is not None:
            return False
    except (ImportError, ValueError):
        pass
    module = types.ModuleType("pulp", "qdiff's stand-in: pulp is not installed (see qdiff.peers.modelopt_int8)")
    def __getattr__(name: str):
        if name.startswith("__"):  # __file__, __path__, ...: absent, as a plain module's would be
            raise AttributeError(name)
        return _PulpUnavailable

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    module.__qdiff_stand_in__ = True  # type: ignore[attr-defined]
    sys.modules["pulp"] = module
    return True


def _skip_cuda_fake_quant_build() -> None:
    """Do not compile ModelOpt's optional CUDA fake-quant kernels (a JIT nvcc build of minutes).

    Nothing here fake-quantizes on the GPU: calibration only collects ranges and the export runs
    on the CPU, where ModelOpt uses its PyTorch path. Set QDIFF_MODELOPT_CUDA_EXT=1 to let
    ModelOpt build them anyway."""
    import os

    if os.environ.get("QDIFF_MODELOPT_CUDA_EXT") == "1":
        return
    from modelopt.torch.quantization import extensions

    if not hasattr(extensions.get_cuda_ext, "extension"):
        extensions.get_cuda_ext.extension = None  # ModelOpt's own "could not build" value: PyTorch fallback


def _import_modelopt():
    _pulp_stand_in()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "transformers X is not tested with modelopt" at import
            import modelopt
            import modelopt.torch.quantization as mtq
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "?"
        raise BackendUnavailableError(
            f"nvidia-modelopt cannot be imported: module {missing!r} is missing ({exc})",
            hint=f"pip install nvidia-modelopt=={MODELOPT_VERSION} \"torch==<your torch version>\" (pinning torch keeps pip from replacing it); "
            "on the GPU machine install the wheels in .whl/",
        ) from exc
    _skip_cuda_fake_quant_build()
    return modelopt, mtq


def _quiet() -> contextlib.AbstractContextManager:
    """ModelOpt prints a line per inserted/smoothed module; keep qdiff's output readable."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _checked_calls(calls: Sequence[Any], recipe: Recipe) -> Sequence[Any]:
    """Precomputed calibration calls must be the ones iter_calibration_inputs yields for the recipe."""
    from qdiff.calib.trajectories import calibration_step_indices, count_calibration_calls

    steps = calibration_step_indices(recipe.calibration_steps, recipe.num_timesteps, recipe.timestep_window)
    expected = count_calibration_calls(recipe)
    got = [getattr(c, "step", None) for c in calls]
    if len(got) != expected or got != steps * (expected // len(steps)):
        raise QuantizationError(
            f"the {len(got)} calibration calls given are not the {expected} calls of this recipe (steps {steps} per trajectory batch)",
            hint="pass the list iter_calibration_inputs yields for the same model, recipe and conditioning, or none",
        )
    return calls


def calibration_calls(bundle, recipe: Recipe, conditioning, device: str | torch.device = "cpu") -> Iterator[Any]:
    """The calibration calls of `qdiff.calibrate(bundle, ..., recipe)`, made lazily by the FP32
    UNet on `device` (the sampler itself stays on the CPU, as in qdiff's calibration).

    A driver that quantizes several ModelOpt variants of one model lists these once and passes
    them as `calibration_inputs`."""
    from qdiff.runtime.backends import DeviceDenoiser
    from qdiff.runtime.calibration_loop import model_calibration_inputs

    dev = torch.device(device)
    return model_calibration_inputs(bundle, recipe, DeviceDenoiser(bundle.unet, dev), conditioning=conditioning, progress=progress)


# ----------------------------------------------------------------------------- the peer


def check_w8a8(recipe: Recipe) -> None:
    """The peer's one precision: refuse any other recipe by name, before anything is loaded."""
    if recipe.weight_bits != 8 or recipe.activation_bits != 8:
        raise QuantizationError(
            f"the ModelOpt peer quantizes W8A8 only; recipe {recipe.name!r} asks for W{recipe.weight_bits}A{recipe.activation_bits}",
            hint="use the w8a8 recipe (ModelOpt's INT4 recipes are weight-only LLM recipes, not this peer)",
        )


def modelopt_quantized_unet(
    bundle,
    recipe: Recipe,
    settings: ModelOptInt8Settings,
    device: torch.device,
    *,
    conditioning=None,
    calibration_inputs: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    unet: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, list[dict[str, Any]], dict[str, str]]:
    """ModelOpt's INT8 recipe applied to a copy of the UNet (or to `unet` itself, in place) and
    calibrated on the recipe's calls: the PyTorch module with ModelOpt's fake quantizers, which
    is what its Q/DQ graph computes. Returns it (on `device`), the calls fed (one entry per call)
    and, per layer left float, the reason. `quantize_with_modelopt` exports it; the evaluation
    harness runs it directly (`qdiff.peers.candidates`)."""
    from qdiff.calib.trajectories import calibration_step_indices, count_calibration_calls

    check_w8a8(recipe)
    device = resolve_device(device)
    _, mtq = _import_modelopt()
    source = bundle.unet.eval()
    quantized = (unet if unet is not None else copy.deepcopy(source)).to(device).eval()
    steps = calibration_step_indices(recipe.calibration_steps, recipe.num_timesteps, recipe.timestep_window)
    count = count_calibration_calls(recipe)
    config, reasons = modelopt_config(quantized, settings, total_step=len(steps))
    fed: list[dict[str, Any]] = []

    if calibration_inputs is not None:

        def calls_source():
            given = calibration_inputs() if callable(calibration_inputs) else calibration_inputs
            return iter(_checked_calls(given, recipe))
    else:

        def calls_source():
            return calibration_calls(bundle, recipe, conditioning, device)

    def forward_loop(model: torch.nn.Module) -> None:
        if fed:
            raise QuantizationError("ModelOpt ran the calibration loop twice; the step calibrator counts calls and needs exactly one pass")
        from qdiff.runtime.backends import DeviceDenoiser

        denoiser = DeviceDenoiser(model, device)
        for call in calls_source():
            batch = call.sample.shape[0]
            t = torch.as_tensor(call.timestep_input, dtype=torch.float32).reshape(-1)
            t = t.expand(batch) if t.numel() == 1 else t
            with torch.no_grad():
                denoiser(call.sample, t, **call.conditioning)
            fed.append({"step": call.step, "timestep": call.timestep, "rows": int(batch)})

    try:
        with exact_float(device), _quiet():  # TF32 off on CUDA: FP32 math, as qdiff's calibration
            mtq.quantize(quantized, config, forward_loop)
            # quantize.py: disable the filtered quantizers after calibration (a no-op here: the
            # config never enabled them, but it is the example's last word on what stays float).
            mtq.disable_quantizer(quantized, lambda name: settings.is_float(name) is not None)
    except (QuantizationError, BackendUnavailableError):
        raise
    except Exception as exc:
        raise QuantizationError(f"ModelOpt's mtq.quantize failed on {bundle.label}: {type(exc).__name__}: {exc}") from exc
    finally:
        source.to("cpu")
    if len(fed) != count:
        raise QuantizationError(f"ModelOpt's calibration loop saw {len(fed)} of the {count} calibration calls")
    return quantized, fed, reasons


def quantize_with_modelopt(
    model,
    onnx_out: str | Path,
    recipe: str | Path | Recipe = "w8a8",
    *,
    settings: ModelOptInt8Settings | dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    fp32_onnx: str | Path | None = None,
    scheduler: str | None = None,
    prompts: list[str] | None = None,
    class_labels: list[int] | None = None,
    embeddings: str | Path | None = None,
    random_conditioning: bool = False,
    calibration_inputs: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    force: bool = False,
    **recipe_overrides: Any,
) -> PeerResult:
    """Quantize the model's UNet with ModelOpt's INT8 diffusion recipe; write a Q/DQ graph.

    `model` is a local diffusers folder (or loaded bundle). The calibration calls are the ones
    `qdiff.calibrate(model, ..., recipe, **recipe_overrides)` observes with the same conditioning
    options; `settings` are ModelOpt's (`ModelOptInt8Settings`, defaults = the example's INT8
    recipe). The graph goes to `onnx_out` (a .onnx path, or a folder for `denoiser.modelopt-int8.onnx`)
    with a `qdq-onnx` manifest, published atomically, and is reused when the manifest says it was
    made from the same model, conditioning and settings. `fp32_onnx` (optional) is qdiff's export
    of the same model: its manifest's `unet_config` is copied, as `qdiff quantize` does.
    `calibration_inputs` (a list, or a function that returns one when it is needed) lets a driver
    that quantizes several variants compute the calls once (`calibration_calls`); they are
    checked against the recipe's steps.
    """
    from qdiff.calib.trajectories import calibration_step_indices
    from qdiff.core.conditioning import conditioning_key, resolve_conditioning
    from qdiff.export.onnx_export import export_unet
    from qdiff.export.onnx_io import load_onnx, publish_onnx, save_onnx
    from qdiff.models import as_bundle, unet_config_of

    # Fail fast, before loading anything.
    recipe = load_recipe(recipe, scheduler=scheduler, **recipe_overrides)
    check_w8a8(recipe)
    settings = ModelOptInt8Settings.coerce(settings)
    dev = resolve_device(device)
    target = Path(onnx_out)
    if target.suffix != ".onnx":
        target = target / ONNX_NAME
    modelopt, mtq = _import_modelopt()
    bundle = as_bundle(model)

    export_manifest = None
    if fp32_onnx is not None:
        export_manifest = read_manifest(fp32_onnx)
        exported_from = export_manifest.model_sha256 if export_manifest else None
        if exported_from and exported_from != bundle.model_sha256:
            raise ArtifactMismatchError(
                f"{Path(fp32_onnx).name} was exported from model {exported_from[:12]}, but {bundle.label} is {bundle.model_sha256[:12]}",
                hint="pass the FP32 graph of the same model folder, or none",
            )
    conditioning = resolve_conditioning(
        bundle, recipe.samples_per_timestep, prompts=prompts, class_labels=class_labels, embeddings=embeddings, random=random_conditioning, seed=recipe.seed
    )
    recipe_json = recipe.to_json()
    wanted = Manifest(
        kind="qdq-onnx",
        inputs={"model_sha256": bundle.model_sha256, "conditioning": conditioning_key(conditioning), "quantizer": "nvidia-modelopt"},
        settings={
            "calibration": {k: recipe_json[k] for k in CALIBRATION_FIELDS},
            "modelopt": settings.to_json(),
            "modelopt_version": modelopt.__version__,
            "device": dev.type,
        },
    )
    cached = CachedStage(target, wanted, log_as="peer", why="same model, conditioning and ModelOpt settings")
    if (have := cached.reusable(force)) is not None:
        return PeerResult(target, "modelopt-int8", settings.to_json(), have.details.get("coverage", {}), have.details.get("calibration", {}), reused=True)

    started = time.perf_counter()
    steps = calibration_step_indices(recipe.calibration_steps, recipe.num_timesteps, recipe.timestep_window)
    log(
        f"peer: ModelOpt {modelopt.__version__} INT8 (quant level {settings.quant_level:g}, {settings.algorithm}"
        + (f" alpha {settings.alpha}" if settings.algorithm == "smoothquant" else "")
        + f", conv inputs {settings.conv_calibrator}"
        + (f"/{settings.collect_method}" if settings.conv_calibrator == "percentile" else "")
        + f") on {bundle.label}, calibrated on {dev.type} with {recipe.samples_per_timestep} trajectories x {len(steps)} timesteps of a "
        f"{recipe.calibration_steps}-step {recipe.scheduler} loop"
    )
    quantized, fed, reasons = modelopt_quantized_unet(bundle, recipe, settings, dev, conditioning=conditioning, calibration_inputs=calibration_inputs)
    amax = _calibration_facts(quantized)
    quantized.to("cpu")
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    with cached.staging() as stage:
        raw = stage / "raw.onnx"
        try:
            with _quiet():
                export_unet(quantized, raw, opset=settings.opset)
        except Exception as exc:
            raise QuantizationError(f"exporting ModelOpt's quantized UNet to ONNX failed: {exc}", hint="check that the FP32 model exports (`qdiff export`)") from exc
        import onnx

        graph = onnx.load(str(raw), load_external_data=True)
        moved = constants_to_initializers(graph)
        graph.producer_name = "qdiff (nvidia-modelopt peer)"
        staged = stage / target.name
        save_onnx(graph, staged)
        del graph
        try:
            load_onnx(staged, load_weights=False)  # the full checker, by path (works above 2 GB)
        except OnnxModelError as exc:
            raise QuantizationError(f"ModelOpt's Q/DQ graph fails the ONNX checker: {exc.message}") from exc
        report = modelopt_coverage(staged, _layer_macs(bundle, conditioning), reasons)
        _check_symmetric(staged)
        publish_onnx(staged, target)

    calibration = {
        "calls": len(fed),
        "rows": sum(f["rows"] for f in fed),
        "step_indices": steps,
        "timesteps": [f["timestep"] for f in fed[: len(steps)]],
        "samples_per_timestep": recipe.samples_per_timestep,
        "conditioning": conditioning.source if conditioning else "none (unconditional model)",
        "device": dev.type,
        "precomputed_calls": calibration_inputs is not None,
    }
    unet_config = export_manifest.unet_config if export_manifest is not None else None
    details = {
        "coverage": report.to_json(),
        "calibration": calibration,
        "weight_bits": 8,
        "activation_bits": 8,
        "unet_config": unet_config if unet_config is not None else unet_config_of(bundle),
        "smoothed_linear_layers": amax["smoothed"],
        "constants_moved_to_initializers": moved,
        "pulp": "stand-in (not installed; see _pulp_stand_in)" if getattr(sys.modules.get("pulp"), "__qdiff_stand_in__", False) else "installed",
        "seconds": round(time.perf_counter() - started, 2),
    }
    cached.record(details)
    log(f"peer: {report.summary().splitlines()[0]} -> {target}")
    return PeerResult(target, "modelopt-int8", settings.to_json(), report, calibration)


def _calibration_facts(model: torch.nn.Module) -> dict[str, Any]:
    """Enabled quantizers must all have a finite amax (else ModelOpt would export garbage)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    smoothed, missing = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, TensorQuantizer) or not module.is_enabled:
            continue
        amax = module.amax
        if amax is None or not torch.isfinite(amax).all():
            missing.append(name)
        if getattr(module, "pre_quant_scale", None) is not None and name.endswith("input_quantizer"):
            smoothed += 1
    if missing:
        raise QuantizationError(
            f"{len(missing)} enabled ModelOpt quantizer(s) have no finite range after calibration: {', '.join(missing[:5])}",
            hint="the calibration calls never reached these layers, or produced NaN/Inf",
        )
    return {"smoothed": smoothed}


def _check_symmetric(path: Path) -> None:
    """TensorRT takes only symmetric INT8 (zero point 0): refuse anything else."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = init.get(node.input[2])
            if zero is None:
                raise QuantizationError(f"{node.name}: its zero point is not a constant")
            if uses_external_data(zero):  # per-channel zero points of wide layers (> 1 KiB) live in <name>.data
                load_external_data_for_tensor(zero, str(path.parent))
            value = numpy_helper.to_array(zero)
            if value.dtype != np.int8 or value.any():
                raise QuantizationError(f"{node.name}: zero point {value.dtype} {value.ravel()[:4]} is not symmetric INT8")


def _layer_macs(bundle, conditioning) -> dict[str, int]:
    from qdiff.calib.collect import example_call, layer_macs

    modules = [n for n, m in bundle.unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d))]
    return layer_macs(bundle.unet, example_call(bundle.unet, (bundle.in_channels, bundle.sample_size, bundle.sample_size), conditioning), modules)


__all__ = [
    "CALIBRATION_FIELDS",
    "FLOAT_MODULES",
    "ModelOptInt8Settings",
    "ONNX_NAME",
    "calibration_calls",
    "modelopt_config",
    "modelopt_coverage",
    "quantize_with_modelopt",
]
