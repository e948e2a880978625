"""On-policy sampling: the student generates its own completion ``g`` from the student prompt.

Batched HF ``generate`` with KV cache over left-padded prompts, stopping at EOS. The completion
is returned right-padded with a mask that covers every token up to and including the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from sdharness.scale.sharding import is_sharded


@dataclass
class Rollout:
    """``completion_ids``/``completion_mask``: ``[batch, new_tokens]``; ``texts``: decoded ``g``."""

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


class _ProgressBar(LogitsProcessor):
    """Ticks a progress bar once per generated token; leaves the scores alone."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.bar.update(1)
        return scores


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """True up to and including the first EOS of each row (all True for rows with none)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return eos_before == 0


def generate(
    model,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    progress: bool = False,
    synced: bool = False,
) -> Rollout:
    """Sample (or greedily decode) one completion per prompt row; the model's mode is restored.

    ``synced``: under sharded weights (FSDP) every forward is a collective, so ranks
    whose rows all ended keep stepping until every rank is done (HF's ``synced_gpus``)."""
    eos = eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        # Sampling: None would fall back to transformers' default top-k of 50, rollouts off the policy;
        # greedy decoding takes no top-k (transformers warns at every call if one is given).
        top_k=None if greedy else 0,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    was_training = model.training
    model.eval()
    # Inference mode skips autograd's per-op bookkeeping, which no_grad keeps: about 10% of a small
    # model's decoding on a CPU. Sharded weights keep no_grad at any world size (one rank included):
    # FSDP2 gathers parameters during the forward, and a parameter gathered under inference mode
    # could not be updated in place later. The model is asked, not the world size.
    grad_off = torch.no_grad() if synced or is_sharded(model) else torch.inference_mode()
    # disable=None shows the bar on a terminal only, keeping logs of batch jobs readable.
    with grad_off, tqdm(total=max_new_tokens, desc="rollout", leave=False, disable=None if progress else True) as bar:
        sequences = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=config,
            # A hidden bar ticks nothing: HF inspects every processor's signature on every token.
            logits_processor=LogitsProcessorList([] if bar.disable else [_ProgressBar(bar)]),
            synced_gpus=synced,
        )
    model.train(was_training)
    completion_ids = sequences[:, prompt_ids.shape[1]:]
    mask = completion_mask(completion_ids, eos)
    # Out of place and outside inference mode: a normal tensor, which a loss may save for backward.
    completion_ids = completion_ids.masked_fill(~mask, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(completion_ids, mask, texts)
