"""Pure GRPO maths: group-normalised advantages and the clipped policy-gradient loss.

* advantages:  A_ij = r_ij - mean_j r_ij, divided by std_j r_ij (+eps) when ``scale='group'``.
  A group whose rewards are all equal has zero advantage: it teaches nothing.
* per token:   -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta KL_k3,  rho = exp(logp - logp_old)
  KL_k3 = exp(ref - logp) - (ref - logp) - 1, an unbiased, non-negative estimate of KL(pi || ref).
* aggregation: ``token_mean`` averages over every loss token of the batch; ``sequence_mean``
  averages each sequence over its tokens, then over sequences.
"""

from __future__ import annotations

import torch

SCALES = ("group", "none")
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean")


def group_advantages(rewards: torch.Tensor, *, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Advantages ``[groups, group_size]`` from rewards of the same shape."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(dim=-1, keepdim=True) + eps)
    if scale == "none":
        return centred
    raise ValueError(f"algo.scale_rewards={scale!r} is unknown; choose one of {', '.join(SCALES)}")


def zero_variance_groups(rewards: torch.Tensor) -> int:
    """Number of groups ``[groups, group_size]`` whose rewards are all equal."""
    return int((rewards.max(dim=-1).values == rewards.min(dim=-1).values).sum())


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) ``[batch, length]`` from logits ``[batch, length, vocab]``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    aggregation: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss (scalar) and detached diagnostics.

    Args:
        logprobs, old_logprobs, ref_logprobs: ``[batch, length]`` token log-probabilities under
            the current, sampling-time and reference policies.
        advantages: ``[batch]``, one per sequence.
        mask: ``[batch, length]`` bool, the completion tokens that carry loss.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    kl = torch.zeros_like(per_token)
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("algo.beta > 0 needs reference log-probabilities")
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + beta * kl
    weights = mask.to(per_token.dtype)
    if aggregation == "token_mean":
        loss = (per_token * weights).sum() / weights.sum().clamp(min=1)
    elif aggregation == "sequence_mean":
        per_sequence = (per_token * weights).sum(-1) / weights.sum(-1).clamp(min=1)
        loss = per_sequence[weights.sum(-1) > 0].mean() if (weights.sum(-1) > 0).any() else per_token.sum() * 0
    else:
        raise ValueError(f"algo.loss_aggregation={aggregation!r} is unknown; "
                         f"choose one of {', '.join(LOSS_AGGREGATIONS)}")
    clipped = ((ratio - 1).abs() > epsilon) & mask
    stats = {"clip_fraction": clipped.sum() / mask.sum().clamp(min=1),
             "kl_to_reference": (kl * weights).sum() / weights.sum().clamp(min=1)}
    return loss, {k: v.detach() for k, v in stats.items()}
