"""Verifiable tasks: the built-in arithmetic family and answer checking.

A problem is a dict ``{"problem", "solution", "answer"}``. The arithmetic task chains
operations on a start value; its worked solution writes every intermediate result::

    problem:  Start with 7. Add 5. Multiply by 3. Subtract 4. What is the result?
    solution: 7 + 5 = 12
              12 * 3 = 36
              36 - 4 = 32
              The answer is 32.

Answers are read after the task's answer marker (``The answer is``) and compared as numbers.
The *early-answer* check flags a completion that states the final answer before the worked
step that derives it: the symptom of a teacher's impossible knowledge leaking into the student.
"""

from __future__ import annotations

import random
import re

ANSWER_MARKER = "The answer is"
DIFFICULTY_STEPS = {"single": 1, "easy": 2, "hard": 4}
SOLUTION_STYLES = ("native", "foreign")
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def normalise_number(text: str) -> float | None:
    """``'1,024'`` -> 1024.0; None for anything that is not a number."""
    try:
        return float(text.replace(",", "").strip().rstrip("."))
    except ValueError:
        return None


def answer_pattern(marker: str = ANSWER_MARKER) -> str:
    """The regular expression of a marked answer; group 1 is the number (lm-eval tasks use it too)."""
    return re.escape(marker) + r"\s*:?\s*(" + _NUMBER + ")"


def extract_answer(completion: str, marker: str = ANSWER_MARKER) -> str | None:
    """The number after the first answer marker, or None when there is none."""
    match = re.search(answer_pattern(marker), completion)
    return match.group(1) if match else None


def is_correct(completion: str, answer: str, marker: str = ANSWER_MARKER) -> bool:
    """True when the completion's marked answer equals ``answer`` as a number (or as text)."""
    predicted = extract_answer(completion, marker)
    if predicted is None:
        return False
    got, want = normalise_number(predicted), normalise_number(str(answer))
    if got is None or want is None:
        return predicted.strip() == str(answer).strip()
    return abs(got - want) < 1e-6


def answer_span_start(completion: str, marker: str = ANSWER_MARKER) -> int | None:
    """Character offset where the final-answer span begins, or None without a marker."""
    index = completion.find(marker)
    return None if index < 0 else index


def is_early_answer(completion: str, answer: str, marker: str = ANSWER_MARKER) -> bool:
    """True when ``answer`` is stated before the first equation that derives it (``= answer``).

    A statement is the answer after the answer marker, or the answer opening a line without
    being the left operand of an equation; operands and other numbers do not count. A
    completion that states the answer and never derives it counts as early.
    """
    number = r"(?<![\d.])" + re.escape(str(answer).strip()) + r"(?![\d])"
    stated = [match.start() for match in re.finditer(re.escape(marker) + r"\s*:?\s*" + number, completion)]
    stated += [match.start(1) for match in re.finditer(r"(?m)^\s*(" + number + r")(?!\s*[-+*/=])", completion)]
    if not stated:
        return False
    derived = re.search(r"=\s*" + number, completion)
    return derived is None or min(stated) < derived.start()


def _operation(rng: random.Random, value: int) -> tuple[str, str, int, int]:
    """One operation applicable to ``value``: (problem words, symbol, operand, result)."""
    kinds = ["add", "subtract"] + (["multiply"] if value <= 40 else [])
    kind = rng.choice(kinds)
    if kind == "add":
        operand = rng.randint(1, 20)
        return f"Add {operand}.", "+", operand, value + operand
    if kind == "subtract" and value > 1:
        operand = rng.randint(1, min(value - 1, 20))
        return f"Subtract {operand}.", "-", operand, value - operand
    if kind == "multiply":
        operand = rng.randint(2, 4)
        return f"Multiply by {operand}.", "*", operand, value * operand
    operand = rng.randint(1, 20)
    return f"Add {operand}.", "+", operand, value + operand


def arithmetic_problem(rng: random.Random, steps: int, solution_style: str = "native") -> dict[str, str]:
    """One chained-arithmetic problem with ``steps`` operations and its worked solution.

    ``solution_style='native'`` writes the solution as the student writes its own chain of
    thought; ``'foreign'`` gives the same reasoning in a terse notation the student never uses.
    """
    value = rng.randint(2, 20)
    words, native, foreign = [f"Start with {value}."], [], []
    for _ in range(steps):
        phrase, symbol, operand, result = _operation(rng, value)
        words.append(phrase)
        native.append(f"{value} {symbol} {operand} = {result}")
        foreign.append(f"{symbol}{operand} -> {result}")
        value = result
    if solution_style == "native":
        solution = "\n".join(native + [f"{ANSWER_MARKER} {value}."])
    elif solution_style == "foreign":
        solution = "; ".join(foreign) + f". So: {value}"
    else:
        raise ValueError(f"data.solution_style={solution_style!r} is unknown; choose one of {SOLUTION_STYLES}")
    return {"problem": " ".join(words) + " What is the result?", "solution": solution, "answer": str(value)}


def arithmetic_split(seed: int, size: int, difficulty: str, solution_style: str = "native",
                     exclude: set[str] | None = None) -> list[dict[str, str]]:
    """``size`` distinct problems drawn deterministically from ``seed``, none of them in ``exclude``."""
    if difficulty not in DIFFICULTY_STEPS:
        raise ValueError(f"data.difficulty={difficulty!r} is unknown; choose one of {', '.join(DIFFICULTY_STEPS)}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    problems: list[dict[str, str]] = []
    for _ in range(size * 100):
        if len(problems) == size:
            break
        item = arithmetic_problem(rng, DIFFICULTY_STEPS[difficulty], solution_style)
        if item["problem"] not in seen:
            seen.add(item["problem"])
            problems.append(item)
    return problems


def answer_match_reward(completion: str, problem: dict, answer_marker: str = ANSWER_MARKER) -> float:
    """1.0 when the completion's marked answer equals the problem's answer, else 0.0."""
    return float(is_correct(completion, problem["answer"], answer_marker))


REWARDS = {"answer_match": answer_match_reward}


def resolve_reward(name: str):
    """A built-in reward by name, or ``package.module:function``."""
    if name in REWARDS:
        return REWARDS[name]
    module_name, _, function = name.partition(":")
    if not function:
        raise ValueError(f"algo.reward={name!r} is unknown; choose one of {', '.join(REWARDS)} "
                         "or give module:function")
    import importlib

    return getattr(importlib.import_module(module_name), function)
