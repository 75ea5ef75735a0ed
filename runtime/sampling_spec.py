"""What to sample, as one object: the public API's sampling and conditioning settings.

`qdiff.api.sample`, `qdiff.api.run` and `qdiff.evaluate.evaluate` take a `SamplingSpec`
(`spec=`); the same nine settings as keywords are a convenience (the CLI uses them), checked
strictly, so a misspelt keyword is an error naming the known ones instead of being swallowed by
a `**kwargs`. One definition instead of nine keywords repeated in every signature.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdiff.core.errors import SamplingError, strict_fields


@dataclass(frozen=True)
class SamplingSpec:
    """Scheduler, steps, images (seeds `seed .. seed + num_images - 1`), guidance, and where a
    conditional model's conditioning comes from (prompts, class labels, an embeddings file, or
    explicitly random)."""

    scheduler: str = "ddim"
    steps: int = 50
    num_images: int = 8
    seed: int = 0
    guidance_scale: float = 3.0
    prompts: tuple[str, ...] | None = None
    class_labels: tuple[int, ...] | None = None
    embeddings: str | None = None
    random_conditioning: bool = False

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.steps < 1:
            raise SamplingError(f"need at least 1 image and 1 step, got {self.num_images} images and {self.steps} steps")

    @classmethod
    def of(cls, spec: SamplingSpec | None = None, **keywords: Any) -> SamplingSpec:
        """`spec`, or a spec from keywords (None, or a field's default value, means "the
        default"); not both."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        keywords = {k: v for k, v in keywords.items() if v is not None and not (k in defaults and v == defaults[k])}
        if spec is not None:
            if keywords:
                raise SamplingError(f"give a SamplingSpec or sampling keywords, not both (got spec= and {', '.join(sorted(keywords))})")
            return spec
        kwargs = strict_fields(cls, keywords, error=SamplingError, what="sampling", tuples=("prompts", "class_labels"))
        if "embeddings" in kwargs:
            kwargs["embeddings"] = str(kwargs["embeddings"])
        return cls(**kwargs)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.num_images))

    def conditioning_kwargs(self) -> dict[str, Any]:
        """The keywords `qdiff.core.conditioning.resolve_conditioning` takes."""
        return {
            "prompts": list(self.prompts) if self.prompts is not None else None,
            "class_labels": list(self.class_labels) if self.class_labels is not None else None,
            "embeddings": Path(self.embeddings) if self.embeddings is not None else None,
            "random": self.random_conditioning,
            "seed": self.seed,
        }

    def conditioning_sources(self) -> dict[str, Any]:
        """The conditioning keywords of `qdiff.api.calibrate` / `reconstruct` (for `run`)."""
        return {"prompts": list(self.prompts) if self.prompts is not None else None, "class_labels": list(self.class_labels) if self.class_labels is not None else None, "embeddings": self.embeddings, "random_conditioning": self.random_conditioning}

    def to_json(self) -> dict[str, Any]:
        obj = dataclasses.asdict(self)
        for key in ("prompts", "class_labels"):
            if obj[key] is not None:
                obj[key] = list(obj[key])
        return obj
