"""Procedural datasets for training qdiff's small default models.

The project cannot download a dataset (the training machine has no network),
yet post-training quantization can only be judged on a *trained* denoiser:
a randomly initialised UNet has meaningless activation statistics and its
samples cannot get worse.  :mod:`qdiff.datasets.shapes` therefore draws a
labelled image dataset from a seed, and :mod:`qdiff.datasets.shape_classifier`
(imported lazily because it needs torch) turns samples into checkable numbers.
"""

from qdiff.datasets.shapes import (
    CLASS_NAMES,
    IMAGE_SIZE,
    NUM_CLASSES,
    generate,
    make_image,
)

__all__ = ["CLASS_NAMES", "IMAGE_SIZE", "NUM_CLASSES", "generate", "make_image"]
