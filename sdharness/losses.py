"""Full-vocabulary divergences and the chunked, masked self-distillation loss.

Divergences take log-probabilities ``[..., vocab]`` and return one value per position ``[...]``:

* ``forward_kl``: KL(target || student) = sum_v p_target (log p_target - log p_S)
* ``reverse_kl``: KL(student || target) = sum_v p_S (log p_S - log p_target)
* ``jsd``:        beta KL(target || M) + (1 - beta) KL(student || M),  M = beta p_target + (1 - beta) p_S

:func:`distillation_loss` evaluates aggregation and divergence over chunks of loss-carrying
positions and computes the gradient with respect to the student logits chunk by chunk, so the
only full ``[batch, length, vocab]`` tensors alive are the student logits and their gradient; the
teacher can be passed as hidden states and is projected to the vocabulary chunk by chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sdharness.aggregation import AGGREGATIONS, aggregate_logprobs
from sdharness.logits import LazyLogits

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position; terms with p = 0 count as 0."""
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p)).sum(-1)


def forward_kl(target_logp: torch.Tensor, student_logp: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    return _kl(target_logp, student_logp)


def reverse_kl(target_logp: torch.Tensor, student_logp: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    return _kl(student_logp, target_logp)


def jsd(target_logp: torch.Tensor, student_logp: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    mixture = torch.logsumexp(
        torch.stack([target_logp + math.log(beta), student_logp + math.log1p(-beta)]), dim=0
    )
    return beta * _kl(target_logp, mixture) + (1 - beta) * _kl(student_logp, mixture)


_BY_NAME: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
}


def divergence(target_logp: torch.Tensor, student_logp: torch.Tensor, *, name: str, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence ``[...]`` of the kind called ``name``."""
    if name not in _BY_NAME:
        raise ValueError(f"loss.divergence={name!r} is unknown; choose one of {', '.join(DIVERGENCES)}")
    return _BY_NAME[name](target_logp, student_logp, beta=beta)


@dataclass(frozen=True)
class DistillationLoss:
    """Result of :func:`distillation_loss`.

    ``loss``: scalar (float32 for half-precision logits), the token mean of the divergence;
    differentiable w.r.t. the student logits only.
    ``teacher_student_kl``: token mean of KL(teacher || student), detached, for monitoring.
    ``tokens``: number of positions that carried loss.
    """

    loss: torch.Tensor
    teacher_student_kl: torch.Tensor
    tokens: int


def forward_kl_with_grad(target_logp: torch.Tensor, student_logp: torch.Tensor):
    """KL(target || student) per row and its gradient w.r.t. the student logits, p_S - p_target."""
    target_p = target_logp.exp()
    value = (target_p * (target_logp - student_logp)).sum(-1)
    return value, student_logp.exp().sub_(target_p)


def reverse_kl_with_grad(target_logp: torch.Tensor, student_logp: torch.Tensor):
    """KL(student || target) per row and its gradient p_S * (log p_S - log p_target - KL)."""
    student_p = student_logp.exp()
    log_ratio = student_logp - target_logp
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


def value_and_grad_fn(name: str, beta: float = 0.5):
    """``(target_logp, student_logp) -> (per-row divergence, gradient w.r.t. the student logits)``.

    The KLs have closed-form gradients (fewer passes over the vocabulary than autograd);
    the JSD goes through autograd.
    """
    return {"forward_kl": forward_kl_with_grad, "reverse_kl": reverse_kl_with_grad}.get(
        name, _autograd_with_grad(name, beta))


class _ChunkedDistillation(torch.autograd.Function):
    """Loss and student-logit gradient computed together, chunk by chunk (Liger-style).

    Autograd through a chunked loop would keep every chunk's softmax alive for backward, i.e.
    another full [positions, vocab] copy; computing each chunk's gradient immediately avoids that.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_rows, positions, weight, chunk_size, target_fn, value_and_grad,
                row_weights=None):
        flat_student = student_logits.detach().reshape(-1, student_logits.shape[-1])
        # Half-precision logits are evaluated in float32; float64 stays float64.
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        grad = torch.zeros_like(flat_student) if ctx.needs_input_grad[0] else None
        loss = flat_student.new_zeros((), dtype=dtype)
        kl = flat_student.new_zeros((), dtype=dtype)
        with torch.no_grad():
            for start in range(0, positions.numel(), chunk_size):
                rows = positions[start : start + chunk_size]
                student_logp = F.log_softmax(flat_student[rows].to(dtype), dim=-1)
                teacher_logp = F.log_softmax(teacher_rows(rows).to(dtype), dim=-1)
                value, chunk_grad = value_and_grad(target_fn(teacher_logp, student_logp), student_logp)
                if row_weights is not None:  # per-token weights scale each row's value and gradient
                    chunk_weights = row_weights[start : start + chunk_size].to(dtype)
                    value = value * chunk_weights
                    chunk_grad.mul_(chunk_weights.unsqueeze(-1))
                if grad is not None:
                    grad[rows] = chunk_grad.mul_(weight).to(grad.dtype)
                del chunk_grad
                loss += value.sum() * weight
                # Log-probabilities of finite logits are finite: no zero-probability guard needed here.
                kl += (teacher_logp.exp() * (teacher_logp - student_logp)).sum() * weight
        ctx.save_for_backward(grad.view_as(student_logits) if grad is not None else None)
        ctx.mark_non_differentiable(kl)
        return loss, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_kl):
        (grad,) = ctx.saved_tensors
        # In place: the saved gradient is used once, and a copy would be another [batch, length, vocab].
        student_grad = None if grad is None else grad.mul_(grad_loss.to(grad.dtype))
        # The target is detached by definition, so the teacher logits never get a gradient.
        return student_grad, None, None, None, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | LazyLogits,
    loss_mask: torch.Tensor,
    *,
    aggregation: str,
    tau: float,
    divergence_name: str,
    beta: float = 0.5,
    chunk_size: int = 32,
    token_weights: torch.Tensor | None = None,
) -> DistillationLoss:
    """Token-mean divergence between the detached aggregate target and the student.

    Args:
        student_logits: ``[batch, length, vocab]``, with gradient.
        teacher_logits: ``[batch, length, vocab]``, position i aligned with the student's, or
            :class:`LazyLogits` (hidden states + LM head) evaluated chunk by chunk.
        loss_mask: ``[batch, length]`` bool; positions that carry loss. If none does, the loss is
            a zero still attached to the student graph so that backward runs everywhere.
        chunk_size: positions evaluated at once; the result does not depend on it.
        token_weights: optional ``[batch, length]`` float (detached), multiplying each position's
            divergence and its gradient; the mean still divides by the number of loss tokens.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if loss_mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the logits' shape without the vocabulary, "
                         f"{tuple(student_logits.shape[:-1])}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is unknown; choose one of {', '.join(AGGREGATIONS)}")
    if divergence_name not in DIVERGENCES:
        raise ValueError(f"loss.divergence={divergence_name!r} is unknown; choose one of {', '.join(DIVERGENCES)}")
    if token_weights is not None and token_weights.shape != loss_mask.shape:
        raise ValueError(f"token_weights {tuple(token_weights.shape)} must have loss_mask's shape "
                         f"{tuple(loss_mask.shape)}")
    positions = loss_mask.reshape(-1).nonzero().squeeze(-1)
    tokens = positions.numel()
    if tokens == 0:
        zero = student_logits.sum() * 0.0
        return DistillationLoss(zero, zero.detach(), 0)

    def target_fn(teacher_logp, student_logp):
        return aggregate_logprobs(teacher_logp, student_logp, name=aggregation, tau=tau)

    if isinstance(teacher_logits, LazyLogits):
        teacher_rows = teacher_logits.rows
    else:
        flat_teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
        teacher_rows = flat_teacher.__getitem__
    loss, kl = _ChunkedDistillation.apply(
        student_logits, teacher_rows, positions, 1.0 / tokens, chunk_size, target_fn,
        value_and_grad_fn(divergence_name, beta),
        None if token_weights is None else token_weights.detach().reshape(-1)[positions],
    )
    return DistillationLoss(loss, kl, tokens)


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
