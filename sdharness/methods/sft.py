"""SFT baseline: cross-entropy on the reference solution (+EOS) after the student prompt, on the
same plumbing, data, eval and accounting as self-distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdharness.data.datamodule import PromptBatch
from sdharness.distill.logits import completion_logits
from sdharness.methods.policy import PolicyModule


def token_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of ``tokens`` ``[batch, length]`` under ``logits`` ``[batch, length, vocab]``
    over the positions in ``mask`` (the SFT loss)."""
    # Flattened: cross_entropy over a [batch, vocab, length] transpose was ~8x slower on CPU.
    nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none").view_as(tokens)
    return masked_token_mean(nll, mask)


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is true; 0 when none is."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


class SFTModule(PolicyModule):
    def losses(self, batch: PromptBatch):
        logits = completion_logits(self.model, batch.student_ids, batch.student_mask,
                                   batch.solution_ids, batch.solution_mask)
        loss = token_cross_entropy(logits, batch.solution_ids, batch.solution_mask)
        del logits  # not kept through backward by this suspended generator (cross-entropy saved what it needs)
        self.count(problems=len(batch), trained=int(batch.student_mask.sum() + batch.solution_mask.sum()))
        yield loss, {"train/loss_tokens": float(batch.solution_mask.sum())}
