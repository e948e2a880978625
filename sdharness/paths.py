"""Where the harness's files are: a source checkout, or the copies an installed wheel carries.

``conf/``, ``sweeps/`` and ``evals/`` live at the top of the repository; the wheel ships them
inside the package as ``sdharness/_configs/{conf,sweeps,evals}`` (``pyproject.toml`` maps them), so
the apps find their configs after ``pip install``. A checkout's own folders win: an editable
install reads the files being edited. Files kept only in a checkout (``testbed/bases``, bases that
only reproduce a past result) are named ``checkout://PATH`` in a config.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_CONFIGS = PACKAGE_DIR / "_configs"
CHECKOUT_SCHEME = "checkout://"


def checkout_dir() -> Path | None:
    """The source checkout this package is imported from (editable install, ``PYTHONPATH``), or
    None for an installed wheel (its parent is ``site-packages``, which holds no ``pyproject.toml``)."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "conf").is_dir() else None


def config_dir(name: str) -> Path:
    """``conf``, ``sweeps`` or ``evals``: the checkout's top-level folder, else the wheel's copy."""
    root = checkout_dir()
    return root / name if root is not None else SHIPPED_CONFIGS / name
