"""Which positions of a completion carry loss: ``all`` of ``g``, or only its ``reasoning``.

``reasoning`` excludes the final-answer span (from the task's answer marker on) and EOS: a
teacher that knows the answer would otherwise teach the student to state answers, and to stop,
whether or not its own reasoning reached them.
"""

from __future__ import annotations

import logging

import torch

from sdharness.data.answers import answer_span_start

log = logging.getLogger(__name__)


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


class AnswerMarkerMonitor:
    """Under ``reasoning``, a completion without the answer marker keeps every token in the loss,
    its answer included, as under ``all``. Each step's share of such completions is logged as
    ``train/answer_marker_missing``, and a warning is given the first time it exceeds ``warn_above``."""

    def __init__(self, answer_marker: str, warn_above: float = 0.5):
        self.answer_marker, self.warn_above, self.warned = answer_marker, warn_above, False

    def __call__(self, texts: list[str]) -> dict[str, float]:
        missing = sum(answer_span_start(text, self.answer_marker) is None for text in texts) / max(len(texts), 1)
        if missing > self.warn_above and not self.warned:
            self.warned = True
            log.warning("loss.positions=reasoning: %.0f%% of this step's completions do not write "
                        "data.answer_marker=%r, so all their tokens, the answer included, carry loss "
                        "(train/answer_marker_missing); set data.answer_marker to the marker the completions write, "
                        "or loss.positions=all", 100 * missing, self.answer_marker)
        return {"train/answer_marker_missing": missing}
