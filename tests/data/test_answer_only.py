"""The answer-only regime: the built-in task's training pool without solutions, bootstrapped back into
``data.solutions_path``, on the same validation and eval splits; and a run on a bootstrap's output
counting the bootstrap's sampling from step 0, once."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from sdharness.config import ConfigError, DataConfig, to_train_config
from sdharness.data.loading import NO_SOLUTION, load_data
from sdharness.errors import DataError
from sdharness.methods.accounting import X_AXES
from sdharness.tools import answer_pool as pool_tool
from sdharness.tools.bootstrap import BootstrapSettings, bootstrap_to_file
from sdharness.tools.provenance import bootstrap_record, provenance_path
from tests.conftest import TINY, compose_config
from tests.tools.test_bootstrap import TINY as TINY_MODEL, fake_sampler

PROTOCOL_DATA = DataConfig(name="arithmetic", task="columns", difficulty="hard", train_size=2304, validation_size=256,
                           eval_size=256)
SPLIT = ["data.train_size=8", "data.validation_size=2", "data.eval_size=4"]
# Counters a run on the bootstrap output starts from; the sidecar is edited to these so that each is
# nonzero and none equals another (the fake sampler has no model, so no FLOPs of its own).
OFFSET = {"rollouts": 24, "generated_tokens": 700, "forward_tokens": 940, "flops": 3.5e9, "wall_seconds": 1000.0}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def bootstrapped(tmp_path: Path, data: DataConfig) -> Path:
    """The pool of ``data`` bootstrapped by the fake sampler (row 2 of the pool never solved, so dropped),
    its sidecar's cost set to OFFSET."""
    pool = write_rows(tmp_path / "pool.jsonl", pool_tool.answer_pool(data))
    out = tmp_path / "solved.jsonl"
    bootstrap_to_file(pool, out, BootstrapSettings(k=4), model_cfg=TINY_MODEL, prompt_cfg=to_train_config(
        compose_config(TINY)).prompt, sample_fn=fake_sampler())
    record = json.loads(provenance_path(out).read_text())
    record["summary"]["cost"].update(OFFSET)
    provenance_path(out).write_text(json.dumps(record))
    return out


def test_the_pool_is_the_protocols_training_problems_without_solutions(tmp_path):
    plain = load_data(PROTOCOL_DATA)
    pool = pool_tool.answer_pool(PROTOCOL_DATA)
    assert len(pool) == 2048 and pool == [{"problem": r["problem"], "answer": r["answer"]} for r in plain.train]
    held_out = {r["problem"] for r in plain.validation + plain.evaluation}
    assert len(held_out) == 512 and not held_out & {r["problem"] for r in pool}
    pool_tool.main(["--out", str(tmp_path / "pool.jsonl"), "experiment=protocol"])
    assert [json.loads(line) for line in (tmp_path / "pool.jsonl").read_text().splitlines()] == pool


def test_pool_command_errors_in_one_line(tmp_path, capsys):
    for argv, message in ((["data=jsonl", "data.path=x.jsonl"], "the answer-only pool is written for the built-in"),
                          (["data.difficuly=hard"], "data.difficuly is not a config key")):
        with pytest.raises(SystemExit) as exit_info:
            pool_tool.main(["--out", str(tmp_path / "p.jsonl"), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_a_run_on_the_bootstrap_output_keeps_the_tasks_validation_and_eval_splits(tmp_path):
    data = to_train_config(compose_config(TINY + SPLIT)).data
    solved = bootstrapped(tmp_path, data)
    plain, loaded = load_data(data), load_data(replace(data, solutions_path=str(solved)))
    assert loaded.evaluation == plain.evaluation and loaded.validation == plain.validation
    by_problem = {row["problem"]: row for row in map(json.loads, solved.read_text().splitlines())}
    assert [row["problem"] for row in loaded.train] == [row["problem"] for row in plain.train
                                                        if row["problem"] in by_problem]
    assert len(loaded.train) == 5 and loaded.skipped == {NO_SOLUTION: 1}  # pool row 2 never solved
    references = {row["problem"]: row["solution"] for row in plain.train}
    for row in loaded.train:  # the bootstrap's trace, not the task's worked reference
        assert row["solution"] == by_problem[row["problem"]]["solution"] != references[row["problem"]]
    assert loaded.contamination == {"eval_in_train": 0, "validation_in_train": 0, "validation_in_eval": 0}


def test_solutions_path_refuses_held_out_problems_and_other_sources(tmp_path):
    data = to_train_config(compose_config(TINY + SPLIT)).data
    plain = load_data(data)
    leaked = write_rows(tmp_path / "leaked.jsonl", [
        {"problem": plain.train[0]["problem"], "solution": "The answer is 1."},
        {"problem": plain.validation[0]["problem"], "solution": "The answer is 2."}])
    with pytest.raises(DataError, match=r"leaked.jsonl:2: problem .* is not one of this config's training problems"):
        load_data(replace(data, solutions_path=str(leaked)))
    with pytest.raises(ConfigError, match=r"data.solutions_path is for the built-in task \(data=arithmetic\), not "
                                          r"data=jsonl"):
        DataConfig(name="jsonl", path="x.jsonl", solutions_path=str(leaked))


def test_bootstrap_record_refuses_output_whose_cost_cannot_be_read(tmp_path):
    rows = write_rows(tmp_path / "solved.jsonl", [{"problem": "p", "solution": "s", "answer": "1",
                                                   "bootstrap": {"samples": 4}}])
    with pytest.raises(DataError, match=r"solved.jsonl is sdharness-bootstrap output .* provenance sidecar .* is "
                                        r"missing, so the sampling's cost cannot be counted"):
        bootstrap_record(rows)
    provenance_path(rows).write_text(json.dumps({"key": {}, "summary": {"problems": 1}}))  # before costs were recorded
    with pytest.raises(DataError, match=r"records no sampling cost .* rerun sdharness-bootstrap"):
        bootstrap_record(rows)
    assert bootstrap_record(write_rows(tmp_path / "plain.jsonl", [{"problem": "p", "solution": "s"}])) is None
    assert bootstrap_record(None) is None


def counter_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("train/generated_tokens")]


@pytest.mark.slow
def test_a_run_on_bootstrap_output_starts_at_its_cost_and_a_resume_counts_it_once(tmp_path):
    from sdharness.train import train

    data = to_train_config(compose_config(TINY + SPLIT)).data
    solved = bootstrapped(tmp_path, data)
    run = TINY + SPLIT + [f"data.solutions_path={solved}", "logger.mode=disabled", "trainer.checkpoint_every_n_steps=1",
                          "eval.every_n_steps=1"]
    train(compose_config(run), tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    logged = next(row for row in rows if row.get("bootstrap/generated_tokens"))
    assert {name: float(logged[f"bootstrap/{name}"]) for name in OFFSET} == OFFSET
    assert [float(logged[f"bootstrap/{name}"]) for name in ("problems", "unsolved_problems", "dropped_problems")] == [
        6.0, 1.0, 1.0]
    assert [float(row["data/skipped_no_bootstrap_solution"]) for row in rows
            if row.get("data/skipped_no_bootstrap_solution")] == [1.0]  # the problem the bootstrap dropped
    first = counter_rows(tmp_path / "run")[0]  # the eval before training: nothing trained, the bootstrap counted
    assert float(first["train/problems_seen"]) == 0 and float(first["train/problems_without_success"]) == 1
    assert {name: float(first[f"train/{name}"]) for name in OFFSET if name != "wall_seconds"} == {
        name: value for name, value in OFFSET.items() if name != "wall_seconds"}
    assert OFFSET["wall_seconds"] <= float(first["train/wall_seconds"]) < OFFSET["wall_seconds"] + 60

    train(compose_config(run + ["trainer.max_steps=3", "ckpt_path=last"]), tmp_path / "run")
    last = counter_rows(tmp_path / "run")[-1]
    assert float(last["train/problems_seen"]) == 5.0  # the 5 solved problems: batches of 2, 2 and 1
    # plain SD samples one completion per problem: the bootstrap's rollouts once, plus training's
    assert float(last["train/rollouts"]) == OFFSET["rollouts"] + 5
    assert float(last["train/problems_without_success"]) == 1
    assert OFFSET["generated_tokens"] < float(last["train/generated_tokens"]) <= OFFSET["generated_tokens"] + 5 * 12
    assert OFFSET["flops"] < float(last["train/flops"]) < 2 * OFFSET["flops"]
    assert set(OFFSET) <= set(X_AXES)
