"""Privileged on-policy self-distillation: rollout -> teacher logits (no grad) -> student logits
-> aggregate -> loss, on the shared plumbing of :class:`sdharness.methods.policy.PolicyModule`."""

from __future__ import annotations

import torch

from sdharness.config import AggregationConfig, LossConfig, TrainConfig
from sdharness.data.datamodule import PromptBatch
from sdharness.data.answers import answer_checker
from sdharness.distill.logits import completion_hidden, completion_logits
from sdharness.distill.losses import DistillationLoss, distillation_loss
from sdharness.distill.positions import AnswerMarkerMonitor, loss_positions
from sdharness.eval.teacher_health import HealthModels
from sdharness.methods.accounting import rollout_cost
from sdharness.methods.distill_pg import PolicyGradientMix
from sdharness.methods.policy import PolicyModule
from sdharness.methods.sibling_hints import SiblingHintLosses
from sdharness.rollout.guided import guided_rollout, guided_token_weights
from sdharness.rollout.hf import Rollout


def score_and_distil(student_model, teacher_model, student_ids, student_mask, teacher_ids, teacher_mask, g, g_mask,
                     loss_mask, aggregation: AggregationConfig, loss: LossConfig, *,
                     token_weights: torch.Tensor | None = None, monitor: bool = True) -> DistillationLoss:
    """The SD step after the rollout: teacher logits on ``[teacher prompt, g]`` (no gradient, kept as
    hidden states), student logits on ``[student prompt, g]``, then the chunked loss on ``loss_mask``.

    The logits live only inside this call: the loss has already computed the gradient it hands
    backward, so nothing of size ``[batch, length, vocab]`` outlives it but that gradient.
    """
    with torch.no_grad():
        teacher_logits = completion_hidden(teacher_model, teacher_ids, teacher_mask, g, g_mask)
    student_logits = completion_logits(student_model, student_ids, student_mask, g, g_mask)
    return distil(student_logits, teacher_logits, loss_mask, g, aggregation, loss, token_weights=token_weights,
                  monitor=monitor)


def distil(student_logits, teacher_logits, loss_mask, g, aggregation: AggregationConfig, loss: LossConfig, *,
           token_weights: torch.Tensor | None = None, monitor: bool = True) -> DistillationLoss:
    """The chunked loss that ``aggregation`` and ``loss`` configure, on scored completions ``g``."""
    return distillation_loss(student_logits, teacher_logits, loss_mask, aggregation=aggregation.name,
                             tau=aggregation.tau, divergence_name=loss.divergence, beta=loss.beta,
                             chunk_size=loss.chunk_size, token_weights=token_weights, monitor_kl=monitor,
                             unconsidered_eps=loss.unconsidered_eps, support=loss.support, top_k=loss.top_k,
                             topk_from=loss.topk_from, sampled_tokens=g, entry_clip=loss.entry_clip)


class SelfDistillModule(SiblingHintLosses, PolicyGradientMix, PolicyModule):
    """Privileged on-policy self-distillation; below ``algo.distillation_weight`` 1, mixed with GRPO; with
    ``algo.hint_source=sibling``, a successful sibling completion as the teacher's reference."""

    def __init__(self, model, tokenizer, cfg: TrainConfig):
        super().__init__(model, tokenizer, cfg)
        self.teacher = self.shadow_weights("teacher_model", cfg.teacher.weights, cfg.teacher.ema_decay)
        self.marker_monitor = AnswerMarkerMonitor(cfg.data.answer_marker)
        # The initial weights for the teacher-health drift figures: the teacher itself when it is frozen.
        self.initial = self.teacher if cfg.teacher.weights == "initial" else (
            self.shadow_weights("initial_model", "initial") if cfg.eval.teacher_health else None)

    def health_models(self) -> HealthModels:
        """The weights :mod:`sdharness.eval.teacher_health` compares."""
        return HealthModels(self.model, self.teacher.model, None if self.initial is None else self.initial.model)

    def logged_completions(self, batch: PromptBatch) -> Rollout:
        """The batch's logged completions (``solution_ids`` + EOS) as ``g``, for ``data=chatlog``."""
        texts = self.tokenizer.batch_decode(batch.solution_ids, skip_special_tokens=True)
        return Rollout(batch.solution_ids, batch.solution_mask, texts)

    def losses(self, batch: PromptBatch):
        if self.cfg.algo.distillation_weight < 1:
            yield from self.mixed_losses(batch)
            return
        if self.cfg.algo.hint_source == "sibling":
            yield from self.sibling_losses(batch)
            return
        rollout, guidance, cost = self.sample(batch)
        g, g_mask = rollout.completion_ids, rollout.completion_mask
        mask = loss_positions(self.tokenizer, g, g_mask, rollout.texts, mode=self.cfg.loss.positions,
                              answer_marker=self.cfg.data.answer_marker, eos_ids=self.eos_ids)
        weights, weight_metrics = guided_token_weights(rollout, mask, self.cfg.loss.is_clip)  # None on policy
        if self.cfg.loss.positions == "reasoning":
            weight_metrics = {**weight_metrics, **self.marker_monitor(rollout.texts)}
        # The teacher-student KL and the target diagnostics are only for the log.
        result = score_and_distil(self.model, self.teacher.model, batch.student_ids, batch.student_mask,
                                  batch.teacher_ids, batch.teacher_mask, g, g_mask, mask, self.cfg.aggregation,
                                  self.cfg.loss, token_weights=weights, monitor=self.logging_step)
        self._count(batch, rollout, cost)
        monitored = {} if result.teacher_student_kl is None else {
            "train/teacher_student_kl": result.teacher_student_kl,
            **{f"train/{name}": value for name, value in result.diagnostics.items()}}
        yield result.loss, {"train/divergence_per_token": result.loss.detach(), **monitored,
                            "train/loss_tokens": float(result.tokens), **self.rollout_metrics(rollout, batch.problems),
                            **guidance, **weight_metrics}

    def sample(self, batch: PromptBatch) -> tuple[Rollout, dict, dict]:
        """``(g, guidance metrics, the rollout's cost)`` for this batch."""
        if batch.logged:  # sdharness/data/chatlog.py: distil logged turns, nothing generated
            return self.logged_completions(batch), {}, {}
        if self.cfg.rollout.guidance == "never":
            rollout = self.rollout(batch.student_ids, batch.student_mask)
            return rollout, {}, rollout_cost(batch.student_mask, rollout)
        # Guided sampling (sdharness/rollout/guided.py): not strictly on-policy.
        return guided_rollout(batch, self.cfg.rollout, self.cfg.aggregation,
                              answer_checker(self.cfg.data.checker, self.cfg.data.answer_marker),
                              model=self.model, teacher_model=self.teacher.model, tokenizer=self.tokenizer,
                              sample_plain=lambda: self.rollout(batch.student_ids, batch.student_mask))

    def _count(self, batch: PromptBatch, rollout: Rollout, sampling_cost: dict) -> None:
        # Logged completions cost no rollout: generated_tokens stays 0, only the two scoring passes count.
        g_tokens = int(rollout.lengths.sum())
        self.count(**sampling_cost)
        self.count(problems=len(batch), forward_only=int(batch.teacher_mask.sum()) + g_tokens,
                   trained=int(batch.student_mask.sum()) + g_tokens)

    def after_optimizer_step(self) -> None:
        self.teacher.update()
