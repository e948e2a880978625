"""Every module of the package imports on its own, as the first sdharness module of a fresh interpreter.

Python reports an import circle only when the circle is entered from a module whose names another
member needs before it has finished (``ImportError: cannot import name ... partially initialized
module``); entered from the other side, the same circle imports fine. So each module must be the
first: one subprocess imports the modules one after another, and before each it drops every
``sdharness`` module from ``sys.modules``, so the next import starts the package from nothing, as a
fresh interpreter would, while torch, Lightning and transformers stay loaded (one interpreter start
for all of them, not one per module).
"""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import sdharness

REPO = Path(sdharness.__file__).resolve().parent.parent

IMPORT_EACH_FIRST = r"""
import importlib
import sys
import traceback

failed = []
for name in sys.argv[1:]:
    for loaded in [module for module in sys.modules if module == "sdharness" or module.startswith("sdharness.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(f"import {name} (first): " + traceback.format_exc(limit=-3))
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def package_modules() -> list[str]:
    return sorted(module.name for module in pkgutil.walk_packages(sdharness.__path__, "sdharness."))


def import_each_first(modules: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", IMPORT_EACH_FIRST, *modules], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


def test_the_module_list_is_the_whole_package():
    modules = package_modules()
    assert {"sdharness.config", "sdharness.errors", "sdharness.data.tasks", "sdharness.tools.bench",
            "sdharness.tools.peer", "sdharness.distill.losses"} <= set(modules)
    files = {path for path in (REPO / "sdharness").rglob("*.py") if (path.parent / "__init__.py").exists()}
    assert len(modules) == len(files) - 1  # every file but the package's own __init__.py


def test_every_module_imports_first_without_a_circle():
    result = import_each_first(package_modules())
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_the_data_modules_the_config_schema_checks_with_load_without_it():
    """``config.py`` imports these to check the data fields; they raise its errors from ``errors.py``."""
    probe = ("import sys, sdharness.data, sdharness.data.answers, sdharness.data.builtin, sdharness.data.tasks; "
             "print('sdharness.config' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
