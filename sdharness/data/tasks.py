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

import functools
import importlib.util
import random
import re
import unicodedata
from fractions import Fraction
from typing import Callable

from sdharness.config import ConfigError

ANSWER_MARKER = "The answer is"
DIFFICULTY_STEPS = {"single": 1, "easy": 2, "hard": 4}
SOLUTION_STYLES = ("native", "foreign")
# An integer, decimal or fraction (559/5, -3/4): the forms a numeric answer takes.
_UNSIGNED = r"\d+(?:,\d{3})*(?:\.\d+)?"  # 1,024 or 111.8; a trailing comma is punctuation
_NUMBER = rf"-?{_UNSIGNED}(?:\s*/\s*{_UNSIGNED})?"
CHECKERS = ("builtin", "math_verify")

Checker = Callable[[str, str], bool]  # (completion, answer) -> correct?


def normalise_notation(text: str) -> str:
    """Full-width and other compatibility forms as plain characters (NFKC: ``１２`` -> ``12``) and the
    Unicode minus sign as ``-``, as both checkers read answers and completions."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")


def normalise_number(text: str) -> Fraction | None:
    """The exact value of ``'1,024'``, ``'111.8'`` or ``'559/5'`` (the last two are equal); None
    for anything that is not a number."""
    text = text.replace(",", "").replace(" ", "").strip().rstrip(".")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answer_pattern(marker: str = ANSWER_MARKER) -> str:
    """The regular expression of a marked answer; group 1 is the number (lm-eval tasks use it too)."""
    return re.escape(marker) + r"\s*:?\s*(" + _NUMBER + ")"


def extract_answer(completion: str, marker: str = ANSWER_MARKER) -> str | None:
    """The number after the first answer marker, or None when there is none."""
    match = re.search(answer_pattern(marker), completion)
    return match.group(1) if match else None


def is_correct(completion: str, answer: str, marker: str = ANSWER_MARKER) -> bool:
    """True when the completion's marked answer equals ``answer`` as a number (an integer,
    decimal or fraction, compared exactly) or, when either is not a number, as text."""
    predicted = extract_answer(normalise_notation(completion), marker)
    if predicted is None:
        return False
    answer = normalise_notation(str(answer))
    got, want = normalise_number(predicted), normalise_number(answer)
    if got is None or want is None:
        return predicted.strip() == str(answer).strip()
    return got == want


def _math_verify_checker(marker: str) -> Checker:
    from math_verify import parse, verify

    def check(completion: str, answer: str) -> bool:
        completion, answer = normalise_notation(completion), normalise_notation(str(answer))
        index = completion.find(marker)
        if index >= 0:  # the answer the completion commits to: the rest of the marker's line
            completion = completion[index + len(marker):].split("\n", 1)[0].strip().rstrip(".")
        try:
            gold = parse(str(answer)) or parse(f"${answer}$")
            predicted = parse(completion)
            return bool(gold) and bool(predicted) and bool(verify(gold, predicted))
        except Exception:  # noqa: BLE001 - an unparseable completion is a wrong one
            return False

    return check


@functools.lru_cache(maxsize=None)
def answer_checker(name: str, marker: str = ANSWER_MARKER) -> Checker:
    """The answer checker ``(completion, answer) -> bool`` that ``data.checker`` names, the one
    eval, GRPO's reward, bootstrapping and the probe all call: ``builtin`` (:func:`is_correct`)
    or ``math_verify`` (the ``math-verify`` package, for free-form answers such as ``\\frac{1}{2}``)."""
    if name not in CHECKERS:
        raise ConfigError(f"data.checker={name!r} is unknown; choose one of: {', '.join(CHECKERS)}")
    if name == "math_verify":
        if importlib.util.find_spec("math_verify") is None:
            raise ConfigError("data.checker=math_verify needs the math-verify package: pip install math-verify, "
                              "or set data.checker=builtin")
        return _math_verify_checker(marker)
    return functools.partial(is_correct, marker=marker)


def unreadable_answer(answer: str, checker: str) -> str | None:
    """Why ``checker`` can never judge a completion right against the gold ``answer``, or None. The
    builtin checker compares numbers: any other gold answer (``12 apples``, ``\\frac{1}{2}``,
    ``\\boxed{5}``) matches nothing, and GRPO would reward nothing, silently."""
    if checker != "builtin" or normalise_number(normalise_notation(answer)) is not None:
        return None
    return (f"answer {answer[:60]!r} is not a number the builtin checker can read (an integer, decimal or fraction), "
            "so no completion could be judged right; set data.checker=math_verify for answers in other notations, "
            "or write it as a number")


def answer_span_start(completion: str, marker: str = ANSWER_MARKER) -> int | None:
    """Character offset where the final-answer span begins, or None without a marker."""
    index = completion.find(marker)
    return None if index < 0 else index


def is_early_answer(completion: str, answer: str, marker: str = ANSWER_MARKER,
                    derived_at: Callable[[str, str], int | None] | None = None) -> bool:
    """True when ``answer`` is stated before the first working that derives it: an equation
    ``= answer``, or where the task's ``derived_at`` finds its own derivation (``BuiltinTask.derived_at``:
    the columns task's lines ``1+7=8`` ... that assemble it).

    A statement is the answer after the answer marker, or the answer opening a line without
    being the left operand of an equation; operands and other numbers do not count. A
    completion that states the answer and never derives it counts as early.
    """
    number = r"(?<![\d.])" + re.escape(str(answer).strip()) + r"(?![\d])"
    stated = [match.start() for match in re.finditer(re.escape(marker) + r"\s*:?\s*" + number, completion)]
    stated += [match.start(1) for match in re.finditer(r"(?m)^\s*(" + number + r")(?!\s*[-+*/=])", completion)]
    if not stated:
        return False
    equation = re.search(r"=\s*" + number, completion)
    task_derived = derived_at(completion, str(answer).strip()) if derived_at is not None else None
    derived = [at for at in (equation and equation.start(), task_derived) if at is not None]
    return not derived or min(stated) < min(derived)


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


def _apply(symbol: str, value: int, operand: int) -> int:
    return {"+": value + operand, "-": value - operand, "*": value * operand}[symbol]


def arithmetic_chain(rng: random.Random, steps: int) -> tuple[str, int, list[tuple[str, int]]]:
    """A problem's words, its start value and its ``(symbol, operand)`` operations."""
    value = rng.randint(2, 20)
    start, words, operations = value, [f"Start with {value}."], []
    for _ in range(steps):
        phrase, symbol, operand, value = _operation(rng, value)
        words.append(phrase)
        operations.append((symbol, operand))
    return " ".join(words) + " What is the result?", start, operations


def chain_values(start: int, operations: list[tuple[str, int]]) -> list[int]:
    """The value after each operation, each computed from the one before."""
    values = []
    for symbol, operand in operations:
        start = _apply(symbol, start, operand)
        values.append(start)
    return values


def native_solution(start: int, operations: list[tuple[str, int]], values: list[int]) -> str:
    """The worked solution as the student writes it; ``values`` are the results it states."""
    lines = [f"{left} {symbol} {operand} = {value}"
             for left, (symbol, operand), value in zip([start] + values, operations, values)]
    return "\n".join(lines + [f"{ANSWER_MARKER} {values[-1]}."])


def foreign_solution(operations: list[tuple[str, int]], values: list[int]) -> str:
    """The same reasoning in a terse notation the student never writes: ``+5 -> 12; *3 -> 36. So: 36``."""
    return "; ".join(f"{symbol}{operand} -> {value}" for (symbol, operand), value in zip(operations, values)) \
        + f". So: {values[-1]}"


# Student-like slips (the shipped base's own arithmetic errors are mostly a few units off, sometimes ten).
SLIPS = (-10, -4, -3, -2, -1, 1, 2, 3, 4, 10)


def slipped_solution(rng: random.Random, start: int, operations: list[tuple[str, int]]) -> tuple[str, tuple[int, int]]:
    """A native solution with one arithmetic slip at a random step, continued consistently from it.

    The slipped step states its correct result plus a delta from :data:`SLIPS`; every later step
    is correct arithmetic on the value the line before states, and the answer line states the
    last of them. Returns the text and the ``[begin, end)`` character span of the slipped result
    from its first wrong character: a teacher trained on it learns nothing from the slip itself,
    only what follows. A delta that would make a later value negative is taken positive (the
    operations grow with their input, so every value stays at least the correct one).
    """
    step, delta = rng.randrange(len(operations)), rng.choice(SLIPS)
    correct = chain_values(start, operations)
    values = slipped_values(start, operations, correct, step, delta)
    if min(values) < 0:
        values = slipped_values(start, operations, correct, step, abs(delta))
    text = native_solution(start, operations, values)
    line_start = sum(len(line) + 1 for line in text.split("\n")[:step])
    line = text.split("\n")[step]
    number_start = line_start + line.rindex(" = ") + 3
    wrong, right = str(values[step]), str(correct[step])
    same = next((i for i, (a, b) in enumerate(zip(wrong, right)) if a != b), min(len(wrong), len(right)))
    return text, (number_start + same, number_start + len(wrong))


def slipped_values(start: int, operations: list[tuple[str, int]], correct: list[int], step: int, delta: int) -> list[int]:
    """``correct`` with the result of ``step`` off by ``delta`` and every later value computed from it."""
    slipped = correct[step] + delta
    return correct[:step] + [slipped] + chain_values(slipped, operations[step + 1:])


class BuiltinTask:
    """A generated task of ``data=arithmetic`` (``data.task`` names it; the registry is
    :data:`sdharness.data.builtin.TASKS`). A task draws a problem per difficulty, writes its
    worked solution in the native or the foreign notation, writes a solution with one
    student-like slip continued consistently (for pretraining), and gives the probe the
    student-consistent continuation of a completion that slipped.

    A drawn problem is whatever the task needs to write its solutions; ``problem_text`` is the
    question the student sees."""

    name: str = ""

    def draw(self, rng: random.Random, difficulty: str):
        raise NotImplementedError

    def problem_text(self, drawn) -> str:
        raise NotImplementedError

    def solution(self, drawn, solution_style: str) -> str:
        raise NotImplementedError

    def answer(self, drawn) -> str:
        raise NotImplementedError

    def slipped_solution(self, rng: random.Random, drawn) -> tuple[str, tuple[int, int]]:
        """A native solution with one slip, continued consistently, and the ``[begin, end)``
        character span of the slip's wrong characters (trained without loss)."""
        raise NotImplementedError

    def derived_at(self, completion: str, answer: str) -> int | None:
        """Where the task's own working in ``completion`` first derives ``answer`` (the end of it),
        beyond an equation ``= answer``, which :func:`is_early_answer` finds for every task; None if
        there is none."""
        return None

    def consistent_continuation(self, problem: str, completion: str, reference: str, slip_at: int) -> dict | None:
        """For a completion that first leaves ``reference`` at character ``slip_at`` with a slip the
        task can continue from: ``{"consistent": text, "copied": text}``, both ``completion`` up to
        the end of the slipped line, then the student-consistent continuation (correct work on
        what the student wrote) or the reference's own remaining text. None for any other deviation."""
        raise NotImplementedError

    def problem(self, rng: random.Random, difficulty: str, solution_style: str = "native") -> dict[str, str]:
        """One problem with its worked solution in ``solution_style``."""
        if solution_style not in SOLUTION_STYLES:
            raise ValueError(f"data.solution_style={solution_style!r} is unknown; choose one of {SOLUTION_STYLES}")
        drawn = self.draw(rng, difficulty)
        return {"problem": self.problem_text(drawn), "solution": self.solution(drawn, solution_style),
                "answer": self.answer(drawn)}

    def split(self, seed: int, size: int, difficulty: str, solution_style: str = "native",
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
            item = self.problem(rng, difficulty, solution_style)
            if item["problem"] not in seen:
                seen.add(item["problem"])
                problems.append(item)
        return problems


OPERATION = re.compile(r"(Add|Subtract|Multiply by) (\d+)\.")
SYMBOLS = {"Add": "+", "Subtract": "-", "Multiply by": "*"}
STEP_LINE = re.compile(r"^(-?\d+) ([-+*]) (\d+) = (-?\d+)$")


def chain_operations(problem: str) -> list[tuple[str, int]]:
    """The ``(symbol, operand)`` operations of a chained-arithmetic problem, in order."""
    return [(SYMBOLS[word], int(operand)) for word, operand in OPERATION.findall(problem)]


class ChainTask(BuiltinTask):
    """Chained arithmetic (the module docstring's example): each result feeds the next step, so a
    slip changes every later result. Difficulty is the number of operations (:data:`DIFFICULTY_STEPS`);
    a drawn problem is ``(words, start, operations)``."""

    name = "chain"

    def draw(self, rng, difficulty):
        return arithmetic_chain(rng, DIFFICULTY_STEPS[difficulty])

    def problem_text(self, drawn):
        return drawn[0]

    def solution(self, drawn, solution_style):
        _, start, operations = drawn
        values = chain_values(start, operations)
        if solution_style == "foreign":
            return foreign_solution(operations, values)
        return native_solution(start, operations, values)

    def answer(self, drawn):
        _, start, operations = drawn
        return str(chain_values(start, operations)[-1])

    def slipped_solution(self, rng, drawn):
        _, start, operations = drawn
        return slipped_solution(rng, start, operations)

    def consistent_continuation(self, problem, completion, reference, slip_at):
        """A slip is a step's result that leaves the reference (the line's operation and operand
        as the problem's); both texts run to the end of the next result: the next step's on the
        student's value, or the answer line's after a slip in the last step."""
        operations = chain_operations(problem)
        line_start = completion.rfind("\n", 0, slip_at) + 1
        line_end = completion.find("\n", slip_at)
        line = completion[line_start:line_end if line_end >= 0 else len(completion)]
        step = completion[:line_start].count("\n")
        parsed = STEP_LINE.match(line)
        if parsed is None or step >= len(operations) or slip_at < line_start + line.rindex(" = ") + 3:
            return None
        if (parsed.group(2), int(parsed.group(3))) != operations[step]:
            return None
        reference_lines = reference.split("\n")
        value = int(parsed.group(4))
        text = completion[:line_start] + line
        if step + 1 < len(operations):
            symbol, operand = operations[step + 1]
            text += f"\n{value} {symbol} {operand} = "
            consistent = f"{chain_values(value, [(symbol, operand)])[0]}\n"
            copied = STEP_LINE.match(reference_lines[step + 1]).group(4) + "\n"
        else:
            text += f"\n{ANSWER_MARKER} "
            consistent = f"{value}."
            copied = re.search(r"-?\d+", reference_lines[-1]).group(0) + "."
        # The result's terminator is part of it: "1" and "12" differ at the character after "1".
        return {"consistent": text + consistent, "copied": text + copied}


CHAIN = ChainTask()


def answer_match_reward(completion: str, problem: dict, answer_marker: str = ANSWER_MARKER, *,
                        checker: str = "builtin") -> float:
    """1.0 when the completion's marked answer equals the problem's answer (by ``checker``), else 0.0."""
    return float(answer_checker(checker, answer_marker)(completion, problem["answer"]))


REWARDS = {"answer_match": answer_match_reward}


def resolve_reward(name: str, checker: str = "builtin"):
    """A built-in reward by name (answer checks by ``checker``, see :func:`answer_checker`), or
    ``package.module:function``."""
    if name in REWARDS:
        return functools.partial(REWARDS[name], checker=checker)
    module_name, _, function = name.partition(":")
    if not function:
        raise ValueError(f"algo.reward={name!r} is unknown; choose one of {', '.join(REWARDS)} "
                         "or give module:function")
    import importlib

    return getattr(importlib.import_module(module_name), function)
