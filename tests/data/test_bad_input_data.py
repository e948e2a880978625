"""Bad input, part two (issue #27), in the data: held-out problems that are training problems,
answers in every common notation, completions without the answer marker under
``loss.positions=reasoning``, and probe references not in the student's format. Run-level cases
are in ``tests/test_bad_input_runs.py``; the first part is ``tests/test_bad_input.py``.
"""

from __future__ import annotations

import json
import logging
import re

import pytest

from sdharness.config import DataConfig
from sdharness.data.loading import load_data
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


# ------------------------------------------------------------------------ answers in any notation

# completion, gold, builtin's verdict, math_verify's verdict (None: builtin refuses this gold at load time)
NOTATIONS = [
    ("The answer is \u22123.", "-3", True, True),           # Unicode minus sign in the completion
    ("The answer is -3.", "\u22123", True, True),           # ... in the gold answer
    ("The answer is 12.", "\uff11\uff12", True, True),      # full-width digits in the gold answer
    ("The answer is \uff15.", "5", True, True),             # ... in the completion
    ("The answer is 12.", "12 apples", None, True),
    ("The answer is 1/2.", "\\frac{1}{2}", None, True),
    ("The answer is 5.", "\\boxed{5}", None, True),
    ("The answer is 1,024.", "1024", True, True),
    ("The answer is 4.", "5", False, False),
    ("The answer is \u22125.", "5", False, False),
]


@pytest.mark.parametrize("completion, gold, builtin, math_verify", NOTATIONS)
def test_both_checkers_read_answers_in_common_notations(completion, gold, builtin, math_verify):
    from sdharness.data.answers import answer_checker, unreadable_answer

    assert answer_checker("math_verify")(completion, gold) is math_verify
    if builtin is None:
        assert unreadable_answer(gold, "builtin") is not None and unreadable_answer(gold, "math_verify") is None
    else:
        assert answer_checker("builtin")(completion, gold) is builtin and unreadable_answer(gold, "builtin") is None


@pytest.mark.parametrize("name", ["jsonl", "chatlog"])
def test_builtin_checker_refuses_a_gold_answer_it_cannot_read_at_load_time(tmp_path, name):
    if name == "jsonl":
        rows = [problem(1), {**problem(2), "answer": "\\frac{1}{2}"}, problem(3)]
    else:
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "no"}, {"role": "assistant", "content": "The answer is 5."}]
        rows = [{"messages": messages, "answer": "5"}, {"messages": messages, "answer": "\\frac{1}{2}"},
                {"messages": messages, "answer": "5"}]
    path = write_rows(tmp_path / "train.jsonl", rows)
    message = (f"{path}:2: answer '\\\\frac{{1}}{{2}}' is not a number the builtin checker can read (an integer, "
               "decimal or fraction), so no completion could be judged right; set data.checker=math_verify for "
               "answers in other notations, or write it as a number")
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        load_data(DataConfig(name=name, path=path, eval_size=1))
    assert load_data(DataConfig(name=name, path=path, eval_size=1, checker="math_verify")).train


# ------------------------------------------------------------- answer markers under positions=reasoning

def test_answer_marker_missing_is_a_share_and_warned_once_over_the_threshold(caplog):
    from sdharness.distill.positions import AnswerMarkerMonitor

    monitor = AnswerMarkerMonitor("The answer is")
    with caplog.at_level(logging.WARNING, logger="sdharness"):
        assert monitor(["2 + 3 = 5\nThe answer is 5.", "#### 5"]) == {"train/answer_marker_missing": 0.5}
        assert not caplog.text  # half is not over the threshold
        assert monitor(["#### 5", "Answer: 5", "The answer is 5."]) == {"train/answer_marker_missing": 2 / 3}
        assert monitor(["#### 5"]) == {"train/answer_marker_missing": 1.0}
    assert caplog.text.count("loss.positions=reasoning: 67% of this step's completions do not write "
                             "data.answer_marker='The answer is', so all their tokens, the answer included, carry "
                             "loss (train/answer_marker_missing); set data.answer_marker") == 1


@pytest.mark.slow
def test_answer_marker_missing_reaches_the_run_metrics_under_reasoning(tmp_path, caplog):
    from sdharness.train import train

    with caplog.at_level(logging.WARNING, logger="sdharness"):
        train(compose_config(TINY + ["loss.positions=reasoning", "data.answer_marker='####'", "logger.mode=disabled",
                                     "eval.at_start=false"]), tmp_path)
    rows = [row for row in read_metrics(tmp_path) if row.get("train/loss")]
    assert [float(row["train/answer_marker_missing"]) for row in rows] == [1.0, 1.0]  # random text writes no ####
    assert caplog.text.count("do not write data.answer_marker='####'") == 1


# ------------------------------------------------------------------- the probe on the user's data

FREE_TEXT = [{"problem": f"Start with {i}. Add 3.", "answer": str(i + 3),
              "solution": f"Well, if you take {i} things and add three more, you end up with {i + 3}."} for i in range(6)]


def probe_config(overrides: list[str]):
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose_config(["model=tiny_random", "logger.mode=disabled", "max_new_tokens=8",
                                               "data.eval_size=2", "threads=1", *overrides], config_name="probe"))


@pytest.mark.parametrize("setting, comparable", [([], False), (["references_in_student_format=true"], True)],
                         ids=["unsaid", "said"])
def test_probe_deviation_rows_are_na_unless_references_are_in_the_student_format(tmp_path, setting, comparable):
    from sdharness.tools.probe import probe

    path = write_rows(tmp_path / "free.jsonl", FREE_TEXT)
    result = probe(probe_config(["data=jsonl", f"data.path={path}", *setting]), tmp_path / "run")
    assert result["deviation"]["references_in_student_format"] is comparable
    if comparable:
        assert result["deviation"]["deviating"] == 2 and re.search(r"samples leaving the reference +2/2", result["table"])
    else:
        assert result["deviation"] == {"references_in_student_format": False}
        assert "samples leaving the reference" not in result["table"]
        assert re.search(r"\nfirst deviation from the reference +n/a: the references are not in the student's format "
                         r"\(references_in_student_format=true if they are\)\n", result["table"])


def test_probe_refuses_answer_only_eval_rows_before_the_model_loads(tmp_path, monkeypatch):
    import sdharness.tools.probe as probe_module

    monkeypatch.setattr(probe_module, "load_model_and_tokenizer", lambda cfg: pytest.fail("the model was loaded"))
    train = write_rows(tmp_path / "train.jsonl", [problem(i) for i in range(4)])
    answers = write_rows(tmp_path / "answers_only.jsonl", [{"problem": "Start with 9. Add 3.", "answer": "12"}])
    with pytest.raises(DataError, match=rf"^{re.escape(answers)}:1: sdharness-probe puts each problem's solution in "
                                        r"the teacher prompt, and this row has none; give data.eval_path rows with a "
                                        r"solution, or leave data.eval_path out to probe rows held out of data.path$"):
        probe_module.probe(probe_config(["data=jsonl", f"data.path={train}", f"data.eval_path={answers}"]), tmp_path)
