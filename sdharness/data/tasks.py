"""The built-in tasks' interface: a generated problem family with its worked solutions.

A problem is a dict ``{"problem", "solution", "answer"}``; the tasks are registered in
:data:`sdharness.data.builtin.TASKS` (chained arithmetic: :mod:`sdharness.data.chain`; column
addition: :mod:`sdharness.data.columns`).
"""

from __future__ import annotations

import random

DIFFICULTY_STEPS = {"single": 1, "easy": 2, "hard": 4}
SOLUTION_STYLES = ("native", "foreign")


class BuiltinTask:
    """A generated task of ``data=arithmetic`` (``data.task`` names it; the registry is
    :data:`sdharness.data.builtin.TASKS`). A task draws a problem per difficulty, writes its
    worked solution in the native or the foreign notation, writes a solution with one
    student-like slip continued consistently (for pretraining), and gives the probe the
    student-consistent continuation of a completion that slipped.

    A drawn problem is whatever the task needs to write its solutions; ``problem_text`` is the
    question the student sees."""

    name: str = ""
    difficulties: tuple[str, ...] = ()  # the data.difficulty names draw accepts

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
        beyond an equation ``= answer``, which :func:`~sdharness.data.answers.is_early_answer` finds for
        every task; None if there is none."""
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
        if difficulty not in self.difficulties:
            raise ValueError(f"data.difficulty={difficulty!r} is not a difficulty of data.task={self.name}; "
                             f"choose one of {', '.join(self.difficulties)}")
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
