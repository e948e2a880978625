"""PNG plots of a sweep report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sdharness.report.curves import mean_curve  # noqa: E402
from sdharness.report.runs import aggregation_parameter  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _legend(ax) -> None:
    """Inside the axes for a few lines; beside them for more, where it would hide the curves."""
    handles = ax.get_legend_handles_labels()[0]
    if len(handles) > 4:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif handles:
        ax.legend(fontsize="small")


def _colors(count: int) -> list:
    """One distinct colour per line: matplotlib's 10-colour cycle repeats from the 11th line on."""
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


def _draw(ax, groups: dict, axis: str, key: str, colors: list, bounded: bool) -> None:
    """One line per label of ``key`` against ``train/<axis>`` (mean over seeds) and its 95% band;
    ``bounded``: the band clipped to [0, 1] (a t-interval over a few seeds that disagree reaches past it)."""
    for (label, runs), color in zip(groups.items(), colors):
        curves = []
        for run in runs:
            points = [(r.get(f"train/{axis}"), r.get(key)) for r in run.evals]
            points = [(x, y) for x, y in points if x is not None and y is not None and math.isfinite(y)]
            curves.append(([x for x, _ in points], [y for _, y in points]))
        curves = [c for c in curves if c[0]]
        if not curves:
            continue
        x, mean, low, high = mean_curve(curves)
        ax.plot(x, mean, marker="o", markersize=3, color=color, label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(x, *((np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)) if bounded else (low, high)),
                            color=color, alpha=0.15)


def plot_curves(groups: dict, axis: str, axis_name: str, path: Path, target: float | None = None) -> Path:
    """Eval accuracy against ``train/<axis>``: one line per label (mean over seeds), its 95%
    confidence band over seeds; the tokens-to-target accuracy as a dotted line."""
    fig, ax = plt.subplots(figsize=(7 if len(groups) <= 4 else 11, 4.5))
    _draw(ax, groups, axis, "eval/accuracy", _colors(len(groups)), bounded=True)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
    ax.set(xlabel=axis_name, ylabel="eval accuracy", title=f"Eval accuracy vs {axis_name} (mean, 95% CI over seeds)")
    if axis == "flops":
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def plot_health(groups: dict, figures: list[tuple[str, str]], path: Path) -> Path:
    """One panel per ``(key, name)`` of ``figures`` (accuracy, then the teacher's health) against problems
    seen, every label in each (mean over seeds, 95% band); the legend beside the last panel."""
    columns = min(3, len(figures))
    rows = math.ceil(len(figures) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns + 3, 3.4 * rows), squeeze=False)
    colors = _colors(len(groups))
    for ax, (key, name) in zip(axes.flat, figures):
        _draw(ax, groups, "problems_seen", key, colors, bounded="accuracy" in key)
        ax.set(xlabel="problems seen", title=name)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(figures):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize="small", loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 2.8 / (5 * columns + 3), 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_parameter(groups: dict, scores: dict, path: Path) -> Path:
    """Final accuracy (mean, 95% confidence bars over seeds) against the aggregation's parameter (``tau``,
    ``kl_bound``), one line per sd aggregation (plus any other differing setting); runs without one (sft,
    grpo, sd/teacher) as dashed horizontal lines."""
    lines: dict[str, list[tuple[float, dict]]] = {}
    flat = {}
    for label, runs in groups.items():
        config, acc = runs[0].config, scores[label]["eval/accuracy"]
        parameter = aggregation_parameter(config) if config.get("algo.name") == "sd" else None
        if parameter is not None:
            name, value = parameter[0], float(parameter[1])
            lines.setdefault(label.replace(f"/{name}={value:g}", f" ({name})"), []).append((value, acc))
        else:
            flat[label] = acc
    colors = _colors(len(lines) + len(flat))
    fig, ax = plt.subplots(figsize=(7 if len(colors) <= 4 else 11, 4.5))
    for i, (name, points) in enumerate(lines.items()):
        points.sort(key=lambda p: p[0])
        means = [a["mean"] for _, a in points]
        errors = [[a["ci"] if math.isfinite(a["ci"]) else 0.0 for _, a in points]] * 2
        ax.errorbar([t for t, _ in points], means, yerr=errors, marker="o", capsize=3, label=name, color=colors[i])
    for i, (label, acc) in enumerate(flat.items(), start=len(lines)):
        ax.axhline(acc["mean"], linestyle="--", linewidth=1, label=label, color=colors[i])
    values = sorted({t for points in lines.values() for t, _ in points})
    if values and values[0] > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [f"{t:g}" for t in values])
    if not lines:
        ax.text(0.5, 0.5, "no sd run with an aggregation parameter", transform=ax.transAxes, ha="center")
    ax.set(xlabel="tau (temperature) or kl_bound (nats), as each line names", ylabel="final eval accuracy",
           title="Final accuracy vs the aggregation's parameter (mean, 95% CI over seeds)")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)
