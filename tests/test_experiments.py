"""Every shipped experiment, method and sweep composes and runs.

Each file in ``conf/experiment/`` trains one step on its own model, and so does each choice of
``conf/method/`` in the testbed experiment; each sweep in ``sweeps/`` composes every combination its
sweeper lists (an interval of the Optuna search at both ends, a glob as the group's choices it
matches) and runs the first. ``make train``'s sweep composes exactly the jobs it composed before the
method group existed (tests/golden/testbed_sweep_jobs.json), field for field.
A sweep on the real model (SmolLM2) runs on the tiny random model instead: what is tested is the
config, not the weights.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from omegaconf import OmegaConf

from sdharness.config import CONF_DIR, SWEEPS_DIR, register_configs, to_train_config
from sdharness.train import train
from tests.conftest import compose_config

pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or sweeps

EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
METHODS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))
# Every experiment at its defaults, and every method in the experiment that compares them.
EXPERIMENT_RUNS = [[f"experiment={name}"] for name in EXPERIMENTS] + [["experiment=testbed", f"method={name}"]
                                                                      for name in METHODS]
SWEEPS = sorted(path.stem for path in SWEEPS_DIR.glob("*.yaml"))
# One optimiser step on a few short problems, no W&B: the smallest run that goes through every stage.
SMOKE = ["trainer.max_steps=1", "data.train_size=8", "data.validation_size=2", "data.eval_size=4", "data.batch_size=2",
         "rollout.max_new_tokens=8", "rollout.progress=false", "eval.max_new_tokens=8", "eval.batch_size=4",
         "logger.mode=disabled"]
HEAVY_MODELS = ("smollm2_135m",)


def compose_sweep(name: str, overrides: list[str], hydra_config: bool = False):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(SWEEPS_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides],
                       return_hydra_config=hydra_config)


def sweep_combinations(params: dict) -> list[list[str]]:
    """Every combination of a sweeper's ``params`` as override lists; an interval gives both ends, a
    ``glob(...)`` over a config group the group's choices it matches (as Hydra's basic sweeper does)."""
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        if override.is_sweep_override() and hasattr(override.value(), "start"):  # an Optuna interval
            interval = override.value()
            values = [interval.start, interval.end]
        elif override.is_sweep_override() and isinstance(override.value(), Glob):
            values = override.value().filter(sorted(path.stem for path in (CONF_DIR / key).glob("*.yaml")))
        elif override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            values = [override.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [list(combination) for combination in itertools.product(*axes)]


def assert_one_step_ran(output_dir: Path, metrics: dict, batch_size: int) -> None:
    # The protocol's selection stage scores the validation split: val/*, never eval/*
    assert math.isfinite(metrics["val/accuracy"] if "val/accuracy" in metrics else metrics["eval/accuracy"])
    with open(output_dir / "metrics.csv", newline="") as handle:
        seen = [float(row["train/problems_seen"]) for row in csv.DictReader(handle) if row.get("train/problems_seen")]
    assert max(seen) == batch_size  # exactly one step of one batch
    assert (output_dir / "final_model" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENT_RUNS, ids=" ".join)
def test_experiment_composes_and_runs_one_step(experiment, tmp_path):
    cfg = compose_config([*experiment, *SMOKE])
    assert cfg.model.name not in HEAVY_MODELS, f"{experiment}: experiments must run on a shipped small model"
    metrics = train(cfg, tmp_path)
    assert_one_step_ran(tmp_path, metrics, batch_size=2)


def test_every_experiment_and_sweep_is_covered():
    assert len(EXPERIMENT_RUNS) >= 6 and len(SWEEPS) >= 5  # the globs found the files


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_composes_in_every_experiment(experiment, method):
    cfg = to_train_config(compose_config([f"experiment={experiment}", f"method={method}"]))
    chosen = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml").defaults
    assert {"override /algo": cfg.algo.name} in chosen
    assert {"override /aggregation": cfg.aggregation.name} in chosen or cfg.algo.name != "sd"


def test_make_train_composes_the_jobs_it_composed_before_the_method_group():
    """``make train`` (sweeps/testbed.yaml): the same six jobs in the same order, each config equal field
    for field (interpolations resolved) to what the six ``conf/experiment/testbed_*`` files composed."""
    params = dict(compose_sweep("testbed", [], hydra_config=True).hydra.sweeper.params)
    jobs = [{"overrides": combination, "config": OmegaConf.to_container(compose_sweep("testbed", combination),
                                                                       resolve=True)}
            for combination in sweep_combinations(params)]
    expected = json.loads((Path(__file__).parent / "golden" / "testbed_sweep_jobs.json").read_text())
    assert [job["overrides"] for job in jobs] == [job["overrides"] for job in expected]
    for job, pinned in zip(jobs, expected):
        assert job["config"] == pinned["config"], job["overrides"]


@pytest.mark.slow
@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_composes_every_job_and_runs_the_first(sweep, tmp_path):
    if sweep == "search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="sweeps/search.yaml needs '.[optuna]'")
    params = dict(compose_sweep(sweep, [], hydra_config=True).hydra.sweeper.params or {})
    combinations = sweep_combinations(params)
    assert combinations, f"sweeps/{sweep}.yaml lists no sweeper params"
    model = [] if compose_sweep(sweep, combinations[0]).model.name not in HEAVY_MODELS else ["model=tiny_random"]
    for combination in combinations:  # every job's config passes the checks a run makes before loading a model
        to_train_config(compose_sweep(sweep, [*combination, *model, *SMOKE]))
    metrics = train(compose_sweep(sweep, [*combinations[0], *model, *SMOKE]), tmp_path)
    assert_one_step_ran(tmp_path, metrics, batch_size=2)
