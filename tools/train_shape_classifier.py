"""Train the small shapes classifier that `qdiff eval` uses for shape-FD, and ship its weights.

Why: shape-FD (a Frechet distance on this classifier's features, see
`qdiff.datasets.shape_classifier`) is the distribution-level check of samples from the shipped
shapes models. The evaluation must not retrain the classifier each time (minutes on a CPU) nor
download anything, so the trained weights ship in the package, at
`qdiff/models/shape-classifier/`, with a JSON file that says how they were made and how well
they classify held-out real images.

    .venv/bin/python tools/train_shape_classifier.py     # 8 min on 2 busy CPU cores; 96.7% held out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdiff.datasets import shape_classifier as sc  # noqa: E402
from qdiff.datasets import shapes  # noqa: E402
from qdiff.datasets.shape_fd import CLASSIFIER_DIR, save_classifier  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    p.add_argument("--train-images", type=int, default=12000)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_x, train_y = shapes.generate(args.train_images, seed=args.seed, split="train")
    # Disjoint from the real images shape-FD compares against (test split, from index 0).
    test_x, test_y = shapes.generate(args.test_images, seed=args.seed, split="test", start=100_000)
    model = sc.train_classifier(train_x, train_y, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, log_every=max(1, args.steps // 10))
    acc = sc.accuracy(sc.predict(model, test_x), test_y)
    meta = {
        "dataset": {"generator": "qdiff.datasets.shapes", "seed": args.seed, "train_images": args.train_images},
        "training": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed")},
        "held_out_accuracy": acc,
        "held_out": f"{args.test_images} test-split images from index 100000",
        "seconds": round(time.perf_counter() - started, 1),
        "weights": "float16 (trained in float32; same held-out accuracy after the cast)",
    }
    save_classifier(model, args.out, meta)
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
