from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from sdharness.config import ConfigError, TrainConfig, to_train_config
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


def test_integer_tau_from_command_line_is_a_float():
    cfg = to_train_config(compose_config(TINY + ["aggregation.tau=4"]))
    assert isinstance(cfg.aggregation.tau, float) and cfg.aggregation.tau == 4.0


@pytest.mark.parametrize("tau", ["0", "-1.5"])
def test_non_positive_tau_is_rejected(tau):
    with pytest.raises(ConfigError, match="aggregation.tau must be a positive number"):
        to_train_config(compose_config(TINY + [f"aggregation.tau={tau}"]))


def test_unknown_aggregation_name_lists_the_choices():
    with pytest.raises(ConfigError, match=r"aggregation.name='geometric' is unknown; choose one of: teacher, product"):
        to_train_config(compose_config(TINY + ["aggregation.name=geometric"]))


def test_unknown_aggregation_config_is_a_composition_error():
    with pytest.raises(ConfigCompositionException, match="aggregation/geometric"):
        compose_config(TINY + ["aggregation=geometric"])


def test_misspelt_key_fails_at_compose():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(TINY + ["aggregation.temperature=2"])
    assert "Key 'temperature' not in 'AggregationConfig'" in str(error.value.__cause__)


def test_forced_unknown_key_is_not_silently_dropped():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): aggregation.temperature \(known: name, tau\)"):
        to_train_config(compose_config(TINY + ["+aggregation.temperature=2"]))


def test_free_form_trainer_extra_is_allowed():
    cfg = to_train_config(compose_config(TINY + ["+trainer.extra.benchmark=false"]))
    assert cfg.trainer.extra == {"benchmark": False}


def test_teacher_template_without_solution_is_rejected():
    with pytest.raises(ConfigError, match=r"prompt.teacher must use exactly the placeholders \{problem\} and \{solution\}"):
        to_train_config(compose_config(TINY + ["prompt.teacher='Solve: {problem}'"]))


def test_student_template_with_solution_is_rejected():
    with pytest.raises(ConfigError, match="The student never sees the solution"):
        to_train_config(compose_config(TINY + ["prompt.student='{problem} {solution}'"]))


def test_unknown_placeholder_is_rejected():
    with pytest.raises(ConfigError, match="hint"):
        to_train_config(compose_config(TINY + ["prompt.teacher='{problem} {solution} {hint}'"]))


def test_string_tau_is_a_type_error():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(TINY + ["aggregation.tau=hot"])
    assert isinstance(error.value.__cause__, ValidationError)
