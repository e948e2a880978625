"""GRPO baseline: ``group_size`` samples per problem, rewards from the answer checker,
group-normalised advantages, PPO-clipped policy gradient over ``inner_epochs`` passes, optional
KL to the initial weights."""

from __future__ import annotations

import torch

from sdharness.config import TrainConfig
from sdharness.data.datamodule import PromptBatch
from sdharness.methods.rewards import resolve_reward
from sdharness.distill.logits import completion_logits
from sdharness.methods.policy import PolicyModule
from sdharness.methods.policy_gradient import clipped_policy_loss, group_advantages, token_logprobs, zero_variance_groups


class GRPOModule(PolicyModule):
    def __init__(self, model, tokenizer, cfg: TrainConfig):
        super().__init__(model, tokenizer, cfg)
        self.reward_fn = resolve_reward(cfg.algo.reward, cfg.data.checker)
        self.reference = self.shadow_weights("reference_model", "initial" if cfg.algo.beta > 0 else "live")

    @property
    def loss_mean_over(self) -> str:
        return "train/loss_tokens" if self.cfg.algo.loss_aggregation == "token_mean" else "train/loss_sequences"

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
        zero_groups = zero_variance_groups(rewards.view(-1, group))  # no advantage, no gradient
        pass_tokens = int(prompt_mask.sum()) + generated
        with torch.no_grad():
            # With one inner epoch the sampling policy is the current one: ratio 1, no extra pass.
            old = self._logprobs(self.model, prompt_ids, prompt_mask, rollout) if algo.inner_epochs > 1 else None
            ref = self._logprobs(self.reference.model, prompt_ids, prompt_mask, rollout) if algo.beta > 0 else None
        self.count(forward_only=pass_tokens * ((algo.inner_epochs > 1) + (algo.beta > 0)))
        metrics = {"train/reward": rewards.mean().item(),
                   "train/zero_variance_groups": float(zero_groups),
                   "train/zero_variance_share": zero_groups / len(batch),
                   **self.rollout_metrics(rollout, problems)}
        for _ in range(algo.inner_epochs):
            logprobs = self._logprobs(self.model, prompt_ids, prompt_mask, rollout)
            loss, stats = clipped_policy_loss(
                logprobs, logprobs.detach() if old is None else old, advantages, rollout.completion_mask,
                epsilon=algo.epsilon, beta=algo.beta, ref_logprobs=ref, aggregation=algo.loss_aggregation)
            self.count(trained=pass_tokens)
            yield loss, {**metrics, "train/loss_tokens": float(rollout.completion_mask.sum()),
                         "train/loss_sequences": float((rollout.completion_mask.sum(-1) > 0).sum()),
                         **{f"train/{k}": v for k, v in stats.items()}}
