"""QuEST's methods as candidates of the evaluation harness (`qdiff.eval_harness`).

Selective fine-tuning needs no candidate of its own: its artifact is an ordinary set of integer
weights, so `fake_quant_candidate(label, "finetune.calibration.json", weights="finetune.safetensors")`
evaluates it, as it does a W4A4 (simulated) table. The time-aware quantizer switches activation
scales with the timestep, which only a module of its own can do: `time_aware_candidate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def time_aware_candidate(label: str, index: str | Path, *, weights: Any = None, meta: dict[str, Any] | None = None):
    """A harness `Candidate` whose UNet is the time-aware fake-quant model of the K tables that
    `index` (a `buckets.json` from `qdiff.api.calibrate_time_aware`, or its folder) names.

    `weights`: a `ReconstructedWeights` or its path (reconstruction or fine-tuning), whose
    integers every bucket shares; the tables must have the weight scales it was made with."""
    from qdiff.calib.quest.time_aware import build_time_aware_model, load_time_aware
    from qdiff.calib.reconstruct.artifact import ReconstructedWeights
    from qdiff.eval_harness import Candidate

    tables, buckets = load_time_aware(index)
    if weights is not None and not isinstance(weights, ReconstructedWeights):
        weights = ReconstructedWeights.load(weights)
    if weights is not None:
        weights.check_model(tables[0].model_sha256, f"the model of {index}")

    def make_unet(unet):
        return build_time_aware_model(unet, tables, buckets, weights=weights)

    info = {"method": "time-aware", "K": buckets.k, "boundaries": list(buckets.boundaries), "recipe": tables[0].recipe.get("name"), **(meta or {})}
    return Candidate(label=label, make_unet=make_unet, meta=info)
