"""shape-FD of generated samples, for models trained on one of qdiff's procedural datasets.

FID needs an Inception network nobody here can download, and it knows nothing of the shapes
dataset. shape-FD is the same measure on the features of the small shapes classifier
(`qdiff.datasets.shape_classifier`), whose trained weights ship in the package. It is only
meaningful for models trained on that dataset, so `shipped_shapes_model` says whether a model
is one of the shipped ones (by the hash of its UNet, not by its folder name). Models trained on
another procedural dataset (the evaluation models' "scenes") declare it in their folder, and
every function here takes that dataset's name (`qdiff.datasets.registry`; default "shapes").

Like FID it is biased upward at small sample counts, so every value comes with the real-vs-real
distance at the same count (real train images vs the same real test images): a generated set
is as close to the data as it can get at that count when it reaches that reference.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdiff.core.artifacts import atomic_path, write_json_atomic
from qdiff.datasets import shape_classifier as sc
from qdiff.core.errors import EvaluationError

CLASSIFIER_DIR = Path(__file__).resolve().parents[1] / "models" / "shape-classifier"
WEIGHTS_NAME = "classifier.safetensors"
META_NAME = "classifier.json"
SHAPES_MODELS = ("shapes-ddpm", "shapes-cond")
# Real images shape-FD compares against: test split, indices 0..n-1 (the classifier trained on
# the train split only, and measured its accuracy on test indices from 100000). The floor
# (`real_reference`) uses train images 0..n-1, as docs/default-models.md did.
DEFAULT_REAL_IMAGES = 1000


def save_classifier(model: torch.nn.Module, folder: Path, meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_NAME
    with atomic_path(weights, suffix=".safetensors") as tmp:
        # float16 halves the shipped file; loading casts back to the float32 parameters.
        state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp))
    write_json_atomic(folder / META_NAME, meta)
    return weights


@functools.lru_cache(maxsize=4)
def load_classifier(folder: Path = CLASSIFIER_DIR, dataset: str = "shapes"):
    """A shipped classifier, in eval mode; an EvaluationError says how to make it if missing."""
    from safetensors.torch import load_file

    weights = Path(folder) / WEIGHTS_NAME
    retrain = f"run `python tools/train_shape_classifier.py --dataset {dataset}`"
    if not weights.is_file():
        raise EvaluationError(f"the {dataset} classifier for shape-FD is missing ({weights})", hint=f"{retrain}, or evaluate without shape-FD")
    model = sc.ShapeClassifier()
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # damaged file or another architecture: both need a retrain
        raise EvaluationError(f"{weights} does not hold the {dataset} classifier ({type(exc).__name__}: {exc})", hint=retrain) from exc
    return model.eval().requires_grad_(False)


def _real_features(split: str, count: int, seed: int = 0, dataset: str = "shapes") -> np.ndarray:
    from qdiff.datasets.registry import get_dataset

    return get_dataset(dataset).real_features(split, count, seed)


def shape_fd(images: list[np.ndarray] | np.ndarray, real_images: int = DEFAULT_REAL_IMAGES, dataset: str = "shapes") -> float:
    """Frechet distance between classifier features of `images` (uint8 HWC, 32x32) and real test images."""
    from qdiff.datasets.registry import get_dataset

    batch = np.stack(list(images))
    if batch.shape[1:] != (32, 32, 3):
        raise EvaluationError(f"shape-FD needs 32x32 RGB images, got {batch.shape[1:]}")
    spec = get_dataset(dataset)
    return sc.frechet_distance(sc.features(spec.classifier(), batch), spec.real_features("test", real_images))


def real_reference(count: int, real_images: int = DEFAULT_REAL_IMAGES, dataset: str = "shapes") -> float:
    """shape-FD of `count` real train images: the floor a generated set of that size can reach."""
    return sc.frechet_distance(_real_features("train", count, dataset=dataset), _real_features("test", real_images, dataset=dataset))


@functools.lru_cache(maxsize=1)
def _shipped_hashes() -> dict[str, str]:
    from qdiff.models import PACKAGE_MODELS, unet_sha256

    hashes = {}
    for name in SHAPES_MODELS:
        unet_dir = PACKAGE_MODELS / name / "unet"
        if (unet_dir / "config.json").is_file():
            hashes[unet_sha256(unet_dir)] = name
    return hashes


def shipped_shapes_model(model_sha256: str) -> str | None:
    """The shipped shapes model with this UNet hash, or None (shape-FD means nothing for it)."""
    return _shipped_hashes().get(model_sha256)


def classifier_info(folder: Path = CLASSIFIER_DIR) -> dict[str, Any]:
    meta = Path(folder) / META_NAME
    return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
