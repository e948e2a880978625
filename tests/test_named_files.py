"""Every repository file that the README, the docs or a config names exists.

A moved or renamed file leaves its old path behind in prose and comments, where nothing runs it;
this test reads them as a newcomer would and follows each path (``conf/model/testbed.yaml``,
``pkg://sdharness/assets/testbed``, a glob, a ``{yaml,jsonl}`` pair), each dotted name of the
repository's code (``python -m scripts.gsm_symbolic.build``, ``sdharness.eval.lmeval_tasks.write_local_tasks``)
and, in the Markdown, each console script (``sdharness-train``)."""

from __future__ import annotations

import ast
import re
import tomllib
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOP = ("sdharness", "conf", "sweeps", "evals", "tests", "testbed", "scripts", "docs")
# The prose and configs a reader follows; generated files that record the command that made them.
NAMING_FILES = ("README.md", "docs/**/*.md", "testbed/**/*.md", "sdharness/assets/*/README.md", "conf/**/*.yaml",
                "sweeps/**/*.yaml", "testbed/conf/*.yaml", "evals/tasks/*.yaml", "sdharness/assets/*/manifest.json")
# A path: a top-level folder, then lower-case path characters (``sdharness/TRL`` is prose), not inside a
# longer word or a URL, and not ending in the sentence's punctuation.
PATH = re.compile(r"(?<![\w./:-])(?:pkg://)?((?:%s)/(?:[a-z0-9_*{](?:[\w./*{},-]*[\w*}/])?)?)" % "|".join(TOP))
# A dotted name of the repository's Python code: sdharness.eval.lmeval, scripts.gsm_symbolic.build.
DOTTED = re.compile(r"(?<![\w./-])((?:sdharness|testbed|scripts)(?:\.[A-Za-z_]\w*)+)")
# A console script a reader would type (in YAML such a word is a name, e.g. an Optuna study's).
SCRIPT = re.compile(r"(?<![\w./-])(sdharness-[a-z][a-z-]*[a-z])(?![\w.-])")
SCRIPTS = frozenset(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def _expand_braces(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if match is None:
        return [path]
    return [expanded for option in match.group(1).split(",")
            for expanded in _expand_braces(path[:match.start()] + option + path[match.end():])]


def path_exists(path: str) -> bool:
    return all(any(REPO.glob(candidate)) if "*" in candidate else (REPO / candidate).exists()
               for candidate in _expand_braces(path))


@cache
def _top_level_names(module_file: Path) -> frozenset[str]:
    tree = ast.parse(module_file.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return frozenset(names)


def dotted_name_exists(name: str) -> bool:
    """A module (file or package), or a module's top-level name, or one attribute below it."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:end])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[end:]
            return not rest or (len(rest) <= 2 and rest[0] in _top_level_names(module))
    return False


def named_files() -> list[Path]:
    return sorted({path for pattern in NAMING_FILES for path in REPO.glob(pattern) if path.is_file()})


def missing_names(path: Path) -> list[str]:
    """``file:line: name`` for each path or dotted name in ``path`` that the repository does not have."""
    missing = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path.relative_to(REPO)}:{number}"
        missing += [f"{where}: {name}" for name in PATH.findall(line) if not path_exists(name)]
        missing += [f"{where}: {name}" for name in DOTTED.findall(line) if not dotted_name_exists(name)]
        if path.suffix == ".md":
            missing += [f"{where}: {name}" for name in SCRIPT.findall(line) if name not in SCRIPTS]
    return missing


def test_the_scan_finds_paths_and_dotted_names_and_judges_them():
    assert PATH.findall("see `conf/model/testbed.yaml` and pkg://sdharness/assets/testbed_chain, "
                        "not https://x.org/conf/a or myconf/b") == ["conf/model/testbed.yaml",
                                                                    "sdharness/assets/testbed_chain"]
    assert DOTTED.findall("python -m scripts.gsm_symbolic.build X; sdharness.eval.lmeval.run_lm_eval rewrites") == [
        "scripts.gsm_symbolic.build", "sdharness.eval.lmeval.run_lm_eval"]
    assert path_exists("evals/tasks/sdh_gsm_symbolic.{yaml,jsonl}") and path_exists("sdharness/assets/testbed*")
    assert not path_exists("evals/tasks/sdh_gsm_symbolic.{yaml,csv}") and not path_exists("conf/nothing*.yaml")
    assert dotted_name_exists("sdharness.eval.lmeval_tasks.write_local_tasks")
    assert not dotted_name_exists("sdharness.eval.lmeval.write_local_tasks")  # defined in lmeval_tasks only
    assert not dotted_name_exists("sdharness.gsm_symbolic")
    assert SCRIPT.findall("run `sdharness-train -m`, not sdharness-0.1.0 or my-sdharness-app") == ["sdharness-train"]
    assert "sdharness-train" in SCRIPTS and "sdharness-pretrain" not in SCRIPTS  # the testbed builder left the package


def test_every_file_the_readme_the_docs_and_the_configs_name_exists():
    files = named_files()
    assert REPO / "conf" / "train.yaml" in files and REPO / "README.md" in files
    missing = [entry for path in files for entry in missing_names(path)]
    assert not missing, "named but not in the repository (fix the path or the text):\n" + "\n".join(missing)
