"""The report's pure maths: curves over seeds, summaries of final scores, tokens to a target."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

NAN = float("nan")
CONFIDENCE = 0.95
AXIS_NAMES = {"problems_seen": "problems seen", "generated_tokens": "generated tokens", "flops": "FLOPs",
          "wall_seconds": "train seconds"}


def tokens_to_target(points, target: float) -> float | None:
    """The x (tokens, FLOPs...) of the first ``(x, accuracy)`` point whose accuracy reaches
    ``target``; None when none does. ``points`` are in eval order."""
    return next((x for x, acc in points if acc is not None and acc >= target - 1e-12), None)


def eval_step(row: dict):
    """The optimiser step of a logged row: ``step`` in metrics.csv, ``trainer/global_step`` in W&B."""
    return row.get("step", row.get("trainer/global_step"))


def trained(row: dict) -> bool:
    """True for an eval taken after training started: its step (``step`` in metrics.csv,
    ``trainer/global_step`` in W&B) is > 0, or, without a step, its problems seen are. The eval
    before training (step 0) measures the base model, not what a method's tokens bought."""
    step = eval_step(row)
    return (step if step is not None else row.get("train/problems_seen") or 0) > 0


def t_halfwidth(std, n: int, level: float = CONFIDENCE):
    """Half-width of the ``level`` Student-t confidence interval of a mean of ``n`` values with
    sample standard deviation ``std`` (ddof 1); NaN below 2 values."""
    return NAN if n < 2 else stats.t.ppf(0.5 + level / 2, n - 1) * np.asarray(std) / math.sqrt(n)


def summarize(values) -> dict:
    """mean, std (sample, ddof 1), ci (half-width of the 95% t-interval of the mean), min, max and n
    of the finite values; NaNs when there are none (std and ci: below 2 values)."""
    array = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(array):
        return {"mean": NAN, "std": NAN, "ci": NAN, "min": NAN, "max": NAN, "n": 0}
    std = array.std(ddof=1) if len(array) > 1 else NAN
    return {"mean": array.mean(), "std": std, "ci": float(t_halfwidth(std, len(array))), "min": array.min(),
            "max": array.max(), "n": len(array)}


def mean_curve(curves):
    """Mean and its 95% confidence band (mean -+ t half-width over curves; the mean itself for one
    curve) of curves ``[(xs, ys), ...]`` sampled at different x: linearly interpolated on the union
    of their x values within the range all of them cover. Returns ``(x, mean, low, high)``."""
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x)]
    if len(curves) == 1:
        return curves[0][0], curves[0][1], curves[0][1], curves[0][1]
    low, high = max(x.min() for x, _ in curves), min(x.max() for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= low) & (grid <= high)] if low <= high else grid
    stack = np.stack([np.interp(grid, x, y) for x, y in curves])
    mean, half = stack.mean(0), t_halfwidth(stack.std(0, ddof=1), len(curves))
    return grid, mean, mean - half, mean + half


def best_on_validation(evals: list[dict]) -> float | None:
    """Early stopping chosen on validation, scored on eval: ``eval/accuracy`` at the first eval whose
    ``val/accuracy`` is the run's highest; None for a run that did not score both splits."""
    scored = [row for row in evals if row.get("val/accuracy") is not None and row.get("eval/accuracy") is not None]
    if not scored:
        return None
    best = max(row["val/accuracy"] for row in scored)
    return next(row["eval/accuracy"] for row in scored if row["val/accuracy"] >= best)


COLLAPSE_DROP = 0.2  # final eval accuracy this far below the run's best marks a collapse


def collapse(evals: list[dict], figures: list[tuple[str, int]], drop: float = COLLAPSE_DROP) -> dict | None:
    """A run whose final ``eval/accuracy`` ends at least ``drop`` below its best: ``{best, best_step,
    final, dropped_step, first_moved, moved_step}``; None otherwise. The drop happens at the first eval
    after the best at or below half-way from best to final. ``figures`` are ``(name, direction)`` pairs,
    the direction in which a figure worsens (+1: rises, as a drift; -1: falls, as a hint accuracy). A
    figure that ends worse than it started moves at the first eval where it has covered a quarter of that
    change; ``first_moved`` is the earliest to move at or before the drop (ties: the order of ``figures``;
    None: none did). A figure that improves (a student's entropy falling as it learns) never moves."""
    rows = [row for row in evals if row.get("eval/accuracy") is not None]
    if len(rows) < 2:
        return None
    at_best = max(range(len(rows)), key=lambda i: (rows[i]["eval/accuracy"], -i))
    best, final = rows[at_best]["eval/accuracy"], rows[-1]["eval/accuracy"]
    if final > best - drop:
        return None
    dropped = next(row for row in rows[at_best + 1:] if row["eval/accuracy"] <= best - (best - final) / 2)
    moved = []
    for order, (name, direction) in enumerate(figures):
        start, end = rows[0].get(name), rows[-1].get(name)
        if start is None or end is None or not math.isfinite(start) or not math.isfinite(end):
            continue
        worse = (end - start) * direction
        if worse <= 0:
            continue
        step = next(eval_step(row) for row in rows[1:]
                    if row.get(name) is not None and (row[name] - start) * direction >= worse / 4)
        if step <= eval_step(dropped):
            moved.append((step, order, name))
    first = min(moved, default=None)
    return {"best": best, "best_step": eval_step(rows[at_best]), "final": final, "dropped_step": eval_step(dropped),
            "first_moved": first[2] if first else None, "moved_step": first[0] if first else None}
