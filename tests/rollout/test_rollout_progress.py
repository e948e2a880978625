"""A rollout without a visible progress bar hands HF generate no logits processor: HF inspects
each processor's signature on every generated token, a per-token cost for nothing."""

import torch

from sdharness.config import ModelConfig
from sdharness.models import load_model_and_tokenizer
from sdharness.rollout.hf import generate


def test_hidden_progress_bar_adds_no_logits_processor():
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny_random"))
    seen = []
    original = model.generate

    def spy(*args, **kwargs):
        seen.append(list(kwargs["logits_processor"]))
        return original(*args, **kwargs)

    model.generate = spy
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    rollout = generate(model, tokenizer, ids, torch.ones_like(ids), max_new_tokens=4, greedy=True, progress=False)
    assert seen == [[]]
    assert rollout.completion_ids.shape == (2, 4)


def test_sampling_uses_the_full_distribution(monkeypatch):
    """temperature 1, top_p 1: no logits warper may truncate the policy (transformers adds a top-50
    filter unless top_k is 0), or rollouts are not samples of the model being trained."""
    from transformers.generation import utils

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny_random"))
    assert model.config.vocab_size > 50
    built = []
    original = utils.GenerationMixin._get_logits_processor

    def spy(self, *args, **kwargs):
        built.append(original(self, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(utils.GenerationMixin, "_get_logits_processor", spy)
    ids = torch.tensor([[5, 6, 7]])
    generate(model, tokenizer, ids, torch.ones_like(ids), max_new_tokens=2, progress=False)
    assert [type(p).__name__ for p in built[-1]] == []


def test_greedy_decoding_passes_no_sampling_flag():
    """Greedy decoding with top_k set made transformers log "generation flags are not valid" at every
    eval call; sampling keeps top_k=0."""
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny_random"))
    configs = []
    original = model.generate

    def spy(*args, **kwargs):
        configs.append(kwargs["generation_config"])
        return original(*args, **kwargs)

    model.generate = spy
    ids = torch.tensor([[5, 6, 7]])
    generate(model, tokenizer, ids, torch.ones_like(ids), max_new_tokens=2, greedy=True, progress=False)
    generate(model, tokenizer, ids, torch.ones_like(ids), max_new_tokens=2, progress=False)
    assert [(c.do_sample, c.top_k, c.temperature) for c in configs] == [(False, None, None), (True, 0, 1.0)]
    assert configs[0].validate() is None  # no flag that greedy decoding would ignore
