"""Figures for the reports: noise-prediction error per step, and the calibration statistics
that motivate Q-Diffusion's two techniques.

- `plot_step_errors`: relative L2 of the quantized noise prediction vs timestep (one line per
  variant), to see where along the trajectory quantization hurts.
- `plot_branch_histograms`: activation histograms of the two halves of split-shortcut layers
  (a = deep features, b = skip) at a few timesteps; different ranges in one tensor are what a
  single INT8 scale handles badly and split-shortcut quantization fixes.
- `plot_amax_vs_timestep`: input range (amax) vs timestep of the layers whose range moves most;
  a range that moves is why calibration samples the whole trajectory (timestep-uniform).
- `plot_tdac`: the calibration samples TDAC gave each step, with the density, diversity and
  weight behind them (`calib.tdac`).
- `plot_group_sensitivity`: per-step error with only one layer group quantized, and with all
  but that group (`calib.sensitivity`).

Matplotlib is used through its object API on the Agg canvas (`Figure` + `FigureCanvasAgg`), not
through `pyplot`: no global backend switch, no GUI, safe on headless machines and in threads.
Every PNG is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qdiff.core.artifacts import atomic_path
from qdiff.calib.timestep_stats import TimestepStats

DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _short(name: str) -> str:
    """`up_blocks.1.resnets.2.conv_shortcut` -> `up1.res2.conv_shortcut` (legends stay narrow)."""
    for long, short in (("up_blocks.", "up"), ("down_blocks.", "down"), ("mid_block.", "mid."), ("resnets.", "res"), ("attentions.", "attn"), ("transformer_blocks.", "tb")):
        name = name.replace(long, short)
    return name


def plot_step_errors(series: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "noise-prediction error per step") -> Path:
    """Relative L2 of the noise prediction vs timestep, one line per entry of `series`
    (rows as `qdiff.runtime.sampler.step_errors` returns them). Timestep decreases left to right, as sampling runs."""
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for label, rows in series.items():
        t = [r["timestep"] for r in rows]
        err = [max(r["rel_l2"], 1e-8) for r in rows]
        ax.plot(t, err, marker="o", markersize=2.5, linewidth=1.2, label=label)
    ax.set_xlabel("timestep")
    ax.set_ylabel("relative L2 of eps (quantized vs FP32)")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _pick_steps(n: int, count: int) -> list[int]:
    return sorted(set(np.round(np.linspace(0, n - 1, min(count, n))).astype(int).tolist()))


def _branch_ratio(stats: TimestepStats, p: int) -> float:
    a, b = stats.branch_amax[p, 0].max(), stats.branch_amax[p, 1].max()
    return float(max(a, b) / max(min(a, b), 1e-12))


def plot_branch_histograms(stats: TimestepStats, path: str | Path, max_layers: int = 4, timesteps: int = 3) -> Path | None:
    """Histograms of branch a (deep) and b (skip) of the split-shortcut layers whose branch
    ranges differ most, at the first, middle and last calibration timesteps. None without
    split-shortcut layers."""
    if not stats.split_layers or len(stats.step_indices) == 0:
        return None
    layers = sorted(range(len(stats.split_layers)), key=lambda p: -_branch_ratio(stats, p))[:max_layers]
    cols = _pick_steps(len(stats.step_indices), timesteps)
    fig = _figure(3.2 * len(cols), 2.3 * len(layers))
    for r, p in enumerate(layers):
        edges = stats.branch_edges[p]
        centers = (edges[1:] + edges[:-1]) / 2
        for c, s in enumerate(cols):
            ax = fig.add_subplot(len(layers), len(cols), r * len(cols) + c + 1)
            for b, (name, color) in enumerate((("a: deep", "tab:blue"), ("b: skip", "tab:orange"))):
                density = np.maximum(stats.branch_hist[p, b, s], 1e-6)
                ax.fill_between(centers, 1e-6, density, step="mid", alpha=0.45, color=color, label=f"{name} (amax {stats.branch_amax[p, b, s]:.3g})")
            ax.set_yscale("log")
            ax.set_ylim(bottom=1e-4)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=5.5, loc="upper right")
            if r == 0:
                ax.set_title(f"t = {stats.timesteps[s]:g}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{_short(stats.split_layers[p])}\nrange ratio {_branch_ratio(stats, p):.1f}x", fontsize=6.5)
    fig.suptitle("split-shortcut layers: activation histograms of the two concat branches", fontsize=9)
    return save_figure(fig, path)


def _variation(series: np.ndarray) -> float:
    positive = series[series > 0]
    return float(positive.max() / positive.min()) if positive.size else 0.0


def plot_amax_vs_timestep(stats: TimestepStats, path: str | Path, max_layers: int = 6) -> Path | None:
    """Input amax vs timestep of the `max_layers` layers whose range changes most over the
    trajectory (max/min ratio). None without statistics."""
    if not stats.layers or len(stats.step_indices) == 0:
        return None
    # Layers fed by the same tensor (every resnet's time_emb_proj sees silu(temb)) have the same
    # curve: draw it once and say how many share it.
    groups: dict[tuple, list[int]] = {}
    for i in sorted(range(len(stats.layers)), key=lambda i: -_variation(stats.amax[i])):
        groups.setdefault(tuple(np.round(stats.amax[i], 6).tolist()), []).append(i)
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for members in list(groups.values())[:max_layers]:
        i = members[0]
        shared = f", +{len(members) - 1} with the same input" if len(members) > 1 else ""
        ax.plot(stats.timesteps, stats.amax[i], marker="o", markersize=2.5, linewidth=1.2, label=f"{_short(stats.layers[i])} ({_variation(stats.amax[i]):.1f}x{shared})")
    ax.set_xlabel("timestep")
    ax.set_ylabel("input amax at this timestep")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5)
    ax.set_title("activation range vs timestep (layers that move most; max/min in brackets)", fontsize=9)
    return save_figure(fig, path)


def plot_tdac(tdac: dict[str, Any], path: str | Path) -> Path:
    """TDAC's samples per step (bars), over its normalised density, diversity and weight
    (`calib.tdac.TdacResult.to_json()`), against timestep as sampling runs."""
    t = np.asarray(tdac["timesteps"], dtype=float)
    counts = np.asarray(tdac["counts"], dtype=float)

    def norm(v) -> np.ndarray:
        v = np.asarray(v, dtype=float)
        span = v.max() - v.min()
        return (v - v.min()) / span if span > 0 else np.zeros_like(v)

    fig = _figure(6.4, 5.0)
    top = fig.add_subplot(2, 1, 1)
    width = float(np.median(np.abs(np.diff(t)))) * 0.85 if len(t) > 1 else 1.0
    top.bar(t, counts, width=width, color="tab:blue", alpha=0.8, label=f"TDAC ({int(counts.sum())} samples)")
    top.axhline(counts.sum() / len(counts), color="0.3", linestyle="--", linewidth=1, label="same budget spread evenly")
    top.set_ylabel("calibration samples")
    top.invert_xaxis()
    top.grid(True, alpha=0.3)
    top.legend(fontsize=7)
    top.set_title(f"TDAC: samples per step (lambda {tdac['lam']:g}, r {tdac['r']:.3g} = MSE quantile {tdac['r_quantile']:.2f}, {tdac['r_rule']})", fontsize=8.5)
    bottom = fig.add_subplot(2, 1, 2, sharex=top)
    bottom.plot(t, norm(tdac["density"]), label="density (normalised)", linewidth=1.2)
    bottom.plot(t, norm(tdac["diversity"]), label="diversity (normalised)", linewidth=1.2)
    bottom.plot(t, np.asarray(tdac["weights"]) / max(max(tdac["weights"]), 1e-12), label="weight (/ max)", linewidth=1.5, color="k")
    bottom.set_xlabel("timestep")
    bottom.set_ylabel("score")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=7)
    return save_figure(fig, path)


def plot_group_sensitivity(rows: list[dict[str, Any]], path: str | Path, title: str = "per-step error by layer group") -> Path:
    """Horizontal bars per layer group: mean step rel-L2 with only that group quantized, and
    with everything but that group (rows as `calib.sensitivity.group_sensitivity` returns)."""
    fig = _figure(6.4, 0.9 + 0.32 * len(rows))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(rows))
    only = [max(r["only"], 1e-8) if r.get("only") is not None else np.nan for r in rows]
    others = [max(r["all_but"], 1e-8) if r.get("all_but") is not None else np.nan for r in rows]
    ax.barh(y - 0.2, only, height=0.4, label="only this group quantized", color="tab:orange")
    ax.barh(y + 0.2, others, height=0.4, label="all but this group quantized", color="tab:blue")
    ax.set_yticks(y, [f"{r['group']} ({r['layers']})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("mean relative L2 of eps per step (vs FP32)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def calibration_figures(stats_path: str | Path, out_dir: str | Path, provenance: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """The calibration plots from a `calibration.stats.npz` into `out_dir`, as report figure
    entries ({title, path, caption}); a plot without data is left out. With the table's
    `provenance` from a TDAC calibration, its samples-per-step plot too."""
    stats = TimestepStats.load(stats_path)
    out_dir = Path(out_dir)
    figures = []
    if provenance and provenance.get("tdac"):
        tdac = plot_tdac(provenance["tdac"], out_dir / "calib-tdac-samples.png")
        figures.append({"title": "TDAC samples per step", "path": tdac.name, "caption": "EDA-DM's temporal distribution alignment: calibration samples each step got, from the density and diversity of its mid-block attention input (calib.tdac)."})
    amax = plot_amax_vs_timestep(stats, out_dir / "calib-amax-vs-timestep.png")
    if amax is not None:
        figures.append({"title": "Activation range vs timestep", "path": amax.name, "caption": "Input amax of the layers whose range moves most along the trajectory, at each calibration timestep: why calibration samples the whole trajectory."})
    hist = plot_branch_histograms(stats, out_dir / "calib-shortcut-histograms.png")
    if hist is not None:
        figures.append({"title": "Split-shortcut branches", "path": hist.name, "caption": "Activation histograms of the deep (a) and skip (b) halves of skip-concat convolutions: why each half gets its own scale."})
    return figures


def plot_metric_intervals(result: Any, path: str | Path) -> Path:
    """One panel per harness metric: each candidate's mean as a dot, its bootstrap 95% interval
    as a bar (FP32's shape-FD and the real-vs-real floor as lines), so which candidates overlap
    is seen at a glance. `result` is a `qdiff.eval_harness.HarnessResult`."""
    from qdiff.eval_harness import METRIC_TITLES, METRICS

    labels = list(result.rows)
    metrics = [m for m in METRICS if any(m in r["metrics"] for r in result.rows.values())]
    fig = _figure(2.6 * len(metrics), 1.4 + 0.32 * len(labels))
    y = np.arange(len(labels))[::-1]
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for yi, label in zip(y, labels):
            stat = result.rows[label]["metrics"].get(metric)
            if stat is None:
                continue
            lo, hi = stat["ci95"]
            color = "tab:red" if label == result.baseline else "tab:blue"
            ax.errorbar([stat["mean"]], [yi], xerr=[[max(stat["mean"] - lo, 0.0)], [max(hi - stat["mean"], 0.0)]], fmt="o", markersize=3.5, capsize=3, color=color)
        if metric == "shape_fd" and "shape_fd" in result.fp32:
            ax.axvline(result.fp32["shape_fd"]["mean"], color="0.3", linestyle="--", linewidth=0.9, label="fp32")
            ax.axvline(result.fp32["real_floor_shape_fd"], color="tab:green", linestyle=":", linewidth=0.9, label="real floor")
            ax.legend(fontsize=6)
        ax.set_yticks(y)
        ax.set_yticklabels(labels if k == 0 else [""] * len(labels), fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(METRIC_TITLES[metric], fontsize=8.5)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"mean and 95% interval per candidate (baseline {result.baseline} in red)", fontsize=9, y=1.06)
    return save_figure(fig, path)
