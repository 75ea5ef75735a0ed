"""A tiny CNN for the shapes dataset, and a Frechet distance on its features.

Why this exists
---------------
Judging quantized diffusion samples by eye does not scale and does not give
numbers to compare.  The shapes dataset (:mod:`qdiff.datasets.shapes`) has
classes, so a small classifier trained on real images gives two checks:

* **class accuracy on conditional samples** -- if the model was asked for
  "star", does the classifier see a star?  (Compare with its accuracy on
  held-out real images, the ceiling.)
* **shape-FD** -- the Frechet distance between Gaussian fits of the
  classifier's penultimate-layer features of generated and of held-out real
  images, an FID analogue that needs no downloaded Inception network.  Like
  FID it is biased by the sample count, so compare it only with a reference
  computed at the same counts (e.g. real-vs-real on disjoint sets).

The network is deliberately small (~0.3M parameters): it trains in seconds on
a GPU and in a few minutes on a CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qdiff.datasets.shapes import NUM_CLASSES

FEATURE_DIM = 128


class ShapeClassifier(nn.Module):
    """Four conv stages (32->16->8->4) and global average pooling to FEATURE_DIM features."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32) -> None:
        super().__init__()

        def stage(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            if pool:
                layers.append(nn.MaxPool2d(2))
            return layers

        self.body = nn.Sequential(
            *stage(3, width, True),
            *stage(width, 2 * width, True),
            *stage(2 * width, FEATURE_DIM, True),
            *stage(FEATURE_DIM, FEATURE_DIM, False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features of images already scaled to [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_tensor(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC images (numpy or torch) -> float NCHW in [-1, 1] on ``device``."""
    t = torch.as_tensor(images).to(device)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree turns: every shape class is invariant to them."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    x = torch.where(flip[:, None, None, None].to(x.device), x.flip(3), x)
    k = int(torch.randint(4, (1,), generator=generator, device=generator.device).item())
    return torch.rot90(x, k, dims=(2, 3))


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device | str = "cpu",
    steps: int = 1500,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 0,
) -> ShapeClassifier:
    """Train a ShapeClassifier on uint8 NHWC ``images`` with int ``labels``; returns it in eval mode."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = ShapeClassifier().to(device)
    data = torch.as_tensor(images).to(device)
    targets = torch.as_tensor(labels, dtype=torch.long).to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1.0 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))
    )
    model.train()
    for step in range(steps):
        idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=gen).to(device)
        x = _augment(to_tensor(data[idx], device), gen)
        loss = F.cross_entropy(model(x), targets[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  classifier step {step:5d}/{steps} loss {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def _batched(model: ShapeClassifier, images: np.ndarray | torch.Tensor, fn: str, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    outs = [getattr(model, fn)(to_tensor(images[i : i + batch_size], device)).float().cpu()
            for i in range(0, len(images), batch_size)]  # fmt: skip
    return torch.cat(outs) if outs else torch.empty(0)


def predict(model: ShapeClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Predicted class ids (int64 [N]) for uint8 NHWC images."""
    model.eval()
    return _batched(model, images, "forward", batch_size).argmax(1).numpy().astype(np.int64)


def features(model: ShapeClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Penultimate-layer features (float64 [N, FEATURE_DIM]) for uint8 NHWC images."""
    model.eval()
    return _batched(model, images, "features", batch_size).numpy().astype(np.float64)


def accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int = NUM_CLASSES) -> dict[str, object]:
    """Overall and per-class accuracy as plain floats (JSON-friendly)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    per_class = [float((predictions[labels == c] == c).mean()) if (labels == c).any() else float("nan")
                 for c in range(num_classes)]  # fmt: skip
    return {"overall": float((predictions == labels).mean()) if len(labels) else float("nan"),
            "per_class": per_class}  # fmt: skip


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two feature sets ([N, D] each).

    ``||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)``;
    the last trace is computed from eigenvalues of a symmetric PSD matrix,
    which is stabler than ``scipy.linalg.sqrtm`` of the non-symmetric product.
    """
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, D] arrays with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    product = root_a @ cov_b @ root_a
    cross = np.linalg.eigvalsh((product + product.T) / 2.0)
    tr_sqrt = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)
    return max(fd, 0.0)
