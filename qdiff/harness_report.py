"""harness.md: the evaluation harness's result as tables a person reads.

One table of every candidate's metrics (mean [95% interval], then the per-seed-set means), one
of the paired differences to the baseline, where a difference whose interval excludes 0 is in
bold and says better/worse. Two intervals that overlap can still give a significant paired
difference (the shared noise cancels in the pair), which is why the second table exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qdiff.eval_harness import HarnessResult


def _fmt(value: float, metric: str) -> str:
    if metric == "step_rel_l2":
        return f"{value:.4f}"
    if metric in ("ssim", "class_accuracy"):
        return f"{value:.3f}"
    return f"{value:.2f}"


def _cell(stat: dict[str, Any] | None, metric: str) -> str:
    if not stat:
        return "-"
    lo, hi = stat["ci95"]
    per_set = " / ".join(_fmt(v, metric) for v in stat.get("per_seed_set", []))
    return f"{_fmt(stat['mean'], metric)} [{_fmt(lo, metric)}, {_fmt(hi, metric)}]" + (f" <br><sub>{per_set}</sub>" if len(stat.get("per_seed_set", [])) > 1 else "")


def _diff_cell(d: dict[str, Any] | None, metric: str) -> str:
    from qdiff.eval_harness import HIGHER_IS_BETTER

    if not d:
        return "-"
    lo, hi = d["ci95"]
    text = f"{d['diff']:+.4g} [{lo:+.4g}, {hi:+.4g}]"
    if not d["significant"]:
        return text
    better = (d["diff"] > 0) == HIGHER_IS_BETTER[metric]
    return f"**{text}** {'better' if better else 'worse'}"


def harness_markdown(result: HarnessResult) -> str:
    from qdiff.eval_harness import METRIC_TITLES, METRICS

    s = result.settings
    metrics = [m for m in METRICS if any(m in r["metrics"] for r in result.rows.values())]
    env = result.environment
    lines = [
        f"# Evaluation harness: {result.model.get('label')}",
        "",
        *([] if result.complete else ["**Partial: the run stopped before every candidate was evaluated; the rows below are the ones it finished.**", ""]),
        f"- {s['seed_sets']} seed sets x {s['images']} images (seeds {s['seed_offset']}..{s['seed_offset'] + s['seed_sets'] * s['images'] - 1}), "
        f"{s['steps']} {s['scheduler']} steps, guidance {s['guidance_scale']} (conditional models only); step rel-L2 on the FP32 trajectory of the first {s['step_images']} images of each set.",
        f"- Device {env.get('device')}{' (' + env['gpu'] + ')' if env.get('gpu') else ''}, torch {env.get('torch')}; {result.seconds} s.",
        f"- [a, b] = bootstrap 95% interval ({s['bootstrap']} replicates, images resampled within each seed set); small numbers below = per-seed-set means. "
        f"PSNR of identical images counts as 100 dB.",
    ]
    fp = result.fp32
    if "shape_fd" in fp:
        lines.append(f"- FP32: shape-FD {_cell(fp['shape_fd'], 'shape_fd').split(' <br>')[0]} at n = {fp['n']} per set; real-vs-real floor at the same n {fp['real_floor_shape_fd']:.2f}"
                     + (f"; class accuracy {_cell(fp['class_accuracy'], 'class_accuracy').split(' <br>')[0]}" if "class_accuracy" in fp else "") + ".")
    elif fp.get("shape_fd_note"):
        lines.append(f"- {fp['shape_fd_note']}.")
    for label, why in result.failed.items():
        lines.append(f"- **{label} failed**: {why}")
    lines += ["", "## Metrics", "", "| candidate | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " | s |", "|---" * (len(metrics) + 2) + "|"]
    for label, row in result.rows.items():
        lines.append(f"| {label} | " + " | ".join(_cell(row["metrics"].get(m), m) for m in metrics) + f" | {row['seconds']} |")
    if result.comparisons:
        lines += [
            "",
            f"## Difference to {result.baseline} (candidate - baseline, paired bootstrap)",
            "",
            "Bold: the 95% interval of the difference excludes 0 (the difference is outside the noise), with which way it goes.",
            "",
            "| candidate | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " |",
            "|---" * (len(metrics) + 1) + "|",
        ]
        for label, comp in result.comparisons.items():
            lines.append(f"| {label} | " + " | ".join(_diff_cell(comp.get(m), m) for m in metrics) + " |")
    lines += ["", "![metrics](harness-metrics.png)", "", "![step error](harness-steps.png)", ""]
    return "\n".join(lines)
