"""The runs of a sweep for ``sdharness-report``: loading job dirs, and labelling runs by method and setting.

A run is a directory with ``.hydra/config.yaml`` and ``metrics.csv``. Its label is its method
(``sd/clip/tau=1``, ``sd/trust_region/kl_bound=0.1``, ``sft``, ``grpo``), then its setting when it is
not plain on-policy training on problems with reference solutions (``guided=on_failure``,
``chatlog``, ``bootstrapped``), then any other config key that differs between runs of one method
(``optim.lr=3e-05``); runs that differ only in ``seed`` share a label and are averaged.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from sdharness.data import SOURCES
from sdharness.distill.aggregation import AGGREGATIONS, PARAMETER_NAMES
from sdharness.jobs import read_failure
from sdharness.report.curves import AXIS_NAMES
from sdharness.tools.provenance import first_row_is_bootstrapped, provenance_path

log = logging.getLogger(__name__)

PARAMETER_KEYS = tuple(f"aggregation.{name}" for name in PARAMETER_NAMES)  # aggregation.tau, aggregation.kl_bound
METHOD_KEYS = ("algo.name", "aggregation.name", *PARAMETER_KEYS)
SETTING_KEYS = ("rollout.guidance", "algo.hint_source", "data.name", "teacher.weights",
                "teacher.ema_decay")  # see settings()
DEFAULT_TEACHER = "initial"
# data.solutions_path: the label's `bootstrapped` says it (see bootstrapped_data)
NOT_IN_LABEL = {"seed", "tags", "output_dir", "ckpt_path", "resume_allow_changes", "data.solutions_path", *METHOD_KEYS,
                *SETTING_KEYS}
CORRUPT = "corrupt metrics.csv"  # a run's failure type when a logged value is outside its range


@dataclass
class Run:
    name: str
    config: dict  # flattened: "optim.lr" -> value
    rows: list[dict] = field(default_factory=list)  # metrics.csv rows, numbers (or None)
    failure: dict | None = None
    finished: bool = True  # wrote its final model (local) / state "finished" (W&B)
    overrides: list[str] = field(default_factory=list)
    label: str = ""
    bootstrapped: bool = False  # trained on sdharness-bootstrap output (see bootstrapped_data)

    @property
    def evals(self) -> list[dict]:
        return [row for row in self.rows if row.get("eval/accuracy") is not None]

    @property
    def status(self) -> str:
        if self.failure:
            return "corrupt" if self.failure.get("error_type") == CORRUPT else "failed"
        return "completed" if self.finished and self.evals else "incomplete"

    def final(self) -> dict:
        """The last eval row, plus the last value of any ``lmeval/*`` column."""
        final = {k: v for k, v in self.evals[-1].items() if v is not None} if self.evals else {}
        for row in self.rows:
            final.update({k: v for k, v in row.items() if k.startswith("lmeval/") and v is not None})
        return final


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


# ---------------------------------------------------------------- labels
def teacher_of(config: dict) -> str:
    """The teacher of a run's flattened config: ``initial``, ``live`` or ``ema<decay>`` (``ema0.95``)."""
    weights = config.get("teacher.weights", DEFAULT_TEACHER)
    return f"ema{float(config.get('teacher.ema_decay', 0.99)):g}" if weights == "ema" else str(weights)


def settings(config: dict, bootstrapped: bool = False) -> list[str]:
    """What the run trains on, when it is not on-policy samples of problems with reference
    solutions and the frozen initial teacher: ``teacher=<teacher_of>`` and ``guided=<rollout.guidance>``
    (sd only: the other algos have no teacher and ignore guidance), ``sibling_hints`` (sd with
    ``algo.hint_source=sibling``: no references, a group's successful completion is the hint), ``chatlog``
    (``data=chatlog``) and ``bootstrapped`` (sdharness-bootstrap data)."""
    found, guidance = [], config.get("rollout.guidance")
    if config.get("algo.name") == "sd" and teacher_of(config) != DEFAULT_TEACHER:
        found.append(f"teacher={teacher_of(config)}")
    if config.get("algo.name") == "sd" and guidance not in (None, "never"):
        found.append(f"guided={guidance}")
    if config.get("algo.name") == "sd" and config.get("algo.hint_source") == "sibling":
        found.append("sibling_hints")
    if config.get("data.name") in SOURCES and SOURCES[config["data.name"]].logged_completions:
        found.append(config["data.name"])
    if bootstrapped:
        found.append("bootstrapped")
    return found


def aggregation_parameter(config: dict) -> tuple[str, object] | None:
    """``(name, value)`` of the parameter of a flattened sd config's aggregation (``("kl_bound", 0.1)``);
    None where the aggregation has none, is unknown or the value is unset. Runs from before
    ``aggregation.kl_bound`` existed carried trust_region's bound in ``aggregation.tau``."""
    aggregation = AGGREGATIONS.get(config.get("aggregation.name"))
    if aggregation is None or aggregation.parameter is None:
        return None
    name = aggregation.parameter.name
    value = config.get(f"aggregation.{name}")
    if value is None and "aggregation.kl_bound" not in config and name == "kl_bound":
        value = config.get("aggregation.tau")
    return None if value is None else (name, value)


def unread_parameter_keys(config: dict) -> set[str]:
    """The aggregation parameter keys (:data:`PARAMETER_KEYS`) that a flattened sd config's aggregation
    does not read; none for a run from before ``aggregation.kl_bound`` existed (its tau may be the bound)."""
    aggregation = AGGREGATIONS.get(config.get("aggregation.name"))
    own = aggregation and aggregation.parameter and f"aggregation.{aggregation.parameter.name}"
    if aggregation is None or (own and own not in config):
        return set()
    return {key for key in PARAMETER_KEYS if key != own}


def method_label(config: dict, bootstrapped: bool = False) -> str:
    algo = config.get("algo.name", "?")
    if algo != "sd":
        method = str(algo)
    else:
        parameter = aggregation_parameter(config)
        method = f"sd/{config.get('aggregation.name', '?')}" + (f"/{parameter[0]}={show(parameter[1])}"
                                                                 if parameter else "")
    return " ".join([method] + settings(config, bootstrapped))


def differing_keys(configs: list[dict]) -> list[str]:
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def family(run: Run) -> str:
    """The run's method and setting, the aggregation's parameter aside: the runs among which other
    differing keys are named."""
    return method_label({**run.config, **dict.fromkeys(PARAMETER_KEYS)}, run.bootstrapped)


def extra_label_keys(runs: list[Run]) -> dict[str, list[str]]:
    """family -> the keys but seed, method and setting that differ between its completed runs."""
    done = [r for r in runs if r.status == "completed"]
    return {f: [k for k in differing_keys([r.config for r in done if family(r) == f]) if k not in NOT_IN_LABEL]
            for f in {family(r) for r in done}}


def label_runs(runs: list[Run]) -> None:
    """Label = method (``sd/clip/tau=1``, ``sd/trust_region/kl_bound=0.1``, ``sft``), setting
    (``guided=always``, ``chatlog``, ``bootstrapped``), then each key that differs within its family
    (``optim.lr=3e-05``, see :func:`extra_label_keys`); a label's runs are its seeds."""
    extra = extra_label_keys(runs)
    for run in runs:
        run.label = " ".join([method_label(run.config, run.bootstrapped)]
                             + [f"{k}={show(run.config.get(k))}" for k in extra.get(family(run), [])])


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """label -> its completed runs, sd first (by aggregation, its parameter), then sft, grpo."""
    groups: dict[str, list[Run]] = {}
    order = lambda r: ({"sd": 0, "sft": 1, "grpo": 2}.get(r.config.get("algo.name"), 3),
                       str(r.config.get("aggregation.name")),
                       number((aggregation_parameter(r.config) or (None, None))[1]) or 0, r.label)
    for run in sorted((r for r in runs if r.status == "completed"), key=order):
        groups.setdefault(run.label, []).append(run)
    return groups


# ---------------------------------------------------------------- loading
def bootstrapped_data(config: dict, cwd: str | Path | None = None) -> bool:
    """True when the file the run's solutions come from (``data.solutions_path``, or ``data.path`` under
    ``data=jsonl``; relative paths against ``cwd``, the job's launch directory) is sdharness-bootstrap
    output: its provenance sidecar exists, or its first row carries the ``bootstrap`` record. False
    when the file is not there (read elsewhere, from W&B)."""
    path = config.get("data.solutions_path") or (
        config.get("data.path") if config.get("data.name") == "jsonl" else None)
    if not isinstance(path, str) or path.startswith("pkg://"):
        return False
    path = Path(cwd or ".") / Path(path).expanduser()
    return provenance_path(path).is_file() or first_row_is_bootstrapped(path)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.csv``, as numbers. A line with the wrong number of fields, or a last
    line without its newline (the file was copied, or its run killed, mid-write), is dropped with a
    warning naming the file: a row cut inside a field reads as another, wrong, number."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        log.warning("%s: dropped its last line, which has no newline (cut off mid-write: the file was copied, or "
                    "its run killed, while it was written): %r", path, lines.pop()[:80])
    parsed = list(csv.reader(lines))
    header, rows = (parsed[0], parsed[1:]) if parsed else ([], [])
    kept = []
    for number_, fields in enumerate(rows, start=2):
        if len(fields) != len(header):
            log.warning("%s:%d: dropped, %d fields where the header has %d", path, number_, len(fields), len(header))
            continue
        kept.append({key: number(value) for key, value in zip(header, fields) if key})
    return kept


def out_of_range(rows: list[dict]) -> str | None:
    """The first logged value outside its range (an accuracy outside [0, 1], a negative count on an
    axis the report plots against, a negative data count), or None."""
    for index, row in enumerate(rows):
        for key, value in row.items():
            if value is None:
                continue
            name = key.rsplit("/", 1)[-1]
            if ("accuracy" in name and not 0 <= value <= 1) or (
                    (name in AXIS_NAMES or key.startswith("data/")) and value < 0):
                return f"{key}={value:g} in row {index + 1} (after the header), outside its range"
    return None


def load_run(run_dir: Path) -> Run:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs Hydra (${hydra:...}): keep it as written
        config = OmegaConf.to_container(cfg, resolve=False)
    rows = read_metrics(run_dir / "metrics.csv")
    failure = read_failure(run_dir)
    wrong = out_of_range(rows)
    if wrong and failure is None:  # a number in no table: the file holds another run's rows, or is damaged
        failure = {"error_type": CORRUPT, "message": f"{run_dir / 'metrics.csv'}: {wrong}", "traceback_tail": ""}
    overrides_file, hydra_file = run_dir / ".hydra" / "overrides.yaml", run_dir / ".hydra" / "hydra.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd") if hydra_file.exists() else None
    config = flatten(config)
    return Run(str(run_dir), config, rows, failure, (run_dir / "final_model").is_dir(),
               [str(o) for o in overrides], bootstrapped=bootstrapped_data(config, cwd))


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
