"""The comparison protocol: a learning rate per method chosen on a validation split, every method at
its learning rate over seeds, then the report with confidence bands.

    sdharness-protocol --out protocol              # all of it (CPU: see the estimate below)
    sdharness-protocol --out protocol --dry-run    # print the commands only
    sdharness-protocol --out protocol --stage final   # reuse protocol/select
    sdharness-protocol --out p --methods sd_trust_region,grpo --lrs 1e-4,3e-4 budget.problems=16
        # a subset; trailing Hydra overrides apply to every job of both stages

1. ``select`` (sweeps/protocol_select.yaml): every method of :data:`METHOD_CHOICES` at each lr of the grid,
   SD methods with the frozen initial teacher, seed 0, native references, scored on ``data.validation_size``
   problems held out of the training pool and logged as ``val/*``. Then, for the ``--teacher-top`` SD
   methods that validation ranks first, the other teachers of :data:`TEACHERS` (live, EMA at SDFT's and
   SDPO's rates) over the same grid. Selection reads ``val/accuracy`` only (:func:`select_learning_rates`),
   per arm (method, and teacher for SD); the eval split is never scored in this stage. Writes
   ``OUT/selection.json`` and ``OUT/selection.md``.
2. ``final`` (sweeps/protocol_final.yaml): each arm at its selected lr, seeds 0, 1, 2, native and
   foreign references (a method that reads none, grpo: native only; ``reads_reference`` in
   :data:`sdharness.methods.METHODS`), 2048 problems each, 256 eval and 256 validation
   problems scored at every eval point (the report's best-on-validation column); one multirun per arm
   and seed under ``OUT/final/<arm>/seed<k>``.
3. ``report``: ``sdharness-report OUT/final`` -> ``OUT/final/report/report.md``: mean ± 95% confidence
   bands over seeds on every x-axis, final and best-on-validation accuracy, tokens-to-target with
   intervals, early answers, target diagnostics and the teacher's health per arm.

Both stages run one multirun per method (and, in the final stage, per seed), grpo's first, two at
a time (``--jobs``, default 2: one per core of the 2-core VM, each job at 1 thread).

Time on the 2-core VM: measured 2026-12-02 at 0ee2318 (before the teacher factor, the validation split
beside eval in the final stage and the teacher's health): 35 selection jobs and 39 final jobs took 58 min
wall with ``--jobs 2`` (selection 14 min, final 45 min; per final job grpo ~6 min of training, sft under
30 s). The protocol as it is now adds 15 selection jobs (the other teachers for the first-ranked SD
method) and 18 final SD jobs; one final SD job (sd_product, initial teacher) took 2.5 min at 29fa0a6
(92 s training, 25 s eval and validation, 20 s the teacher's health). The whole protocol is not yet
timed; by those parts about 1.5 to 2 hours. ``--styles native``, fewer ``--methods``, ``--teachers ''``
or ``--teacher-top 0`` shrink it proportionally.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sdharness.config import CONF_DIR, SWEEPS_DIR, ConfigError
from sdharness.data.jsonl import DataError
from sdharness.methods import METHODS
from sdharness.report.build import build_report, markdown_table
from sdharness.report.runs import Run, find_runs, teacher_of

# The choices of conf/method/, one per compared method; a new file there joins the protocol.
METHOD_CHOICES = tuple(sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml")))
SELECTION_METRIC = "val/accuracy"
LEARNING_RATES = "1e-5,3e-5,1e-4,3e-4,1e-3"
# The teacher factor of SD methods: the frozen initial weights for every aggregation; the live weights and
# EMAs at SDFT's rate (0.01 per step) and SDPO's (0.05) for the aggregations validation ranks first.
TEACHERS = {"initial": ["teacher=initial"], "live": ["teacher=live"],
            "ema0.99": ["teacher=ema", "teacher.ema_decay=0.99"], "ema0.95": ["teacher=ema", "teacher.ema_decay=0.95"]}
FIRST_TEACHER = "initial"


def algo_of(method: str) -> str:
    """The ``algo`` a method choice trains with (its conf/method file's ``override /algo``)."""
    defaults = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml").get("defaults", [])
    return next(dict(entry)["override /algo"] for entry in defaults
                if isinstance(entry, DictConfig) and "override /algo" in entry)


def has_teacher(method: str) -> bool:
    """Whether the method choice trains with a teacher (algo sd)."""
    return algo_of(method) == "sd"


def arm(method: str, teacher: str | None) -> str:
    """What the protocol compares: a method, and for one with a teacher, which (``sd_clip+live``)."""
    return f"{method}+{teacher}" if teacher else method


def split_arm(name: str) -> tuple[str, list[str]]:
    """``(method, its teacher's overrides)`` of an :func:`arm` name."""
    method, _, teacher = name.partition("+")
    return method, TEACHERS[teacher] if teacher else []


def method_of(run: Run) -> str | None:
    """The arm a protocol job ran: its ``method=...`` choice (Hydra overrides) and, for an SD method, its teacher."""
    method = next((o.split("=", 1)[1] for o in run.overrides if o.startswith("method=")), None)
    if method is None or run.config.get("algo.name") != "sd":
        return method
    return arm(method, teacher_of(run.config))


def validation_scores(run: Run) -> list[tuple[int, float]]:
    """The run's ``(step, val/accuracy)`` pairs in step order (never ``eval/*``)."""
    return [(int(row["step"]), row[SELECTION_METRIC]) for row in run.rows if row.get(SELECTION_METRIC) is not None]


def select_learning_rates(runs: list[Run], arm_of=None) -> dict[str, dict]:
    """method -> {lr, validation accuracy, start, edge, candidates: [{lr, final, mean}]}: per method
    (``arm_of(run)``, by default :func:`method_of`), the
    ``optim.lr`` whose run ends with the best validation accuracy; ties go to the higher mean over
    its validation evals after the first (the base model's), then to the smaller lr. Only
    ``val/accuracy`` is read; runs without it (failed, or scored on the eval split) are skipped.
    ``start`` is the base model's validation accuracy (the step-0 eval, None without one); ``edge``
    says whether the chosen lr is the grid's smallest or largest (``lowest``/``highest``; None inside),
    where a wider grid may find a better one."""
    candidates: dict[str, list[dict]] = {}
    starts: dict[str, float] = {}
    for run in runs:
        scored, method = validation_scores(run), (arm_of or method_of)(run)
        if run.failure or not scored or method is None:
            continue
        scores = [value for _, value in scored]
        if scored[0][0] == 0:
            starts[method] = scores[0]
        after_start = scores[1:] or scores
        candidates.setdefault(method, []).append({"lr": float(run.config["optim.lr"]), "final": scores[-1],
                                                  "mean": sum(after_start) / len(after_start)})
    chosen = {}
    for method, options in candidates.items():
        best = max(options, key=lambda c: (c["final"], c["mean"], -c["lr"]))
        grid = sorted(c["lr"] for c in options)
        edge = None if len(grid) < 2 else "lowest" if best["lr"] == grid[0] else "highest" if best["lr"] == grid[-1] else None
        chosen[method] = {"lr": best["lr"], "validation_accuracy": best["final"], "start": starts.get(method),
                          "edge": edge, "candidates": sorted(options, key=lambda c: c["lr"])}
    return chosen


def selection_markdown(selection: dict[str, dict]) -> str:
    def start(entry):
        return "–" if entry.get("start") is None else f"{entry['start']:.3f}"

    rows = [[method, f"{entry['lr']:g}" + (f" ({entry['edge']} of the grid)" if entry.get("edge") else ""),
             f"{entry['validation_accuracy']:.3f}", start(entry),
             ", ".join(f"{c['lr']:g}: {c['final']:.3f}" for c in entry["candidates"])]
            for method, entry in selection.items()]
    edges = sorted({entry["edge"] for entry in selection.values() if entry.get("edge")})
    note = (f" An lr at the {' or '.join(edges)} end of the grid may not be the best one: a wider grid "
            "(--lrs) would say." if edges else "")
    return ("Learning rate per method, chosen on the validation split (final val/accuracy; ties: mean over the "
            "evals after the start, then the smaller lr). The eval split was not scored." + note + "\n\n"
            + markdown_table(["method", "lr", "val accuracy", "val accuracy at start", "final val accuracy per lr"],
                             rows))


def train_command(config_name: str, sweep_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "sdharness.train", "-m", "--config-dir", str(SWEEPS_DIR), "--config-name",
            config_name, f"hydra.sweep.dir={sweep_dir}", *overrides]


def select_commands(out: Path, arms: list[str], lrs: str, overrides: list[str]) -> list[list[str]]:
    """One multirun per arm over the lr grid, grpo first (its jobs are the longest)."""
    commands = []
    for name in sorted(arms, key=lambda a: not a.startswith("grpo")):
        method, teacher = split_arm(name)
        commands.append(train_command("protocol_select", out / "select" / name,
                                      [f"method={method}", *teacher, f"optim.lr={lrs}", *overrides]))
    return commands


def first_arms(methods: list[str]) -> list[str]:
    """The selection's first round: every method, those with a teacher with the frozen initial one."""
    return [arm(method, FIRST_TEACHER if has_teacher(method) else None) for method in methods]


def teacher_arms(selection: dict[str, dict], teachers: list[str], top: int) -> list[str]:
    """The second round: the other teachers for the ``top`` arms with a teacher that validation ranks first
    (final val accuracy, then the mean over its evals)."""
    ranked = sorted((name for name in selection if "+" in name),
                    key=lambda name: (-selection[name]["validation_accuracy"], -best_mean(selection[name]), name))
    return [arm(split_arm(name)[0], teacher) for name in ranked[:top] for teacher in teachers]


def best_mean(entry: dict) -> float:
    return next(c["mean"] for c in entry["candidates"] if c["lr"] == entry["lr"])


def final_commands(out: Path, selection: dict[str, dict], styles: list[str], seeds: str,
                   overrides: list[str]) -> list[list[str]]:
    """One multirun per arm and seed (its reference styles inside), grpo first: the longest jobs
    start first, so that ``--jobs 2`` keeps both cores busy to the end."""
    commands = []
    for name in sorted(selection, key=lambda a: (not a.startswith("grpo"), a)):
        method, teacher = split_arm(name)
        if method not in METHOD_CHOICES:
            continue
        method_styles = styles if METHODS[algo_of(method)].reads_reference else ["native"]
        for seed in seeds.split(","):
            commands.append(train_command("protocol_final", out / "final" / name / f"seed{seed}", [
                f"method={method}", *teacher, f"optim.lr={selection[name]['lr']:g}", f"seed={seed}",
                f"data.solution_style={','.join(method_styles)}", *overrides]))
    return commands


def check_selection_data(overrides: list[str]) -> None:
    """Load the selection stage's data once, before any job: a validation split that shares problems
    with the eval split is refused here (:func:`sdharness.data.loading.check_contamination`), not
    in every one of its jobs."""
    from hydra import compose, initialize_config_dir

    from sdharness.config import CONF_DIR, register_configs, to_train_config
    from sdharness.data.loading import load_data

    register_configs()
    with initialize_config_dir(config_dir=str(SWEEPS_DIR), version_base="1.3"):
        cfg = to_train_config(compose("protocol_select", [f"hydra.searchpath=[file://{CONF_DIR}]", *overrides]))
    load_data(cfg.data, cfg.algo.name, cfg.algo.hint_source)


def run_all(commands: list[list[str]], jobs: int, dry_run: bool) -> None:
    for command in commands:
        print("+ " + " ".join(command), flush=True)
    if dry_run:
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = list(pool.map(lambda command: subprocess.run(command).returncode, commands))
    failed = [" ".join(c) for c, code in zip(commands, codes) if code]
    if failed:  # a failed job is recorded in its FAILED.json and listed by the report; go on
        print(f"sdharness-protocol: {len(failed)} multirun(s) exited non-zero; see their FAILED.json", file=sys.stderr)


def selection_from(out: Path, parser) -> dict[str, dict]:
    """Select from every run under ``OUT/select`` and write ``selection.json`` and ``selection.md``."""
    if not (out / "select").is_dir():
        parser.error(f"no selection stage under {out / 'select'}: run --stage select first")
    selection = select_learning_rates(find_runs(out / "select"))
    if not selection:
        parser.error(f"no run under {out / 'select'} logged {SELECTION_METRIC}")
    (out / "selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    (out / "selection.md").write_text(selection_markdown(selection) + "\n")
    return selection


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdharness-protocol", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="protocol dir: select/, selection.json, final/, final/report/")
    parser.add_argument("--stage", choices=("all", "select", "final"), default="all",
                        help="final: reuse OUT/selection.json (or OUT/select)")
    parser.add_argument("--methods", default=",".join(METHOD_CHOICES), help="choices of conf/method/ to compare")
    parser.add_argument("--teachers", default=",".join(t for t in TEACHERS if t != FIRST_TEACHER),
                        help=f"teachers besides {FIRST_TEACHER} for the SD methods validation ranks first "
                             f"(choose from {', '.join(TEACHERS)}; empty: none)")
    parser.add_argument("--teacher-top", type=int, default=1, help="how many SD methods get the other teachers")
    parser.add_argument("--lrs", default=LEARNING_RATES, help="the selection stage's optim.lr grid")
    parser.add_argument("--styles", default="native,foreign", help="reference styles of the final stage")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="multiruns at once (2: one per core of the 2-core VM)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. model=tiny_random")
    args = parser.parse_args(argv)
    out = Path(args.out)
    teachers = [t for t in args.teachers.split(",") if t]
    unknown = [t for t in teachers if t not in TEACHERS]
    if unknown:
        parser.error(f"--teachers: unknown {', '.join(unknown)}; choose from {', '.join(TEACHERS)}")
    if args.stage in ("all", "select"):
        methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in METHOD_CHOICES]
        if unknown:
            parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHOD_CHOICES)}")
        try:
            check_selection_data(args.overrides)
        except (ConfigError, DataError) as error:
            parser.error(str(error))
        run_all(select_commands(out, first_arms(methods), args.lrs, args.overrides), args.jobs, args.dry_run)
        if args.dry_run:
            if teachers and args.teacher_top:
                print(f"# then, for the {args.teacher_top} SD method(s) ranked first on validation (TOP):")
                run_all(select_commands(out, [arm("TOP", t) for t in teachers], args.lrs, args.overrides), 1, True)
            print("# then the final stage: every arm at its selected lr, seeds "
                  f"{args.seeds}, styles {args.styles} (grpo: native)")
            return
        if teachers and args.teacher_top:
            ranked = teacher_arms(selection_from(out, parser), teachers, args.teacher_top)
            run_all(select_commands(out, ranked, args.lrs, args.overrides), args.jobs, False)
    if args.stage == "final" and (out / "selection.json").exists():
        selection = json.loads((out / "selection.json").read_text())
    else:
        selection = selection_from(out, parser)
        print(selection_markdown(selection), flush=True)
    if args.stage == "select":
        return
    styles = [s for s in args.styles.split(",") if s]
    run_all(final_commands(out, selection, styles, args.seeds, args.overrides), args.jobs, args.dry_run)
    if args.dry_run:
        return
    result = build_report(find_runs(out / "final"), out / "final" / "report", title=f"comparison protocol {out}")
    print(f"\nFinal scores:\n{result['table']}\n\nReport: {result['path']}", flush=True)


if __name__ == "__main__":
    main()
