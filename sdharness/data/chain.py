"""Chained arithmetic, the built-in task ``chain``: operations on a start value, each result feeding
the next; its worked solution writes every intermediate result::

    problem:  Start with 7. Add 5. Multiply by 3. Subtract 4. What is the result?
    solution: 7 + 5 = 12
              12 * 3 = 36
              36 - 4 = 32
              The answer is 32.
"""

from __future__ import annotations

import random
import re

from sdharness.data.answers import ANSWER_MARKER
from sdharness.data.tasks import DIFFICULTY_STEPS, BuiltinTask


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
    difficulties = tuple(DIFFICULTY_STEPS)

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
