"""The column-addition task (data.task=columns) and the task registry, on hand-checked cases."""

from __future__ import annotations

import random

import pytest

from sdharness.config import ConfigError, DataConfig
from sdharness.data.builtin import TASKS, builtin_task
from sdharness.data.columns import (COLUMNS, Column, ColumnProblem, add_columns, assemble, digit_pairs,
                                    foreign_solution, native_solution, parse_line)
from sdharness.data.loading import load_problems
from sdharness.data.answers import is_correct, is_early_answer
from sdharness.data.chain import CHAIN
from sdharness.tools.probe_figures import first_difference

# 9581 + 4637 = 14218: carries out of the tens, hundreds and thousands; a final carry leads.
PROBLEM = "Add 9581 and 4637. What is the sum?"
NATIVE = "1+7=8\n8+3=11\n5+6+1=12\n9+4+1=14\nThe answer is 14218."
FOREIGN = "1&7 -> 8; 8&3 -> 11; 5&6 -> 12; 9&4 -> 14. So: 14218"


def test_hand_made_problem_native_and_foreign():
    drawn = ColumnProblem("9581", "4637")
    assert COLUMNS.problem_text(drawn) == PROBLEM
    assert COLUMNS.solution(drawn, "native") == NATIVE
    assert COLUMNS.solution(drawn, "foreign") == FOREIGN
    assert COLUMNS.answer(drawn) == "14218"
    assert is_correct(NATIVE, "14218") and not is_early_answer(NATIVE, "14218", derived_at=COLUMNS.derived_at)


def test_columns_units_first_and_the_carry_follows_the_written_total():
    assert digit_pairs("9581", "4637") == [(1, 7), (8, 3), (5, 6), (9, 4)]
    assert digit_pairs("95", "4637") == [(5, 7), (9, 3), (0, 6), (0, 4)]  # the shorter number padded with 0
    assert add_columns([(8, 3), (5, 6)], carry=True) == [Column(8, 3, True, 12), Column(5, 6, True, 12)]
    assert [column.line() for column in add_columns([(4, 5), (2, 3)])] == ["4+5=9", "2+3=5"]


@pytest.mark.parametrize("columns,answer", [
    ([Column(1, 7, False, 8), Column(8, 3, False, 11), Column(5, 6, True, 12), Column(9, 4, True, 14)], "14218"),
    ([Column(3, 4, False, 7), Column(2, 2, False, 4)], "47"),  # no final carry
    ([Column(9, 9, False, 18)], "18"),
    # written lines, right or wrong, are what the answer assembles: 8+3 written 10 gives digit 0
    ([Column(1, 7, False, 8), Column(8, 3, False, 10), Column(5, 6, True, 12), Column(9, 4, True, 14)], "14208"),
])
def test_answer_assembles_each_lines_last_digit_and_a_final_carry(columns, answer):
    assert assemble(columns) == answer


def test_native_and_foreign_of_written_columns():
    columns = add_columns(digit_pairs("482193", "396714"))
    assert native_solution(columns) == ("3+4=7\n9+1=10\n1+7+1=9\n2+6=8\n8+9=17\n4+3+1=8\nThe answer is 878907.")
    assert foreign_solution(columns) == "3&4 -> 7; 9&1 -> 10; 1&7 -> 9; 2&6 -> 8; 8&9 -> 17; 4&3 -> 8. So: 878907"
    assert 482193 + 396714 == 878907


class _Scripted:
    """A stand-in random source: ``randrange`` gives the slipped column, ``choice`` the scripted picks in order."""

    def __init__(self, step: int, *choices):
        self.step, self.choices = step, list(choices)

    def randrange(self, stop: int) -> int:
        assert 0 <= self.step < stop
        return self.step

    def choice(self, options):
        pick = self.choices.pop(0)
        assert pick in options, (pick, options)
        return pick


@pytest.mark.parametrize("script,text,slip", [
    # a wrong total in the tens (11 written 9): no carry into the hundreds, the answer's tens digit 9
    ((1, "sum", -2), "1+7=8\n8+3=9\n5+6=11\n9+4+1=14\nThe answer is 14198.", "9"),
    # 11 written 10: still >= 10, so the carry stays; only the answer's tens digit changes
    ((1, "sum", -1), "1+7=8\n8+3=10\n5+6+1=12\n9+4+1=14\nThe answer is 14208.", "0"),
    # the tens' carry dropped: "=" where "+1" belonged, then 5+6=11 consistent with what is written
    ((2, "carry"), "1+7=8\n8+3=11\n5+6=11\n9+4+1=14\nThe answer is 14118.", "="),
    # a carry invented into the units' neighbour: "+1" masked, the total follows the written terms
    ((1, "carry"), "1+7=8\n8+3+1=12\n5+6+1=12\n9+4+1=14\nThe answer is 14228.", "+1"),
    # the hundreds' top digit misread as its neighbour's (8 for 5): 8+6+1=15
    ((2, "misread", 8), "1+7=8\n8+3=11\n8+6+1=15\n9+4+1=14\nThe answer is 14518.", "8"),
    # a wrong total in the last column (14 written 16) leads the answer
    ((3, "sum", 2), "1+7=8\n8+3=11\n5+6+1=12\n9+4+1=16\nThe answer is 16218.", "6"),
])
def test_slipped_solution_is_consistent_after_the_slip_and_masks_only_the_slip(script, text, slip):
    step, *choices = script
    got, (begin, end) = COLUMNS.slipped_solution(_Scripted(step, *choices), ColumnProblem("9581", "4637"))
    assert got == text
    assert got[begin:end] == slip
    assert got[:begin] == NATIVE[:begin]  # everything before the slip is the correct solution


def test_slipped_solutions_from_a_real_random_source_are_consistent():
    rng = random.Random(3)
    for _ in range(300):
        drawn = COLUMNS.draw(rng, "hard")
        text, (begin, end) = COLUMNS.slipped_solution(rng, drawn)
        lines = text.splitlines()
        columns = [parse_line(line) for line in lines[:-1]]
        assert len(columns) == len(drawn.top) and None not in columns
        wrong = [i for i, c in enumerate(columns) if c.total != c.top + c.bottom + int(c.carry)
                 or (c.top, c.bottom) != digit_pairs(drawn.top, drawn.bottom)[i]
                 or c.carry != (i > 0 and columns[i - 1].total >= 10)]
        assert len(wrong) == 1  # exactly one slipped line; every other line is right given the one before
        assert lines[-1] == f"The answer is {assemble(columns)}."
        assert text[:begin] == COLUMNS.solution(drawn, "native")[:begin] and 1 <= end - begin <= 2


def test_consistent_continuation_after_a_wrong_total_differs_at_the_answer():
    completion = "1+7=8\n8+3=10\n5+6+1=12\n9+4+1=14\nThe answer is 14208."
    got = COLUMNS.consistent_continuation(PROBLEM, completion, NATIVE, completion.index("10") + 1)
    # the student kept the carry although it wrote 10 (>= 10, so the carry is right): only the answer differs
    assert got == {"consistent": "1+7=8\n8+3=10\n5+6+1=12\n9+4+1=14\nThe answer is 14208.",
                   "copied": "1+7=8\n8+3=10\n5+6+1=12\n9+4+1=14\nThe answer is 14218."}
    assert first_difference(got["consistent"], got["copied"]) == len("1+7=8\n8+3=10\n5+6+1=12\n9+4+1=14\nThe answer is 142")


def test_consistent_continuation_after_a_total_below_ten_drops_the_next_carry():
    completion = "1+7=8\n8+3=9\n5+6+1=12\n"
    got = COLUMNS.consistent_continuation(PROBLEM, completion, NATIVE, completion.index("9"))
    assert got == {"consistent": "1+7=8\n8+3=9\n5+6=11\n9+4+1=14\nThe answer is 14198.",
                   "copied": "1+7=8\n8+3=9\n5+6+1=12\n9+4+1=14\nThe answer is 14218."}
    assert first_difference(got["consistent"], got["copied"]) == len("1+7=8\n8+3=9\n5+6")  # "=" against "+"


def test_a_misread_with_the_right_total_changes_nothing_after_it():
    """35 + 44: the units written 4+5=9 (digits swapped) give the reference's total; the two
    continuations agree everywhere, so the probe does not count it as a slip."""
    problem, reference = "Add 35 and 44. What is the sum?", "5+4=9\n3+4=7\nThe answer is 79."
    got = COLUMNS.consistent_continuation(problem, "4+5=9\n3+4=7\n", reference, 0)
    assert got == {"consistent": "4+5=9\n3+4=7\nThe answer is 79.", "copied": "4+5=9\n3+4=7\nThe answer is 79."}
    assert first_difference(got["consistent"], got["copied"]) is None


@pytest.mark.parametrize("completion,slip_at", [
    ("1+7=8\n8+3=11\n5+6+1=12\n9+4+1=14\nThe answer is 14228.", 44),  # in the answer line: no column slipped
    ("1+7=8\n8+3 = 11\n", 9),                                        # not the line format
    ("1+7=8\n8+3=1", 10),                                             # the slipped line unfinished
    ("1+7=8\nThe answer is 8.", 6),                                   # stopped early
])
def test_consistent_continuation_is_none_for_other_deviations(completion, slip_at):
    assert COLUMNS.consistent_continuation(PROBLEM, completion, NATIVE, slip_at) is None


def test_difficulty_sets_the_length_and_splits_are_deterministic():
    for difficulty, widths in {"single": {1, 2}, "easy": {3, 4}, "hard": {6, 7}, "seven": {7}}.items():
        rows = COLUMNS.split(5, 200, difficulty)
        assert rows == COLUMNS.split(5, 200, difficulty) and len({row["problem"] for row in rows}) == len(rows)
        assert {len(row["problem"].split()[1]) for row in rows} == widths
        assert all(is_correct(row["solution"], row["answer"]) for row in rows)
        assert all(int(row["answer"]) == sum(int(word.rstrip(".")) for word in row["problem"].split()[1:4:2])
                   for row in rows)


def test_the_registry_and_data_task():
    assert TASKS == {"chain": CHAIN, "columns": COLUMNS}
    assert builtin_task("columns") is COLUMNS
    with pytest.raises(ConfigError, match=r"^data\.task='sums' is unknown; choose one of: chain, columns$"):
        DataConfig(task="sums")
    train, evaluation = load_problems(DataConfig(task="columns", difficulty="hard", train_size=20, eval_size=8))
    assert train == COLUMNS.split(1234, 20, "hard") and len(evaluation) == 8
    assert not {row["problem"] for row in train} & {row["problem"] for row in evaluation}
    chain_train, _ = load_problems(DataConfig(difficulty="hard", train_size=20, eval_size=8))
    assert chain_train == CHAIN.split(1234, 20, "hard")  # the default task is the chained one


def test_seven_draws_only_seven_digit_operands_for_train_and_eval():
    cfg = DataConfig(task="columns", difficulty="seven", eval_difficulty="seven", train_size=64, eval_size=64)
    for rows in load_problems(cfg):
        operands = [word.rstrip(".") for row in rows for word in row["problem"].split()[1:4:2]]
        assert len(operands) == 128 and all(len(number) == 7 and number[0] != "0" for number in operands)


@pytest.mark.parametrize("field", ["difficulty", "eval_difficulty"])
def test_seven_is_refused_for_the_chain_task_with_the_fix(field):
    with pytest.raises(ConfigError, match=rf"^data\.{field}='seven' is not a difficulty of data\.task=chain; choose "
                                          r"one of: single, easy, hard or set data\.task=columns$"):
        DataConfig(**{field: "seven"})
    with pytest.raises(ConfigError, match=r"^data\.difficulty='eight' is not a difficulty of data\.task=columns; "
                                          r"choose one of: single, easy, hard, seven$"):
        DataConfig(task="columns", difficulty="eight")
    with pytest.raises(ValueError, match=r"^data\.difficulty='seven' is not a difficulty of data\.task=chain"):
        CHAIN.split(0, 4, "seven")


def test_data_task_composes_from_the_command_line():
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    assert compose_config().data.task == "chain"
    cfg = OmegaConf.to_object(compose_config(["data.task=columns"]))
    assert cfg.data.task == "columns"


@pytest.mark.parametrize("text,early", [
    (NATIVE, False),
    ("The answer is 14218.", True),                                   # stated, never worked
    ("The answer is 14218.\n1+7=8\n8+3=11\n5+6+1=12\n9+4+1=14", True),  # stated before the lines
    ("1+7=8\n8+3=11\nThe answer is 14218.", True),                    # the lines written do not assemble it
    ("1+7=8\n8+3=10\n5+6+1=12\n9+4+1=14\nThe answer is 14208.", False),  # a wrong answer is never early
])
def test_early_answer_on_column_work(text, early):
    assert is_early_answer(text, "14218", derived_at=COLUMNS.derived_at) is early


def test_what_derives_the_answer_is_the_runs_task():
    """Column lines derive the answer on the columns task only: the chain task's equations end in
    ``= answer``, and a chain run's eval must not count another task's working."""
    from sdharness.eval.quick import completion_metrics

    problem = {"problem": "Add 9581 and 4637. What is the sum?", "answer": "14218"}
    assert completion_metrics([NATIVE], [problem], "The answer is", task="columns")["early_answer_rate"] == 0.0
    assert completion_metrics([NATIVE], [problem], "The answer is", task="chain")["early_answer_rate"] == 1.0
    assert completion_metrics([NATIVE], [problem], "The answer is", task="columns")["accuracy"] == 1.0


def test_pretraining_examples_of_the_columns_task():
    """conf/pretrain_columns.yaml composes; its examples are column work with foreign hints and
    slips in the configured shares, and a slip's characters are exactly the completion's unsupervised ones."""
    from omegaconf import OmegaConf

    from sdharness.config import PromptConfig
    from sdharness.models import char_tokenizer
    from testbed.examples import build_examples, eval_problems
    from testbed.pretrain_config import MixConfig, compose_pretrain_config, to_pretrain_config
    from tests.testbed.test_testbed import unsupervised_completion_spans

    cfg = to_pretrain_config(compose_pretrain_config(config_name="pretrain_columns"))
    assert cfg.task == "columns" and cfg.foreign_hint_fraction == 0.5
    with pytest.raises(ConfigError, match=r"^task='sums' is unknown; choose one of: chain, columns$"):
        to_pretrain_config(compose_pretrain_config(["task=sums"], config_name="pretrain_columns"))
    held_out = eval_problems(20240, 20, "columns")
    assert held_out["hard"][0]["problem"] == COLUMNS.split(20242, 1, "hard")[0]["problem"]
    assert held_out["hard_foreign"][0]["solution"] == COLUMNS.split(20242, 1, "hard", "foreign")[0]["solution"]
    prompt = PromptConfig(**OmegaConf.to_container(compose_pretrain_config(config_name="pretrain_columns").prompt))
    tokenizer = char_tokenizer()
    mix = MixConfig(student_easy=0.2, student_hard=0.2, teacher_easy=0.2, teacher_hard=0.4)
    exclude = {row["problem"] for rows in held_out.values() for row in rows}
    examples = build_examples(prompt, tokenizer, size=200, mix=mix, early_answer_fraction=0.0, seed=5, exclude=exclude,
                              foreign_hint_fraction=0.5, slip_fraction=0.5, task="columns")
    teacher = [example for example in examples if example.kind.startswith("teacher")]
    slipped = [example for example in examples if example.no_loss is not None]
    assert len(teacher) == 120 and sum(example.foreign_hint for example in teacher) == 60 and len(slipped) == 60
    assert not {example.problem for example in examples} & exclude
    for example in examples:
        assert example.problem.startswith("Add ") and example.completion.splitlines()[-1].startswith("The answer is ")
        hint = tokenizer.decode(example.ids[:example.prompt_length]).split("Reference solution:\n")[-1]
        assert (" -> " in hint and ". So: " in hint) == example.foreign_hint
    gaps = unsupervised_completion_spans(slipped, batch_size=8, seed=5, pad_id=tokenizer.pad_token_id)
    assert len(gaps) == len(slipped)
    for example, gap in gaps:
        begin, end = example.no_loss
        assert gap == list(range(begin, end))  # exactly the slip's characters, nothing else
        assert example.completion[begin:end] in {"=", "+1"} or example.completion[begin:end].isdigit()
