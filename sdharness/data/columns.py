"""The column-addition task (``data.task=columns``): two long numbers added column by column.

    problem:  Add 4821 and 3967. What is the sum?
    solution: 1+7=8
              2+6=8
              8+9=17
              4+3+1=8
              The answer is 8788.

One line per column from the units up; a column whose right neighbour's result reached 10 adds
a visible ``+1`` term; the answer is each line's last digit read from the top line down (the
last line's first digit leads when it reached 10). The foreign notation lists the same columns
as ``1&7 -> 8; 2&6 -> 8; 8&9 -> 17; 4&3 -> 8. So: 8788`` (the carry only inside the totals).

Unlike a chain of operations, a slip does not propagate: each line needs only its column's two
digits (read from the problem, or copied from a hint) and whether the line before reached 10.
What makes the task hard without a hint is finding which digits form column ``i`` of long
numbers; a hinted teacher copies them, so after a student's slip it can copy the digits and
still follow the student's carry and assemble the answer from the lines actually written.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from sdharness.data.answers import ANSWER_MARKER
from sdharness.data.tasks import BuiltinTask

# Digits per number (both numbers have the same length), drawn uniformly in the range. ``seven``
# is the longest length the shipped base's hinted teacher still reads (greedy .98 with the hint,
# .02 without: evals/figures/regime_hard/split.md); the columns task alone has it.
COLUMN_DIGITS = {"single": (1, 2), "easy": (3, 4), "hard": (6, 7), "seven": (7, 7)}
PROBLEM = re.compile(r"Add (\d+) and (\d+)\.")
LINE = re.compile(r"^(\d)\+(\d)(\+1)?=(\d+)$")
SLIP_KINDS = ("sum", "misread", "carry")


@dataclass(frozen=True)
class Column:
    """One written line: the column's digits, whether it adds the carry, and the total it states."""

    top: int
    bottom: int
    carry: bool
    total: int

    def line(self) -> str:
        return f"{self.top}+{self.bottom}{'+1' if self.carry else ''}={self.total}"


def parse_line(line: str) -> Column | None:
    """The column a line in the native format states, or None for any other line."""
    match = LINE.match(line)
    if match is None:
        return None
    return Column(int(match.group(1)), int(match.group(2)), match.group(3) is not None, int(match.group(4)))


def digit_pairs(top: str, bottom: str) -> list[tuple[int, int]]:
    """The ``(top, bottom)`` digits of each column, units first (the shorter number padded with 0)."""
    width = max(len(top), len(bottom))
    return [(int(a), int(b)) for a, b in zip(reversed(top.zfill(width)), reversed(bottom.zfill(width)))]


def add_columns(pairs: list[tuple[int, int]], carry: bool = False) -> list[Column]:
    """Correct column lines for ``pairs``, the first one adding ``carry``; each later line's carry
    follows the total the line before states."""
    columns = []
    for top, bottom in pairs:
        column = Column(top, bottom, carry, top + bottom + int(carry))
        columns.append(column)
        carry = column.total >= 10
    return columns


def assemble(columns: list[Column]) -> str:
    """The answer the lines state: each line's last digit, the last line's leading carry first."""
    digits = "".join(str(column.total % 10) for column in reversed(columns))
    return ("1" if columns[-1].total >= 10 else "") + digits


def assembled_at(completion: str, answer: str) -> int | None:
    """The character where a run of column lines first assembles ``answer`` (the end of its
    last line), or None."""
    run, offset = [], 0
    for line in completion.split("\n"):
        column = parse_line(line)
        run = run + [column] if column is not None else []
        if run and assemble(run) == answer:
            return offset + len(line)
        offset += len(line) + 1
    return None


def native_solution(columns: list[Column]) -> str:
    return "\n".join([column.line() for column in columns] + [f"{ANSWER_MARKER} {assemble(columns)}."])


def foreign_solution(columns: list[Column]) -> str:
    return "; ".join(f"{c.top}&{c.bottom} -> {c.total}" for c in columns) + f". So: {assemble(columns)}"


def slip_column(rng: random.Random, column: Column, neighbours: list[int]) -> tuple[Column, str]:
    """A student-like wrong version of ``column`` and its kind: a wrong total (one or two off), a
    misread digit (a neighbouring column's digit of the same number, else one off), or a dropped
    or invented carry (the total consistent with the written terms)."""
    kind = rng.choice(SLIP_KINDS)
    if kind == "sum":
        total = column.total + rng.choice([delta for delta in (-2, -1, 1, 2) if column.total + delta >= 0])
        return Column(column.top, column.bottom, column.carry, total), kind
    if kind == "misread":
        others = [digit for digit in neighbours if digit != column.top] or [(column.top + rng.choice((1, 9))) % 10]
        top = rng.choice(others)
        return Column(top, column.bottom, column.carry, top + column.bottom + int(column.carry)), kind
    carry = not column.carry
    return Column(column.top, column.bottom, carry, column.top + column.bottom + int(carry)), kind


@dataclass(frozen=True)
class ColumnProblem:
    top: str
    bottom: str

    @property
    def columns(self) -> list[Column]:
        return add_columns(digit_pairs(self.top, self.bottom))


class ColumnsTask(BuiltinTask):
    """Column addition; difficulty sets the numbers' length (:data:`COLUMN_DIGITS`)."""

    name = "columns"
    difficulties = tuple(COLUMN_DIGITS)

    def draw(self, rng, difficulty):
        low, high = COLUMN_DIGITS[difficulty]
        width = rng.randint(low, high)
        top, bottom = (str(rng.randint(10 ** (width - 1), 10 ** width - 1)) for _ in range(2))
        return ColumnProblem(top, bottom)

    def problem_text(self, drawn):
        return f"Add {drawn.top} and {drawn.bottom}. What is the sum?"

    def solution(self, drawn, solution_style):
        columns = drawn.columns
        return foreign_solution(columns) if solution_style == "foreign" else native_solution(columns)

    def answer(self, drawn):
        return str(int(drawn.top) + int(drawn.bottom))

    def derived_at(self, completion, answer):
        return assembled_at(completion, answer)

    def slipped_solution(self, rng, drawn):
        """One column slipped (:func:`slip_column`), every later line correct on the digits with its
        carry following the written totals, the answer assembled from the written lines. The span
        is the slip's wrong characters: the wrong total, the misread digit, the invented ``+1`` or
        the ``=`` standing where the dropped ``+1`` belonged."""
        correct = drawn.columns
        step = rng.randrange(len(correct))
        tops = [column.top for column in correct]
        wrong, kind = slip_column(rng, correct[step], tops[max(step - 1, 0):step] + tops[step + 1:step + 2])
        columns = correct[:step] + [wrong] + add_columns([(c.top, c.bottom) for c in correct[step + 1:]],
                                                         wrong.total >= 10)
        text = native_solution(columns)
        line_start = sum(len(column.line()) + 1 for column in columns[:step])
        written, right = wrong.line(), correct[step].line()
        begin = next(i for i, (a, b) in enumerate(zip(written, right)) if a != b)
        if kind == "sum":
            end = len(written)
        else:  # a misread digit, the "=" of a dropped carry or the "+1" of an invented one
            end = begin + (2 if kind == "carry" and wrong.carry else 1)
        return text, (line_start + begin, line_start + end)

    def consistent_continuation(self, problem, completion, reference, slip_at):
        """A slip is a column line the student wrote in the line format, differing from the
        reference's (wrong digits, carry or total). The consistent text goes on with correct
        lines for the later columns, their carry following the student's totals, and the answer
        assembled from all lines as written; the copied text goes on with the reference's lines."""
        parsed_problem = PROBLEM.search(problem)
        if parsed_problem is None:
            return None
        pairs = digit_pairs(*parsed_problem.groups())
        step = completion[:slip_at].count("\n")
        lines = completion.split("\n")
        if step >= len(pairs) or step + 1 >= len(lines):  # in the answer line, or the slipped line unfinished
            return None
        columns = [parse_line(line) for line in lines[:step + 1]]
        if None in columns:
            return None
        columns += add_columns(pairs[step + 1:], columns[-1].total >= 10)
        prefix = "\n".join(lines[:step + 1])
        rest = reference.split("\n")[step + 1:]
        later = [column.line() for column in columns[step + 1:]]
        return {"consistent": "\n".join([prefix, *later, f"{ANSWER_MARKER} {assemble(columns)}."]),
                "copied": "\n".join([prefix, *rest])}


COLUMNS = ColumnsTask()
