"""The harness's own lm-eval tasks: writing the task files, and materialising them for a run.

::

    python -m sdharness.eval.lmeval write-tasks evals/tasks     # regenerate the shipped task files

``evals/tasks/`` holds one lm-eval task per difficulty (``sdh_arithmetic_easy``,
``sdh_arithmetic_hard``; tag ``sdh_arithmetic`` runs both): a JSONL file of held-out problems
(``problem``, ``solution``, ``answer``) and a YAML that loads it with ``dataset_path: json``.
Answers are read with a regex filter after "The answer is" (the same pattern as
:func:`sdharness.data.answers.extract_answer`) and scored with ``exact_match``. The same folder holds
``sdh_gsm_symbolic`` (GSM8K-style word problems on held-out templates), written with
:func:`task_config` by ``python -m scripts.gsm_symbolic.build`` (a builder in the checkout's ``scripts/``).
The tasks' ``doc_to_text`` is the student prompt of ``conf/prompt/cot.yaml``
(:data:`DEFAULT_STUDENT_TEMPLATE`).

The held-out problems are ``CHAIN.split(HELDOUT_SEED=999, 100, difficulty)`` (the chained task), a fixed seed
distinct from any training split, minus the problems of the default training split
(``data.seed=1234``, ``data.train_size=256``), so the files do not depend on a run's config.
The training run's own quick eval uses ``data.seed + 1`` with its train problems excluded
(:func:`sdharness.data.loading.load_problems`); these files are a separate, fixed benchmark.

Task paths: lm-eval passes ``dataset_kwargs.data_files`` to ``datasets.load_dataset``, which
resolves relative paths against the *current directory*, not the YAML file. The shipped YAMLs
therefore name their data relative to the repository root (``evals/tasks/NAME.jsonl``), which is
what the stock CLI needs when run from the checkout (``lm_eval --include_path evals/tasks``).
:func:`materialise_tasks` (used by :func:`sdharness.eval.lmeval.run_lm_eval`) never relies on that: it
copies every task YAML into another directory with each data file rewritten to an absolute path
(looked up next to the YAML first), and there renders the harness's tasks with a run's own prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
from pathlib import Path
from typing import Any, Iterable

import yaml

from sdharness.data.answers import ANSWER_MARKER, answer_pattern
from sdharness.data.chain import CHAIN
from sdharness.data.tasks import DIFFICULTY_STEPS
from sdharness.paths import config_dir

TASKS_DIR = config_dir("evals") / "tasks"  # the shipped task files
HELDOUT_SEED = 999
HELDOUT_SIZE = 100
DEFAULT_DIFFICULTIES = ("easy", "hard")
TASK_PREFIX = "sdh_arithmetic"
TASK_TAG = "sdh_arithmetic"  # `--tasks sdh_arithmetic` runs every difficulty written
LOCAL_TAG_PREFIX = "sdh_"  # tags of the harness's own tasks, whose prompt follows the run's student prompt
DEFAULT_MAX_GEN_TOKS = 256
# The student prompt of conf/prompt/cot.yaml (tests check that the two agree).
DEFAULT_STUDENT_TEMPLATE = (
    'Solve the problem step by step, writing each intermediate result. End with "The answer is N."\n'
    "\n"
    "Problem: {problem}"
)
# End-of-text markers of common tokenizers; lm-eval adds the tokenizer's own EOS as well.
STOP_SEQUENCES = ["</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"]
# Exactly sdharness.data.answers.extract_answer: the first number after the answer marker.
ANSWER_REGEX = answer_pattern(ANSWER_MARKER)
FILTER_NAME = "strict-match"


# ----------------------------------------------------------------------------- task files


def task_name(difficulty: str) -> str:
    return f"{TASK_PREFIX}_{difficulty}"


def jinja_template(template: str) -> str:
    """A ``str.format`` template with ``{problem}`` as a Jinja template for lm-eval's doc_to_text.

    Literal text that Jinja would read as syntax (``{{``, ``{%``, ``{#``) is wrapped in raw blocks.
    """
    parts = []
    for literal, field_name, format_spec, conversion in string.Formatter().parse(template):
        if literal:
            parts.append("{% raw %}" + literal + "{% endraw %}" if re.search(r"\{[{%#]", literal) else literal)
        if field_name is not None:
            if field_name != "problem" or format_spec or conversion:
                raise ValueError(f"prompt template may only use the placeholder {{problem}}; got {{{field_name}}}")
            parts.append("{{problem}}")
    return "".join(parts)


def task_config(name: str, difficulty: str | None, data_file: str, *, prompt_template: str, max_gen_toks: int,
                seed: int, size: int, tag: str = TASK_TAG, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The lm-eval task config (as a dict) of one local task: a JSONL of problem/solution/answer rows.

    ``tag``: the arithmetic tasks share ``sdh_arithmetic``; other local tasks (e.g.
    ``sdh_gsm_symbolic``, ``scripts/gsm_symbolic/build.py``) pass their own. ``metadata`` is added to
    the task's metadata (``difficulty`` is left out when None).
    """
    meta: dict[str, Any] = {"version": 1.0}
    if difficulty is not None:
        meta["difficulty"] = difficulty
    meta.update({"seed": seed, "size": size, **(metadata or {})})
    return {
        "task": name,
        "tag": [tag],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "generate_until",
        "num_fewshot": 0,
        "doc_to_text": jinja_template(prompt_template),
        "doc_to_target": "answer",
        "generation_kwargs": {"until": list(STOP_SEQUENCES), "do_sample": False, "max_gen_toks": max_gen_toks},
        "filter_list": [{"name": FILTER_NAME, "filter": [
            {"function": "regex", "regex_pattern": ANSWER_REGEX, "group_select": 0},
            {"function": "take_first"},
        ]}],
        "metric_list": [{
            "metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
            "ignore_case": True, "ignore_punctuation": False,
            # "1,024" == "1024" and "32.0" == "32", as sdharness.data.answers.is_correct compares numbers
            "regexes_to_ignore": [",", r"\.0+$"],
        }],
        "metadata": meta,
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the prompt) as readable ``|`` blocks."""


_BlockDumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def dump_yaml(config: dict, path: Path, header: str = "") -> None:
    path.write_text(header + yaml.dump(config, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True,
                                       width=10_000), encoding="utf-8")


def heldout_problems(difficulty: str, *, seed: int = HELDOUT_SEED, size: int = HELDOUT_SIZE,
                     exclude_default_train: bool = True) -> list[dict[str, str]]:
    """The held-out problems of one difficulty; by default none of the default training split."""
    exclude = None
    if exclude_default_train:
        from sdharness.config import DataConfig

        default = DataConfig()
        exclude = {row["problem"] for row in CHAIN.split(default.seed, default.train_size, difficulty,
                                                          default.solution_style)}
    return CHAIN.split(seed, size, difficulty, "native", exclude=exclude)


def write_local_tasks(directory: str | Path, *, seed: int = HELDOUT_SEED, size: int = HELDOUT_SIZE,
                      difficulties: Iterable[str] = DEFAULT_DIFFICULTIES,
                      prompt_template: str = DEFAULT_STUDENT_TEMPLATE, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                      relative_to: str | Path | None = None,
                      exclude_default_train: bool = True) -> dict[str, Path]:
    """Write ``<task>.jsonl`` (problem, solution, answer) and ``<task>.yaml`` per difficulty.

    ``data_files`` in the YAML is absolute, or relative to ``relative_to`` when given (the
    shipped files use the repository root, see the module docstring). Returns task -> YAML path.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    shown = os.path.relpath(directory, Path(relative_to).resolve()) if relative_to is not None else directory
    command = f"python -m sdharness.eval.lmeval write-tasks {shown} --seed {seed} --size {size}"
    written = {}
    for difficulty in difficulties:
        if difficulty not in DIFFICULTY_STEPS:
            raise ValueError(f"difficulty {difficulty!r} is unknown; choose from {', '.join(DIFFICULTY_STEPS)}")
        name = task_name(difficulty)
        problems = heldout_problems(difficulty, seed=seed, size=size, exclude_default_train=exclude_default_train)
        data_path = directory / f"{name}.jsonl"
        with data_path.open("w", encoding="utf-8") as handle:
            for row in problems:
                handle.write(json.dumps({"problem": row["problem"], "solution": row["solution"],
                                         "answer": str(row["answer"])}) + "\n")
        data_file = str(data_path) if relative_to is None else os.path.relpath(data_path, Path(relative_to).resolve())
        config = task_config(name, difficulty, data_file, prompt_template=prompt_template,
                             max_gen_toks=max_gen_toks, seed=seed, size=len(problems))
        header = (f"# Generated by sdharness.eval.lmeval_tasks.write_local_tasks ({command}); do not edit by hand.\n"
                  f"# {len(problems)} held-out {difficulty} arithmetic problems, seed {seed}.\n"
                  "# data_files is resolved by datasets against the current directory; sdharness-eval and\n"
                  "# sdharness.eval.lmeval.run_lm_eval rewrite it to an absolute path (next to this file) at run time.\n")
        yaml_path = directory / f"{name}.yaml"
        dump_yaml(config, yaml_path, header)
        written[name] = yaml_path
    return written


# ----------------------------------------------------------------------------- materialising


def _resolve_data_file(value: str, yaml_dir: Path) -> str:
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return str(path)
    for candidate in (yaml_dir / path, yaml_dir / path.name, Path.cwd() / path):
        if candidate.exists():
            return str(candidate.resolve())
    raise FileNotFoundError(f"{yaml_dir}: data file {value!r} not found next to the task YAML nor under {Path.cwd()}")


def _absolute_data_files(data_files: Any, yaml_dir: Path) -> Any:
    if isinstance(data_files, str):
        return _resolve_data_file(data_files, yaml_dir)
    if isinstance(data_files, list):
        return [_absolute_data_files(item, yaml_dir) for item in data_files]
    if isinstance(data_files, dict):
        return {split: _absolute_data_files(item, yaml_dir) for split, item in data_files.items()}
    return data_files


def _tags(config: dict) -> list[str]:
    tags = config.get("tag") or []
    return [tags] if isinstance(tags, str) else list(tags)


def materialise_tasks(include_path: str | Path, target: str | Path, *, doc_to_text: str | None = None,
                      plain_newline: bool = False) -> set[str]:
    """Copy the task YAMLs of ``include_path`` into ``target`` with absolute data paths.

    For the harness's own tasks (a tag starting ``sdh_``: ``sdh_arithmetic``, ``sdh_gsm_symbolic``):
    ``doc_to_text`` (a Jinja template) replaces the prompt when given; ``plain_newline`` appends the
    newline that plain-text (no chat template) prompts end with in training. Returns the task and
    tag names defined there.
    """
    include_path, target = Path(include_path), Path(target)
    yaml_files = sorted(include_path.glob("*.yaml")) + sorted(include_path.glob("*.yml"))
    if not yaml_files:
        raise FileNotFoundError(f"no task YAML in {include_path}; write them with "
                                f"`python -m sdharness.eval.lmeval write-tasks {include_path}`")
    names: set[str] = set()
    for path in yaml_files:
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: only plain YAML task files are supported here (no !function); pass "
                             f"other task directories through extra_include_paths ({error})") from None
        if not isinstance(config, dict):
            continue
        data_files = (config.get("dataset_kwargs") or {}).get("data_files")
        if data_files is not None:
            config["dataset_kwargs"]["data_files"] = _absolute_data_files(data_files, path.parent.resolve())
        if any(tag.startswith(LOCAL_TAG_PREFIX) for tag in _tags(config)):
            if doc_to_text is not None:
                config["doc_to_text"] = doc_to_text
            if plain_newline and not str(config.get("doc_to_text", "")).endswith("\n"):
                config["doc_to_text"] = str(config["doc_to_text"]) + "\n"
        names.update([str(config["task"])] if "task" in config else [])
        names.update(_tags(config))
        dump_yaml(config, target / path.name)
    return names


# ----------------------------------------------------------------------------- the write-tasks command


def _write_tasks_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdharness-eval write-tasks",
                                     description="Write the local lm-eval arithmetic tasks (YAML + JSONL).")
    parser.add_argument("directory", nargs="?", default=str(TASKS_DIR))
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED)
    parser.add_argument("--size", type=int, default=HELDOUT_SIZE)
    parser.add_argument("--difficulties", default=",".join(DEFAULT_DIFFICULTIES))
    parser.add_argument("--max-gen-toks", type=int, default=DEFAULT_MAX_GEN_TOKS)
    parser.add_argument("--absolute", action="store_true",
                        help="absolute data paths (default: relative to the current directory when the "
                             "target lies inside it, as the stock `lm_eval --include_path` run from there needs)")
    return parser


def write_tasks_main(argv: list[str]) -> int:
    args = _write_tasks_parser().parse_args(argv)
    directory = Path(args.directory).resolve()
    cwd = Path.cwd().resolve()
    relative = None if args.absolute or not directory.is_relative_to(cwd) else cwd
    written = write_local_tasks(directory, seed=args.seed, size=args.size,
                                difficulties=[d for d in args.difficulties.split(",") if d],
                                max_gen_toks=args.max_gen_toks, relative_to=relative)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
