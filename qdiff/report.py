"""Reports a person reads: image grids, and JSON + Markdown summaries of a quantized model's
quality against FP32 from the same seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from qdiff.core.artifacts import atomic_path, write_json_atomic, write_text_atomic


def image_grid(rows: list[list[np.ndarray]], labels: list[str] | None = None, scale: int = 1, pad: int = 2) -> Image.Image:
    """Rows of HWC uint8 images in one picture, with an optional label at the left of each row."""
    h, w = rows[0][0].shape[:2]
    h, w = h * scale, w * scale
    label_w = 8 * max((len(label) for label in labels), default=0) + 6 if labels else 0
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = pad + r * (h + pad)
        if labels:
            draw.text((3, y + h // 2 - 5), labels[r], fill=(0, 0, 0))
        for c, img in enumerate(row):
            tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
            grid.paste(tile, (label_w + pad + c * (w + pad), y))
    return grid


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_quality_report(out_dir: Path, report: dict[str, Any], name: str = "report") -> tuple[Path, Path]:
    """`<name>.json` and `<name>.md` from the dict that `qdiff.api.run` or `qdiff.evaluate` builds.

    Optional parts appear when present: `recipe`, `figures` (PNG files beside the report),
    `shape_fd`, `coverage_text`.
    """
    json_path = out_dir / f"{name}.json"
    write_json_atomic(json_path, json.loads(json.dumps(report, default=float)))
    s = report["summary"]
    sampling = report["sampling"]
    title = report.get("title") or f"qdiff report: {report['model']['label']} ({report['recipe']['name']})"
    grid = report.get("artifacts", {}).get("grid", "grid.png")
    md = [
        f"# {title}",
        "",
        f"Model: `{report['model']['path']}` ({report['model']['unet_class']}, sha256 {report['model']['sha256'][:12]}).",
        f"Sampler: {sampling['scheduler']}, {sampling['steps']} steps, "
        f"{sampling['num_images']} images from seeds {sampling['seeds'][0]}..{sampling['seeds'][-1]}"
        + (f", guidance {sampling['guidance_scale']}" if sampling.get("guidance_scale", 1.0) != 1.0 else "")
        + ".",
    ]
    md += ["", *_setup_lines(report)]
    if "graphs" in report:
        md += ["", f"Graphs: FP32 `{report['graphs']['fp32']}`, quantized `{report['graphs']['quantized']}`."]
    md += [
        "",
        f"![FP32 (top) vs quantized (bottom)]({grid})",
        "",
        "## Summary",
        "",
        markdown_table(["metric", "value"], [[k, v] for k, v in s.items()]),
        "",
    ]
    if "shape_fd" in report:
        md += ["## Distribution: shape-FD to the dataset", "", _shape_fd_text(report["shape_fd"]), ""]
    md += [
        "## Per image: quantized vs FP32",
        "",
        markdown_table(["seed", "PSNR (dB)", "SSIM"], [[r["seed"], r["psnr"], r["ssim"]] for r in report["images"]]),
        "",
        "## Noise-prediction error per denoising step",
        "",
        "Both models see the same inputs (the FP32 trajectory); relative L2 = ||eps_q - eps_fp32|| / ||eps_fp32||.",
        "",
        markdown_table(["step", "timestep", "relative L2", "cosine"], [[r["step"], r["timestep"], r["rel_l2"], r["cosine"]] for r in report["steps"]]),
        "",
    ]
    if report.get("figures"):
        md += ["## Figures", ""]
        for fig in report["figures"]:
            md += [f"### {fig['title']}", ""] + ([fig["caption"], ""] if fig.get("caption") else []) + [f"![{fig['title']}]({fig['path']})", ""]
    if "coverage_text" in report:
        md += ["## Quantization coverage", "", report["coverage_text"], ""]
    md_path = out_dir / f"{name}.md"
    write_text_atomic(md_path, "\n".join(md))
    return json_path, md_path


def recipe_line(recipe: dict[str, Any]) -> str:
    """The settings that change a quantized model's numbers, in one sentence."""
    window = recipe.get("timestep_window", (0.0, 1.0))
    window_text = "" if list(window) == [0.0, 1.0] else f" (window {window[0]:g}-{window[1]:g} of the trajectory)"
    calibrator = recipe["activation_calibrator"] + (f" {recipe['percentile']:g}" if recipe["activation_calibrator"] == "percentile" else "")
    return (
        f"Recipe: {recipe['name']} (W{recipe['weight_bits']}A{recipe['activation_bits']}), activation calibrator {calibrator}, "
        f"weight calibrator {recipe.get('weight_calibrator', 'max')}; {recipe['num_timesteps']} timesteps x {recipe['samples_per_timestep']} samples "
        f"from a {recipe['calibration_steps']}-step {recipe['scheduler']} trajectory{window_text}; "
        f"split shortcut {'on' if recipe.get('split_shortcut') else 'off'}, split conv1 {'on' if recipe.get('split_conv1') else 'off'}."
    )


def _setup_lines(report: dict[str, Any]) -> list[str]:
    """Recipe, backend with its arithmetic, conditioning and what the arrays are: how to read the numbers."""
    sampling = report["sampling"]
    lines = []
    if "recipe" in report:
        lines += [recipe_line(report["recipe"]), ""]
    backend = sampling.get("backend", "unknown")
    if sampling.get("providers"):
        backend += f" ({sampling['providers']})"
    if sampling.get("arithmetic"):
        backend += f"; arithmetic {sampling['arithmetic']}"
    lines += [f"Backend: {backend}.", "", f"Conditioning: {sampling.get('conditioning', 'none')}."]
    output = report["model"].get("output")
    if output:
        lines += ["", f"Samples: {output}."]
    return lines


def _shape_fd_text(fd: dict[str, Any]) -> str:
    if not fd.get("available"):
        return f"Skipped: {fd.get('reason', 'not computed')}."
    n = fd["n_generated"]
    lines = [
        "Frechet distance between the shapes classifier's features of the samples and of "
        f"{fd['n_real']} real test images (lower is closer to the data). Biased upward at small n: "
        f"compare with real images at the same n ({n}), the floor a perfect model would reach.",
        "",
        markdown_table(["samples", "shape-FD"], [["FP32", fd["fp32"]], ["quantized", fd["quantized"]], [f"real train images, the floor at n={n}", fd["real_reference"]]]),
    ]
    below = [name for name in ("fp32", "quantized") if fd[name] < fd["real_reference"]]
    if below:
        lines += ["", f"Noise at this n: {' and '.join('FP32' if b == 'fp32' else 'quantized' for b in below)} below the real-vs-real floor "
                      f"({fd['real_reference']:.4g} at n={n}), so shape-FD cannot rank them here; use more images."]
    return "\n".join(lines)


def coverage_text(coverage: dict[str, Any]) -> str:
    """The quantize report's coverage as the run report prints it: counts, then each float layer and why."""
    lines = [f"{coverage['quantized_layers']} of {coverage['weighted_layers']} weighted layers quantized ({coverage['mac_share']:.1%} of their MACs).", ""]
    for layer in coverage["float_layers"]:
        lines.append(f"- float: `{layer['module']}` ({layer['op']}): {layer['reason']}")
    return "\n".join(lines)
