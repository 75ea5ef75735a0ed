"""The one place qdiff imports TensorRT, and what the running version can do.

qdiff supports TensorRT 8.6 and 10.x with one code path: both have the tensor-name APIs
(`set_input_shape`, `set_tensor_address`, `execute_async_v3`). Features only 10.x has are
probed here by attribute, never by parsing version strings at call sites, so a build that asks
for one on 8.6 fails with one sentence that names the feature and the version needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from qdiff.errors import BackendUnavailableError, EngineBuildError

_TRT: ModuleType | None = None

# Builder tactic sources by the names users type. Machines whose cuBLAS/cuDNN do not match the
# TensorRT build (or are missing) must leave those out; `QDIFF_TRT_TACTIC_SOURCES` sets the
# default for such a machine so every build on it, tests included, does the same.
TACTIC_SOURCE_NAMES = ("cublas", "cublas_lt", "cudnn", "edge_mask_convolutions", "jit_convolutions")
TACTIC_SOURCES_ENV = "QDIFF_TRT_TACTIC_SOURCES"


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

    @property
    def major(self) -> int:
        return version_tuple(self.version)[0]

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
    )


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


def tactic_source_mask(trt: Any, names: tuple[str, ...]) -> int:
    mask = 0
    for name in names:
        member = getattr(trt.TacticSource, name.upper(), None)
        if member is None:
            raise EngineBuildError(f"TensorRT {trt.__version__} has no tactic source {name!r}")
        mask |= 1 << int(member)
    return mask


def make_logger(trt: Any, verbose: bool = False) -> Any:
    """A TensorRT logger that keeps errors (for the exception) and forwards warnings to stderr
    only when asked, since TensorRT 8.6 warns about every INT64 weight it casts down."""
    from qdiff.progress import log

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
