"""The reconstruction section of a recipe: every setting that changes reconstructed weights.

Serialised beside the recipe (the reconstruction artifact's manifest records both), torchao's
habit of one JSON-round-tripping config per method. Defaults are the papers': AdaRound 20k
iterations at batch 32 with Adam lr 1e-3 on the rounding variables, lambda 0.01, beta 20 -> 2
after a 20% warm-up (Q-Diffusion); learned activation steps with Adam lr 4e-4 and a cosine
schedule (Q-Diffusion's LSQ); FBR 5k iterations, gamma 0.8, QDrop p 0.5 (EDA-DM).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from qdiff.core.errors import RecipeError, strict_fields

METHODS = ("adaround-brecq", "fbr")
DEFAULT_ITERATIONS = {"adaround-brecq": 20000, "fbr": 5000}


@dataclass(frozen=True)
class ReconstructionSettings:
    """How to reconstruct the weights (and optionally activation steps) of a calibrated model.

    `iterations` None means the method's paper default (DEFAULT_ITERATIONS); `qdrop_p` None
    means 0.5 for fbr and 0 (no mixing) for adaround-brecq; `learn_activation_steps` None means
    on for fbr (it trains V and steps jointly) and off for adaround-brecq. `resolved()` fills
    them in, and only resolved settings are recorded, so a manifest never says "default".
    """

    method: str = "adaround-brecq"
    iterations: int | None = None
    batch_size: int = 32
    weight_lr: float = 1e-3
    round_weight: float = 0.01  # lambda of the rounding regulariser (adaround-brecq only)
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    layer_loss_weight: float = 0.8  # gamma: weight of FBR's per-layer output terms
    qdrop_p: float | None = None
    learn_activation_steps: bool | None = None
    activation_lr: float = 4e-4
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method={self.method!r} (one of {', '.join(METHODS)})")
        if self.iterations is not None and self.iterations < 1:
            problems.append(f"iterations={self.iterations} (must be >= 1)")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} (must be >= 1)")
        if not (self.weight_lr > 0 and self.activation_lr > 0):
            problems.append("weight_lr and activation_lr must be > 0")
        if self.round_weight < 0 or self.layer_loss_weight < 0:
            problems.append("round_weight and layer_loss_weight must be >= 0")
        if not 0.0 <= self.warmup < 1.0:
            problems.append(f"warmup={self.warmup} (a fraction in [0, 1))")
        if not self.beta_start >= self.beta_end > 0:
            problems.append(f"beta {self.beta_start} -> {self.beta_end} (need beta_start >= beta_end > 0)")
        if self.qdrop_p is not None and not 0.0 <= self.qdrop_p <= 1.0:
            problems.append(f"qdrop_p={self.qdrop_p} (a probability)")
        if problems:
            raise RecipeError("reconstruction settings are invalid: " + "; ".join(problems))

    def resolved(self) -> ReconstructionSettings:
        fbr = self.method == "fbr"
        return replace(
            self,
            iterations=self.iterations if self.iterations is not None else DEFAULT_ITERATIONS[self.method],
            qdrop_p=self.qdrop_p if self.qdrop_p is not None else (0.5 if fbr else 0.0),
            learn_activation_steps=self.learn_activation_steps if self.learn_activation_steps is not None else fbr,
        )

    @property
    def uses_round_regulariser(self) -> bool:
        """FBR trains V without AdaRound's regulariser (EDA-DM); AdaRound-BRECQ uses it."""
        return self.method == "adaround-brecq"

    @property
    def uses_layer_loss(self) -> bool:
        return self.method == "fbr"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> ReconstructionSettings:
        kwargs = strict_fields(cls, obj, error=RecipeError, what="reconstruction")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise RecipeError(f"a reconstruction setting has the wrong type: {exc}") from exc

    def with_overrides(self, **overrides: Any) -> ReconstructionSettings:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return self.from_json({**self.to_json(), **overrides})
