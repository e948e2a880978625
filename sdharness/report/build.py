"""Report of a sweep from its local files: curves, final scores, tokens-to-target, config diffs.

    sdharness-report multirun/2026-01-01/12-00-00                # -> <that dir>/report/report.md
    sdharness-report outputs/2026-01-01/12-00-00 --target-accuracy 0.4 --out /tmp/report
    sdharness-report --wandb-group methods --wandb-project sdharness --out report-methods   # from W&B (online)
    sdharness-report multirun/2026-01-01/12-00-00 --publish      # also as a W&B Report (online, '.[report]')

Runs are collected and labelled by :mod:`sdharness.report.runs` (a job dir with ``.hydra/config.yaml`` and
``metrics.csv``); runs that differ only in ``seed`` are one line (mean, and min-max band, over
seeds). Failed jobs (``FAILED.json``, see ``sdharness.jobs``) are listed with their error. The local
report never touches the network; ``--publish`` (:mod:`sdharness.report.publish`) runs after it is written.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from sdharness.jobs import FAILED_FILE, write_failure
from sdharness.report.curves import AXIS_NAMES, NAN, summarize, tokens_to_target, trained
from sdharness.report.runs import Run, differing_keys, find_runs, group_runs, label_runs

SCORES = [("eval/accuracy", "accuracy", ".3f"), ("eval/early_answer_rate", "early answer", ".3f"),
          ("eval/leakage_rate", "leakage", ".3f"), ("eval/completion_length", "length", ".1f"),
          ("train/problems_seen", "problems", ",.0f"), ("train/generated_tokens", "gen. tokens", ",.0f"),
          ("train/flops", "FLOPs", ".3g"), ("train/wall_seconds", "seconds", ".1f")]
TO_TARGET_AXES = ("generated_tokens", "flops")


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
    """label -> {axis: mean over the seeds that reach ``target`` (None: no seed does), axis_ratio:
    vs the reference (None: not reached), reached: seeds reaching, n: seeds} for generated tokens and
    FLOPs. Only evals after training started count (:func:`trained`): the base model beating the
    target before its first step is not reaching it."""
    table = {}
    for label, group in groups.items():
        entry = {"n": len(group)}
        for axis in TO_TARGET_AXES:
            hits = [tokens_to_target([(r.get(f"train/{axis}"), r["eval/accuracy"]) for r in run.evals if trained(r)],
                                     target) for run in group]
            entry["reached"] = sum(h is not None for h in hits)
            entry[axis] = summarize(hits)["mean"] if entry["reached"] else None
        table[label] = entry
    for entry in table.values():
        for axis in TO_TARGET_AXES:
            ref = table[reference][axis] if reference else None
            usable = ref is not None and math.isfinite(ref) and ref > 0  # else NaN: no GRPO, or it needed 0
            entry[f"{axis}_ratio"] = None if entry[axis] is None else entry[axis] / ref if usable else NAN
    return table


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
    cell = lambda value, spec: "not reached" if value is None else fmt(value, spec)
    rows = [[label, f"{e['reached']}/{e['n']}", cell(e["generated_tokens"], ",.0f"),
             cell(e["generated_tokens_ratio"], ".3f"), cell(e["flops"], ".3g"), cell(e["flops_ratio"], ".3f")]
            for label, e in table.items()]
    source = f"final accuracy of {reference} (mean over seeds)" if reference else "--target-accuracy"
    return (f"Target accuracy {target:.3f} ({source}). First eval after training started (step > 0; the base "
            f"model's eval does not count) at which accuracy reaches it, mean over the seeds that reach it; "
            f"ratios vs {reference or '– (no GRPO run)'}; \"not reached\": no seed reaches it.\n\n"
            + markdown_table(["run", "seeds reaching", "generated tokens", "× GRPO", "FLOPs", "× GRPO"], rows))


def build_report(runs: list[Run], out: str | Path, target_accuracy: float | None = None, title: str = "",
                 plots: bool = True) -> dict:
    """Write ``out/report.md`` and its PNGs; returns the numbers, the markdown of the score table
    (``table``) and of the tokens-to-target section (``to_target_md``), and the run counts (``summary``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    label_runs(runs)
    groups = group_runs(runs)
    scores = final_scores(groups)
    target, reference = target_and_reference(groups, scores, target_accuracy)
    counts = {s: sum(r.status == s for r in runs) for s in ("completed", "failed", "incomplete")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(runs)} runs."
    md = [f"# Sweep report: {title}", "", summary, ""]
    table = scores_table(scores) if scores else "No completed run."
    md += ["## Final scores", "", "Last eval of each run; mean ± std over seeds.", "", table, ""]
    to_target = to_target_table(groups, target, reference) if groups and target is not None else None
    to_target_md = (target_section(to_target, target, reference) if to_target else
                    "Skipped: no GRPO run to take the target from; pass --target-accuracy X.")
    md += ["## Tokens to target", "", to_target_md, ""]
    if groups and plots:
        from sdharness.report.plots import plot_curves, plot_tau

        md += ["## Eval accuracy", "", "Mean over seeds (line) and min–max over seeds (band).", ""]
        for axis, name in AXIS_NAMES.items():
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
            "table": table, "to_target_md": to_target_md, "summary": summary, "title": title, "path": out / "report.md"}


class SummaryCallback(Callback):
    """Hydra callback: at the end of a multirun, write ``<sweep dir>/report/report.md`` and print the
    final-score table. A job that raised is recorded in its ``FAILED.json`` (``train`` closes each
    job's W&B run itself)."""

    def __init__(self, target_accuracy: float | None = None, out: str | None = None):
        self.target_accuracy, self.out = target_accuracy, out

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        failed = job_return.status == JobStatus.FAILED
        output_dir = Path(config.hydra.runtime.output_dir)
        if failed and not (output_dir / FAILED_FILE).exists():
            write_failure(output_dir, job_return._return_value)

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
    parser.add_argument("--wandb-project", help="W&B project of --wandb-group / --publish (default: the runs' "
                        "logger.project, else sdharness)")
    parser.add_argument("--wandb-entity", help="W&B entity (default: the runs' logger.entity, else your default entity)")
    parser.add_argument("--publish", action="store_true",
                        help="after the local report, also save it as a W&B Report (online; pip install -e '.[report]')")
    args = parser.parse_args(argv)
    if args.wandb_group:
        from sdharness.report.wandb_runs import load_wandb_runs  # online only; the local report never imports it

        runs = load_wandb_runs(args.wandb_group, args.wandb_project or "sdharness", args.wandb_entity)
        out = args.out or f"report-{args.wandb_group}"
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
    if args.publish:
        from sdharness.report.publish import PublishError, publish  # online only, after the local report is written

        try:
            url = publish(result, group=args.wandb_group, project=args.wandb_project, entity=args.wandb_entity)
        except PublishError as error:
            print(f"sdharness-report --publish: {error}\nThe local report is written: {result['path']}", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"W&B Report: {url}")


if __name__ == "__main__":
    main()
