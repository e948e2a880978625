"""``sdharness-bench``'s rollout cases: tokens/s of one batched, left-padded HF ``generate`` with KV
cache against a loop of per-sample ``generate`` calls over the same prompts (greedy, exactly ``new``
tokens per row), and guided sampling (student and teacher rows in one forward per token) per
generated token, for models with a tokenizer."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig

from sdharness.rollout.guided import guided_generate
from sdharness.tools.bench_measure import load_model, setup_device, timed

if TYPE_CHECKING:
    from sdharness.tools.bench import Case


def _generate(model, ids, mask, new_tokens: int, pad: int, eos: int) -> int:
    """Greedy ``new_tokens`` tokens per row (EOS suppressed); returns the tokens generated."""
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad, use_cache=True)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


def rollout_prompts(case: Case, vocab: int, pad: int, device):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.linspace(max(1, case.prompt // 2), case.prompt, case.batch).long()
    ids = torch.randint(3, vocab, (case.batch, case.prompt), generator=generator)
    mask = torch.arange(case.prompt).unsqueeze(0) >= (case.prompt - lengths).unsqueeze(1)
    return ids.masked_fill(~mask, pad).to(device), mask.long().to(device)


@torch.no_grad()
def measure_rollout(case: Case, repeats: int, threads: int | None) -> dict:
    device = setup_device(threads)
    model, tokenizer = load_model(case.model)
    model.to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    eos = tokenizer.eos_token_id if tokenizer is not None else 2
    ids, mask = rollout_prompts(case, model.config.vocab_size, pad, device)

    def batched(new=case.completion):
        return _generate(model, ids, mask, new, pad, eos)

    def naive(new=case.completion):  # one call per sample, its padding stripped
        return sum(_generate(model, row[keep.bool()][None], keep[keep.bool()][None], new, pad, eos)
                   for row, keep in zip(ids, mask))

    result = {"tokens": case.batch * case.completion, "params": sum(p.numel() for p in model.parameters()),
              "threads": torch.get_num_threads(), "device": device.type}
    for name, fn in (("batched", batched), ("naive", naive)):
        fn(2)  # warm-up
        assert fn() == result["tokens"], "batched and naive must generate the same number of tokens"
        median = statistics.median(timed(fn, device) for _ in range(repeats))
        result[name] = {"median_s": median, "tokens_per_s": result["tokens"] / median}
    if tokenizer is not None:
        result["guided"] = measure_guided(model, tokenizer, ids, mask, case.completion, repeats, device)
    return result


def measure_guided(model, tokenizer, ids, mask, new_tokens: int, repeats: int, device) -> dict:
    """Guided sampling (student and teacher rows in one batched forward per token) in tokens/s.

    The teacher context is the prompt with its first half repeated, so it is longer, as a real
    teacher prompt is. Guided decoding stops rows at EOS, so it is compared per generated token.
    """
    teacher_ids, teacher_mask = torch.cat([ids[:, : ids.shape[1] // 2], ids], 1), torch.cat(
        [mask[:, : mask.shape[1] // 2], mask], 1)

    def guided():
        out = guided_generate(model, tokenizer, ids, mask, teacher_ids, teacher_mask, aggregation="product",
                              parameter=2.0, max_new_tokens=new_tokens, greedy=True)
        return int(out.completion_mask.sum())

    guided()  # warm-up
    runs = [(timed(guided, device), guided()) for _ in range(repeats)]
    seconds = statistics.median(t for t, _ in runs)
    tokens = statistics.median(n for _, n in runs)
    return {"median_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
