"""The expression language of the GSM-Symbolic templates, evaluated without ``eval``.

Every expression of a template (init lines, ``#conditions``, ``#answer``, the solution's
``{expression}`` fields; the format is in :mod:`scripts.gsm_symbolic.templates`) is checked and compiled
once by a small restricted interpreter (:class:`Expression`): literals, names, arithmetic on
numbers, comparisons, ``and``/``or``/``not``, conditional expressions and calls to a fixed set of
helper functions; anything else (attributes, subscripts, comprehensions, lambdas, arithmetic on
strings, huge powers) raises :class:`TemplateError`, and the template is skipped and counted.

The helper functions are :data:`PURE_FUNCTIONS` (``is_int``, ``divides``, ``Fraction``, ``plural``,
...) and :data:`CHOICE_FUNCTIONS` (``range``, ``arange``, ``sample``, ``sample_sequential``,
``range_str``; their values are listed in :mod:`scripts.gsm_symbolic.templates`), which list the possible
values of an init line, or draw one of them (:func:`drawing_functions`). Values are numbers
without float noise (:func:`number`: at most MAX_DECIMALS decimals, integral floats as integers),
read from sampled strings by :func:`parse_value` and written into texts by :func:`text_of`.
"""

from __future__ import annotations

import ast
import itertools
import math
import random
import re
from decimal import Decimal
from fractions import Fraction
from typing import Any, Callable

MAX_DECIMALS = 6


class TemplateError(ValueError):
    """A template that cannot be instantiated safely or correctly; it is skipped and counted."""


# ----------------------------------------------------------------------------- a restricted evaluator


_BINARY = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a ** b,
}
_COMPARE = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
}
_NUMERIC = (int, float, Fraction)


def is_number(value: Any) -> bool:
    return isinstance(value, _NUMERIC) and not isinstance(value, bool)


_OPERATOR_WORDS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
                   ast.Pow: "**"}


def _binary(op: type, left: Any, right: Any) -> Any:
    if isinstance(left, str) and isinstance(right, str) and op is ast.Add:
        return left + right
    if not (is_number(left) and is_number(right)):
        raise TemplateError(f"{type(left).__name__} {_OPERATOR_WORDS[op]} {type(right).__name__} "
                            "is not arithmetic on numbers")
    if op is ast.Pow and (abs(right) > 64 or abs(left) > 10 ** 12):
        raise TemplateError(f"{left} ** {right} is too large")
    return _BINARY[op](left, right)


Compiled = Callable[[dict, dict], Any]  # (names, functions) -> value


def _compile(node: ast.AST) -> Compiled:
    """A closure evaluating ``node``; :class:`TemplateError` for anything outside the supported language."""
    if isinstance(node, ast.Constant):
        value = node.value
        if not isinstance(value, (int, float, str, bool)) and value is not None:
            raise TemplateError(f"constant {value!r} is not supported")
        return lambda names, functions: value
    if isinstance(node, ast.Name):
        key = node.id

        def name(names, functions):
            try:
                return names[key]
            except KeyError:
                raise TemplateError(f"name {key!r} is not defined") from None
        return name
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_compile(item) for item in node.elts]
        kind = list if isinstance(node, ast.List) else tuple
        return lambda names, functions: kind(item(names, functions) for item in items)
    if isinstance(node, ast.BinOp):
        op, left, right = type(node.op), _compile(node.left), _compile(node.right)
        if op not in _BINARY:
            raise TemplateError(f"operator {op.__name__} is not supported")
        return lambda names, functions: _binary(op, left(names, functions), right(names, functions))
    if isinstance(node, ast.UnaryOp):
        operand = _compile(node.operand)
        if isinstance(node.op, ast.Not):
            return lambda names, functions: not operand(names, functions)
        if not isinstance(node.op, (ast.USub, ast.UAdd)):
            raise TemplateError(f"operator {type(node.op).__name__} is not supported")
        sign = -1 if isinstance(node.op, ast.USub) else 1

        def signed(names, functions):
            value = operand(names, functions)
            if not is_number(value):
                raise TemplateError(f"sign of a {type(value).__name__}")
            return sign * value
        return signed
    if isinstance(node, ast.Compare):
        first = _compile(node.left)
        rest = []
        for op, comparator in zip(node.ops, node.comparators):
            if type(op) not in _COMPARE:
                raise TemplateError(f"comparison {type(op).__name__} is not supported")
            rest.append((_COMPARE[type(op)], _compile(comparator)))

        def compare(names, functions):
            left = first(names, functions)
            for test, comparator in rest:
                right = comparator(names, functions)
                if not test(left, right):
                    return False
                left = right
            return True
        return compare
    if isinstance(node, ast.BoolOp):
        values = [_compile(value) for value in node.values]
        if isinstance(node.op, ast.And):
            return lambda names, functions: all(value(names, functions) for value in values)
        return lambda names, functions: any(value(names, functions) for value in values)
    if isinstance(node, ast.IfExp):
        test, body, orelse = _compile(node.test), _compile(node.body), _compile(node.orelse)
        return lambda names, functions: (body if test(names, functions) else orelse)(names, functions)
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.keywords or \
                any(isinstance(arg, ast.Starred) for arg in node.args):
            raise TemplateError(f"call {ast.unparse(node)!r} is not supported")
        function_name, arguments = node.func.id, [_compile(arg) for arg in node.args]

        def call(names, functions):
            if function_name not in functions:
                raise TemplateError(f"function {function_name!r} is not available here")
            return functions[function_name](*[argument(names, functions) for argument in arguments])
        return call
    raise TemplateError(f"{type(node).__name__} expressions ({ast.unparse(node)!r}) are not supported")


class Expression:
    """One template expression, checked against the supported language and compiled once.

    Literals, names, ``+ - * / // % **`` on numbers (``+`` also joins strings), comparisons,
    ``and``/``or``/``not``, ``x if c else y`` and calls of named helper functions. Attributes,
    subscripts, comprehensions, lambdas, keyword arguments and the like raise :class:`TemplateError`.
    Calling it: ``expression(names, functions)``, names and functions as dicts.
    """

    def __init__(self, source: str):
        self.source = source.strip()
        try:
            node = ast.parse(self.source, mode="eval").body
        except SyntaxError as error:
            raise TemplateError(f"cannot parse {self.source!r}: {error.msg}") from None
        self.names = {item.id for item in ast.walk(node) if isinstance(item, ast.Name)}
        self._run = _compile(node)

    def __call__(self, names: dict[str, Any], functions: dict[str, Callable]) -> Any:
        return self._run(names, functions)

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def evaluate(source: str, names: dict[str, Any] | None = None, functions: dict[str, Callable] | None = None) -> Any:
    """Evaluate one expression (a convenience for tests and callers)."""
    return Expression(source)(names or {}, PURE_FUNCTIONS if functions is None else functions)


# ----------------------------------------------------------------------------- helper functions


def is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, Fraction):
        return value.denominator == 1
    return isinstance(value, float) and math.isfinite(value) and abs(value - round(value)) < 1e-6


def divides(a: Any, b: Any) -> bool:
    return b != 0 and a % b == 0


def ensure_int(value: Any) -> int:
    if not is_int(value):
        raise ValueError(f"{value} is not a whole number")
    return int(round(value))


def fraction_text(value: Any) -> str:
    """``0.75`` -> ``"3/4"``; whole numbers as integers."""
    if isinstance(value, (float, Fraction)):
        fraction = Fraction(value).limit_denominator()
        return str(fraction.numerator) if fraction.denominator == 1 else f"{fraction.numerator}/{fraction.denominator}"
    return str(value)


def plural(n: Any, *forms: str) -> str:
    if len(forms) != 2:
        raise TemplateError("plural() takes a singular and a plural form in English")
    return forms[0] if abs(n) == 1 else forms[1]


PURE_FUNCTIONS: dict[str, Callable] = {
    "is_int": is_int, "divides": divides, "ensure_int": ensure_int, "Fraction": fraction_text,
    "plural": plural, "int": int, "float": float, "round": round, "str": str, "len": len, "list": list,
}


def _range_values(start: int, end: int, step: int = 1) -> list[int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, step)) or step == 0:
        raise TemplateError(f"range({start}, {end}, {step}) needs integers and a non-zero step")
    if abs((end - start) // step) > 10 ** 6:
        raise TemplateError(f"range({start}, {end}, {step}) is too long")
    return list(range(start, end, step))


def _arange_values(start: float, end: float, step: float = 1) -> list[int | float]:
    if step <= 0 or (end - start) / step > 10 ** 6:
        raise TemplateError(f"arange({start}, {end}, {step}) is empty or too long")
    decimals = max(0, -Decimal(str(step)).as_tuple().exponent)
    count = int(math.floor((end - start) / step + 1e-9)) + 1
    return [number(round(start + index * step, decimals)) for index in range(max(0, count))]


def _sample_values(items: list, n: int = 1) -> list:
    items = list(items)
    if n == 1:
        return items
    if math.comb(len(items), n) > 10 ** 6:
        raise TemplateError(f"sample(..., {n}) has too many subsets")
    return [list(subset) for subset in itertools.combinations(items, n)]


def _sample_sequential_values(items: list, n: int) -> list[list]:
    items = list(items)
    return [[items[(start + offset) % len(items)] for offset in range(n)] for start in range(len(items))]


def _range_str_values(start: int, end: int, step: int, words: list[str]) -> list[tuple[str, int]]:
    return [(words[i - 1], i) for i in _range_values(start, end, step) if 0 < i <= len(words)]


# Functions that list the possible values of an init line.
CHOICE_FUNCTIONS: dict[str, Callable] = {
    "range": _range_values, "range_list": _range_values, "arange": _arange_values, "sample": _sample_values,
    "sample_sequential": _sample_sequential_values, "range_str": _range_str_values,
}


def drawing_functions(rng: random.Random) -> dict[str, Callable]:
    """The choice functions as draws from ``rng``, for derived init lines (``range_list`` stays a list)."""
    def draw(function):
        def choose(*args):
            values = function(*args)
            if not values:
                raise ValueError("nothing to choose from")
            return rng.choice(values)
        return choose

    drawn = {name: draw(function) for name, function in CHOICE_FUNCTIONS.items()}
    drawn["range_list"] = _range_values
    return drawn


# ----------------------------------------------------------------------------- values and text


def number(value: Any) -> Any:
    """Numbers without float noise: integral floats as int, others rounded to MAX_DECIMALS."""
    if isinstance(value, bool) or not is_number(value):
        return value
    if isinstance(value, Fraction):
        return int(value) if value.denominator == 1 else value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not finite")
        if abs(value - round(value)) < 1e-9:
            return int(round(value))
        return round(value, MAX_DECIMALS)
    return value


def parse_value(value: Any) -> Any:
    """A sampled value as expressions see it: numeric strings (``"12"``, ``"0.5"``, ``"1/2"``) as numbers."""
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if re.fullmatch(r"-?\d+\.\d+", text):
            return number(float(text))
        match = re.fullmatch(r"(-?\d+)/(\d+)", text)
        if match and int(match.group(2)) != 0:
            return number(Fraction(int(match.group(1)), int(match.group(2))))
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(parse_value(item) for item in value)
    return number(value)


def text_of(value: Any) -> str:
    """A value as it is written into the question or solution."""
    value = number(value)
    if isinstance(value, float):
        return f"{value:.{MAX_DECIMALS}f}".rstrip("0").rstrip(".")
    if isinstance(value, Fraction):
        return f"{value.numerator}/{value.denominator}"
    if isinstance(value, (list, tuple)):
        return ", ".join(text_of(item) for item in value)
    return str(value)
