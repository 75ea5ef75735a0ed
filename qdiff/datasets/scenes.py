"""Procedural "scenes": the harder variant of the shapes dataset the evaluation models learn.

Why this exists
---------------
The shipped shapes models learned one flat-coloured shape on a smooth background; a denoiser
that only has to draw that needs few features, and quantization has little to break. The
evaluation models (docs/eval-models.md) are meant to show what Q-Diffusion's findings rest on,
so their data must make the network work: each 32x32 image here holds 2-4 shapes *of the same
class* (the label), of random sizes and colours, each filled with a texture (gradient, stripes,
smooth noise), overlapping one another (later shapes occlude earlier ones) over a textured
background (one background field modulated by a second one) with pixel noise.

The drawing itself is :mod:`qdiff.datasets.shapes`' (outlines, rasterisation at 4x with box
filtering, background fields, contrasting colours); this module only composes scenes from it.

Determinism
-----------
As for shapes: image ``index`` of ``split`` under ``seed`` comes from its own
``SeedSequence([tag, seed, split_id, index])`` stream (a tag of its own, so scene ``i`` is not
shape ``i`` redrawn), independent of batch size, order and worker count; classes cycle with the
index, so every ``NUM_CLASSES`` consecutive indices hold each class once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from qdiff.datasets import shapes
from qdiff.datasets.shapes import BACKGROUND_FIELDS, CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, PIXEL_X, PIXEL_Y, SPLITS, draw_shape, shape_colour  # noqa: F401 - CLASS_NAMES: the registry reads every dataset module's label names

_STREAM_TAG = 0x51_44_53_43  # "QDSC"
MIN_SHAPES, MAX_SHAPES = 2, 4
_RADIUS = (4.5, 10.0)  # pixels; a 32x32 canvas fits four of these that overlap
_PLACEMENT_TRIES = 8  # a new shape is moved until it overlaps one already drawn


class SceneSample(NamedTuple):
    """One scene with each shape's own coverage mask (float32 [k, 32, 32], drawing order)."""

    image: np.ndarray
    class_id: int
    masks: np.ndarray


def _rng_for(index: int, seed: int, split: str) -> np.random.Generator:
    shapes.rng_for(index, seed, split)  # the same argument checks and messages
    return np.random.default_rng(np.random.SeedSequence([_STREAM_TAG, seed, SPLITS[split], index]))


def _field(rng: np.random.Generator) -> np.ndarray:
    """One of the shapes dataset's scalar fields in [0, 1] (gradient, radial, stripes, noise)."""
    return BACKGROUND_FIELDS[int(rng.integers(len(BACKGROUND_FIELDS)))](rng)


def _textured_background(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-colour field modulated in brightness by a second field: (image HWC, c1, c2)."""
    c1, c2 = rng.uniform(0.0, 1.0, size=(2, 3)).astype(np.float32)
    base = c1 + _field(rng)[..., None] * (c2 - c1)
    texture = 1.0 + rng.uniform(0.1, 0.35) * (_field(rng)[..., None] - 0.5)
    return base * texture, c1, c2


def _texture_fill(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """A shape's fill: its colour mixed with a darker/lighter variant along a random field."""
    other = np.clip(colour * rng.uniform(0.45, 0.8) + rng.uniform(-0.1, 0.25), 0.0, 1.0)
    shade_dir = rng.uniform(0.0, 2.0 * math.pi)
    shade = 1.0 + rng.uniform(0.0, 0.25) * (math.cos(shade_dir) * PIXEL_X + math.sin(shade_dir) * PIXEL_Y) / 2.0
    return (colour + _field(rng)[..., None] * (other - colour)) * shade[..., None]


def _place(rng: np.random.Generator, radius: float, placed: list[tuple[float, float, float]]) -> tuple[float, float]:
    """A centre inside the canvas; after the first shape, next to a shape already placed."""
    lo, hi = radius + 0.5, IMAGE_SIZE - radius - 0.5
    if not placed:
        return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    px, py, pr = placed[int(rng.integers(len(placed)))]
    dist = rng.uniform(0.35, 0.85) * (pr + radius)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    return float(np.clip(px + dist * math.cos(angle), lo, hi)), float(np.clip(py + dist * math.sin(angle), lo, hi))


def make_sample(index: int, seed: int = 0, split: str = "train") -> SceneSample:
    """Draw scene ``index`` of ``split`` under ``seed``, with every shape's coverage mask."""
    rng = _rng_for(index, seed, split)
    class_id = index % NUM_CLASSES
    image, c1, c2 = _textured_background(rng)
    count = int(rng.integers(MIN_SHAPES, MAX_SHAPES + 1))
    placed: list[tuple[float, float, float]] = []
    masks: list[np.ndarray] = []
    union = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for _ in range(count):
        radius = float(rng.uniform(*_RADIUS))
        for _try in range(_PLACEMENT_TRIES):
            cx, cy = _place(rng, radius, placed)
            mask = draw_shape(class_id, rng, cx, cy, radius)
            if not placed or float((mask * union).sum()) >= 1.0:  # at least a pixel's worth shared
                break
        placed.append((cx, cy, radius))
        masks.append(mask)
        union = np.maximum(union, mask)
        fill = _texture_fill(rng, shape_colour(rng, c1, c2))
        alpha = mask[..., None]
        image = image * (1.0 - alpha) + fill * alpha  # later shapes occlude earlier ones
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.03), size=image.shape).astype(np.float32)
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return SceneSample(pixels, class_id, np.stack(masks))


def make_image(index: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, int]:
    """Draw scene ``index`` of ``split`` under ``seed``: (uint8 [32, 32, 3], class id)."""
    sample = make_sample(index, seed=seed, split=split)
    return sample.image, sample.class_id


def generate(n: int, seed: int = 0, split: str = "train", start: int = 0, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scenes ``start .. start+n-1`` of a split: (uint8 [n, 32, 32, 3], int64 [n]); the same for
    any worker count (see `qdiff.datasets.shapes.generate`)."""
    return shapes.generate_with(make_image, n, seed=seed, split=split, start=start, workers=workers)
