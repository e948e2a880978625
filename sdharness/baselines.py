"""The baselines, on the same plumbing, data, eval and accounting as self-distillation.

* ``SFTModule``: cross-entropy on the reference solution (+EOS) after the student prompt.
* ``GRPOModule``: ``group_size`` samples per problem, rewards from the answer checker,
  group-normalised advantages, PPO-clipped policy gradient over ``inner_epochs`` passes,
  optional KL to the initial weights.
"""

from __future__ import annotations

import torch

from sdharness.config import TrainConfig
from sdharness.data import PromptBatch
from sdharness.logits import completion_logits
from sdharness.losses import token_cross_entropy
from sdharness.module import PolicyModule, ShadowWeights
from sdharness.policy_gradient import clipped_policy_loss, group_advantages, token_logprobs, zero_variance_groups
from sdharness.tasks import resolve_reward


class SFTModule(PolicyModule):
    def losses(self, batch: PromptBatch):
        logits = completion_logits(self.model, batch.student_ids, batch.student_mask,
                                   batch.solution_ids, batch.solution_mask)
        loss = token_cross_entropy(logits, batch.solution_ids, batch.solution_mask)
        self.count(problems=len(batch), trained=int(batch.student_mask.sum() + batch.solution_mask.sum()))
        yield loss, {"train/loss_tokens": float(batch.solution_mask.sum())}


class GRPOModule(PolicyModule):
    def __init__(self, model, tokenizer, cfg: TrainConfig):
        super().__init__(model, tokenizer, cfg)
        self.reward_fn = resolve_reward(cfg.algo.reward)
        self.reference = ShadowWeights(model, "initial" if cfg.algo.beta > 0 else "live")
        if self.reference.copy is not None:
            self.reference_model = self.reference.copy  # registered: moves devices, is checkpointed

    def _logprobs(self, model, prompt_ids, prompt_mask, rollout) -> torch.Tensor:
        logits = completion_logits(model, prompt_ids, prompt_mask, rollout.completion_ids, rollout.completion_mask)
        return token_logprobs(logits, rollout.completion_ids)

    def losses(self, batch: PromptBatch):
        algo, group = self.cfg.algo, self.cfg.algo.group_size
        prompt_ids = batch.student_ids.repeat_interleave(group, dim=0)
        prompt_mask = batch.student_mask.repeat_interleave(group, dim=0)
        problems = [problem for problem in batch.problems for _ in range(group)]
        rollout = self.rollout(prompt_ids, prompt_mask)
        generated = self.count_rollout(prompt_mask, rollout)
        self.count(problems=len(batch))
        rewards = torch.tensor([self.reward_fn(text, problem, self.cfg.data.answer_marker)
                                for text, problem in zip(rollout.texts, problems)], dtype=torch.float32)
        advantages = group_advantages(rewards.view(-1, group), scale=algo.scale_rewards).view(-1).to(self.device)
        pass_tokens = int(prompt_mask.sum()) + generated
        with torch.no_grad():
            # With one inner epoch the sampling policy is the current one: ratio 1, no extra pass.
            old = self._logprobs(self.model, prompt_ids, prompt_mask, rollout) if algo.inner_epochs > 1 else None
            ref = self._logprobs(self.reference.model, prompt_ids, prompt_mask, rollout) if algo.beta > 0 else None
        self.count(forward_only=pass_tokens * ((algo.inner_epochs > 1) + (algo.beta > 0)))
        metrics = {"train/reward": rewards.mean().item(),
                   "train/zero_variance_groups": float(zero_variance_groups(rewards.view(-1, group))),
                   **self.rollout_metrics(rollout, problems)}
        for _ in range(algo.inner_epochs):
            logprobs = self._logprobs(self.model, prompt_ids, prompt_mask, rollout)
            loss, stats = clipped_policy_loss(
                logprobs, logprobs.detach() if old is None else old, advantages, rollout.completion_mask,
                epsilon=algo.epsilon, beta=algo.beta, ref_logprobs=ref, aggregation=algo.loss_aggregation)
            self.count(trained=pass_tokens)
            yield loss, {**metrics, "train/loss_tokens": float(rollout.completion_mask.sum()),
                         **{f"train/{k}": v for k, v in stats.items()}}
