"""The one place qdiff imports TensorRT, and what the running version can do.

qdiff supports TensorRT 8.6, 10.x and 11.x with one code path. All three have the tensor-name
APIs (`set_input_shape`, `set_tensor_address`, `execute_async_v3`). What differs is decided
here, by version or by probing attributes, never at call sites:

- network typing: 8.6 builds weakly typed networks (precision from builder flags); >= 10 builds
  strongly typed ones (precision from the graph's own types). 11.x has no weak typing at all:
  `BuilderFlag.FP16/INT8`, `ILayer.precision`, `NetworkDefinitionCreationFlag.EXPLICIT_BATCH`
  are gone there, so the weak path must never run on it;
- activation memory: `ICudaEngine.device_memory_size_v2` (>= 10) or `device_memory_size` (8.6,
  removed in 11);
- tactic sources by availability: 11.x has no cuBLAS/cuBLASLt/cuDNN sources.

`VERSION_GUARDED` lists every TensorRT name the code touches only under a version guard, and
`OBJECT_MEMBERS` the members of TensorRT objects (builder, config, engine, ...) the code uses.
tests/test_tensorrt_api_surface.py imports the real 10.x and 11.x bindings and checks every
`trt.*` name used in engines/ and runtime/ (found with `ast`), plus these tables, against them;
a new unguarded name that a version lacks fails that test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from qdiff.core.errors import BackendUnavailableError, EngineBuildError

_TRT: ModuleType | None = None

# Builder tactic sources by the names users type. Machines whose cuBLAS/cuDNN do not match the
# TensorRT build (or are missing) must leave those out; `QDIFF_TRT_TACTIC_SOURCES` sets the
# default for such a machine so every build on it, tests included, does the same.
TACTIC_SOURCE_NAMES = ("cublas", "cublas_lt", "cudnn", "edge_mask_convolutions", "jit_convolutions")
TACTIC_SOURCES_ENV = "QDIFF_TRT_TACTIC_SOURCES"

# The first TensorRT major that builds strongly typed networks by default in qdiff (and the
# first where the weakly typed builder flags are deprecated; 11 removed them).
STRONG_TYPING_MAJOR = 10

# Builder optimization level for INT8/W4A8 builds on TensorRT >= 10 when none is given. Level 4
# follows NVIDIA's diffusion demos; it is NOT measured on TensorRT >= 10 here (nothing >= 10 runs
# on the GPU machine), and builds take longer than at TensorRT's default 3. Override with
# `--opt-level`.
INT8_OPT_LEVEL_STRONG = 4

# Names the code uses only under a guard: "NAME": (first major using it, first major NOT using
# it or None, how the code guards it). The API-surface test skips a name outside its range and
# checks that the guard matches the real bindings (it must exist inside its range).
VERSION_GUARDED: dict[str, tuple[int, int | None, str]] = {
    "BuilderFlag.FP16": (8, STRONG_TYPING_MAJOR, "weakly typed path only (network_typing == 'weak')"),
    "BuilderFlag.INT8": (8, STRONG_TYPING_MAJOR, "weakly typed path only"),
    "BuilderFlag.PREFER_PRECISION_CONSTRAINTS": (8, STRONG_TYPING_MAJOR, "--float-layers, refused on strongly typed builds"),
    "ILayer.precision": (8, STRONG_TYPING_MAJOR, "--float-layers, refused on strongly typed builds"),
    "ILayer.set_output_type": (8, STRONG_TYPING_MAJOR, "--float-layers, refused on strongly typed builds"),
    "NetworkDefinitionCreationFlag.EXPLICIT_BATCH": (8, STRONG_TYPING_MAJOR, "set only on the weakly typed path (implicit in >= 10)"),
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": (STRONG_TYPING_MAJOR, None, "strongly typed path only"),
    "ICudaEngine.device_memory_size": (8, STRONG_TYPING_MAJOR, "device_memory_bytes() prefers device_memory_size_v2"),
    "ICudaEngine.device_memory_size_v2": (STRONG_TYPING_MAJOR, None, "device_memory_bytes(), when present"),
    "IBuilderConfig.progress_monitor": (STRONG_TYPING_MAJOR, None, "Features.progress_monitor"),
    "IProgressMonitor": (STRONG_TYPING_MAJOR, None, "Features.progress_monitor"),
    "TacticSource.CUBLAS": (8, None, "tactic_source_mask(): only sources the version has"),
    "TacticSource.CUBLAS_LT": (8, None, "tactic_source_mask(): only sources the version has"),
    "TacticSource.CUDNN": (8, None, "tactic_source_mask(): only sources the version has"),
    "DataType.BF16": (9, None, "torch_dtype(), when present"),
    "DataType.INT64": (10, None, "torch_dtype(), when present"),
    "DataType.INT4": (10, None, "Features.int4"),
    "DataType.FP8": (9, None, "Features.fp8"),
}
# Of those, the ones probed by availability (getattr with a default) rather than by version: they
# may be missing inside their range without breaking anything.
BY_AVAILABILITY = frozenset({"TacticSource.CUBLAS", "TacticSource.CUBLAS_LT", "TacticSource.CUDNN", "DataType.BF16", "DataType.INT64", "DataType.INT4", "DataType.FP8", "IBuilderConfig.progress_monitor", "IProgressMonitor"})

# Members of TensorRT objects that engines/ and runtime/ call (they are reached through objects,
# so `ast` cannot see them as `trt.X.Y`): class -> members. Version-guarded members are in
# VERSION_GUARDED instead.
OBJECT_MEMBERS: dict[str, tuple[str, ...]] = {
    "Builder": ("create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network"),
    "IBuilderConfig": ("set_memory_pool_limit", "builder_optimization_level", "set_flag", "set_tactic_sources", "profiling_verbosity", "add_optimization_profile", "create_timing_cache", "set_timing_cache"),
    "INetworkDefinition": ("num_inputs", "get_input", "num_outputs", "get_output", "num_layers", "get_layer"),
    "ILayer": ("type", "num_inputs", "get_input", "num_outputs", "get_output"),
    "ITensor": ("name", "shape", "dtype", "is_shape_tensor"),
    "OnnxParser": ("parse_from_file", "num_errors", "get_error"),
    "ParserError": ("desc", "node", "node_name"),
    "IOptimizationProfile": ("set_shape",),
    "ITimingCache": ("combine", "serialize"),
    "Runtime": ("deserialize_cuda_engine",),
    "ICudaEngine": ("create_execution_context", "create_engine_inspector", "num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype"),
    "IExecutionContext": ("set_input_shape", "set_tensor_address", "get_tensor_shape", "execute_async_v3", "profiler"),
    "EngineInspector": ("execution_context", "get_engine_information"),
}


def import_tensorrt() -> ModuleType:
    """`import tensorrt`, or a `BackendUnavailableError` that says how to get it."""
    global _TRT
    if _TRT is not None:
        return _TRT
    try:
        import tensorrt as trt  # noqa: PLC0415  (lazy on purpose: CPU machines have no TensorRT)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not importable here ({exc})",
            hint="install it on a machine with an NVIDIA GPU (pip install 'qdiff[gpu]'), or use the onnxruntime backend",
        ) from exc
    except OSError as exc:  # a shared library it needs is missing or the wrong version
        raise BackendUnavailableError(
            f"TensorRT is installed but its libraries do not load: {exc}",
            hint="check LD_LIBRARY_PATH and that the CUDA major version matches the TensorRT build",
        ) from exc
    _TRT = trt
    return trt


def version_tuple(version: str) -> tuple[int, ...]:
    """'8.6.0' -> (8, 6, 0); ignores suffixes such as '.post1' or 'b38'."""
    parts: list[int] = []
    for piece in version.split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@dataclass(frozen=True)
class Features:
    """What the running TensorRT offers beyond the 8.6 baseline qdiff needs."""

    version: str
    strongly_typed: bool
    int4: bool
    fp8: bool
    progress_monitor: bool
    optimization_level: bool
    weak_typing: bool = True  # BuilderFlag.FP16 exists (gone in 11.x)

    @property
    def major(self) -> int:
        return version_tuple(self.version)[0]

    @property
    def typing(self) -> str:
        """'strong' on TensorRT >= 10 (the graph's types decide), 'weak' on 8.6 (builder flags)."""
        return "strong" if self.strongly_typed and (self.major >= STRONG_TYPING_MAJOR or not self.weak_typing) else "weak"

    def require(self, feature: str, why: str) -> None:
        """Fail plainly when `feature` is missing, e.g. INT4 weight-only on TensorRT 8.6."""
        if not getattr(self, feature):
            raise EngineBuildError(
                f"TensorRT {self.version} cannot {why}: it lacks {feature.replace('_', ' ')}",
                hint="build with TensorRT 10 or newer, or choose a precision this version supports (fp16, int8, w4a8)",
            )


def features(trt: Any | None = None) -> Features:
    trt = trt or import_tensorrt()
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    dtypes = getattr(trt, "DataType", None)
    return Features(
        version=str(getattr(trt, "__version__", "0")),
        strongly_typed=flags is not None and hasattr(flags, "STRONGLY_TYPED"),
        int4=dtypes is not None and hasattr(dtypes, "INT4"),
        fp8=dtypes is not None and hasattr(dtypes, "FP8"),
        progress_monitor=hasattr(trt, "IProgressMonitor"),
        optimization_level=hasattr(getattr(trt, "IBuilderConfig", object), "builder_optimization_level"),
        weak_typing=hasattr(getattr(trt, "BuilderFlag", object), "FP16"),
    )


def network_typing(trt: Any | None = None) -> str:
    """'strong' or 'weak': how this TensorRT builds qdiff's networks (see the module docstring)."""
    return features(trt).typing


def network_flags(trt: Any, typing: str) -> int:
    """`create_network` flags: STRONGLY_TYPED on the strong path; EXPLICIT_BATCH on the weak one
    (8.6 needs it; it is deprecated in 10 and gone in 11, where every network is explicit-batch)."""
    flags = 0
    if typing == "strong":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return flags


def device_memory_bytes(engine: Any) -> int:
    """Activation (scratch) memory of an engine: `device_memory_size_v2` on >= 10 (the old
    property is deprecated there and removed in 11), `device_memory_size` on 8.6."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def available_tactic_sources(trt: Any) -> tuple[str, ...]:
    """The names in TACTIC_SOURCE_NAMES this TensorRT has (11.x: no cuBLAS/cuBLASLt/cuDNN)."""
    source = getattr(trt, "TacticSource", None)
    return tuple(n for n in TACTIC_SOURCE_NAMES if source is not None and hasattr(source, n.upper()))


def parse_tactic_sources(spec: str | None) -> tuple[str, ...] | None:
    """'edge_mask_convolutions,jit_convolutions' -> names; None or 'default' -> TensorRT's own."""
    if spec is None:
        spec = os.environ.get(TACTIC_SOURCES_ENV)
    if spec is None or spec.strip().lower() in ("", "default"):
        return None
    names = tuple(s.strip().lower() for s in spec.split(",") if s.strip())
    unknown = [n for n in names if n not in TACTIC_SOURCE_NAMES]
    if unknown:
        raise EngineBuildError(f"unknown tactic source(s) {', '.join(unknown)}", hint=f"choose from {', '.join(TACTIC_SOURCE_NAMES)}")
    return names


def tactic_source_mask(trt: Any, names: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
    """The builder's tactic-source bit mask from the sources in `names` this TensorRT has, and the
    names it dropped because this version has no such source (cuBLAS/cuDNN on 11.x). Fails only
    when nothing asked for is available."""
    present = available_tactic_sources(trt)
    used = tuple(n for n in names if n in present)
    dropped = tuple(n for n in names if n not in present)
    if names and not used:
        raise EngineBuildError(
            f"TensorRT {getattr(trt, '__version__', '?')} has none of the tactic sources {', '.join(names)}",
            hint=f"choose from {', '.join(present) or 'the default (leave --tactic-sources out)'}",
        )
    mask = 0
    for name in used:
        mask |= 1 << int(getattr(trt.TacticSource, name.upper()))
    return mask, dropped


def make_logger(trt: Any, verbose: bool = False) -> Any:
    """A TensorRT logger that keeps errors (for the exception) and forwards warnings to stderr
    only when asked, since TensorRT 8.6 warns about every INT64 weight it casts down."""
    from qdiff.core.progress import log

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: Any, msg: str) -> None:  # noqa: D401  (TensorRT's callback)
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
                log(f"tensorrt: error: {msg}")
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(msg)
                if verbose:
                    log(f"tensorrt: warning: {msg}")
            elif verbose:
                log(f"tensorrt: {msg}")

    return _Logger()


# TensorRT dtype <-> torch dtype, for binding torch tensors to engine I/O.
def torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32, trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if hasattr(trt.DataType, "INT64"):
        table[trt.DataType.INT64] = torch.int64
    if dtype not in table:
        raise BackendUnavailableError(f"engine tensor dtype {dtype} has no torch equivalent qdiff binds")
    return table[dtype]
