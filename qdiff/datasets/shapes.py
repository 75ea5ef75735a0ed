"""Deterministic procedural "shapes" dataset: 32x32 RGB images of labelled shapes.

Why this exists
---------------
qdiff measures what post-training quantization does to diffusion denoisers,
and that is only meaningful on a *trained* model: an untrained UNet has no
learned activation statistics to clip and its samples are noise before and
after quantization.  The machines the project trains on have no network, so
no dataset can be downloaded; instead this module draws one from a seed.

Each image shows one geometric shape (the class: circle, square, triangle,
star, cross, ring, crescent, heart) with random colour, size, position and
rotation over a random background (linear or radial gradient, stripes or
smooth colour noise) plus a little pixel noise.  Shapes are drawn with PIL at
4x resolution and box-filtered down, so edges are antialiased.  Because the
images carry a class, a small classifier
(:mod:`qdiff.datasets.shape_classifier`) can check conditional samples
("does the 'star' prompt draw stars?") and compare sample distributions
(a Frechet distance on classifier features), which gives quantization
experiments numbers rather than eyeballed grids.

Determinism
-----------
Image ``index`` of split ``split`` under ``seed`` is drawn from its own
``numpy.random.SeedSequence([tag, seed, split_id, index])`` stream, so it does
not depend on batch size, order or worker count, and the train and test
splits come from disjoint streams.  Bytes are reproducible for a given
numpy/Pillow version.  Classes cycle with the index (``index % NUM_CLASSES``),
so any ``NUM_CLASSES`` consecutive indices hold every class exactly once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4
CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "crescent",
    "heart",
)
NUM_CLASSES = len(CLASS_NAMES)
SPLITS: dict[str, int] = {"train": 0, "test": 1}

_STREAM_TAG = 0x51_44_53_48  # "QDSH": keeps these streams apart from other uses of a seed
_CANVAS = IMAGE_SIZE * SUPERSAMPLE
# Pixel-centre coordinates in [-1, 1], shared by every background generator.
_AXIS = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / IMAGE_SIZE * 2.0 - 1.0
_YY, _XX = np.meshgrid(_AXIS, _AXIS, indexing="ij")
_MIN_CONTRAST = 0.4  # RGB distance (unit cube) between shape colour and background
_PARALLEL_THRESHOLD = 4096  # below this many images, generate() stays in-process

Point = tuple[float, float]


# --------------------------------------------------------------------------- #
# Shape outlines (unit size, centred at the origin) and rasterisation
# --------------------------------------------------------------------------- #
def _regular_polygon(n: int, radius: float, angle: float, inner: float | None = None) -> list[Point]:
    """Vertices of a regular n-gon, or an n-pointed star when ``inner`` is set."""
    points: list[Point] = []
    steps = 2 * n if inner is not None else n
    for k in range(steps):
        r = radius if inner is None or k % 2 == 0 else radius * inner
        a = angle + 2.0 * math.pi * k / steps
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


def _rotate(points: list[Point], angle: float) -> list[Point]:
    c, s = math.cos(angle), math.sin(angle)
    return [(c * x - s * y, s * x + c * y) for x, y in points]


def _unit_heart(n: int = 48) -> list[Point]:
    """The classic parametric heart, centred on its bounding box, max radius 1."""
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    x -= (x.max() + x.min()) / 2.0
    y -= (y.max() + y.min()) / 2.0
    scale = float(np.sqrt(x**2 + y**2).max())
    return [(float(a), float(b)) for a, b in zip(x / scale, y / scale)]


_HEART = _unit_heart()


def _cross(half_width: float) -> list[Point]:
    """A plus sign of arm length 1 and arm half-width ``half_width``."""
    w = half_width
    return [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
            (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]  # fmt: skip


def _draw_shape(class_id: int, rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    """Rasterise one shape at 4x and box-filter it to a float coverage mask in [0, 1]."""
    mask = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    s = SUPERSAMPLE
    angle = float(rng.uniform(0.0, 2.0 * math.pi))

    def polygon(points: list[Point], radius: float, fill: int = 255) -> None:
        draw.polygon([((cx + radius * x) * s, (cy + radius * y) * s) for x, y in points], fill=fill)

    def disc(x: float, y: float, radius: float, fill: int) -> None:
        draw.ellipse([(x - radius) * s, (y - radius) * s, (x + radius) * s, (y + radius) * s], fill=fill)

    name = CLASS_NAMES[class_id]
    if name == "circle":
        disc(cx, cy, r, 255)
    elif name == "square":
        polygon(_regular_polygon(4, 1.0, angle), r)
    elif name == "triangle":
        polygon(_regular_polygon(3, 1.0, angle), r)
    elif name == "star":
        polygon(_regular_polygon(5, 1.0, angle, inner=float(rng.uniform(0.38, 0.5))), r)
    elif name == "cross":
        polygon(_rotate(_cross(float(rng.uniform(0.28, 0.4))), angle), r)
    elif name == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, r * float(rng.uniform(0.45, 0.62)), 0)
    elif name == "crescent":
        disc(cx, cy, r, 255)
        offset = r * float(rng.uniform(0.4, 0.55))
        disc(cx + offset * math.cos(angle), cy + offset * math.sin(angle), r * 0.85, 0)
    elif name == "heart":
        polygon(_rotate(_HEART, angle), r)
    else:  # pragma: no cover - CLASS_NAMES and this switch are edited together
        raise AssertionError(name)
    small = mask.reduce(SUPERSAMPLE)  # box filter == exact area coverage
    return np.asarray(small, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------- #
# Backgrounds: a scalar field t in [0, 1] mapped onto a segment between two colours
# --------------------------------------------------------------------------- #
def _linear_field(rng: np.random.Generator) -> np.ndarray:
    phi = rng.uniform(0.0, 2.0 * math.pi)
    u = math.cos(phi) * _XX + math.sin(phi) * _YY
    return (u - u.min()) / (u.max() - u.min())


def _radial_field(rng: np.random.Generator) -> np.ndarray:
    cx, cy = rng.uniform(-1.0, 1.0, size=2)
    reach = rng.uniform(1.0, 2.5)
    return np.clip(np.hypot(_XX - cx, _YY - cy) / reach, 0.0, 1.0)


def _stripe_field(rng: np.random.Generator) -> np.ndarray:
    phi = rng.uniform(0.0, math.pi)
    period_px = rng.uniform(4.0, 12.0)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    sharpness = rng.uniform(1.0, 4.0)
    u_px = (math.cos(phi) * _XX + math.sin(phi) * _YY) * (IMAGE_SIZE / 2.0)
    wave = np.sin(2.0 * math.pi * u_px / period_px + phase)
    return np.clip(0.5 + 0.5 * sharpness * wave, 0.0, 1.0)


def _noise_field(rng: np.random.Generator) -> np.ndarray:
    cells = int(rng.integers(3, 7))
    coarse = rng.uniform(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    fine = Image.fromarray(coarse, mode="F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(fine), 0.0, 1.0)


_BACKGROUNDS: tuple[Callable[[np.random.Generator], np.ndarray], ...] = (
    _linear_field,
    _radial_field,
    _stripe_field,
    _noise_field,
)


# --------------------------------------------------------------------------- #
# Colours
# --------------------------------------------------------------------------- #
def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32)


def _distance_to_segment(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    denom = float(ab @ ab)
    t = 0.0 if denom < 1e-12 else float(np.clip((p - a) @ ab / denom, 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _shape_colour(rng: np.random.Generator, c1: np.ndarray, c2: np.ndarray, tries: int = 24) -> np.ndarray:
    """A saturated colour that stands out from every background colour (the c1-c2 segment)."""
    best, best_d = None, -1.0
    for _ in range(tries):
        cand = _hsv_to_rgb(rng.uniform(), rng.uniform(0.4, 1.0), rng.uniform(0.35, 1.0))
        d = _distance_to_segment(cand, c1, c2)
        if d >= _MIN_CONTRAST:
            return cand
        if d > best_d:
            best, best_d = cand, d
    assert best is not None
    return best


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def _rng_for(index: int, seed: int, split: str) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be non-negative")
    return np.random.default_rng(np.random.SeedSequence([_STREAM_TAG, seed, SPLITS[split], index]))


def class_of(index: int) -> int:
    """The class of image ``index`` (classes cycle so every split is balanced)."""
    return index % NUM_CLASSES


class ShapeSample(NamedTuple):
    """One dataset item with its shape's coverage mask (float32 [32, 32] in [0, 1])."""

    image: np.ndarray
    class_id: int
    mask: np.ndarray


def make_sample(index: int, seed: int = 0, split: str = "train") -> ShapeSample:
    """Draw image ``index`` of ``split`` under ``seed``, with the shape's coverage mask."""
    rng = _rng_for(index, seed, split)
    class_id = class_of(index)

    c1, c2 = rng.uniform(0.0, 1.0, size=(2, 3)).astype(np.float32)
    field = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))](rng)
    background = c1 + field[..., None] * (c2 - c1)

    fg = _shape_colour(rng, c1, c2)
    shade_dir = rng.uniform(0.0, 2.0 * math.pi)
    shade = 1.0 + rng.uniform(0.0, 0.3) * (math.cos(shade_dir) * _XX + math.sin(shade_dir) * _YY) / 2.0
    foreground = fg * shade[..., None]

    radius = float(rng.uniform(6.0, 12.5))
    lo, hi = radius + 0.5, IMAGE_SIZE - radius - 0.5
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    mask = _draw_shape(class_id, rng, cx, cy, radius)
    alpha = mask[..., None]

    image = background * (1.0 - alpha) + foreground * alpha
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.03), size=image.shape).astype(np.float32)
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return ShapeSample(pixels, class_id, mask)


def make_image(index: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, int]:
    """Draw image ``index`` of ``split`` under ``seed``: (uint8 [32, 32, 3], class id)."""
    sample = make_sample(index, seed=seed, split=split)
    return sample.image, sample.class_id


ImageFn = Callable[..., tuple[np.ndarray, int]]  # (index, seed=, split=) -> (uint8 HWC, class id)


def _generate_range(make: ImageFn, start: int, stop: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((stop - start, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty(stop - start, dtype=np.int64)
    for row, index in enumerate(range(start, stop)):
        images[row], labels[row] = make(index, seed=seed, split=split)
    return images, labels


def generate(
    n: int,
    seed: int = 0,
    split: str = "train",
    start: int = 0,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start .. start+n-1`` of a split: (uint8 [n, 32, 32, 3], int64 [n]).

    ``workers`` > 1 spreads the work over processes (default: all CPUs, up to
    16, once ``n`` is large enough to pay for them); the result is identical
    whatever the worker count.
    """
    return generate_with(make_image, n, seed=seed, split=split, start=start, workers=workers)


def generate_with(
    make: ImageFn,
    n: int,
    seed: int = 0,
    split: str = "train",
    start: int = 0,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`generate` for any per-index image function ``make`` (a module-level function, so worker
    processes can find it): other procedural datasets (`qdiff.datasets.scenes`) share the
    batching and process pool instead of repeating them."""
    if n < 0:
        raise ValueError("n must be non-negative")
    _rng_for(start, seed, split)  # validate arguments before spawning anything
    if workers is None:
        workers = min(os.cpu_count() or 1, 16) if n >= _PARALLEL_THRESHOLD else 1
    if workers <= 1 or n < 2 * workers:
        return _generate_range(make, start, start + n, seed, split)

    chunk = math.ceil(n / (workers * 4))
    bounds = [(s, min(s + chunk, start + n)) for s in range(start, start + n, chunk)]
    import multiprocessing

    # forkserver/spawn would re-import the caller's __main__ (torch and all);
    # the work here is pure numpy/PIL, so a plain fork is both safe and fast.
    ctx = multiprocessing.get_context("fork") if os.name == "posix" else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        parts = list(pool.map(_generate_range, *zip(*[(make, a, b, seed, split) for a, b in bounds])))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --------------------------------------------------------------------------- #
# Drawing pieces that other procedural datasets compose (qdiff.datasets.scenes)
# --------------------------------------------------------------------------- #
draw_shape = _draw_shape  # (class_id, rng, cx, cy, radius) -> coverage mask [32, 32]
shape_colour = _shape_colour  # (rng, c1, c2) -> a colour that stands out from the c1-c2 background
rng_for = _rng_for  # (index, seed, split) -> this dataset's stream; checks the arguments
BACKGROUND_FIELDS = _BACKGROUNDS  # rng -> scalar field [32, 32] in [0, 1]
PIXEL_X, PIXEL_Y = _XX, _YY  # pixel-centre coordinates in [-1, 1]
