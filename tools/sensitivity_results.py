"""Per-layer-group sensitivity: which layers carry the quantization error (QuEST's premise).

For each model and preset, calibrate once with every weighted layer calibrated (the preset with
`exclude=()`, so conv_in/conv_out have ranges too), then measure the PyTorch fake-quant model
(`calib.sensitivity`) with only one group quantized and with all but that group, on the same
FP32 trajectory: the per-step noise-prediction rel-L2 (the quantized UNet on the inputs the FP32
UNet saw at each of `--steps` DDIM steps, `--images` held-out seeds). No sampling of quantized
models, so it is cheap. "All quantized" means the preset's own layers (conv_in/conv_out float).
Extra rows: the three groups ModelOpt keeps float together (time_embedding + time_emb_proj +
conv_shortcut), which docs/results/peer-modelopt.md measured at 0.0236 -> 0.0192 on shapes-ddpm
(W8A8, max calibrator, `qdiff run` calibration).

Writes <out>/sensitivity.json and sensitivity.md after every row (a stopped run keeps its rows,
marked partial), and one bar plot per model and preset. Regenerate on the GPU (about 2-4 minutes for both shipped models and presets):

    python3 tools/sensitivity_results.py --device cuda --out docs/results/sensitivity

and the peer-modelopt setting (max calibrator) with `--calibrator max`. CPU check:

    .venv/bin/python tools/sensitivity_results.py --smoke --out /tmp/sens-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = (ROOT / "qdiff" / "models" / "shapes-ddpm", ROOT / "qdiff" / "models" / "shapes-cond")
PRESETS = ("w8a8", "w4a8")
RUN_CALIBRATION = {"num_timesteps": 10, "samples_per_timestep": 32, "calibration_steps": 50, "batch_size": 32}
SMOKE_CALIBRATION = {"num_timesteps": 2, "samples_per_timestep": 2, "calibration_steps": 3, "batch_size": 2}
COMBINATIONS = {"modelopt float set (time_embedding+time_emb_proj+conv_shortcut)": ("time_embedding", "time_emb_proj", "conv_shortcut")}
HELD_OUT_SEED = 100_000  # trajectory seeds far from calibration's and the harness's first sets


def model_sensitivity(model: Path, preset: str, *, device: str, images: int, steps: int, calibration: dict[str, Any], calibrator: str | None, work: Path, log=print,
                      on_partial=None) -> dict[str, Any]:
    """The sensitivity table of one model and preset (JSON-ready); `on_partial` gets the entry
    as it grows (``complete`` False) after every measured row."""
    from qdiff.api import calibrate
    from qdiff.calib.recipe import load_recipe
    from qdiff.calib.sensitivity import group_sensitivity, layer_groups
    from qdiff.calib.shortcuts import find_split_layers
    from qdiff.calib.collect import example_call
    from qdiff.evaluate import sampling_plan
    from qdiff.models import load_model
    from qdiff.runtime.sampler import generate, step_errors
    from qdiff.runtime.backends import DeviceDenoiser

    started = time.perf_counter()
    bundle = load_model(model)
    overrides = dict(calibration, **({"activation_calibrator": calibrator} if calibrator else {}))
    preset_recipe = load_recipe(preset, **overrides)
    table = calibrate(bundle, work / f"{bundle.label}-{preset}-{calibrator or 'preset'}", preset, exclude=(), timestep_stats=False, **overrides).table
    base = [name for name in table.layers if preset_recipe.is_excluded(name) is None]
    plan = sampling_plan(bundle, steps=steps, num_images=images, seed=HELD_OUT_SEED)
    sample_shape = (bundle.in_channels, bundle.sample_size, bundle.sample_size)
    concat_conv1 = find_split_layers(bundle.unet, example_call(bundle.unet, sample_shape, plan.conditioning), conv1=True)[1]
    groups = layer_groups(bundle.unet, concat_conv1)
    fp32 = DeviceDenoiser(bundle.unet, device)
    records = generate(bundle, fp32, scheduler=plan.scheduler, steps=plan.steps, seeds=list(plan.seeds), conditioning=plan.conditioning, guidance_scale=plan.guidance_scale, record_steps=True, desc="fp32 trajectory").steps
    bundle.unet.cpu()

    def measure(quantized: torch.nn.Module) -> list[float]:
        errors = [row["rel_l2"] for row in step_errors(records, DeviceDenoiser(quantized, device))]
        quantized.cpu()
        return errors

    def entry(result, complete: bool) -> dict[str, Any]:
        return {
            "model": bundle.label,
            "model_path": str(model),
            "preset": preset,
            "calibrator": calibrator or preset_recipe.activation_calibrator,
            "calibration": calibration,
            "images": images,
            "steps": steps,
            "groups": {g: names for g, names in groups.items()},
            "base_layers": len(base),
            **result.to_json(),
            "seconds": round(time.perf_counter() - started, 1),
            "complete": complete,
        }

    result = group_sensitivity(bundle.unet, table, groups, measure, base=base, combinations=COMBINATIONS, progress=lambda msg: log(f"  {bundle.label} {preset}: {msg}"),
                               on_row=(lambda partial: on_partial(entry(partial, False))) if on_partial else None)
    return entry(result, True)


def write_outputs(entries: list[dict[str, Any]], out: Path, settings: dict[str, Any]) -> None:
    from qdiff.calib.sensitivity import SensitivityResult, markdown_rows
    from qdiff.core.artifacts import write_json_atomic, write_text_atomic
    from qdiff.plots import plot_group_sensitivity
    from qdiff.report import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sensitivity.json", {"settings": settings, "entries": entries})
    md = [
        "# Per-layer-group sensitivity",
        "",
        f"Made by `python3 tools/sensitivity_results.py {settings['argv']}` ({settings['device']}).",
        "",
        "Per-step noise-prediction rel-L2 of the PyTorch fake-quant model on an FP32 DDIM trajectory (mean over steps), with only one layer group "
        "quantized, and with everything the preset quantizes except that group. 'gain' = all-quantized error minus all-but-this-group error: what keeping the group in float buys. "
        "Groups are disjoint (first matching name pattern, calib/sensitivity.py); skip_concat_conv1 = the up-block resnet conv1s that read a skip concat (calib/shortcuts.py).",
        "",
    ]
    for e in entries:
        result = SensitivityResult(e["all_quantized"], e["rows"])
        header, rows = markdown_rows(result)
        name = f"sensitivity-{e['model']}-{e['preset']}-{e['calibrator']}.png"
        if e["rows"]:  # a partial entry right after its reference has nothing to plot yet
            plot_group_sensitivity([r for r in e["rows"]], out / name, title=f"{e['model']} {e['preset']} ({e['calibrator']}): mean step rel-L2 by layer group")
        partial = "" if e.get("complete", True) else f" **Partial: {len(e['rows'])} rows measured so far (the run is going on or was stopped).**"
        md += [f"## {e['model']}, {e['preset']}, {e['calibrator']} calibrator", "",
               f"{e['images']} images x {e['steps']} steps; calibration {e['calibration']}; {e['base_layers']} layers quantized in 'all'; {e['seconds']} s.{partial}", "",
               markdown_table(header, rows), "", f"![sensitivity]({name})", ""]
    write_text_atomic(out / "sensitivity.md", "\n".join(md))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, default=list(MODELS), help="diffusers model folders (default: the two shipped shapes models)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--calibrator", choices=["max", "percentile", "mse", "entropy"], help="activation calibrator (default: the preset's, mse)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=64, help="images of the FP32 trajectory (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "sensitivity")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qdiff-sensitivity"))
    parser.add_argument("--smoke", action="store_true", help="tiny settings on the CPU (< 2 min): checks the path, numbers not meaningful")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.setdefault("QDIFF_QUIET", "1")
    calibration = SMOKE_CALIBRATION if args.smoke else RUN_CALIBRATION
    if args.smoke:
        args.device, args.images, args.steps, args.models, args.presets = "cpu", 2, 3, args.models[:1], args.presets[:1]
    settings = {"argv": " ".join(argv if argv is not None else sys.argv[1:]), "device": args.device, "images": args.images, "steps": args.steps}
    entries: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model in args.models:
        for preset in args.presets:
            print(f"sensitivity: {model.name} {preset} ...", flush=True)
            entries.append(model_sensitivity(model, preset, device=args.device, images=args.images, steps=args.steps, calibration=calibration, calibrator=args.calibrator, work=args.work,
                                             on_partial=lambda partial: write_outputs(entries + [partial], args.out, settings)))
            write_outputs(entries, args.out, settings)
            e = entries[-1]
            top = sorted(e["rows"], key=lambda r: -r["float_gain"])[:3]
            print(f"sensitivity: {e['model']} {preset}: all {e['all_quantized']['mean']:.4f}; biggest gains from float: "
                  + ", ".join(f"{r['group']} {r['float_gain']:+.4f}" for r in top) + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"wrote {args.out / 'sensitivity.md'} in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
