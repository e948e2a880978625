"""What a training step holds while its loss generator is suspended (through backward and the
optimiser step): no vocabulary-sized logits tensor. The gradient that backward needs is saved by
the loss itself, so backward gives the same gradients with the logits freed."""

import gc
import weakref

import pytest
import torch

from sdharness.config import to_train_config
from sdharness.data.datamodule import ProblemDataModule
from sdharness.methods import self_distill, sft
from sdharness.models import load_model_and_tokenizer
from tests.conftest import TINY, compose_config


def _setup(algo):
    cfg = to_train_config(compose_config(TINY + [f"algo={algo}"]))
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    datamodule = ProblemDataModule(cfg.data, cfg.prompt, tokenizer, max_context=1024,
                                   max_new_tokens=cfg.rollout.max_new_tokens)
    datamodule.setup()
    return cfg, model, tokenizer, next(iter(datamodule.train_dataloader()))


@pytest.mark.parametrize("algo, module, cls", [("sd", self_distill, "SelfDistillModule"), ("sft", sft, "SFTModule")])
def test_suspended_loss_generator_holds_no_logits(monkeypatch, algo, module, cls):
    cfg, model, tokenizer, batch = _setup(algo)
    made = []
    original = module.completion_logits

    def recording(*args, **kwargs):
        logits = original(*args, **kwargs)
        made.append((weakref.ref(logits), logits.shape))
        return logits

    monkeypatch.setattr(module, "completion_logits", recording)
    losses = getattr(module, cls)(model, tokenizer, cfg).losses(batch)
    loss, _ = next(losses)  # the generator is now suspended at its yield, as during backward
    gc.collect()
    ((logits, shape),) = made
    assert shape[-1] == model.config.vocab_size
    assert logits() is None, "the suspended generator still references the student logits"
    loss.backward()  # the loss kept what backward needs
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
