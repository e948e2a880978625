import random

import pytest

from sdharness.data.answers import answer_span_start, extract_answer, is_correct, is_early_answer
from sdharness.data.chain import (CHAIN, arithmetic_chain, chain_values, foreign_solution, native_solution,
                                  slipped_solution)


def test_split_is_deterministic_distinct_and_sized():
    first = CHAIN.split(7, 50, "hard")
    assert first == CHAIN.split(7, 50, "hard")
    assert len({row["problem"] for row in first}) == 50
    assert CHAIN.split(8, 50, "hard") != first


def test_native_solution_derives_the_answer_step_by_step():
    item = CHAIN.problem(random.Random(0), "hard")
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
    native = CHAIN.problem(random.Random(3), "hard", "native")
    foreign = CHAIN.problem(random.Random(3), "hard", "foreign")
    assert native["problem"] == foreign["problem"] and native["answer"] == foreign["answer"]
    assert "The answer is" not in foreign["solution"] and foreign["solution"].endswith(native["answer"])


def test_eval_split_excludes_train_problems():
    train = CHAIN.split(1, 200, "easy")
    held_out = CHAIN.split(2, 100, "easy", exclude={row["problem"] for row in train})
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


class _Fixed:
    """A stand-in random source: the slipped step and the slip are chosen by the test."""

    def __init__(self, step: int, delta: int):
        self.step, self.delta = step, delta

    def randrange(self, stop: int) -> int:
        assert 0 <= self.step < stop
        return self.step

    def choice(self, options):
        assert self.delta in options
        return self.delta


@pytest.mark.parametrize("start,operations,step,delta,text,span", [
    # 12 * 3 = 36 written 35; every later step is right about 35; only the wrong digit is masked
    (7, [("+", 5), ("*", 3), ("-", 4)], 1, -1,
     "7 + 5 = 12\n12 * 3 = 35\n35 - 4 = 31\nThe answer is 31.", (21, 22)),
    # a slip in the last step carries into the answer line; its first digit is already wrong
    (10, [("*", 2), ("+", 3)], 1, 10, "10 * 2 = 20\n20 + 3 = 33\nThe answer is 33.", (21, 23)),
    # 3 - 2 = 1 slipped by -4 would make a later value negative: the slip is taken positive
    (3, [("-", 2), ("-", 1)], 0, -4, "3 - 2 = 5\n5 - 1 = 4\nThe answer is 4.", (8, 9)),
    # a slip that changes the number of digits: 95 + 3 = 98 written 102, masked whole
    (95, [("+", 3), ("*", 2)], 0, 4, "95 + 3 = 102\n102 * 2 = 204\nThe answer is 204.", (9, 12)),
])
def test_slipped_solution_continues_consistently_from_the_slip(start, operations, step, delta, text, span):
    got, got_span = slipped_solution(_Fixed(step, delta), start, operations)
    assert (got, got_span) == (text, span)


def test_slipped_solution_from_a_real_random_source_is_consistent_after_exactly_one_slip():
    rng = random.Random(11)
    for _ in range(200):
        _, start, operations = arithmetic_chain(rng, 4)
        text, (begin, end) = slipped_solution(rng, start, operations)
        lines = text.splitlines()
        wrong = [left for left in lines[:-1] if eval(left.split(" = ")[0]) != int(left.split(" = ")[1])]
        assert len(wrong) == 1  # exactly one slipped step ...
        for before, after in zip(lines[:-2], lines[1:-1]):  # ... and each line starts from the one before
            assert after.split()[0] == before.split(" = ")[1]
        assert lines[-1] == f"The answer is {lines[-2].split(' = ')[1]}."
        assert text[begin:end] and text[begin:end].lstrip("-").isdigit()
        assert min(int(line.split(" = ")[1]) for line in lines[:-1]) >= 0


def test_native_and_foreign_solutions_of_a_chain():
    operations = [("+", 5), ("*", 3), ("-", 4)]
    values = chain_values(7, operations)
    assert values == [12, 36, 32]
    assert native_solution(7, operations, values) == "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 32\nThe answer is 32."
    assert foreign_solution(operations, values) == "+5 -> 12; *3 -> 36; -4 -> 32. So: 32"
    problem, start, chain = arithmetic_chain(random.Random(3), 4)
    item = CHAIN.problem(random.Random(3), "hard", "foreign")
    assert item["problem"] == problem and item["solution"] == foreign_solution(chain, chain_values(start, chain))
