"""One error hierarchy for everything qdiff raises on purpose.

Every error carries a message that names the thing that is wrong (file, node, tensor, shape)
and a `hint` that says what to do next. The CLI prints both on two lines and exits non-zero;
`--verbose` adds the traceback. Anything that is not a `QdiffError` is a bug in qdiff.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class QdiffError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ModelLoadError(QdiffError):
    """A model folder is missing, incomplete, or holds something qdiff cannot load."""


class ConditioningError(QdiffError):
    """A conditional model was asked to run without saying where its conditioning comes from."""


class ExportError(QdiffError):
    """Exporting to ONNX failed, or the exported graph does not match PyTorch."""


class OnnxModelError(QdiffError):
    """An ONNX file is unreadable, invalid, or not what the stage expects."""


class RecipeError(QdiffError):
    """A quantization recipe has an unknown or inconsistent setting."""


class CalibrationError(QdiffError):
    """Calibration failed, or a calibration table is invalid or made for another model."""


class QuantizationError(QdiffError):
    """Q/DQ insertion could not give every layer the recipe quantizes its scales."""


class ArtifactMismatchError(QdiffError):
    """An artifact's manifest does not match what was asked for."""


class BackendUnavailableError(QdiffError):
    """A backend needs something this machine does not have (a GPU, TensorRT, ...)."""


class SamplingError(QdiffError):
    """Sampling produced non-finite values or was configured inconsistently."""


class EngineBuildError(QdiffError):
    """TensorRT could not parse the graph or build an engine from it."""


class EngineMismatchError(ArtifactMismatchError):
    """An engine was built for another TensorRT, GPU or graph, or its bytes changed since."""


class ProfileShapeError(QdiffError):
    """An input shape lies outside the engine's optimization profile, or a profile is malformed."""


class EvaluationError(QdiffError):
    """A quality evaluation cannot run: its graphs are missing, ambiguous or made for another model."""


def strict_fields(cls: type, obj: Any, *, error: type[QdiffError], what: str, tuples: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword arguments of dataclass `cls` from a JSON object, checked strictly.

    Anything but a dict, and any key that is not a field of `cls`, raises `error` naming `what`
    ("recipe", "ModelOpt", ...) and the known fields; the fields in `tuples` become tuples (JSON
    has only lists). Type checks stay with `cls` itself (its constructor and __post_init__).
    """
    if not isinstance(obj, dict):
        raise error(f"{what} settings must be a JSON object, got {type(obj).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise error(f"unknown {what} setting(s): {', '.join(unknown)}", hint=f"known: {', '.join(sorted(known))}")
    kwargs = dict(obj)
    for key in tuples:
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return kwargs
