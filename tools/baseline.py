"""The W8A8 baseline reports in docs/baseline/: `qdiff run` on the two shipped models, copied
with the files they link.

For each model (`shapes-ddpm`, `shapes-cond` at guidance 3.0) and each split-shortcut setting
it runs `qdiff.api.run` with the defaults of `qdiff run` (W8A8 preset, mse calibrator,
timestep-uniform calibration, 8 images, 50 DDIM steps) into `<work>/<name>/`, then copies the
report and every figure it links into docs/baseline/ under one prefix:

- `w8a8-<model>.*`: split shortcut off, the baseline later work must beat (`--no-split-shortcut`);
- `w8a8-<model>-split.*`: split shortcut on, the presets' default.

    .venv/bin/python tools/baseline.py            # both models, both settings
    .venv/bin/python tools/baseline.py --force    # redo every stage instead of reusing artifacts

Each is the same as, e.g., `qdiff run qdiff/models/shapes-cond -o DIR --no-split-shortcut`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qdiff.api import run  # noqa: E402
from qdiff.core.artifacts import write_json_atomic, write_text_atomic  # noqa: E402
from qdiff.models import PACKAGE_MODELS  # noqa: E402

MODELS = ("shapes-ddpm", "shapes-cond")
VARIANTS = {"": False, "-split": True}  # file suffix -> split_shortcut


def publish(run_dir: Path, out: Path, prefix: str) -> list[Path]:
    """report.md/.json and the files report.md links, renamed `<prefix>.md`, `<prefix>-<file>`;
    the grid becomes `<prefix>.png` (the name the README has always linked)."""
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    grid = report["artifacts"]["grid"]
    linked = sorted(set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)))
    renamed = {name: f"{prefix}.png" if name == grid else f"{prefix}-{name}" for name in linked}
    written = []
    for name, new in renamed.items():
        shutil.copyfile(run_dir / name, out / new)
        md = md.replace(f"]({name})", f"]({new})")
        written.append(out / new)
    # Paths relative to the repository, so the report reads the same on any machine.
    md = md.replace(f"`{ROOT}/", "`")
    report["model"]["path"] = str(Path(report["model"]["path"]).resolve().relative_to(ROOT)) if Path(report["model"]["path"]).resolve().is_relative_to(ROOT) else report["model"]["path"]
    report["artifacts"] = {k: renamed.get(v, v) for k, v in report["artifacts"].items()}
    for fig in report.get("figures", []):
        fig["path"] = renamed.get(fig["path"], fig["path"])
    write_text_atomic(out / f"{prefix}.md", md)
    write_json_atomic(out / f"{prefix}.json", report)
    return [out / f"{prefix}.md", out / f"{prefix}.json", *written]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--work", type=Path, default=ROOT / "out" / "baseline", help="run folders (artifacts are reused when up to date)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "baseline")
    p.add_argument("--force", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        for suffix, split in VARIANTS.items():
            name = f"w8a8-{model}{suffix}"
            result = run(PACKAGE_MODELS / model, args.work / name, recipe="w8a8", split_shortcut=split, force=args.force)
            files = publish(result.out_dir, args.out, name)
            s = result.report["summary"]
            print(f"{name}: PSNR {s['mean PSNR (dB)']:.2f} dB, SSIM {s['mean SSIM']:.3f}, step rel-L2 {s['mean step rel-L2 (eps)']:.4f} -> {', '.join(f.name for f in files)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
