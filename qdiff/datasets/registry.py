"""Which procedural dataset a model was trained on, and what scoring its samples needs.

shape-FD and class accuracy are only meaningful against the dataset a model learned: the
shipped shapes models (`qdiff.datasets.shapes`) and the evaluation models (the harder
`qdiff.datasets.scenes`) each have their own classifier and their own real images. A model
folder says which in `dataset.json` (`{"dataset": "scenes", ...}`); folders without one (the
shipped shapes models, and every folder made before the file existed) are "shapes".

    spec = dataset_for("qdiff/models/shapes-ddpm")      # or a loaded ModelBundle
    clf = spec.classifier()                             # the shipped classifier, eval mode
    real = spec.real_features("test", 1000, seed=0)     # cached, [1000, FEATURE_DIM]
    images, labels = spec.generate(64, seed=0, split="train")
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qdiff.core.errors import EvaluationError

DATASET_FILE = "dataset.json"
DEFAULT_DATASET = "shapes"
_MODELS = Path(__file__).resolve().parents[1] / "models"


@dataclass(frozen=True)
class DatasetSpec:
    """One procedural dataset: its generator, its classifier folder and its cached real features."""

    name: str
    module: str  # the generator's module; imported on first use
    classifier_dir: Path

    @property
    def generator(self) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
        import importlib

        return importlib.import_module(self.module).generate

    @property
    def class_names(self) -> tuple[str, ...]:
        """The labels' names, from the generator's module (class accuracy maps model classes to them)."""
        import importlib

        return tuple(importlib.import_module(self.module).CLASS_NAMES)

    def generate(self, n: int, seed: int = 0, split: str = "train", start: int = 0, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Images ``start .. start+n-1`` of a split: (uint8 [n, 32, 32, 3], int64 [n])."""
        return self.generator(n, seed=seed, split=split, start=start, workers=workers)

    def classifier(self):
        """This dataset's shipped classifier (eval mode); an EvaluationError says how to train it."""
        from qdiff.datasets.shape_fd import load_classifier

        return load_classifier(self.classifier_dir, dataset=self.name)

    def classifier_info(self) -> dict[str, Any]:
        from qdiff.datasets.shape_fd import classifier_info

        return classifier_info(self.classifier_dir)

    def real_features(self, split: str, count: int, seed: int = 0) -> np.ndarray:
        """Classifier features of real images ``0 .. count-1`` of ``split`` (cached per process)."""
        return _real_features(self.name, split, count, seed)


DATASETS: dict[str, DatasetSpec] = {
    "shapes": DatasetSpec("shapes", "qdiff.datasets.shapes", _MODELS / "shape-classifier"),
    "scenes": DatasetSpec("scenes", "qdiff.datasets.scenes", _MODELS / "scene-classifier"),
}


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered under ``name``; an unknown name is an EvaluationError listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise EvaluationError(f"unknown dataset {name!r}", hint=f"known datasets: {', '.join(sorted(DATASETS))}") from None


def dataset_file(model_dir: str | os.PathLike[str]) -> Path | None:
    """The `dataset.json` that describes a model folder (a pipeline folder, or the unet/ inside one)."""
    folder = Path(model_dir)
    for candidate in (folder / DATASET_FILE, folder.parent / DATASET_FILE if folder.name == "unet" else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def dataset_for(model: Any) -> DatasetSpec:
    """The dataset of a model folder or a loaded `qdiff.models.ModelBundle` (absent file: shapes)."""
    folder = getattr(model, "path", model)
    path = dataset_file(folder)
    if path is None:
        return DATASETS[DEFAULT_DATASET]
    try:
        name = json.loads(path.read_text(encoding="utf-8"))["dataset"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise EvaluationError(f"{path} must be a JSON object with a 'dataset' name ({type(exc).__name__}: {exc})") from exc
    return get_dataset(name)


def write_dataset_file(model_dir: str | os.PathLike[str], name: str, **details: Any) -> Path:
    """Declare a model folder's dataset (``details``: seed, image counts... kept for the record)."""
    from qdiff.core.artifacts import write_json_atomic

    get_dataset(name)
    path = Path(model_dir) / DATASET_FILE
    write_json_atomic(path, {"dataset": name, **details})
    return path


@functools.lru_cache(maxsize=8)
def _real_features(name: str, split: str, count: int, seed: int) -> np.ndarray:
    from qdiff.datasets import shape_classifier as sc

    spec = get_dataset(name)
    images, _ = spec.generate(count, seed=seed, split=split)
    return sc.features(spec.classifier(), images)
