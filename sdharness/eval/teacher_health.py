"""Teacher health: can the weights that score the teacher prompt still read a hint?

Self-distillation trains the student prompt only; nothing trains the weights' reading of a
reference. A live teacher (the current weights) therefore teaches from a reading that training
erodes, the student follows it, and the loop can run down to zero while the loss's own
diagnostics stay small. These figures, logged at every eval point of an SD run, show it coming:

* ``health/teacher_hint_accuracy_<style>``: greedy accuracy of the teacher's weights on the
  teacher prompt (problem + reference), per reference style (the data's own, and for a built-in
  task the other notation too);
* ``health/policy_hint_accuracy_<style>``: the same for the current weights, when the teacher
  is not them (their hint-reading skill, which a live teacher would have);
* ``health/teacher_drift_kl`` (and ``health/policy_drift_kl``): KL(weights ‖ initial weights)
  per token on ``[teacher prompt, g]``, ``g`` the eval's greedy completions;
* ``health/student_entropy`` and ``health/teacher_entropy``: mean token entropy of the current
  weights on ``[student prompt, g]`` and of the teacher on ``[teacher prompt, g]``;
* ``time/health_seconds``: the run's time spent on these figures so far, kept apart from training
  (``train/wall_seconds``) and from the other evals (``time/eval_seconds``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdharness.distill.logits import completion_hidden
from sdharness.distill.divergences import kl_per_position
from sdharness.rollout.hf import Rollout

CHUNK_POSITIONS = 256  # completion positions turned into vocabulary logits at once


def entropy_and_kl(logits: torch.Tensor, reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` ``[n, vocab]``: the entropy of ``softmax(logits)`` and KL(softmax(logits) ‖
    softmax(reference)) (zeros without a reference), in nats, float32 or wider. ``-inf`` logits
    (tokens a model rules out) contribute nothing where ``logits`` rules them out."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    if reference is None:
        return entropy, torch.zeros_like(entropy)
    return entropy, kl_per_position(logp, torch.log_softmax(reference.to(logp.dtype), dim=-1))


@dataclass
class HealthModels:
    """What the figures compare: the current weights, the teacher's (``policy`` itself when live), and the
    initial weights (the teacher itself when frozen; None: no drift figures)."""

    policy: torch.nn.Module
    teacher: object
    initial: object | None


@dataclass
class TokenSums:
    """Sums over completion tokens, divided at the end (summed over ranks first)."""

    tokens: float = 0.0
    student_entropy: float = 0.0
    teacher_entropy: float = 0.0
    teacher_drift: float = 0.0
    policy_drift: float = 0.0

    def as_tensor(self, device) -> torch.Tensor:
        return torch.tensor([self.tokens, self.student_entropy, self.teacher_entropy, self.teacher_drift,
                             self.policy_drift], dtype=torch.float64, device=device)


def _masked_rows(lazy, mask: torch.Tensor):
    """Vocabulary logits of the positions where ``mask`` is true, chunk by chunk."""
    flat = mask.reshape(-1).nonzero().squeeze(-1)
    for start in range(0, len(flat), CHUNK_POSITIONS):
        yield lazy.rows(flat[start:start + CHUNK_POSITIONS])


@torch.no_grad()
def add_token_figures(sums: TokenSums, *, policy, teacher, initial, student_ids, student_mask, teacher_ids,
                      teacher_mask, rollout: Rollout, weight: float = 1.0) -> None:
    """Add one batch's entropies and drifts to ``sums``. ``teacher`` is ``policy`` for a live teacher;
    ``initial`` (the initial weights; the teacher itself when the teacher is frozen) is None for no
    drift. ``weight`` 0 scores a stand-in batch (sharded ranks keep in step) without counting it."""
    g, g_mask = rollout.completion_ids, rollout.completion_mask

    def hinted(model, *others):  # one forward per distinct model
        same = next((lazy for other, lazy in others if other is model), None)
        return same if same is not None else completion_hidden(model, teacher_ids, teacher_mask, g, g_mask)

    hinted_policy = hinted(policy)
    hinted_teacher = hinted(teacher, (policy, hinted_policy))
    hinted_initial = None if initial is None else hinted(initial, (policy, hinted_policy), (teacher, hinted_teacher))
    student = completion_hidden(policy, student_ids, student_mask, g, g_mask)
    sums.tokens += weight * float(g_mask.sum())
    for logits in _masked_rows(student, g_mask):
        sums.student_entropy += weight * float(entropy_and_kl(logits)[0].sum())
    initial_chunks = _masked_rows(hinted_initial, g_mask) if hinted_initial is not None else None
    for teacher_logits, policy_logits in zip(_masked_rows(hinted_teacher, g_mask), _masked_rows(hinted_policy, g_mask)):
        initial_logits = next(initial_chunks) if initial_chunks is not None else None
        entropy, drift = entropy_and_kl(teacher_logits, initial_logits)
        sums.teacher_entropy += weight * float(entropy.sum())
        sums.teacher_drift += weight * float(drift.sum())
        if teacher is not policy and initial_logits is not None:
            sums.policy_drift += weight * float(entropy_and_kl(policy_logits, initial_logits)[1].sum())


def token_metrics(summed: list[float], *, teacher_is_policy: bool, with_drift: bool) -> dict[str, float]:
    """``health/*`` means per token from :class:`TokenSums` summed over ranks."""
    tokens, student_entropy, teacher_entropy, teacher_drift, policy_drift = summed
    if tokens == 0:
        return {}
    metrics = {"health/student_entropy": student_entropy / tokens, "health/teacher_entropy": teacher_entropy / tokens}
    if with_drift:
        metrics["health/teacher_drift_kl"] = teacher_drift / tokens
        if not teacher_is_policy:
            metrics["health/policy_drift_kl"] = policy_drift / tokens
    return metrics
