"""Tests for the procedural shapes dataset and the shape-FD metric.

The default models and every quantization metric built on them assume the
dataset is bit-for-bit reproducible from (seed, split, index), balanced over
classes, and non-trivial; and that the Frechet distance behaves like one.
"""

from __future__ import annotations

import numpy as np
import pytest

from qdiff.datasets import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, generate, make_image
from qdiff.datasets.shapes import _draw_shape, class_of, make_sample


@pytest.fixture(scope="module")
def train_batch() -> tuple[np.ndarray, np.ndarray]:
    return generate(4 * NUM_CLASSES, seed=3, split="train", workers=1)


def test_class_names() -> None:
    assert 6 <= NUM_CLASSES <= 10
    assert len(set(CLASS_NAMES)) == NUM_CLASSES
    assert all(isinstance(name, str) and name for name in CLASS_NAMES)


def test_make_image_is_deterministic() -> None:
    a, ya = make_image(17, seed=5, split="train")
    b, yb = make_image(17, seed=5, split="train")
    assert ya == yb
    assert a.tobytes() == b.tobytes()


def test_seeds_splits_and_indices_differ() -> None:
    base, _ = make_image(7, seed=0, split="train")
    assert make_image(7, seed=0, split="test")[0].tobytes() != base.tobytes()
    assert make_image(7, seed=1, split="train")[0].tobytes() != base.tobytes()
    assert make_image(8, seed=0, split="train")[0].tobytes() != base.tobytes()


def test_train_and_test_are_disjoint() -> None:
    train, _ = generate(64, seed=0, split="train", workers=1)
    test, _ = generate(64, seed=0, split="test", workers=1)
    assert not {img.tobytes() for img in train} & {img.tobytes() for img in test}


def test_shapes_and_dtypes(train_batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = train_batch
    assert images.shape == (4 * NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert images.dtype == np.uint8
    assert labels.shape == (4 * NUM_CLASSES,)
    assert labels.dtype == np.int64
    empty_x, empty_y = generate(0, seed=0)
    assert empty_x.shape == (0, IMAGE_SIZE, IMAGE_SIZE, 3) and empty_y.shape == (0,)


def test_batch_matches_single_images_and_offsets(train_batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = train_batch
    for i in (0, 5, len(images) - 1):
        img, label = make_image(i, seed=3, split="train")
        assert np.array_equal(images[i], img) and labels[i] == label
    tail, tail_y = generate(4, seed=3, split="train", start=10, workers=1)
    assert np.array_equal(tail, images[10:14]) and np.array_equal(tail_y, labels[10:14])


def test_parallel_generation_is_identical() -> None:
    serial = generate(40, seed=2, split="test", workers=1)
    parallel = generate(40, seed=2, split="test", workers=2)
    assert np.array_equal(serial[0], parallel[0])
    assert np.array_equal(serial[1], parallel[1])


def test_all_classes_occur_balanced(train_batch: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = train_batch
    assert np.array_equal(np.bincount(labels, minlength=NUM_CLASSES), np.full(NUM_CLASSES, 4))
    assert [class_of(i) for i in range(NUM_CLASSES)] == list(range(NUM_CLASSES))


def test_images_are_not_trivial(train_batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = train_batch
    per_image_std = images.reshape(len(images), -1).astype(np.float64).std(axis=1)
    assert per_image_std.min() > 5.0
    # Different images, not one image repeated.
    assert len({img.tobytes() for img in images}) == len(images)


@pytest.mark.parametrize("class_id", range(NUM_CLASSES))
def test_every_shape_covers_pixels(class_id: int) -> None:
    mask = _draw_shape(class_id, np.random.default_rng(0), 16.0, 16.0, 10.0)
    assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert 0.0 <= mask.min() and mask.max() <= 1.0
    covered = mask.mean()
    assert 0.05 < covered < 0.5
    assert ((mask > 0.0) & (mask < 1.0)).any(), "edges should be antialiased"


def test_shape_pixels_differ_from_background() -> None:
    """Inside the shape the colour differs clearly from the background around it."""
    for index in range(3 * NUM_CLASSES):
        sample = make_sample(index, seed=0, split="train")
        pixels = sample.image.reshape(-1, 3).astype(np.float64)
        coverage = sample.mask.reshape(-1)
        inside, outside = coverage > 0.99, coverage < 0.01
        assert inside.sum() >= 10 and outside.sum() >= 100, index
        gap = np.linalg.norm(pixels[inside].mean(0) - pixels[outside].mean(0))
        assert gap > 40.0, (index, gap)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        make_image(0, split="validation")
    with pytest.raises(ValueError):
        make_image(-1)
    with pytest.raises(ValueError):
        generate(-1)


# --------------------------------------------------------------------------- #
# Frechet distance
# --------------------------------------------------------------------------- #
frechet_distance = pytest.importorskip("qdiff.datasets.shape_classifier").frechet_distance


def test_frechet_distance_identical_sets_is_zero() -> None:
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_grows_with_shift() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2000, 8))
    b = rng.normal(size=(2000, 8))
    base = frechet_distance(a, b)
    shifted = [frechet_distance(a, b + s) for s in (0.5, 1.0, 2.0)]
    assert base < 0.1
    assert base < shifted[0] < shifted[1] < shifted[2]
    # Mean term: a shift of s in every one of 8 dims adds ~8 s^2.
    assert shifted[2] == pytest.approx(8 * 4.0, rel=0.1)


def test_frechet_distance_sees_covariance_change() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3000, 4))
    b = 3.0 * rng.normal(size=(3000, 4))
    # Same mean, std 1 vs 3: per dim (1 - 3)^2 = 4, so about 16 in total.
    assert frechet_distance(a, b) == pytest.approx(16.0, rel=0.1)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_frechet_distance_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))
