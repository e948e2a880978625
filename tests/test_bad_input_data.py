"""Bad input, part two (issue #27), in the data: held-out problems that are training problems,
answers in every common notation, completions without the answer marker under
``loss.positions=reasoning``, and probe references not in the student's format. Run-level cases
are in ``tests/test_bad_input_runs.py``; the first part is ``tests/test_bad_input.py``.
"""

from __future__ import annotations

import json
import logging

import pytest

from sdharness.config import DataConfig
from sdharness.data.datamodule import load_data
from sdharness.data.jsonl import DataError
from tests.conftest import TINY, compose_config
from tests.test_bad_input import read_metrics


def write_rows(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def problem(i: int) -> dict:
    return {"problem": f"Start with {i}. Add 3.", "solution": f"{i} + 3 = {i + 3}\nThe answer is {i + 3}.",
            "answer": str(i + 3)}


# ------------------------------------------------------------------------------- contamination

@pytest.fixture
def contaminated(tmp_path):
    """8 training rows; an eval file of 4 whose first 3 are training rows (spacing changed)."""
    train = write_rows(tmp_path / "train.jsonl", [problem(i) for i in range(8)])
    copies = [{"problem": f"Start with  {i}.\nAdd 3. ", "answer": str(i + 3)} for i in (5, 2, 7)]
    evaluation = write_rows(tmp_path / "eval.jsonl", [*copies, {"problem": "Start with 40. Add 3.", "answer": "43"}])
    return train, evaluation


def test_eval_problems_that_are_training_problems_are_counted_and_warned(contaminated, caplog):
    train, evaluation = contaminated
    with caplog.at_level(logging.WARNING, logger="sdharness"):
        loaded = load_data(DataConfig(name="jsonl", path=train, eval_path=evaluation))
    assert loaded.contamination == {"eval_in_train": 3, "validation_in_train": 0, "validation_in_eval": 0}
    assert ("3 of 4 eval problems also occur in the training problems (whitespace normalised), e.g. "
            f"'Start with  5.\\nAdd 3. ' at {evaluation}:1; their scores measure recall") in caplog.text
    assert "(data/eval_in_train; data.strict=true makes this an error)" in caplog.text


def test_eval_file_equal_to_the_training_file_counts_every_problem(contaminated):
    train, _ = contaminated
    assert load_data(DataConfig(name="jsonl", path=train, eval_path=train)).contamination["eval_in_train"] == 8


def test_contamination_is_an_error_under_strict(contaminated):
    train, evaluation = contaminated
    with pytest.raises(DataError, match=r"3 of 4 eval problems also occur in the training problems .*eval.jsonl:1; "
                                        r".*remove them from data.path or data.eval_path$"):
        load_data(DataConfig(name="jsonl", path=train, eval_path=evaluation, strict=True))


@pytest.mark.slow
def test_contamination_count_reaches_the_run_metrics(contaminated, tmp_path):
    from sdharness.train import train

    train_path, evaluation = contaminated
    train(compose_config(TINY + ["data=jsonl", f"data.path={train_path}", f"data.eval_path={evaluation}",
                                 "trainer.max_steps=1", "logger.mode=disabled", "eval.at_start=false"]),
          tmp_path / "run")
    logged = [row for row in read_metrics(tmp_path / "run") if row.get("data/eval_in_train")]
    assert [float(row["data/eval_in_train"]) for row in logged] == [3.0]


def test_builtin_tasks_draw_disjoint_splits():
    for task in ("chain", "columns"):
        loaded = load_data(DataConfig(task=task, train_size=512, eval_size=128, validation_size=64))
        assert loaded.contamination == {"eval_in_train": 0, "validation_in_train": 0, "validation_in_eval": 0}


def test_validation_split_overlapping_the_eval_split_is_refused_when_it_selects(tmp_path):
    from sdharness.tools.protocol import check_selection_data, main

    train = write_rows(tmp_path / "train.jsonl", [problem(i) for i in range(8)])
    evaluation = write_rows(tmp_path / "eval.jsonl", [problem(0), problem(30)])  # row 0 is the validation split's
    data = DataConfig(name="jsonl", path=train, eval_path=evaluation, validation_size=2)
    assert load_data(data).contamination["validation_in_eval"] == 1  # only warned when it selects nothing
    message = (r"1 of 2 validation problems also occur in the eval problems .*; data.evaluate_on=validation selects "
               r"on a split that must not overlap the eval split$")
    with pytest.raises(DataError, match=message):
        load_data(DataConfig(name="jsonl", path=train, eval_path=evaluation, validation_size=2,
                             evaluate_on="validation"))
    overrides = ["model=tiny_random", "data=jsonl", f"data.path={train}", f"data.eval_path={evaluation}",
                 "data.validation_size=2"]
    with pytest.raises(DataError, match=message):
        check_selection_data(overrides)
    with pytest.raises(SystemExit) as exit_:  # the protocol refuses before it launches a job
        main(["--out", str(tmp_path / "protocol"), *overrides])
    assert exit_.value.code == 2 and not (tmp_path / "protocol").exists()
