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
from sdharness.methods.sibling_hints import (check_fits_context, problems_without_success, sibling_hints,
                                             sibling_teacher_prompts)
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
                             parameter=aggregation.parameter, divergence_name=loss.divergence, beta=loss.beta,
                             chunk_size=loss.chunk_size, token_weights=token_weights, monitor_kl=monitor,
                             unconsidered_eps=loss.unconsidered_eps, support=loss.support, top_k=loss.top_k,
                             topk_from=loss.topk_from, sampled_tokens=g, entry_clip=loss.entry_clip)


def loss_metrics(result: DistillationLoss) -> dict:
    """The step's logged loss figures; the teacher-student KL and the target diagnostics only on logging steps."""
    monitored = {} if result.teacher_student_kl is None else {
        "train/teacher_student_kl": result.teacher_student_kl,
        **{f"train/{name}": value for name, value in result.diagnostics.items()}}
    return {"train/divergence_per_token": result.loss.detach(), **monitored, "train/loss_tokens": float(result.tokens)}


class SelfDistillModule(PolicyGradientMix, PolicyModule):
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
        yield result.loss, {**loss_metrics(result), **self.rollout_metrics(rollout, batch.problems), **guidance,
                            **weight_metrics}

    def sibling_losses(self, batch: PromptBatch):
        """``algo.hint_source=sibling`` (:mod:`sdharness.methods.sibling_hints`): ``group_size`` completions per
        problem, each distilled under a successful sibling's text as its reference, where it has one."""
        group = self.cfg.algo.group_size
        prompt_ids = batch.student_ids.repeat_interleave(group, dim=0)
        prompt_mask = batch.student_mask.repeat_interleave(group, dim=0)
        problems = [problem for problem in batch.problems for _ in range(group)]
        rollout = self.rollout(prompt_ids, prompt_mask)
        self.count_rollout(prompt_mask, rollout)
        check = answer_checker(self.cfg.data.checker, self.cfg.data.answer_marker)
        successes = [bool(check(text, problem["answer"])) for text, problem in zip(rollout.texts, problems)]
        self.count(problems=len(batch), problems_without_success=problems_without_success(successes, group))
        hint_of = {row: hint for row, hint in enumerate(sibling_hints(successes, group)) if hint is not None}
        # No hint anywhere: row 0 is still scored (under its own text), with no loss position, so that every
        # rank runs the forward passes its strategy (DDP, FSDP) expects; the step has no loss tokens and is skipped.
        scored = hint_of or {0: 0}
        teacher_ids, teacher_mask = sibling_teacher_prompts(
            self.cfg.prompt, self.tokenizer, [problem["problem"] for problem in problems], rollout.texts, scored,
            self.cfg.data.answer_marker)
        teacher_ids, teacher_mask = teacher_ids.to(self.device), teacher_mask.to(self.device)
        index = torch.tensor(list(scored), device=rollout.completion_ids.device)
        hinted = Rollout(rollout.completion_ids[index], rollout.completion_mask[index],
                         [rollout.texts[row] for row in scored])
        g, g_mask = hinted.completion_ids, hinted.completion_mask
        check_fits_context(teacher_mask, g_mask, getattr(self.model.config, "max_position_embeddings", 10**9))
        mask = loss_positions(self.tokenizer, g, g_mask, hinted.texts, mode=self.cfg.loss.positions,
                              answer_marker=self.cfg.data.answer_marker, eos_ids=self.eos_ids)
        if not hint_of:
            mask = torch.zeros_like(mask)
        student_ids, student_mask = prompt_ids[index], prompt_mask[index]
        result = score_and_distil(self.model, self.teacher.model, student_ids, student_mask, teacher_ids,
                                  teacher_mask, g, g_mask, mask, self.cfg.aggregation, self.cfg.loss,
                                  monitor=self.logging_step)
        g_tokens = int(hinted.lengths.sum())
        self.count(forward_only=int(teacher_mask.sum()) + g_tokens, trained=int(student_mask.sum()) + g_tokens)
        yield result.loss, {**loss_metrics(result), "train/sibling_hint_rows": float(len(hint_of)),
                            **self.rollout_metrics(rollout, problems)}

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
