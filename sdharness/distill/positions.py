"""Which positions of a completion carry loss: ``all`` of ``g``, or only its ``reasoning``.

``reasoning`` excludes the final-answer span (from the task's answer marker on) and EOS: a
teacher that knows the answer would otherwise teach the student to state answers, and to stop,
whether or not its own reasoning reached them.
"""

from __future__ import annotations

import torch

from sdharness.data.tasks import answer_span_start


def _first_token_of_char(tokenizer, ids: list[int], char_index: int) -> int:
    """Index of the token whose decoded text covers character ``char_index`` (binary search)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[: mid + 1], skip_special_tokens=True)) > char_index:
            hi = mid
        else:
            lo = mid + 1
    return lo


def loss_positions(
    tokenizer,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    texts: list[str],
    *,
    mode: str,
    answer_marker: str,
    eos_ids: list[int],
) -> torch.Tensor:
    """Bool mask ``[batch, new_tokens]`` of the positions of ``g`` that carry loss."""
    if mode == "all":
        return completion_mask.clone()
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    mask = completion_mask & ~is_eos
    for row, text in enumerate(texts):
        start = answer_span_start(text, answer_marker)
        if start is not None:
            length = int(completion_mask[row].sum())
            first = _first_token_of_char(tokenizer, completion_ids[row, :length].tolist(), start)
            mask[row, first:] = False
    return mask
