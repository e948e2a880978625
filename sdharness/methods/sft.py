"""SFT baseline: cross-entropy on the reference solution (+EOS) after the student prompt, on the
same plumbing, data, eval and accounting as self-distillation."""

from __future__ import annotations

from sdharness.data.datamodule import PromptBatch
from sdharness.distill.logits import completion_logits
from sdharness.distill.losses import token_cross_entropy
from sdharness.methods.policy import PolicyModule


class SFTModule(PolicyModule):
    def losses(self, batch: PromptBatch):
        logits = completion_logits(self.model, batch.student_ids, batch.student_mask,
                                   batch.solution_ids, batch.solution_mask)
        loss = token_cross_entropy(logits, batch.solution_ids, batch.solution_mask)
        del logits  # not kept through backward by this suspended generator (cross-entropy saved what it needs)
        self.count(problems=len(batch), trained=int(batch.student_mask.sum() + batch.solution_mask.sum()))
        yield loss, {"train/loss_tokens": float(batch.solution_mask.sum())}
