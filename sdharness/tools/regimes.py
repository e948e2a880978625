"""The method's regimes beyond worked references, each measured like the comparison protocol: an lr per
arm chosen on a validation split, every arm at its lr over seeds, then the report with bands.

    sdharness-regime impossible_knowledge --out regimes/impossible_knowledge
    sdharness-regime hard --out regimes/hard --dry-run          # print the commands only
    sdharness-regime answer_only --out r --stage final           # reuse r/selection.json

A regime is one file, ``sweeps/regimes/<name>.yaml`` (:class:`Regime`): the setting every job shares,
commands that prepare its data, its arms (a name and the overrides that make it), the lr grid, an
optional second round of variants (another value of an arm's parameter, validation picks one), arms
that take another arm's lr (``lr_from``: a sampling choice too costly to sweep) and the final stage's
seeds and budget. Stages, under ``OUT``:

1. ``prepare``: the regime's commands in order (``{out}`` is ``OUT``); a failing one stops the regime.
2. ``select`` (sweeps/protocol_select.yaml): each arm over the lr grid, seed 0, scored on the validation
   split only; then each arm's variants at its chosen lr. :func:`choose` picks per arm the lr and
   the variant (or none) with the best final ``val/accuracy``. ``OUT/selection.{json,md}``.
3. ``final`` (sweeps/protocol_final.yaml): each arm at its lr, and its chosen variant beside it, over
   the seeds; ``OUT/final/report/report.md`` (:func:`sdharness.report.build.build_report`).

``OUT/regime.json`` records the regime, the commit, the jobs and each stage's wall seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import OmegaConf

from sdharness.config import SWEEPS_DIR
from sdharness.report.build import build_report, markdown_table
from sdharness.report.runs import Run, find_runs
from sdharness.tools.protocol import run_all, select_learning_rates, train_command, validation_scores
from sdharness.tools.provenance import harness_version, source_commit

REGIMES_DIR = SWEEPS_DIR / "regimes"
REGIME_CHOICES = tuple(sorted(path.stem for path in REGIMES_DIR.glob("*.yaml")))
VARIANT_MARK = "@"  # an arm's variant runs as ``<arm>@<variant>``


class RegimeError(ValueError):
    """A regime file that cannot run; the message names the file and the field."""


@dataclass
class Regime:
    description: str
    arms: dict[str, list[str]]  # name -> overrides (method=..., teacher=..., ...)
    setting: list[str] = field(default_factory=list)  # overrides every job shares
    prepare: list[list[str]] = field(default_factory=list)  # [module, args...] run as `python -m`
    lrs: str = "3e-5,1e-4,3e-4"
    variants: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # arm -> variant -> overrides
    select: list[str] = field(default_factory=list)  # overrides of the selection jobs only
    final: list[str] = field(default_factory=list)  # overrides of the final jobs only
    seeds: str = "0,1,2"
    # reference styles of the final stage, which otherwise sweeps native and foreign (protocol_final.yaml);
    # a chat log has no notation of its own to vary, so the default runs one
    styles: str = "native"
    # arm -> the arm whose chosen lr it takes instead of a sweep of its own (its difference from that
    # arm is not an optimiser's, e.g. how it samples; and its jobs cost too much to sweep)
    lr_from: dict[str, str] = field(default_factory=dict)

    def with_variants(self) -> dict[str, list[str]]:
        """Every arm and every variant (``<arm>@<variant>``) -> the overrides that make it."""
        return {**self.arms, **{f"{arm}{VARIANT_MARK}{name}": [*self.arms[arm], *options]
                                for arm, variants in self.variants.items() for name, options in variants.items()}}

    def swept(self) -> dict[str, list[str]]:
        """The arms the selection stage sweeps over the lr grid."""
        return {name: overrides for name, overrides in self.arms.items() if name not in self.lr_from}


def load_regime(path: Path) -> Regime:
    """A regime file as a :class:`Regime`; any field missing, unknown or of the wrong shape is a
    :class:`RegimeError` naming the file and field."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    known = {f.name for f in fields(Regime)}
    if not isinstance(raw, dict):
        raise RegimeError(f"{path}: a regime file is a mapping with {', '.join(sorted(known))}")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RegimeError(f"{path}: unknown field(s) {', '.join(unknown)}; a regime has {', '.join(sorted(known))}")
    missing = [name for name in ("description", "arms") if name not in raw]
    if missing:
        raise RegimeError(f"{path}: missing {', '.join(missing)}")
    regime = Regime(**raw)
    lists = {f"arms.{name}": value for name, value in regime.arms.items()}
    lists.update({f"variants.{arm}.{name}": value for arm, options in regime.variants.items()
                  for name, value in options.items()})
    lists.update(setting=regime.setting, select=regime.select, final=regime.final)
    lists.update({f"prepare[{i}]": command for i, command in enumerate(regime.prepare)})
    for where, value in lists.items():
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise RegimeError(f"{path}: {where} must be a list of strings (Hydra overrides or command words)")
    for arm in regime.variants:
        if arm not in regime.arms:
            raise RegimeError(f"{path}: variants.{arm} names no arm; arms are {', '.join(regime.arms)}")
    for arm, source in regime.lr_from.items():
        if arm not in regime.arms or source not in regime.swept():
            raise RegimeError(f"{path}: lr_from.{arm}: {source}: both must be arms, the second one swept (not "
                              f"itself in lr_from); arms are {', '.join(regime.arms)}")
    for name in [*regime.arms, *(v for options in regime.variants.values() for v in options)]:
        if VARIANT_MARK in name or "/" in name:
            raise RegimeError(f"{path}: {name!r}: arm and variant names may not hold {VARIANT_MARK!r} or '/'")
    return regime


def arm_of(run: Run) -> str:
    """The arm a regime job ran: the first folder of its path under the stage (``sd_clip@tau0.5``)."""
    return Path(run.name).parts[0]


def expand(words: list[str], out: Path) -> list[str]:
    return [word.replace("{out}", str(out)) for word in words]


def select_commands(out: Path, regime: Regime, arms: dict[str, list[str]], lrs: str,
                    overrides: list[str]) -> list[list[str]]:
    return [train_command("protocol_select", out / "select" / name,
                          expand([*regime.setting, *arm_overrides, f"optim.lr={lrs}", *regime.select, *overrides], out))
            for name, arm_overrides in arms.items()]


def variant_arms(regime: Regime, chosen: dict[str, dict]) -> dict[str, tuple[list[str], float]]:
    """``<arm>@<variant>`` -> (overrides, the arm's chosen lr) for every variant of an arm that selection kept."""
    return {name: (overrides, chosen[name.partition(VARIANT_MARK)[0]]["lr"])
            for name, overrides in regime.with_variants().items()
            if VARIANT_MARK in name and name.partition(VARIANT_MARK)[0] in chosen}


def choose(runs: list[Run], regime: Regime) -> dict[str, dict]:
    """arm -> the lr (:func:`select_learning_rates` over the arm's own runs) and ``variant``: the
    variant whose run at that lr ends with a better final val/accuracy than the arm itself (ties
    keep the arm's own setting), None when none does; ``variant_scores`` lists each one's."""
    plain = [run for run in runs if VARIANT_MARK not in arm_of(run)]
    chosen = select_learning_rates(plain, arm_of=arm_of)
    for arm, entry in chosen.items():
        entry["variant"], entry["variant_scores"] = None, {}
        best = entry["validation_accuracy"]
        for run in runs:
            name = arm_of(run)
            base, _, variant = name.partition(VARIANT_MARK)
            scored = validation_scores(run)
            if base != arm or not variant or run.failure or not scored:
                continue
            entry["variant_scores"][variant] = scored[-1][1]
            if scored[-1][1] > best:
                best, entry["variant"] = scored[-1][1], variant
    for arm, source in regime.lr_from.items():
        if source in chosen:
            chosen[arm] = {"lr": chosen[source]["lr"], "lr_from": source, "variant": None, "variant_scores": {}}
    return chosen


def final_commands(out: Path, regime: Regime, chosen: dict[str, dict], overrides: list[str]) -> list[list[str]]:
    """Each chosen arm at its lr, and its chosen variant beside it, one multirun per seed, in the
    regime file's order (put the longest arms first: ``--jobs 2`` then keeps both cores busy to the end)."""
    commands = []
    for arm, entry in ((arm, chosen[arm]) for arm in regime.arms if arm in chosen):
        names = [arm] + ([f"{arm}{VARIANT_MARK}{entry['variant']}"] if entry.get("variant") else [])
        runs = {name: regime.with_variants()[name] for name in names}
        for name, arm_overrides in runs.items():
            for seed in regime.seeds.split(","):
                commands.append(train_command("protocol_final", out / "final" / name / f"seed{seed}", expand(
                    [*regime.setting, *arm_overrides, f"optim.lr={entry['lr']:g}", f"seed={seed}",
                     f"data.solution_style={regime.styles}", *regime.final, *overrides], out)))
    return commands


def selection_markdown(chosen: dict[str, dict]) -> str:
    rows = [[arm, f"{entry['lr']:g}" + (f" ({entry['edge']} of the grid)" if entry.get("edge") else "")
             + (f" (that of {entry['lr_from']})" if entry.get("lr_from") else ""),
             f"{entry['validation_accuracy']:.3f}" if "validation_accuracy" in entry else "–",
             "–" if entry.get("start") is None else f"{entry['start']:.3f}",
             ", ".join(f"{c['lr']:g}: {c['final']:.3f}" for c in entry.get("candidates", [])) or "–",
             entry.get("variant") or "–",
             ", ".join(f"{name}: {score:.3f}" for name, score in entry.get("variant_scores", {}).items()) or "–"]
            for arm, entry in chosen.items()]
    return ("Learning rate per arm, then its variant, chosen on the validation split (final val/accuracy; lr ties: "
            "the mean over the evals after the start, then the smaller lr; a variant must beat the arm's own "
            "setting; an arm with lr_from takes another arm's lr). The eval split was not scored.\n\n"
            + markdown_table(["arm", "lr", "val accuracy", "val accuracy at start", "final val accuracy per lr",
                              "variant chosen", "final val accuracy per variant"], rows))


def check_arms(regime: Regime, out: Path, overrides: list[str]) -> None:
    """Compose every arm's (and variant's) final job before anything runs: a misspelt override or a
    bad value is one :class:`RegimeError` naming the arm, not a failure of each of its jobs later."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sdharness.cli import composition_error_message
    from sdharness.config import CONF_DIR, ConfigError, register_configs, to_train_config

    register_configs()
    for name, arm_overrides in regime.with_variants().items():
        words = expand([*regime.setting, *arm_overrides, f"data.solution_style={regime.styles}", *regime.final,
                        *overrides], out)
        try:
            with initialize_config_dir(config_dir=str(SWEEPS_DIR), version_base="1.3"):
                to_train_config(compose("protocol_final", [f"hydra.searchpath=[file://{CONF_DIR}]", *words]))
        except ConfigError as error:
            raise RegimeError(f"arm {name}: {error}") from None
        except (HydraException, OmegaConfBaseException) as error:
            raise RegimeError(f"arm {name}: {composition_error_message(error)}") from None


def prepare(out: Path, regime: Regime, dry_run: bool) -> None:
    for command in regime.prepare:
        words = [sys.executable, "-m", *expand(command, out)]
        print("+ " + " ".join(words), flush=True)
        if not dry_run and subprocess.run(words).returncode:
            raise SystemExit(f"sdharness-regime: preparing the data failed: {' '.join(command)}; fix it and rerun "
                             "(the regime's jobs have not started)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdharness-regime", description=__doc__.split("\n")[0])
    parser.add_argument("regime", help=f"a file of sweeps/regimes/ ({', '.join(REGIME_CHOICES)}) or a path")
    parser.add_argument("--out", required=True, help="regime dir: select/, selection.json, final/, final/report/")
    parser.add_argument("--stage", choices=("all", "select", "final"), default="all",
                        help="final: reuse OUT/selection.json")
    parser.add_argument("--jobs", type=int, default=2, help="multiruns at once (2: one per core of the 2-core VM)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. model=tiny_random")
    args = parser.parse_args(argv)
    path = Path(args.regime) if args.regime.endswith(".yaml") else REGIMES_DIR / f"{args.regime}.yaml"
    if not path.is_file():
        parser.error(f"no regime {args.regime!r}: choose from {', '.join(REGIME_CHOICES)} or give a .yaml path")
    out = Path(args.out)
    try:
        regime = load_regime(path)
        check_arms(regime, out, args.overrides)
    except RegimeError as error:
        parser.error(str(error))
    out.mkdir(parents=True, exist_ok=True)
    record = {"regime": path.stem, "version": harness_version(), "commit": source_commit(), "jobs": args.jobs, "overrides": args.overrides,
              "seconds": {}}

    def timed(stage, work):
        started = time.monotonic()
        result = work()
        if not args.dry_run:
            record["seconds"][stage] = round(time.monotonic() - started, 1)
            (out / "regime.json").write_text(json.dumps(record, indent=2) + "\n")
        return result

    if args.stage in ("all", "select"):
        timed("prepare", lambda: prepare(out, regime, args.dry_run))
        timed("select", lambda: run_all(select_commands(out, regime, regime.swept(), regime.lrs, args.overrides),
                                        args.jobs, args.dry_run))
        if args.dry_run:
            print(f"# then each arm's variants ({', '.join(regime.variants) or 'none'}) at its chosen lr, and the "
                  f"final stage: every arm at its lr, seeds {regime.seeds}")
            return
        chosen = select_learning_rates(find_runs(out / "select"), arm_of=arm_of)
        variants = variant_arms(regime, chosen)
        timed("select_variants", lambda: run_all(
            [command for name, (overrides, lr) in variants.items()
             for command in select_commands(out, regime, {name: overrides}, f"{lr:g}", args.overrides)],
            args.jobs, False))
    if args.stage == "final" and (out / "selection.json").exists():
        chosen = json.loads((out / "selection.json").read_text())
    else:
        if not (out / "select").is_dir():
            parser.error(f"no selection stage under {out / 'select'}: run --stage select first")
        chosen = choose(find_runs(out / "select"), regime)
        if not chosen:
            parser.error(f"no run under {out / 'select'} logged val/accuracy")
        (out / "selection.json").write_text(json.dumps(chosen, indent=2) + "\n")
        (out / "selection.md").write_text(selection_markdown(chosen) + "\n")
        print(selection_markdown(chosen), flush=True)
    if args.stage == "select":
        return
    timed("final", lambda: run_all(final_commands(out, regime, chosen, args.overrides), args.jobs, args.dry_run))
    if args.dry_run:
        return
    result = timed("report", lambda: build_report(find_runs(out / "final"), out / "final" / "report",
                                                  title=f"regime {path.stem}: {regime.description}"))
    print(f"\nFinal scores:\n{result['table']}\n\nReport: {result['path']}", flush=True)


if __name__ == "__main__":
    main()
