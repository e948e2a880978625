from pathlib import Path

import pytest

from sdharness.config import TrainConfig, to_train_config
from tests.conftest import CONF_DIR, TINY, compose_config

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())


def _options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group, option):
    overrides = [o for o in TINY if not o.startswith(f"{group}=")] + [f"{group}={option}"]
    if group == "model" and option == "local":
        overrides.append("model.path=/some/dir")
    if group == "data" and option == "jsonl":
        overrides.append("data.path=train.jsonl")
    cfg = to_train_config(compose_config(overrides))
    assert isinstance(cfg, TrainConfig)


def test_default_experiment_is_smollm2_on_arithmetic():
    cfg = to_train_config(compose_config())
    assert cfg.model.name == "smollm2_135m" and cfg.data.name == "arithmetic"
    assert cfg.aggregation.name == "product" and cfg.aggregation.tau == 2.0


def test_free_form_trainer_extra_is_allowed():
    cfg = to_train_config(compose_config(TINY + ["+trainer.extra.benchmark=false"]))
    assert cfg.trainer.extra == {"benchmark": False}


# Bad values, misspelt keys and options, templates and temperatures: tests/test_bad_input.py.
