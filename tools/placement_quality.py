"""Quality of qdiff's named Q/DQ placements on the shipped models (the other half of issue 7).

A placement that is fast in TensorRT must not cost quality. This takes the default W8A8 table
(max calibrator, uniform timesteps, split shortcut: the ablations' `w8a8-max-uniform-split`,
reused from its cache), quantizes the FP32 graph under each placement of
`qdiff.export.placement` and compares each with FP32 from the same seeds, with the ablations'
own metrics and settings (tools/ablations.py: 16 images, 50 DDIM steps, ONNX Runtime).

    .venv/bin/python tools/placement_quality.py            # writes docs/results/placements.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.ablations import MODELS, Config, Runner, _summary_row  # noqa: E402

from qdiff.api import quantize_onnx  # noqa: E402
from qdiff.core.artifacts import write_json_atomic  # noqa: E402
from qdiff.export.placement import PLACEMENTS  # noqa: E402
from qdiff.evaluate import compare  # noqa: E402
from qdiff.runtime.backends import OnnxRuntimeDenoiser  # noqa: E402

BASE = Config("w8a8", "max", "uniform", True)


def measure(args: argparse.Namespace) -> list[dict]:
    cache_path = args.work / "rows.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    rows = []
    for model in args.models:
        runner = Runner(model, args, cache)
        base = runner.run_config(BASE)  # cached by the ablations; calibrates only if missing
        table = runner.work / BASE.id / "calibration.json"
        for name, placement in PLACEMENTS.items():
            t0 = time.perf_counter()
            q = quantize_onnx(runner.fp32, table, runner.work / BASE.id / f"denoiser.w8a8-{name}.onnx", placement=None if name == "all" else name)
            coverage = q.coverage
            if name == "all":
                summary = {k: base[k] for k in ("mean_psnr", "min_psnr", "mean_ssim", "mean_step_rel_l2", "max_step_rel_l2", "shape_fd")}
            else:
                summary = _summary_row(compare(runner.bundle, runner.reference, OnnxRuntimeDenoiser(q.onnx_path), runner.plan, label=name))
                summary.pop("steps", None)
            row = {"model": model, "placement": name, "summary": placement.summary, **summary,
                   "quantized_layers": coverage.get("quantized_layers"), "int8_mac_share": coverage.get("mac_share"), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            rows.append(row)
            print(f"{model} {name}: PSNR {row['mean_psnr']:.2f} dB, step rel-L2 {row['mean_step_rel_l2']:.4f}, shape-FD {row['shape_fd']}, INT8 MAC share {row['int8_mac_share']}", flush=True)
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "# Q/DQ placements: quality on the shipped models",
        "",
        "One W8A8 calibration table (max, uniform timesteps, split shortcut) under each named placement (`qdiff quantize --placement`),",
        "against FP32 from the same seeds: 16 images, 50 DDIM steps, both graphs under ONNX Runtime (tools/ablations.py's settings).",
        "Regenerate: `.venv/bin/python tools/placement_quality.py`. Speed of the same placements in TensorRT: docs/int8-engines.md.",
        "",
        "| model | placement | layers INT8 | INT8 share of MACs | mean PSNR (dB) | mean SSIM | step rel-L2 | shape-FD |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        share = f"{r['int8_mac_share']:.1%}" if r.get("int8_mac_share") is not None else "-"
        fd = f"{r['shape_fd']:.3f}" if r.get("shape_fd") is not None else "-"
        lines.append(f"| {r['model']} | {r['placement']} | {r['quantized_layers']} | {share} | {r['mean_psnr']:.2f} | {r['mean_ssim']:.3f} | {r['mean_step_rel_l2']:.4f} | {fd} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--work", type=Path, default=ROOT / "out" / "ablations", help="the ablations' work folder (its tables and row cache are reused)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = measure(args)
    write_json_atomic(args.out / "placements.json", {"rows": rows})
    (args.out / "placements.md").write_text(to_markdown(rows))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
