"""The wheel: it carries the configs, and its apps train outside the checkout; the builders and the
base that only reproduces a past result stay in the checkout."""

from __future__ import annotations

import csv
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# What a source distribution holds; the builders come along so that the wheel's leaving them out is checked.
SOURCES = ("pyproject.toml", "README.md", "sdharness", "conf", "sweeps", "evals", "testbed", "scripts")
SMOKE = ["model=tiny_random", "data.train_size=8", "data.eval_size=4", "data.batch_size=2", "rollout.max_new_tokens=12",
         "rollout.progress=false", "eval.max_new_tokens=12", "eval.batch_size=4", "trainer.max_steps=2",
         "logger.mode=disabled"]


def run(command: list, **kwargs) -> str:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` offline (no build isolation: this environment's setuptools) from a copy of the
    sources, so that the build's own files never land in the checkout."""
    directory = tmp_path_factory.mktemp("wheel")
    source = directory / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", directory / "dist", source])
    built, = (directory / "dist").glob("sdharness-*.whl")
    return built


def test_the_wheel_holds_the_package_and_its_configs_and_not_the_builders(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every subpackage (pyproject.toml lists them by hand) and every config file.
    for init in REPO.glob("sdharness/**/__init__.py"):
        assert init.relative_to(REPO).as_posix() in names, f"{init.parent.name}: add it to pyproject's packages"
    shipped = [*REPO.glob("conf/**/*.yaml"), *REPO.glob("sweeps/**/*.yaml"), *REPO.glob("evals/tasks/*")]
    assert len(shipped) > 50
    for path in shipped:
        assert f"sdharness/_configs/{path.relative_to(REPO).as_posix()}" in names, path
    # The stress-case bases ship; testbed_columns_v1 (its model config ships, naming checkout://) does not.
    assert {Path(name).parent.name for name in names if name.endswith(".safetensors")} == {
        "testbed", "testbed_chain", "testbed_v1"}
    assert not [name for name in names if name.startswith("sdharness/assets/testbed_columns_v1") or "figures/" in name]
    assert {name.split("/")[0] for name in names} == {"sdharness", "sdharness-0.1.0.dist-info"}  # no testbed/, scripts/
    assert not [name for name in names if Path(name).stem in ("pretrain", "synthetic_chats") or "gsm_symbolic/" in name
                and name.endswith(".py")]
    entry_points = zipfile.ZipFile(wheel).read("sdharness-0.1.0.dist-info/entry_points.txt").decode()
    assert "sdharness-train = sdharness.train:main" in entry_points and "pretrain" not in entry_points


def test_the_installed_wheel_trains_two_steps_outside_the_checkout(wheel, tmp_path):
    environment = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", environment])
    python = environment / "bin" / "python"
    # --system-site-packages reaches the base interpreter's packages, not this environment's (torch, ...):
    # a .pth line adds those. A plain path, so their own .pth files (this checkout's editable install) never run.
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    (purelib / "outer_site_packages.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    run([python, "-m", "pip", "install", "-q", "--no-deps", wheel])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    where = run([python, "-c", "from sdharness import config, paths; print(paths.checkout_dir(), config.CONF_DIR)"],
                cwd=elsewhere, env=env)
    assert where.split() == ["None", str(purelib / "sdharness" / "_configs" / "conf")]
    run([environment / "bin" / "sdharness-train", *SMOKE, f"hydra.run.dir={elsewhere / 'run'}"], cwd=elsewhere, env=env)
    with open(elsewhere / "run" / "metrics.csv") as handle:
        losses = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(losses) == 2
