"""Answer checking: reading a completion's marked answer and judging it against the gold one.

Answers are read after the task's answer marker (``The answer is``) and compared as numbers
(``builtin``) or by the ``math-verify`` package (``math_verify``); :func:`answer_checker` is the one
place eval, GRPO's reward, bootstrapping and the probe get a checker from. The *early-answer* check
flags a completion that states the final answer before the worked step that derives it: the
symptom of a teacher's impossible knowledge leaking into the student.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import unicodedata
from fractions import Fraction
from typing import Callable

from sdharness.errors import ConfigError

ANSWER_MARKER = "The answer is"
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


def trim_solution(text: str, marker: str = ANSWER_MARKER) -> str:
    """``text`` up to the end of the line holding the first answer marker, stripped."""
    index = text.find(marker)
    if index >= 0:
        end = text.find("\n", index)
        text = text if end < 0 else text[:end]
    return text.strip()
