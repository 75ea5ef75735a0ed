#!/usr/bin/env python3
"""Measure the two properties of a denoiser that Q-Diffusion's methods rest on.

Why this exists
---------------
Split-shortcut quantization helps only if the two halves of a skip concat have very different
ranges (the paper reports up to ~200x); timestep-aware calibration helps only if activation
ranges move over the trajectory. Whether a model can show either is a property of the model,
so this tool measures both on any model folder, on the CPU or CUDA:

* **concat ratio**, per skip concat (each up-block resnet's ``conv_shortcut``, found and split
  exactly as `qdiff.calib.shortcuts` does for split-shortcut quantization): max|x| over the
  whole trajectory of the skip branch vs the upsampled (deep) branch, reported as larger /
  smaller (>= 1) and as skip / deep;
* **timestep spread**, per quantized layer (the w8a8 preset's targets): max over timesteps of
  the per-timestep max|x|, divided by its min over timesteps.

Both come from `qdiff.calib.timestep_stats.TimestepStatsRecorder` (the per-timestep recorder
calibration uses) hooked on the layers while DDIM samples from noise, with classifier-free
guidance batches for class-conditional models as at inference. Results: ``properties.json``
and ``properties.md`` (median, max, which layers) in ``--out``.

    python tools/eval_model_properties.py qdiff/models/shapes-ddpm --out out/properties/shapes-ddpm
    python tools/eval_model_properties.py .eval-models/scenes-cond --out out/properties/scenes-cond --device cuda --samples 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))

import train_default_models as tdm  # noqa: E402  (its DDIM loop)

from qdiff.calib.recipe import load_recipe  # noqa: E402
from qdiff.calib.shortcuts import find_split_shortcuts  # noqa: E402
from qdiff.calib.targets import select_targets  # noqa: E402
from qdiff.calib.timestep_stats import TimestepStats, TimestepStatsRecorder  # noqa: E402
from qdiff.core.artifacts import write_json_atomic, write_text_atomic  # noqa: E402
from qdiff.datasets.registry import dataset_for  # noqa: E402
from qdiff.models import ModelBundle, load_model  # noqa: E402

TOP = 5


class _RecordingUNet:
    """Calls the UNet and tells the recorder which trajectory step each call belongs to."""

    def __init__(self, unet: torch.nn.Module, recorder: TimestepStatsRecorder, steps: int) -> None:
        self.unet, self.recorder, self.steps, self.calls = unet, recorder, steps, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> Any:
        self.recorder.begin_step(self.calls % self.steps, float(t), True)
        self.calls += 1
        return self.unet(x, t, **kwargs)


def record(bundle: ModelBundle, device: torch.device, samples: int, steps: int, guidance_scale: float, seed: int = 0) -> tuple[TimestepStats, dict[str, int]]:
    """Per-timestep ranges of every quantized layer and both branches of every skip concat."""
    unet = bundle.unet.to(device)
    example: dict[str, Any] = {"sample": torch.zeros(1, bundle.in_channels, bundle.sample_size, bundle.sample_size, device=device),
                               "timestep": torch.tensor([500.0], device=device)}  # fmt: skip
    cond = uncond = None
    if bundle.is_conditional:
        if bundle.class_embeddings is None:
            raise SystemExit(f"{bundle.path}: a conditional model without conditioning/class_embeddings.safetensors is not supported here")
        table = bundle.class_embeddings.to(device)
        labels = torch.arange(samples, device=device) % (table.shape[0] - 1)  # the last row is the null class
        cond, uncond = table[labels], table[-1]
        example["encoder_hidden_states"] = table[:1]
    splits = find_split_shortcuts(unet, example)
    targets, _ = select_targets(unet, load_recipe("w8a8"))
    recorder = TimestepStatsRecorder(samples_per_call=256)
    recorder.attach(((t.name, t.module) for t in targets), splits)
    try:
        tdm.ddim_sample(_RecordingUNet(unet, recorder, steps), bundle.scheduler_config, samples, device, steps, seed=seed,
                        cond=cond, uncond=uncond, guidance_scale=guidance_scale if cond is not None else 1.0)  # fmt: skip
    finally:
        recorder.remove()
    return recorder.result(), splits


def _summary(values: dict[str, float]) -> dict[str, Any]:
    finite = {k: v for k, v in values.items() if np.isfinite(v)}
    ranked = sorted(finite.items(), key=lambda kv: -kv[1])
    return {
        "count": len(values), "median": float(np.median(list(finite.values()))) if finite else None,
        "min": ranked[-1][1] if ranked else None, "max": ranked[0][1] if ranked else None,
        "top": [{"layer": k, "value": v} for k, v in ranked[:TOP]], "non_finite": sorted(set(values) - set(finite)),
    }  # fmt: skip


def _is_time_embedding(layer: str) -> bool:
    return layer.endswith("time_emb_proj") or layer.startswith("time_embedding")


def properties(stats: TimestepStats, splits: dict[str, int]) -> dict[str, Any]:
    """Concat branch ratios and per-layer timestep spreads from recorded statistics."""
    concats = []
    for p, name in enumerate(stats.split_layers):
        deep, skip = (float(stats.branch_amax[p, b].max()) for b in (0, 1))
        per_step = np.maximum(stats.branch_amax[p, 0], stats.branch_amax[p, 1]) / np.maximum(np.minimum(stats.branch_amax[p, 0], stats.branch_amax[p, 1]), 1e-12)
        concats.append({"layer": name, "split_channels": splits[name], "deep_amax": deep, "skip_amax": skip,
                        "ratio": max(deep, skip) / max(min(deep, skip), 1e-12), "skip_over_deep": skip / max(deep, 1e-12),
                        "per_step_ratio_max": float(per_step.max())})  # fmt: skip
    spreads = []
    for name, amax in zip(stats.layers, stats.amax):
        low, high = float(amax.min()), float(amax.max())
        spreads.append({"layer": name, "amax_min": low, "amax_max": high, "spread": high / low if low > 0 else float("inf"),
                        "argmax_timestep": float(stats.timesteps[int(amax.argmax())])})  # fmt: skip
    spread = {s["layer"]: s["spread"] for s in spreads}
    return {
        "concat": {"layers": concats, "summary": _summary({c["layer"]: c["ratio"] for c in concats})},
        "timestep_spread": {"layers": spreads, "summary": _summary(spread),
                            # every time_emb_proj reads the same SiLU(time embedding), whose range is the
                            # timestep itself; without them the summary says what the feature maps do
                            "summary_without_time_embedding": _summary({k: v for k, v in spread.items() if not _is_time_embedding(k)})},
        "timesteps": stats.timesteps.tolist(),
    }


def markdown(result: dict[str, Any]) -> str:
    def line(summary: dict[str, Any], unit: str) -> str:
        if summary["median"] is None:
            return f"no {unit}"
        tops = ", ".join(f"`{t['layer']}` {t['value']:.2f}" for t in summary["top"])
        return f"{summary['count']} {unit}: median {summary['median']:.2f}, min {summary['min']:.2f}, max {summary['max']:.2f} (largest: {tops})"

    c, s = result["concat"], result["timestep_spread"]
    md = [f"# Model properties: {result['model']}", "",
          f"`{result['model_sha256'][:16]}`, dataset {result['dataset']}, {result['samples']} samples x {result['steps']} DDIM steps"
          f"{', CFG ' + str(result['guidance_scale']) if result['conditional'] else ''}, on {result['device']} ({result['seconds']} s).", "",
          "## Skip-concat branch range ratio (larger / smaller max|x| over the trajectory)", "", line(c["summary"], "concats"), "",
          "| layer | split | deep max abs | skip max abs | ratio | skip / deep | max per-step ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    md += [f"| `{r['layer']}` | {r['split_channels']} | {r['deep_amax']:.3g} | {r['skip_amax']:.3g} | {r['ratio']:.2f} | {r['skip_over_deep']:.2f} | {r['per_step_ratio_max']:.2f} |" for r in c["layers"]]
    md += ["", "## Range over timesteps (max / min over timesteps of the per-timestep max|x|)", "", line(s["summary"], "quantized layers"), "",
           line(s["summary_without_time_embedding"], "quantized layers without the time-embedding inputs"), ""]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a model folder (qdiff.models.load_model)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=64, help="trajectories (one batch)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps; every step is recorded")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bundle = load_model(args.model)
    device = torch.device(args.device)
    with torch.no_grad():
        stats, splits = record(bundle, device, args.samples, args.steps, args.guidance_scale, args.seed)
    result = {"model": str(args.model), "model_sha256": bundle.model_sha256, "dataset": dataset_for(bundle).name,
              "conditional": bundle.is_conditional, "samples": args.samples, "steps": args.steps,
              "guidance_scale": args.guidance_scale if bundle.is_conditional else None, "device": str(device),
              **properties(stats, splits), "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "properties.json", result)
    text = markdown(result)
    write_text_atomic(args.out / "properties.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
