"""Diffusers schedulers by short name, built from the model folder's own scheduler config.

The schedulers are taken from diffusers as they are; only the choice of class is ours. A model's
`scheduler_config.json` carries its training noise schedule (betas, prediction type), which every
sampler must share, so each scheduler is made with `from_config` of that config.
"""

from __future__ import annotations

from typing import Any

from qdiff.core.errors import SamplingError

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def make_scheduler(name: str, config: dict[str, Any] | None):
    """A fresh scheduler of kind `name` carrying the model's noise schedule."""
    import diffusers

    if name not in SCHEDULERS:
        raise SamplingError(f"unknown scheduler {name!r}", hint=f"use one of {', '.join(SCHEDULERS)}")
    class_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    if config is None:
        # Bare UNet folders carry no schedule; DDPM's default (linear betas, 1000 steps) is the
        # schedule diffusers trains with unless told otherwise.
        config = diffusers.DDPMScheduler().config
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return cls.from_config({**config, **extra})
