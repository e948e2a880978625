"""Where the harness finds its files: a checkout's own folders, or the copies an installed wheel carries."""

from __future__ import annotations

import pytest

from sdharness import paths
from sdharness.config import CONF_DIR, ConfigError, SWEEPS_DIR
from sdharness.models import resolve_path

REPO = paths.PACKAGE_DIR.parent


def test_a_checkout_reads_its_own_top_level_folders():
    assert paths.checkout_dir() == REPO
    assert CONF_DIR == REPO / "conf" and SWEEPS_DIR == REPO / "sweeps"
    assert paths.config_dir("evals") == REPO / "evals"


def test_an_installed_package_reads_the_copies_it_ships(tmp_path, monkeypatch):
    site_packages = tmp_path / "site-packages"  # holds the package and no pyproject.toml
    monkeypatch.setattr(paths, "PACKAGE_DIR", site_packages / "sdharness")
    monkeypatch.setattr(paths, "SHIPPED_CONFIGS", site_packages / "sdharness" / "_configs")
    assert paths.checkout_dir() is None
    assert paths.config_dir("conf") == site_packages / "sdharness" / "_configs" / "conf"


def test_a_checkout_only_base_loads_from_the_checkout_and_says_what_to_do_without_one(monkeypatch, tmp_path):
    assert resolve_path("checkout://testbed/bases/testbed_columns_v1") == REPO / "testbed/bases/testbed_columns_v1"
    monkeypatch.setattr(paths, "PACKAGE_DIR", tmp_path / "sdharness")  # as in an installed wheel
    with pytest.raises(ConfigError) as error:
        resolve_path("checkout://testbed/bases/testbed_columns_v1")
    assert str(error.value) == (
        "model.path='checkout://testbed/bases/testbed_columns_v1' is kept in the sdharness source checkout only, "
        "not in an installed package; run from a clone (git clone, then pip install -e .) or choose another model.path")
