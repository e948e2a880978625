import random

import pytest

from sdharness.data.tasks import (answer_span_start, arithmetic_problem, arithmetic_split, extract_answer,
                             is_correct, is_early_answer)


def test_split_is_deterministic_distinct_and_sized():
    first = arithmetic_split(7, 50, "hard")
    assert first == arithmetic_split(7, 50, "hard")
    assert len({row["problem"] for row in first}) == 50
    assert arithmetic_split(8, 50, "hard") != first


def test_native_solution_derives_the_answer_step_by_step():
    item = arithmetic_problem(random.Random(0), steps=4)
    lines = item["solution"].splitlines()
    assert len(lines) == 5 and lines[-1] == f"The answer is {item['answer']}."
    value = int(lines[0].split()[0])
    for line in lines[:-1]:
        left, right = line.split(" = ")
        assert eval(left) == int(right) and int(left.split()[0]) == value
        value = int(right)
    assert value == int(item["answer"])
    assert is_correct(item["solution"], item["answer"]) and not is_early_answer(item["solution"], item["answer"])


def test_foreign_solution_has_the_same_answer_in_another_notation():
    native = arithmetic_problem(random.Random(3), steps=3, solution_style="native")
    foreign = arithmetic_problem(random.Random(3), steps=3, solution_style="foreign")
    assert native["problem"] == foreign["problem"] and native["answer"] == foreign["answer"]
    assert "The answer is" not in foreign["solution"] and foreign["solution"].endswith(native["answer"])


def test_eval_split_excludes_train_problems():
    train = arithmetic_split(1, 200, "easy")
    held_out = arithmetic_split(2, 100, "easy", exclude={row["problem"] for row in train})
    assert not {row["problem"] for row in train} & {row["problem"] for row in held_out}


@pytest.mark.parametrize("text,answer,correct", [
    ("3 + 4 = 7\nThe answer is 7.", "7", True),
    ("The answer is 1,024", "1024", True),
    ("The answer is 7.0", "7", True),
    ("The answer is 8.", "7", False),
    ("7", "7", False),  # no marker: not an answer
    ("The answer is -3", "-3", True),
])
def test_answer_checking(text, answer, correct):
    assert is_correct(text, answer) is correct


def test_extract_answer_and_span():
    assert extract_answer("x\nThe answer is: 42.") == "42"
    assert answer_span_start("12 = 12\nThe answer is 12.") == 8
    assert answer_span_start("no answer") is None


@pytest.mark.parametrize("text,early", [
    ("7 + 5 = 12\n12 * 3 = 36\nThe answer is 36.", False),
    ("The answer is 36.", True),                    # stated, never derived
    ("36. Let me check: 12 * 3 = 36", True),        # stated before its derivation
    ("7 + 5 = 12\nThe answer is 12.", False),
    ("7 + 5 = 13\nThe answer is 13.", False),       # wrong answer never appears: not early
    ("136 - 100 = 36", False),                      # 136 is not 36
    ("36 - 24 = 12\nThe answer is 12.", False),     # an operand that equals some answer is no statement
])
def test_early_answer(text, early):
    assert is_early_answer(text, "36" if "36" in text else "12") is early
