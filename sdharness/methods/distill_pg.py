"""Self-distillation mixed with GRPO's clipped policy gradient: ``algo.distillation_weight`` w < 1
under ``algo=sd`` (SDPO's ``distillation_weight``, SDPG).

Each problem gets ``algo.group_size`` rollouts from the student prompt, rewarded and given
group-normalised advantages exactly as in :mod:`sdharness.methods.grpo`; one student pass scores
them for both terms, and the step's loss is

    w * (SD loss on every rollout, teacher prompt repeated) + (1 - w) * (GRPO's clipped loss),

one optimiser step per batch (so GRPO's ratio is 1, as in its one-inner-epoch form). A term of
weight 0 is not computed: at w = 0 this is GRPO bit for bit, with no teacher pass. At w = 1 the
method is plain SD, with its one rollout per problem (this module is not used).
"""

from __future__ import annotations

import torch

from sdharness.data.datamodule import PromptBatch
from sdharness.methods.rewards import resolve_reward
from sdharness.distill.logits import completion_hidden, completion_logits
from sdharness.distill.positions import loss_positions
from sdharness.methods.policy_gradient import clipped_policy_loss, group_advantages, token_logprobs, zero_variance_groups


class PolicyGradientMix:
    """``mixed_losses(batch)`` for :class:`~sdharness.methods.self_distill.SelfDistillModule`."""

    def mixed_losses(self, batch: PromptBatch):
        # Imported here: self_distill imports this module for its class.
        from sdharness.methods.self_distill import distil

        algo, group, weight = self.cfg.algo, self.cfg.algo.group_size, self.cfg.algo.distillation_weight
        prompt_ids = batch.student_ids.repeat_interleave(group, dim=0)
        prompt_mask = batch.student_mask.repeat_interleave(group, dim=0)
        problems = [problem for problem in batch.problems for _ in range(group)]
        rollout = self.rollout(prompt_ids, prompt_mask)
        generated = self.count_rollout(prompt_mask, rollout)
        self.count(problems=len(batch), trained=int(prompt_mask.sum()) + generated)
        reward_fn = resolve_reward(algo.reward, self.cfg.data.checker)
        rewards = torch.tensor([reward_fn(text, problem, self.cfg.data.answer_marker)
                                for text, problem in zip(rollout.texts, problems)], dtype=torch.float32)
        advantages = group_advantages(rewards.view(-1, group), scale=algo.scale_rewards).view(-1).to(self.device)
        zero_groups = zero_variance_groups(rewards.view(-1, group))  # no advantage, no gradient
        g, g_mask = rollout.completion_ids, rollout.completion_mask
        student_logits = completion_logits(self.model, prompt_ids, prompt_mask, g, g_mask)
        logprobs = token_logprobs(student_logits, g)
        policy_loss, stats = clipped_policy_loss(logprobs, logprobs.detach(), advantages, g_mask,
                                                 epsilon=algo.epsilon, aggregation=algo.loss_aggregation)
        loss = (1 - weight) * policy_loss
        metrics = {"train/reward": rewards.mean().item(), "train/policy_loss": policy_loss.detach(),
                   "train/zero_variance_groups": float(zero_groups),
                   "train/zero_variance_share": zero_groups / len(batch),
                   "train/loss_tokens": float(g_mask.sum()), **{f"train/{k}": v for k, v in stats.items()},
                   **self.rollout_metrics(rollout, problems)}
        if weight > 0:
            teacher_ids = batch.teacher_ids.repeat_interleave(group, dim=0)
            teacher_mask = batch.teacher_mask.repeat_interleave(group, dim=0)
            mask = loss_positions(self.tokenizer, g, g_mask, rollout.texts, mode=self.cfg.loss.positions,
                                  answer_marker=self.cfg.data.answer_marker, eos_ids=self.eos_ids)
            with torch.no_grad():
                teacher = completion_hidden(self.teacher.model, teacher_ids, teacher_mask, g, g_mask)
            result = distil(student_logits, teacher, mask, g, self.cfg.aggregation, self.cfg.loss,
                            monitor=self.logging_step)
            self.count(forward_only=int(teacher_mask.sum()) + generated)
            loss = weight * result.loss + loss
            metrics["train/divergence_per_token"] = result.loss.detach()
            if result.teacher_student_kl is not None:
                metrics["train/teacher_student_kl"] = result.teacher_student_kl
        yield loss, metrics
