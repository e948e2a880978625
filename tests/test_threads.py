"""threads=auto: one thread for small models, half the cores for large ones; a bad value names the field."""

import pytest

from sdharness.config import ConfigError, to_train_config
from sdharness.models import SINGLE_THREAD_PARAMETERS, torch_threads
from tests.conftest import compose_config


@pytest.mark.parametrize("setting,parameters,cpus,threads", [
    ("auto", 452_832, 2, 1),            # the testbed base
    ("auto", 452_832, 64, 1),
    ("auto", 134_515_008, 2, 1),        # SmolLM2-135M on the 2-core VM
    ("auto", 134_515_008, 16, 8),
    ("auto", SINGLE_THREAD_PARAMETERS, 1, 1),
    ("3", 452_832, 2, 3),
    ("0", 134_515_008, 16, 0),          # torch's own default
])
def test_torch_threads(setting, parameters, cpus, threads):
    assert torch_threads(setting, parameters, cpus) == threads


def test_threads_setting_is_checked_at_compose():
    assert to_train_config(compose_config(["model=tiny_random"])).threads == "auto"
    assert to_train_config(compose_config(["model=tiny_random", "threads=2"])).threads == "2"
    with pytest.raises(ConfigError, match="threads='two' must be auto"):
        to_train_config(compose_config(["model=tiny_random", "threads=two"]))
