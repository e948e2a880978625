"""Report of a sweep from its local files: curves, final scores, tokens-to-target, config diffs.

    sdharness-report multirun/2026-01-01/12-00-00                # -> <that dir>/report/report.md
    sdharness-report outputs/2026-01-01/12-00-00 --target-accuracy 0.4 --out /tmp/report
    sdharness-report --wandb-group methods --wandb-project sdharness --out report-methods   # from W&B (online)
    sdharness-report multirun/2026-01-01/12-00-00 --publish      # also as a W&B Report (online, '.[report]')

Runs are collected and labelled by :mod:`sdharness.report.runs` (a job dir with ``.hydra/config.yaml`` and
``metrics.csv``); runs that differ only in ``seed`` are one line: the mean over seeds and, from
two seeds on, its 95% confidence interval (Student t over seeds) as the band of every curve and
the ± of every table. Failed jobs (``FAILED.json``, see ``sdharness.jobs``) are listed with their error. The local
report never touches the network; ``--publish`` (:mod:`sdharness.report.publish`) runs after it is written.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from sdharness.jobs import FAILED_FILE, write_failure
from sdharness.report.curves import (AXIS_NAMES, COLLAPSE_DROP, NAN, best_on_validation, collapse, summarize,
                                     tokens_to_target, trained)
from sdharness.report.runs import Run, find_runs, group_runs, label_runs, unread_parameter_keys

SCORES = [("eval/accuracy", "accuracy", ".3f"), ("eval/early_answer_rate", "early answer", ".3f"),
          ("eval/leakage_rate", "leakage", ".3f"), ("eval/completion_length", "length", ".1f"),
          ("train/problems_seen", "problems", ",.0f"), ("train/generated_tokens", "gen. tokens", ",.0f"),
          ("train/flops", "FLOPs", ".3g"), ("train/wall_seconds", "seconds", ".1f")]
# Chat logs whose accepted answer is wrong: how often the model now gives that answer, on held-out
# conversations and on the training ones (data/chatlog.py).
WRONG_ACCEPTED = [("eval/wrong_accepted_rate", "wrong accepted (eval)", ".3f"),
                  ("wrongly_accepted/wrong_accepted_rate", "wrong accepted (trained on)", ".3f")]
TO_TARGET_AXES = ("generated_tokens", "flops")
# Target diagnostics the SD loss logs (sdharness/losses.py), and the share of GRPO's groups whose
# rewards are all equal (no advantage, no gradient: sdharness/methods/grpo.py), averaged over a run's
# logged steps.
DIAGNOSTICS = [("train/unconsidered_mass", "unconsidered mass", ".4f"),  # the promise is < 1e-3
               ("train/kl_target_student", "KL(target‖student)", ".3f"),
               ("train/max_log_ratio_mean", "max log q/p_S (mean)", ".2f"),
               ("train/max_log_ratio_max", "max log q/p_S (max)", ".2f"),
               ("train/zero_variance_share", "zero-variance groups", ".3f")]


# The teacher's health at every eval point (sdharness/eval/teacher_health.py), in the order a collapse
# names the first to move.
# (key, name, format, the direction it worsens in: -1 falls, +1 rises)
HEALTH = [("health/teacher_hint_accuracy_native", "teacher hint acc. (native)", ".3f", -1),
          ("health/teacher_hint_accuracy_foreign", "teacher hint acc. (foreign)", ".3f", -1),
          ("health/teacher_hint_accuracy_given", "teacher hint acc.", ".3f", -1),
          ("health/policy_hint_accuracy_native", "policy hint acc. (native)", ".3f", -1),
          ("health/policy_hint_accuracy_foreign", "policy hint acc. (foreign)", ".3f", -1),
          ("health/policy_hint_accuracy_given", "policy hint acc.", ".3f", -1),
          ("health/teacher_drift_kl", "teacher drift KL", ".3f", 1),
          ("health/policy_drift_kl", "policy drift KL", ".3f", 1),
          ("health/teacher_entropy", "teacher entropy", ".3f", 1),
          ("health/student_entropy", "student entropy", ".3f", 1)]
BEST_ON_VALIDATION = "eval/accuracy@best_val"


def final_scores(groups: dict[str, list[Run]]) -> dict[str, dict[str, dict]]:
    """label -> metric -> :func:`summarize` of the runs' final values; for the training diagnostics
    (:data:`DIAGNOSTICS`), of each run's mean over its logged steps; :data:`BEST_ON_VALIDATION`, the eval
    accuracy at the eval the validation split scored best (:func:`best_on_validation`)."""
    scores = {label: {key: summarize([r.final().get(key) for r in group])
                      for key in sorted({k for r in group for k in r.final()})} for label, group in groups.items()}
    for label, group in groups.items():
        best = [best_on_validation(r.evals) for r in group]
        if any(b is not None for b in best):
            scores[label][BEST_ON_VALIDATION] = summarize(best)
        for key, _, _ in DIAGNOSTICS:
            per_run = [summarize([row.get(key) for row in r.rows])["mean"] for r in group]
            if any(math.isfinite(v) for v in per_run):
                scores[label][key] = summarize(per_run)
    return scores


def base_accuracy(runs: list[Run]) -> float | None:
    """Mean accuracy of the evals taken before training (step 0), i.e. of the base model, over
    the runs that have one; None when none has."""
    found = summarize([run.evals[0]["eval/accuracy"] for run in runs if run.evals and not trained(run.evals[0])])
    return found["mean"] if found["n"] else None


def target_and_reference(groups, scores, target: float | None) -> tuple[float | None, str | None]:
    """The target accuracy (explicit, else the best GRPO label's final mean) and that GRPO label."""
    grpo = [label for label, group in groups.items() if group[0].config.get("algo.name") == "grpo"]
    reference = max(grpo, key=lambda label: scores[label]["eval/accuracy"]["mean"], default=None)
    if target is None and reference is not None:
        target = scores[reference]["eval/accuracy"]["mean"]
    return target, reference


def to_target_table(groups, target: float, reference: str | None) -> dict[str, dict]:
    """label -> {axis: mean over the seeds that reach ``target`` (None: no seed does), axis_ci: the
    95% t half-width over those seeds (NaN below 2), axis_ratio: vs the reference's mean (None: not
    reached), reached: seeds reaching, n: seeds} for generated tokens and FLOPs. Only evals after
    training started count (:func:`trained`): the base model beating the target before its first
    step is not reaching it."""
    table = {}
    for label, group in groups.items():
        entry = {"n": len(group)}
        for axis in TO_TARGET_AXES:
            hits = [tokens_to_target([(r.get(f"train/{axis}"), r["eval/accuracy"]) for r in run.evals if trained(r)],
                                     target) for run in group]
            entry["reached"] = sum(h is not None for h in hits)
            found = summarize(hits)
            entry[axis] = found["mean"] if entry["reached"] else None
            entry[f"{axis}_ci"] = found["ci"] if entry["reached"] else None
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


def with_interval(summary: dict | None, spec: str) -> str:
    """``mean ± 95% half-width`` (the mean alone below 2 values)."""
    if not summary or not summary.get("n"):
        return "–"
    half = summary.get("ci", NAN)
    return fmt(summary["mean"], spec) + (f" ± {fmt(half, spec)}" if math.isfinite(half) else "")


def scores_table(scores: dict) -> str:
    lmeval = sorted({k for s in scores.values() for k in s if k.startswith("lmeval/")})
    best = [(BEST_ON_VALIDATION, "accuracy at best val", ".3f")] if any(BEST_ON_VALIDATION in s
                                                                          for s in scores.values()) else []
    wrong = [column for column in WRONG_ACCEPTED if any(column[0] in s for s in scores.values())]
    columns = SCORES[:1] + best + wrong + SCORES[1:] + [(k, k, ".3f") for k in lmeval]
    rows = []
    for label, s in scores.items():
        cells = [with_interval(s.get(k), spec) if not k.startswith("train/") else fmt(s.get(k, {}).get("mean"), spec)
                 for k, _, spec in columns]
        rows.append([label, str(s["eval/accuracy"]["n"])] + cells)
    return markdown_table(["run", "seeds"] + [name for _, name, _ in columns], rows)


def diagnostics_table(scores: dict) -> str:
    """Per label: final early-answer rate, the SD target diagnostics and GRPO's zero-variance share
    (run means over logged steps), mean ± 95% half-width over seeds; "–" for a method that does not log one."""
    rows = [[label, with_interval(s.get("eval/early_answer_rate"), ".3f")]
            + [with_interval(s.get(key), spec) for key, _, spec in DIAGNOSTICS] for label, s in scores.items()]
    return markdown_table(["run", "early answer"] + [name for _, name, _ in DIAGNOSTICS], rows)


def health_share(final: dict) -> float:
    """The health evals' share of a run's time: training + the other evals + health (start-up aside)."""
    health = final.get("time/health_seconds", NAN)
    return health / (final.get("train/wall_seconds", NAN) + final.get("time/eval_seconds", 0.0) + health)


def health_section(groups: dict[str, list[Run]], scores: dict) -> str:
    """The teacher's health at the final eval per label (mean ± 95% half-width), the health evals' time
    against training time, and every run that collapsed with the first health figure that moved."""
    columns = [(key, name, spec) for key, name, spec, _ in HEALTH if any(key in s for s in scores.values())]
    if not columns:
        return "No run logged the teacher's health (SD runs with eval.teacher_health=true do)."
    rows = [[label, *(with_interval(s.get(key), spec) for key, _, spec in columns)] for label, s in scores.items()
            if any(key in s for key, _, _ in columns)]
    share = [health_share(r.final()) for group in groups.values() for r in group
             if r.final().get("time/health_seconds") is not None]
    cost = summarize(share)
    md = [f"Final eval point. Hint accuracy: greedy, with the reference in the prompt, on the first eval.health_size "
          "problems; drift: KL(weights ‖ initial weights) per token on [teacher prompt, g]; entropies per token on "
          f"the eval's completions. Health evals took {fmt(cost['mean'] * 100, '.0f')}% of a run's training, eval and "
          f"health time on average (max {fmt(cost['max'] * 100, '.0f')}%), counted apart from training.", "",
          markdown_table(["run", *(name for _, name, _ in columns)], rows), ""]
    figures = [(key, direction) for key, _, _, direction in HEALTH]
    collapsed = [(r, found) for group in groups.values() for r in group
                 if (found := collapse(r.evals, figures)) is not None]
    md += [f"Collapses (final eval accuracy at least {COLLAPSE_DROP} below the run's best), with the first health "
           "figure that had covered a quarter of its worsening (start to end: a hint accuracy falling, a drift or an "
           "entropy rising) by the time accuracy had covered half its drop:", ""]
    md += [f"- {r.name} ({r.label}, seed {r.config.get('seed')}): best {found['best']:.3f} at step "
           f"{found['best_step']:g}, final {found['final']:.3f}; dropped by step {found['dropped_step']:g}; first "
           "moved: " + (f"{found['first_moved']} (by step {found['moved_step']:g})" if found["first_moved"] else
              "no health figure before the drop") for r, found in collapsed] or ["- none"]
    return "\n".join(md)


def target_section(table, target, reference, base: float | None = None) -> str:
    if base is not None and target <= base + 1e-12:
        return (f"Target accuracy {target:.3f} is at or below the base model's accuracy {base:.3f} (mean of the "
                "evals before training): not reaching below the start is no measure of what training bought, so "
                "no tokens-to-target and no ratio. Pass --target-accuracy above the base.")

    def cell(value, half, spec):
        if value is None:
            return "not reached"
        return fmt(value, spec) + (f" ± {fmt(half, spec)}" if half is not None and math.isfinite(half) else "")

    rows = [[label, f"{e['reached']}/{e['n']}", cell(e["generated_tokens"], e["generated_tokens_ci"], ",.0f"),
             cell(e["generated_tokens_ratio"], None, ".3f"), cell(e["flops"], e["flops_ci"], ".3g"),
             cell(e["flops_ratio"], None, ".3f")]
            for label, e in table.items()]
    source = f"final accuracy of {reference} (mean over seeds)" if reference else "--target-accuracy"
    base_note = f"; base model {base:.3f}" if base is not None else ""
    return (f"Target accuracy {target:.3f} ({source}{base_note}). First eval after training started (step > 0; "
            f"the base model's eval does not count) at which accuracy reaches it: mean ± 95% t half-width over the "
            f"seeds that reach it (no ± below 2); ratios of those means vs {reference or '– (no GRPO run)'}; "
            f"\"not reached\": no seed reaches it.\n\n"
            + markdown_table(["run", "seeds reaching", "generated tokens", "× GRPO", "FLOPs", "× GRPO"], rows))


NOT_USED = "n/a"


def used_config(config: dict) -> dict:
    """The run's config with the keys its method ignores set to :data:`NOT_USED`: sft and grpo
    have no aggregation, and an sd aggregation reads only its own parameter (tau or kl_bound)."""
    if config.get("algo.name") == "sd":
        unread = unread_parameter_keys(config)
        return {k: NOT_USED if k in unread else v for k, v in config.items()}
    return {k: NOT_USED if k.startswith("aggregation.") else v for k, v in config.items()}


def config_differences(runs: list[Run]) -> str:
    """Markdown table of the keys whose used values differ between runs (tags omitted)."""
    configs = [used_config(r.config) for r in runs]
    keys = [k for k in sorted({k for c in configs for k in c}) if k != "tags"
            and len({repr(c.get(k)) for c in configs if c.get(k) != NOT_USED}) > 1]
    if not keys:
        return "All runs share one config."
    return markdown_table(["run"] + keys, [[r.name] + [str(c.get(k, "–")) for k in keys] for r, c in zip(runs, configs)])


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
    counts = {s: sum(r.status == s for r in runs) for s in ("completed", "failed", "corrupt", "incomplete")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s != "corrupt") + f" of {len(runs)} runs."
    md = [f"# Sweep report: {title}", "", summary, ""]
    table = scores_table(scores) if scores else "No completed run."
    md += ["## Final scores", "", "Last eval of each run; mean ± half-width of the 95% confidence interval over "
           "seeds (Student t; no ± for one seed).", "", table, ""]
    base = base_accuracy(runs)
    below_base = target is not None and base is not None and target <= base + 1e-12
    to_target = to_target_table(groups, target, reference) if groups and target is not None and not below_base \
        else None
    to_target_md = (target_section(to_target, target, reference, base) if to_target or below_base else
                    "Skipped: no GRPO run to take the target from; pass --target-accuracy X.")
    md += ["## Tokens to target", "", to_target_md, ""]
    if scores:
        md += ["## Early answers and target diagnostics", "", "Early answer: final eval. Target diagnostics (SD "
               "only): each run's mean over its logged steps of the loss's diagnostics (target mass on tokens the "
               "student gives < loss.unconsidered_eps; KL(target‖student) per token; per-position max of "
               "log(q/p_S), averaged and maxed over positions); zero-variance groups (GRPO only): each run's mean over its "
               "logged steps of the share of groups whose rewards are all equal, which give no gradient. Then "
               "mean ± 95% half-width over seeds.", "",
               diagnostics_table(scores), ""]
    if scores:
        md += ["## The teacher's health", "", health_section(groups, scores), ""]
    if groups and plots:
        from sdharness.report.plots import plot_curves, plot_health, plot_parameter

        md += ["## Eval accuracy", "", "Mean over seeds (line) and its 95% confidence interval (band, Student t "
               "over seeds; none for one seed).", ""]
        for axis, name in AXIS_NAMES.items():
            png = plot_curves(groups, axis, name, out / f"accuracy_vs_{axis}.png", target)
            md += [f"![accuracy vs {name}]({png.name})", ""]
        health = [(key, name) for key, name, _, _ in HEALTH
                  if any(key in r for g in groups.values() for r in g[0].evals)]
        if health:
            png = plot_health(groups, [("eval/accuracy", "eval accuracy"), *health], out / "teacher_health.png")
            md += ["## The teacher's health against problems seen", "", "Mean over seeds and 95% band.", "",
                   f"![teacher health]({png.name})", ""]
        png = plot_parameter(groups, scores, out / "accuracy_vs_parameter.png")
        md += ["## Final accuracy against the aggregation's parameter", "",
               f"![accuracy vs the aggregation's parameter]({png.name})", ""]
    md += ["## Config differences", "", f"Keys whose used values differ between runs (tags omitted; \"–\": not set; "
           f"\"{NOT_USED}\": ignored by the method, e.g. the aggregation of sft and grpo).", "",
           config_differences(runs), ""]
    md += ["## Runs", "", markdown_table(["run", "label", "seed", "status", "final accuracy"],
           [[r.name, r.label, r.config.get("seed"), r.status,
             fmt(None if r.status == "corrupt" else r.final().get("eval/accuracy"), ".3f")] for r in runs]), ""]
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
            "base": base,
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
