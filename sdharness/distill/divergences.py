"""Full-vocabulary divergences: the references, per position, and their closed-form gradients.

Divergences take log-probabilities ``[..., vocab]`` and return one value per position ``[...]``:

* ``forward_kl``: KL(target || student) = sum_v p_target (log p_target - log p_S)
* ``reverse_kl``: KL(student || target) = sum_v p_S (log p_S - log p_target)
* ``jsd``:        beta KL(target || M) + (1 - beta) KL(student || M),  M = beta p_target + (1 - beta) p_S

``-inf`` logits (masked vocabulary entries) are probability 0 on every path: 0 log 0 = 0. A
divergence that is infinite by definition stays infinite (forward KL from the ``teacher`` target to
a student that gives 0 to a token the teacher supports; reverse KL to a target that drops a token
the student supports). The chunked loss that evaluates them is :mod:`sdharness.distill.losses`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def kl_per_position(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position; terms with p = 0 count as 0, in the gradient too."""
    p = p_logp.exp()
    # The difference is masked before the product: p * NaN (-inf - -inf) would make a NaN gradient.
    return (p * torch.where(p > 0, p_logp - q_logp, torch.zeros_like(p))).sum(-1)


def log_ratio_where_supported(log_ratio: torch.Tensor) -> torch.Tensor:
    """In place: log(a / b) -> 0 where a = 0, i.e. where it is -inf (b > 0) or NaN (b = 0 too);
    +inf (a > 0 = b) stays. Then ``a * log_ratio`` follows 0 log 0 = 0."""
    return log_ratio.nan_to_num_(nan=0.0, posinf=math.inf, neginf=0.0)


def forward_kl(target_logp: torch.Tensor, student_logp: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    return kl_per_position(target_logp, student_logp)


def reverse_kl(target_logp: torch.Tensor, student_logp: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    return kl_per_position(student_logp, target_logp)


def jsd(target_logp: torch.Tensor, student_logp: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    # Clamped: where both are -inf, logsumexp's gradient would be exp(-inf - -inf) = NaN.
    stacked = torch.stack([target_logp + math.log(beta), student_logp + math.log1p(-beta)])
    mixture = torch.logsumexp(stacked.clamp(min=torch.finfo(stacked.dtype).min), dim=0)
    return beta * kl_per_position(target_logp, mixture) + (1 - beta) * kl_per_position(student_logp, mixture)


def forward_kl_with_grad(target_logp: torch.Tensor, student_logp: torch.Tensor):
    """KL(target || student) per row and its gradient w.r.t. the student logits, p_S - p_target."""
    target_p = target_logp.exp()
    value = (target_p * log_ratio_where_supported(target_logp - student_logp)).sum(-1)
    return value, student_logp.exp().sub_(target_p)


def reverse_kl_with_grad(target_logp: torch.Tensor, student_logp: torch.Tensor):
    """KL(student || target) per row and its gradient p_S * (log p_S - log p_target - KL)."""
    student_p = student_logp.exp()
    log_ratio = log_ratio_where_supported(student_logp - target_logp)
    value = (student_p * log_ratio).sum(-1)
    return value, log_ratio.sub_(value.unsqueeze(-1)).mul_(student_p)


def _autograd_with_grad(name: str, beta: float):
    def value_and_grad(target_logp, student_logp):
        # log_softmax(student_logp) == student_logp, and its Jacobian equals the logits' one.
        student = student_logp.detach().requires_grad_()
        with torch.enable_grad():
            value = divergence(target_logp, F.log_softmax(student, dim=-1), name=name, beta=beta)
            (grad,) = torch.autograd.grad(value.sum(), student)
        return value.detach(), grad
    return value_and_grad


@dataclass(frozen=True)
class Divergence:
    """One divergence. ``value(target_logp, student_logp, *, beta)`` is the reference, per position.
    ``value_and_grad(target_logp, student_logp)``: per-row value and gradient w.r.t. the student
    logits in closed form (fewer passes over the vocabulary than autograd), or None for autograd.
    ``fused``: written out pass by pass in the chunk body
    (:func:`sdharness.distill.chunks.fused_chunk`)."""

    value: Callable[..., torch.Tensor]
    value_and_grad: Optional[Callable] = None
    fused: bool = False


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence(forward_kl, forward_kl_with_grad, fused=True),
    "reverse_kl": Divergence(reverse_kl, reverse_kl_with_grad, fused=True),
    "jsd": Divergence(jsd),
}


def divergence_named(name: str) -> Divergence:
    """The :class:`Divergence` called ``name``; a ValueError naming the valid ones otherwise."""
    if name not in DIVERGENCES:
        raise ValueError(f"loss.divergence={name!r} is unknown; choose one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def divergence(target_logp: torch.Tensor, student_logp: torch.Tensor, *, name: str, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence ``[...]`` of the kind called ``name``."""
    return divergence_named(name).value(target_logp, student_logp, beta=beta)


def value_and_grad_fn(name: str, beta: float = 0.5):
    """``(target_logp, student_logp) -> (per-row divergence, gradient w.r.t. the student logits)``."""
    return divergence_named(name).value_and_grad or _autograd_with_grad(name, beta)
