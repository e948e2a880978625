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


def _leaves(values: dict, defaults: dict, prefix: str = ""):
    """``(key, value, default)`` of each YAML leaf whose field has a dataclass default."""
    for key, value in values.items():
        if key not in defaults:
            continue  # `defaults`, `hydra`, a free-form dict's keys: no dataclass default to compare with
        if isinstance(value, dict) and isinstance(defaults[key], dict) and defaults[key]:
            yield from _leaves(value, defaults[key], f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value, defaults[key]


def _restated_defaults(path: Path, defaults: dict) -> list[str]:
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(path)) or {}
    # A value equal to the file's own name is what makes that option that option (algo/sd.yaml's name: sd).
    return [f"{path.relative_to(Path(CONF_DIR).parent)}: {key}: {value!r} restates the dataclass default; delete it"
            for key, value, default in _leaves(values, defaults) if value == default and value != path.stem]


def test_no_yaml_in_conf_restates_a_dataclass_default():
    """The dataclasses in sdharness/config.py hold every default; an option file states only what makes it
    that option, so the two never disagree (a Python-built TrainConfig() is the YAML's default run)."""
    from omegaconf import OmegaConf

    from sdharness.tools.probe import ProbeConfig

    train = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    probe = OmegaConf.to_container(OmegaConf.structured(ProbeConfig))
    conf = Path(CONF_DIR)
    files = [(conf / "train.yaml", train), (conf / "probe.yaml", probe)]
    for group in GROUPS:
        for path in sorted((conf / group).glob("*.yaml")):
            is_global = path.read_text().startswith("# @package _global_")
            files.append((path, train if is_global else train.get(group, {})))
    restated = [line for path, defaults in files for line in _restated_defaults(path, defaults)]
    assert not restated, "\n".join(restated)
    assert len(files) > 40 and all(isinstance(defaults, dict) and defaults for _, defaults in files)
