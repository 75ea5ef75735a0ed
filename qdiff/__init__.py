"""qdiff: post-training quantization of diffusion denoisers, deployed through ONNX and TensorRT.

The public API lives in `qdiff.api` and is re-exported here lazily, so `import qdiff` stays
cheap and works on machines without a GPU or TensorRT.
"""

from __future__ import annotations

from typing import Any

from qdiff.core._version import __version__

_API = {
    "export_model",
    "calibrate",
    "quantize_onnx",
    "sample",
    "run",
    "load_model",
    "Recipe",
    "CalibrationTable",
}

__all__ = sorted(_API | {"__version__"})


def __getattr__(name: str) -> Any:
    if name in {"Recipe"}:
        from qdiff.calib.recipe import Recipe

        return Recipe
    if name == "CalibrationTable":
        from qdiff.calib.table import CalibrationTable

        return CalibrationTable
    if name == "load_model":
        from qdiff.models import load_model

        return load_model
    if name in _API:
        from qdiff import api

        return getattr(api, name)
    raise AttributeError(f"module 'qdiff' has no attribute {name!r}")
