"""algo.distillation_weight: SD mixed with GRPO's clipped policy gradient on the same rollouts.
At 0 it trains exactly as algo=grpo, at 1 exactly as plain SD; between, the loss is the weighted sum."""

import pytest
import torch
from safetensors.torch import load_file

from sdharness.config import ConfigError, to_train_config
from sdharness.data.datamodule import ProblemDataModule
from sdharness.methods.self_distill import SelfDistillModule
from sdharness.models import load_model_and_tokenizer
from sdharness.train import train
from tests.conftest import TINY, compose_config

RUN = TINY + ["algo.group_size=2", "eval.at_start=false", "logger.mode=disabled"]


def trained_weights(overrides, tmp_path):
    train(compose_config(RUN + overrides), tmp_path)
    return load_file(tmp_path / "final_model" / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_weight_zero_trains_exactly_as_grpo(tmp_path):
    mixed = trained_weights(["algo=sd", "algo.distillation_weight=0"], tmp_path / "mixed")
    grpo = trained_weights(["algo=grpo"], tmp_path / "grpo")
    assert_same_weights(mixed, grpo)


@pytest.mark.slow
def test_weight_one_trains_exactly_as_sd(tmp_path):
    one = trained_weights(["algo=sd", "algo.distillation_weight=1"], tmp_path / "one")
    sd = trained_weights(["algo=sd"], tmp_path / "sd")
    assert_same_weights(one, sd)
    nearly = trained_weights(["algo=sd", "algo.distillation_weight=0.999"], tmp_path / "nearly")
    assert any(not torch.equal(nearly[name], sd[name]) for name in sd)  # group rollouts below 1


def step(weight: float):
    cfg = to_train_config(compose_config(RUN + ["algo=sd", f"algo.distillation_weight={weight}"]))
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    data = ProblemDataModule(cfg.data, cfg.prompt, tokenizer, max_context=1024, max_new_tokens=cfg.rollout.max_new_tokens)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    module = SelfDistillModule(model, tokenizer, cfg)
    torch.manual_seed(0)
    (loss, metrics), = list(module.losses(batch))
    return loss, metrics, module


def test_the_mixed_loss_is_the_weighted_sum_of_both_terms_on_the_same_rollouts():
    grpo_loss, grpo_metrics, grpo_module = step(0.0)
    loss, metrics, module = step(0.25)
    assert "train/divergence_per_token" not in grpo_metrics  # weight 0: no teacher pass
    assert metrics["train/policy_loss"].item() == grpo_loss.item()  # same rollouts, same rewards
    expected = 0.25 * metrics["train/divergence_per_token"] + 0.75 * metrics["train/policy_loss"]
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)
    assert module.step_counts.rollouts == 2 * 2 and grpo_module.step_counts.rollouts == 2 * 2
    assert module.step_counts.forward_tokens > grpo_module.step_counts.forward_tokens  # the teacher's pass
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())


@pytest.mark.parametrize("overrides,message", [
    (["algo.distillation_weight=1.5"], r"algo.distillation_weight must be in \[0, 1\], got 1.5"),
    (["algo=grpo", "algo.distillation_weight=0.5"], r"algo.distillation_weight mixes GRPO into algo=sd, not "
                                                     r"algo=grpo"),
    (["algo.distillation_weight=0.5", "algo.inner_epochs=2"], r"set algo.group_size >= 2 \(got 2\), "
                                                              r"algo.inner_epochs=1 \(got 2\)"),
    (["algo.distillation_weight=0.5", "rollout.guidance=always"], r"set rollout.guidance=never"),
])
def test_bad_distillation_weights_name_the_field_and_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_train_config(compose_config(RUN + overrides))
