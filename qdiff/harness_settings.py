"""The evaluation harness's settings (`qdiff.eval_harness.HarnessSettings`), without torch, so
the CLI can show their defaults in `qdiff eval --help` without importing it."""

from __future__ import annotations

from dataclasses import dataclass

from qdiff.core.errors import EvaluationError


@dataclass(frozen=True)
class HarnessSettings:
    images: int = 1000  # per seed set
    seed_sets: int = 3  # disjoint noise seed ranges: set k uses seeds seed_offset + k*images .. + images - 1
    steps: int = 50  # DDIM steps
    step_images: int = 256  # images (the first of each seed set) whose FP32 trajectory gives step_rel_l2
    guidance_scale: float = 3.0  # class-conditional models (CFG); ignored for unconditional ones
    device: str = "cuda"
    batch_size: int = 250  # images per UNet call
    bootstrap: int = 1000  # bootstrap replicates
    shape_fd: bool = True
    scheduler: str = "ddim"
    seed_offset: int = 0
    # cuDNN/cuBLAS TF32 would add ~1e-3 relative error to FP32 and fake-quant alike; off by default.
    allow_tf32: bool = False

    def check(self) -> HarnessSettings:
        problems = []
        if self.images < 2:
            problems.append(f"images={self.images} (need >= 2 per seed set)")
        if self.seed_sets < 1:
            problems.append(f"seed_sets={self.seed_sets} (need >= 1)")
        if not 1 <= self.step_images <= self.images:
            problems.append(f"step_images={self.step_images} (need 1..images={self.images})")
        if self.steps < 1 or self.batch_size < 1:
            problems.append(f"steps={self.steps}, batch_size={self.batch_size} (need >= 1)")
        if self.bootstrap < 10:
            problems.append(f"bootstrap={self.bootstrap} (need >= 10 replicates)")
        if problems:
            raise EvaluationError("harness settings out of range: " + "; ".join(problems))
        return self


def seed_sets(settings: HarnessSettings) -> list[list[int]]:
    """The disjoint, deterministic seed ranges of the seed sets."""
    n, start = settings.images, settings.seed_offset
    return [list(range(start + k * n, start + (k + 1) * n)) for k in range(settings.seed_sets)]
