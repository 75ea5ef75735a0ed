"""A machine-speed anchor: FP16 and INT8 GEMMs at SD 1.5's batch-2 layer shapes, as measured in
../shared/anchors/h200-gemm-int8-fp8.md, timed in the same device run as an engine benchmark.

Engine rows from different device runs are compared only through this: if the FP16 GEMMs of
two runs agree, the two machines ran at the same speed, and rows of the two runs can be set side
by side with that spread; if they disagree, they cannot.

    python benchmarks/gemm_anchor.py --out /tmp/xo

Writes gemm-anchor.json and gemm-anchor.md (median of --iters after --warmup, CUDA events).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

from benchmarks.sd15_unet import _gpu_facts, _versions, time_calls  # noqa: E402

# (label, M, K, N): the implicit-GEMM shapes of the anchor file
SHAPES = [
    ("conv3x3 64x64 c320", 8192, 2880, 320),
    ("conv3x3 32x32 c640", 2048, 5760, 640),
    ("conv3x3 16x16 c1280", 512, 11520, 1280),
    ("conv3x3 8x8 c1280", 128, 11520, 1280),
    ("attn proj 64x64 c320", 8192, 320, 320),
    ("ff 64x64 320->2560", 8192, 320, 2560),
    ("ff 32x32 640->5120", 2048, 640, 5120),
    ("big 8192^3", 8192, 8192, 8192),
]


def measure(warmup: int = 10, iters: int = 50) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for label, m, k, n in SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
        b = torch.randn(k, n, device="cuda", dtype=torch.float16, generator=g)
        a8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=g)
        b8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g).t()  # column-major, as _int_mm wants
        fp16 = time_calls(lambda: a @ b, warmup, iters)["median_ms"]
        int8 = time_calls(lambda: torch._int_mm(a8, b8), warmup, iters)["median_ms"]
        rows.append({"shape": label, "m": m, "k": k, "n": n, "fp16_ms": round(fp16, 4), "fp16_tflops": round(2 * m * k * n / fp16 / 1e9, 1), "int8_ms": round(int8, 4), "int8_vs_fp16": round(fp16 / int8, 2)})
    return rows


def to_markdown(doc: dict) -> str:
    lines = [
        f"# GEMM anchor ({doc['date']}, {doc['gpu']['gpu']})",
        "",
        f"CUDA events, {doc['warmup']} warm-up calls then the median of {doc['iters']}; `a @ b` FP16 and `torch._int_mm` INT8. "
        + "; ".join(f"{k} {v}" for k, v in doc["versions"].items()) + f"; driver {doc['gpu']['driver']}.",
        "",
        "| shape | M x K x N | FP16 ms | FP16 TFLOP/s | INT8 ms | INT8 / FP16 speed |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        lines.append(f"| {r['shape']} | {r['m']} x {r['k']} x {r['n']} | {r['fp16_ms']:.4f} | {r['fp16_tflops']} | {r['int8_ms']:.4f} | {r['int8_vs_fp16']}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args(argv)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "gpu": _gpu_facts(), "versions": _versions(), "warmup": args.warmup, "iters": args.iters, "rows": measure(args.warmup, args.iters)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemm-anchor.json").write_text(json.dumps(doc, indent=1))
    (args.out / "gemm-anchor.md").write_text(to_markdown(doc))
    print(to_markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
