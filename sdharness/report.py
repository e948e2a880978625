"""Report of a sweep from its local files: curves, final scores, tokens-to-target, config diffs.

    sdharness-report multirun/2026-01-01/12-00-00                # -> <that dir>/report/report.md
    sdharness-report outputs/2026-01-01/12-00-00 --target-accuracy 0.4 --out /tmp/report
    sdharness-report --wandb-group methods --wandb-project sdharness --out report-methods   # from W&B (online)

A run is a directory with ``.hydra/config.yaml`` and ``metrics.csv``; runs that differ only in
``seed`` are one line (mean, and min-max band, over seeds). Failed jobs (``FAILED.json``, see
``sdharness.jobs``) are listed with their error. The local report never touches the network.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from sdharness.jobs import FAILED_FILE, end_wandb_run, read_failure, write_failure

NAN = float("nan")
X_AXES = {"problems_seen": "problems seen", "generated_tokens": "generated tokens", "flops": "FLOPs",
          "wall_seconds": "train seconds"}
SCORES = [("eval/accuracy", "accuracy", ".3f"), ("eval/early_answer_rate", "early answer", ".3f"),
          ("eval/leakage_rate", "leakage", ".3f"), ("eval/completion_length", "length", ".1f"),
          ("train/problems_seen", "problems", ",.0f"), ("train/generated_tokens", "gen. tokens", ",.0f"),
          ("train/flops", "FLOPs", ".3g"), ("train/wall_seconds", "seconds", ".1f")]
METHOD_KEYS = ("algo.name", "aggregation.name", "aggregation.tau")
NOT_IN_LABEL = {"seed", "tags", "output_dir", "ckpt_path", *METHOD_KEYS}
UNUSED_TAU = ("teacher", "entropy_matched")  # aggregations whose tau is ignored


@dataclass
class Run:
    name: str
    config: dict  # flattened: "optim.lr" -> value
    rows: list[dict] = field(default_factory=list)  # metrics.csv rows, numbers (or None)
    failure: dict | None = None
    finished: bool = True  # wrote its final model (local) / state "finished" (W&B)
    overrides: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def evals(self) -> list[dict]:
        return [row for row in self.rows if row.get("eval/accuracy") is not None]

    @property
    def status(self) -> str:
        return "failed" if self.failure else "completed" if self.finished and self.evals else "incomplete"

    def final(self) -> dict:
        """The last eval row, plus the last value of any ``lmeval/*`` column."""
        final = {k: v for k, v in self.evals[-1].items() if v is not None} if self.evals else {}
        for row in self.rows:
            final.update({k: v for k, v in row.items() if k.startswith("lmeval/") and v is not None})
        return final


# ---------------------------------------------------------------- pure maths
def number(text) -> float | None:
    try:
        return float(text) if text not in ("", None) else None
    except (TypeError, ValueError):
        return None


def flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tuple(tree) if isinstance(tree, list) else tree}
    return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()} or {prefix[:-1]: {}}


def show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def tokens_to_target(points, target: float) -> float | None:
    """The x (tokens, FLOPs...) of the first ``(x, accuracy)`` point whose accuracy reaches
    ``target``; None when none does. ``points`` are in eval order."""
    return next((x for x, acc in points if acc is not None and acc >= target - 1e-12), None)


def summarize(values) -> dict:
    """mean, std (population), min, max and n of the finite values; NaNs when there are none."""
    array = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(array):
        return {"mean": NAN, "std": NAN, "min": NAN, "max": NAN, "n": 0}
    return {"mean": array.mean(), "std": array.std(), "min": array.min(), "max": array.max(), "n": len(array)}


def mean_curve(curves):
    """Mean and min/max of curves ``[(xs, ys), ...]`` sampled at different x: linearly
    interpolated on the union of their x values within the range all of them cover."""
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x)]
    if len(curves) == 1:
        return curves[0][0], curves[0][1], curves[0][1], curves[0][1]
    low, high = max(x.min() for x, _ in curves), min(x.max() for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= low) & (grid <= high)] if low <= high else grid
    stack = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, stack.mean(0), stack.min(0), stack.max(0)


def method_label(config: dict) -> str:
    algo = config.get("algo.name", "?")
    if algo != "sd":
        return str(algo)
    agg, tau = config.get("aggregation.name", "?"), config.get("aggregation.tau")
    return f"sd/{agg}" if agg in UNUSED_TAU or tau is None else f"sd/{agg}/tau={show(tau)}"


def differing_keys(configs: list[dict]) -> list[str]:
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def label_runs(runs: list[Run]) -> None:
    """Label = method (``sd/clip/tau=1``, ``sft``) plus each other key but the seed that differs
    between completed runs of one algo/aggregation (``optim.lr=3e-05``); a label's runs are its seeds."""
    done = [r for r in runs if r.status == "completed"]
    family = lambda r: method_label({**r.config, "aggregation.tau": None})
    extra = sorted({k for f in {family(r) for r in done}
                    for k in differing_keys([r.config for r in done if family(r) == f]) if k not in NOT_IN_LABEL})
    for run in runs:
        run.label = " ".join([method_label(run.config)] + [f"{k}={show(run.config.get(k))}" for k in extra])


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """label -> its completed runs, sd first (by aggregation, tau), then sft, grpo."""
    groups: dict[str, list[Run]] = {}
    order = lambda r: ({"sd": 0, "sft": 1, "grpo": 2}.get(r.config.get("algo.name"), 3),
                       str(r.config.get("aggregation.name")), number(r.config.get("aggregation.tau")) or 0, r.label)
    for run in sorted((r for r in runs if r.status == "completed"), key=order):
        groups.setdefault(run.label, []).append(run)
    return groups


def final_scores(groups: dict[str, list[Run]]) -> dict[str, dict[str, dict]]:
    """label -> metric -> :func:`summarize` of the runs' final values."""
    return {label: {key: summarize([r.final().get(key) for r in group])
                    for key in sorted({k for r in group for k in r.final()})} for label, group in groups.items()}


def target_and_reference(groups, scores, target: float | None) -> tuple[float | None, str | None]:
    """The target accuracy (explicit, else the best GRPO label's final mean) and that GRPO label."""
    grpo = [label for label, group in groups.items() if group[0].config.get("algo.name") == "grpo"]
    reference = max(grpo, key=lambda label: scores[label]["eval/accuracy"]["mean"], default=None)
    if target is None and reference is not None:
        target = scores[reference]["eval/accuracy"]["mean"]
    return target, reference


def to_target_table(groups, target: float, reference: str | None) -> dict[str, dict]:
    """label -> {axis: mean over the seeds that reach ``target``, axis_ratio: vs the reference,
    reached: seeds reaching, n: seeds} for generated tokens and FLOPs."""
    table = {}
    for label, group in groups.items():
        entry = {"n": len(group)}
        for axis in ("generated_tokens", "flops"):
            hits = [tokens_to_target([(r[f"train/{axis}"], r["eval/accuracy"]) for r in run.evals], target)
                    for run in group]
            entry[axis] = summarize(hits)["mean"]
            entry["reached"] = sum(h is not None for h in hits)
        table[label] = entry
    for entry in table.values():
        for axis in ("generated_tokens", "flops"):
            ref = table[reference][axis] if reference else NAN
            entry[f"{axis}_ratio"] = entry[axis] / ref if ref and math.isfinite(ref) and ref > 0 else NAN
    return table


# ---------------------------------------------------------------- loading
def load_run(run_dir: Path) -> Run:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs Hydra (${hydra:...}): keep it as written
        config = OmegaConf.to_container(cfg, resolve=False)
    rows = []
    if (run_dir / "metrics.csv").exists():
        with open(run_dir / "metrics.csv", newline="") as handle:
            rows = [{k: number(v) for k, v in row.items() if k} for row in csv.DictReader(handle)]
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    return Run(str(run_dir), flatten(config), rows, read_failure(run_dir), (run_dir / "final_model").is_dir(),
               [str(o) for o in overrides])


def natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(root: str | Path) -> list[Run]:
    """Every run under ``root`` (a sweep dir, a parent of sweeps, or one run dir)."""
    root = Path(root)
    dirs = {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    runs = [load_run(d) for d in sorted(dirs, key=natural_key)]
    for run in runs:
        run.name = str(Path(run.name).relative_to(root)) if Path(run.name) != root else root.name
    return runs


# ---------------------------------------------------------------- writing
def fmt(value, spec: str = ".3g") -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    clean = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows])


def scores_table(scores: dict) -> str:
    lmeval = sorted({k for s in scores.values() for k in s if k.startswith("lmeval/")})
    columns = SCORES + [(k, k, ".3f") for k in lmeval]
    rows = []
    for label, s in scores.items():
        cells = [f"{fmt(s[k]['mean'], spec)} ± {fmt(s[k]['std'], spec)}" if s.get(k, {}).get("n", 0) > 1
                 and not k.startswith("train/") else fmt(s.get(k, {}).get("mean"), spec) for k, _, spec in columns]
        rows.append([label, str(s["eval/accuracy"]["n"])] + cells)
    return markdown_table(["run", "seeds"] + [name for _, name, _ in columns], rows)


def target_section(table, target, reference) -> str:
    rows = [[label, f"{e['reached']}/{e['n']}", fmt(e["generated_tokens"], ",.0f") if e["reached"] else "not reached",
             fmt(e["generated_tokens_ratio"], ".3f"), fmt(e["flops"], ".3g") if e["reached"] else "not reached",
             fmt(e["flops_ratio"], ".3f")] for label, e in table.items()]
    source = f"final accuracy of {reference} (mean over seeds)" if reference else "--target-accuracy"
    return (f"Target accuracy {target:.3f} ({source}). First eval at which accuracy reaches it, mean over the "
            f"seeds that reach it; ratios vs {reference or '– (no GRPO run)'}.\n\n"
            + markdown_table(["run", "seeds reaching", "generated tokens", "× GRPO", "FLOPs", "× GRPO"], rows))


def build_report(runs: list[Run], out: str | Path, target_accuracy: float | None = None, title: str = "",
                 plots: bool = True) -> dict:
    """Write ``out/report.md`` and its PNGs; returns the numbers and the markdown of the score table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    label_runs(runs)
    groups = group_runs(runs)
    scores = final_scores(groups)
    target, reference = target_and_reference(groups, scores, target_accuracy)
    counts = {s: sum(r.status == s for r in runs) for s in ("completed", "failed", "incomplete")}
    md = [f"# Sweep report: {title}", "", ", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(runs)} runs.", ""]
    table = scores_table(scores) if scores else "No completed run."
    md += ["## Final scores", "", "Last eval of each run; mean ± std over seeds.", "", table, ""]
    to_target = to_target_table(groups, target, reference) if groups and target is not None else None
    md += ["## Tokens to target", ""]
    md += [target_section(to_target, target, reference) if to_target else
           "Skipped: no GRPO run to take the target from; pass --target-accuracy X.", ""]
    if groups and plots:
        from sdharness.plots import plot_curves, plot_tau

        md += ["## Eval accuracy", "", "Mean over seeds (line) and min–max over seeds (band).", ""]
        for axis, name in X_AXES.items():
            png = plot_curves(groups, axis, name, out / f"accuracy_vs_{axis}.png", target)
            md += [f"![accuracy vs {name}]({png.name})", ""]
        png = plot_tau(groups, scores, out / "accuracy_vs_tau.png")
        md += ["## Final accuracy against tau", "", f"![accuracy vs tau]({png.name})", ""]
    keys = [k for k in differing_keys([r.config for r in runs]) if k != "tags"]
    md += ["## Config differences", "", "Keys that differ between runs (tags omitted).", ""]
    md += [markdown_table(["run"] + keys, [[r.name] + [str(r.config.get(k, "–")) for k in keys] for r in runs])
           if keys else "All runs share one config.", ""]
    md += ["## Runs", "", markdown_table(["run", "label", "seed", "status", "final accuracy"],
           [[r.name, r.label, r.config.get("seed"), r.status, fmt(r.final().get("eval/accuracy"), ".3f")] for r in runs]), ""]
    bad = [r for r in runs if r.status != "completed"]
    md += ["## Failed and incomplete jobs", ""] + (["None."] if not bad else [])
    for r in bad:
        error = r.failure or {"error_type": "incomplete", "message": "no final eval or final model (killed, still "
                              f"running, or failed without {FAILED_FILE})", "traceback_tail": ""}
        md += [f"### {r.name}: {r.status}", "", f"Overrides: `{' '.join(r.overrides)}`", "",
               f"**{error['error_type']}**: {error['message']}", ""]
        if error.get("traceback_tail"):
            md += ["```", "\n".join(error["traceback_tail"].splitlines()[-15:]), "```", ""]
    (out / "report.md").write_text("\n".join(md))
    return {"scores": scores, "target": target, "reference": reference, "to_target": to_target, "runs": runs,
            "table": table, "path": out / "report.md"}


class SummaryCallback(Callback):
    """Hydra callback: at the end of a multirun, write ``<sweep dir>/report/report.md`` and print the
    final-score table. A job that raised is recorded in its ``FAILED.json``; each job's W&B run is closed."""

    def __init__(self, target_accuracy: float | None = None, out: str | None = None):
        self.target_accuracy, self.out = target_accuracy, out

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        failed = job_return.status == JobStatus.FAILED
        output_dir = Path(config.hydra.runtime.output_dir)
        if failed and not (output_dir / FAILED_FILE).exists():
            write_failure(output_dir, job_return._return_value)
        end_wandb_run(exit_code=1 if failed else 0)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:  # a report problem must not fail a finished sweep
            result = build_report(find_runs(sweep_dir), self.out or sweep_dir / "report", self.target_accuracy,
                                  title=str(sweep_dir))
        except Exception as error:
            print(f"sdharness-report: could not build the report of {sweep_dir}: {error!r}", file=sys.stderr)
            return
        print(f"\nFinal scores ({sweep_dir}):\n{result['table']}\n\nReport: {result['path']}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdharness-report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", nargs="?", help="a multirun dir, a parent of several, or one run dir")
    parser.add_argument("--out", help="output dir (default: <sweep_dir>/report)")
    parser.add_argument("--target-accuracy", type=float, help="default: the final accuracy of GRPO")
    parser.add_argument("--wandb-group", help="read the runs of this W&B group instead of local files (online)")
    parser.add_argument("--wandb-project", default="sdharness")
    parser.add_argument("--wandb-entity")
    args = parser.parse_args(argv)
    if args.wandb_group:
        from sdharness.wandb_runs import load_wandb_runs  # online only; the local report never imports it

        runs, out = load_wandb_runs(args.wandb_group, args.wandb_project, args.wandb_entity), args.out or f"report-{args.wandb_group}"
    elif args.sweep_dir and Path(args.sweep_dir).is_dir():
        runs, out = find_runs(args.sweep_dir), args.out or Path(args.sweep_dir) / "report"
    else:
        parser.error(f"not a directory: {args.sweep_dir!r} (or pass --wandb-group)")
    if not runs:
        parser.error(f"no runs (directories with .hydra/config.yaml) under {args.sweep_dir}")
    result = build_report(runs, out, args.target_accuracy, title=args.wandb_group or str(args.sweep_dir))
    print(result["table"])
    if result["target"] is None:
        print("sdharness-report: no GRPO run; pass --target-accuracy X for tokens-to-target", file=sys.stderr)
    print(f"Report: {result['path']}")


if __name__ == "__main__":
    main()
