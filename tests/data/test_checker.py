"""One answer checker, ``data.checker``, for eval, GRPO's reward, guided sampling and bootstrap;
the built-in one reads integers, decimals and fractions and compares them exactly."""

import pytest

from sdharness.config import to_train_config
from sdharness.data.answers import answer_checker, extract_answer, is_correct
from sdharness.methods.rewards import resolve_reward
from sdharness.eval.quick import completion_metrics
from tests.conftest import TINY, compose_config

EQUAL = [("The answer is 559/5.", "559/5"), ("The answer is 111.8.", "559/5"), ("The answer is 559/5.", "111.8"),
         ("The answer is -3/4.", "-0.75"), ("The answer is 1,024.", "1024"), ("The answer is 32.0", "32"),
         ("The answer is 10/2", "5"), ("The answer is 1 / 3.", "2/6")]
DIFFERENT = [("The answer is 559/6.", "559/5"), ("The answer is 559.", "559/5"), ("The answer is 0.333333.", "1/3"),
             ("The answer is 3/4.", "-3/4"), ("no marker 559/5", "559/5")]


@pytest.mark.parametrize("completion,answer", EQUAL)
def test_builtin_checker_equates_fractions_and_decimals(completion, answer):
    assert is_correct(completion, answer) and answer_checker("builtin")(completion, answer)


@pytest.mark.parametrize("completion,answer", DIFFERENT)
def test_builtin_checker_tells_different_values_apart(completion, answer):
    assert not is_correct(completion, answer)


def test_the_whole_fraction_is_extracted():
    assert extract_answer("so 559/5 it is. The answer is 559/5.") == "559/5"
    assert extract_answer("The answer is: -12/7, so") == "-12/7"
    assert extract_answer("The answer is 42.") == "42"


def test_eval_and_grpo_reward_check_with_the_configured_checker():
    pytest.importorskip("math_verify")
    completion, problem = "The answer is \\frac{1}{2}.", {"answer": "0.5"}
    assert completion_metrics([completion], [problem], "The answer is")["accuracy"] == 0.0
    assert completion_metrics([completion], [problem], "The answer is", checker="math_verify")["accuracy"] == 1.0
    assert resolve_reward("answer_match")(completion, problem, "The answer is") == 0.0
    assert resolve_reward("answer_match", "math_verify")(completion, problem, "The answer is") == 1.0


def test_grpo_module_and_bootstrap_use_data_checker():
    pytest.importorskip("math_verify")
    from sdharness.methods.grpo import GRPOModule
    from sdharness.models import load_model_and_tokenizer
    from sdharness.tools import bootstrap

    cfg = to_train_config(compose_config(TINY + ["algo=grpo", "data.checker=math_verify"]))
    module = GRPOModule(*load_model_and_tokenizer(cfg.model), cfg)
    assert module.reward_fn("The answer is \\frac{1}{2}.", {"answer": "0.5"}, "The answer is") == 1.0
    assert bootstrap.answer_checker is answer_checker  # bootstrap's --checker is the same choice


def test_math_verify_checker_without_the_package_is_an_error_naming_the_install(monkeypatch):
    import importlib.util

    from sdharness.config import ConfigError

    answer_checker.cache_clear()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else find_spec(name, *a))
    message = r"data.checker=math_verify needs the math-verify package: pip install math-verify, or set " \
              r"data.checker=builtin"
    with pytest.raises(ConfigError, match=message):
        to_train_config(compose_config(TINY + ["data.checker=math_verify"]))
    with pytest.raises(ConfigError, match=message):  # sdharness-bootstrap --checker math_verify: the same function
        answer_checker("math_verify")
    answer_checker.cache_clear()
