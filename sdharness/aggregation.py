"""Aggregations: how teacher and student logits combine into the distillation target.

Every function maps logits of shape ``[..., vocab]`` to target log-probabilities of the
same shape and never touches a model. With ``s = log_softmax(z_S)`` and
``t = log_softmax(z_T)``:

* ``teacher``:          target = t                                  (plain on-policy self-distillation)
* ``product``:          target = log_softmax((z_S + z_T) / tau)     (tau = 2: normalised geometric mean)
* ``clip``:             target = log_softmax(s + min(0, (t - s) / tau))
  The teacher can only push down tokens it finds less likely than the student does; every other
  token keeps the student's unnormalised mass, so relative to the student all tokens the teacher
  does not push down gain the same factor 1/Z, and none gains more. A token the student ignores
  stays ignored unless the teacher pushes down nearly everything else (Z -> 0). tau = 1 gives a
  target proportional to min(p_S, p_T); tau -> inf gives the student.
* ``entropy_matched``:  ``product`` with a per-position tau, found by bisection, so that the
  target's entropy equals the student's: the teacher may move mass, never sharpen or flatten it.

Select one by name with :func:`aggregate`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AGGREGATIONS = ("teacher", "product", "clip", "entropy_matched")


def teacher_target(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, tau: float) -> torch.Tensor:
    """target = log_softmax(z_T); the student and tau are ignored."""
    return F.log_softmax(teacher_logits, dim=-1)


def product_target(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, tau: float) -> torch.Tensor:
    """target = log_softmax((z_S + z_T) / tau)."""
    return F.log_softmax((student_logits + teacher_logits) / tau, dim=-1)


def clip_target(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, tau: float) -> torch.Tensor:
    """target = log_softmax(s + min(0, (t - s) / tau))."""
    return _clip_from_logprobs(F.log_softmax(teacher_logits, dim=-1), F.log_softmax(student_logits, dim=-1), tau)


def _clip_from_logprobs(t: torch.Tensor, s: torch.Tensor, tau: float) -> torch.Tensor:
    return F.log_softmax(s + torch.clamp((t - s) / tau, max=0.0), dim=-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the distributions ``exp(logp)``; shape ``[...]``."""
    return -(logp.exp() * logp).sum(-1)


def entropy_matched_tau(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    tau_min: float = 1e-2,
    tau_max: float = 1e2,
    steps: int = 30,
) -> torch.Tensor:
    """Per-position tau with H(softmax((z_S + z_T) / tau)) = H(softmax(z_S)); shape ``[...]``.

    The entropy of ``softmax(x / tau)`` grows monotonically with tau, so bisection on
    ``log tau`` converges; targets outside the reachable range end at the bracket's edge.
    """
    summed = (student_logits + teacher_logits).float()
    wanted = entropy(F.log_softmax(student_logits.float(), dim=-1))
    lo = torch.full_like(wanted, math.log(tau_min))
    hi = torch.full_like(wanted, math.log(tau_max))
    for _ in range(steps):
        mid = (lo + hi) / 2
        too_sharp = entropy(F.log_softmax(summed / mid.exp().unsqueeze(-1), dim=-1)) < wanted
        lo = torch.where(too_sharp, mid, lo)
        hi = torch.where(too_sharp, hi, mid)
    return ((lo + hi) / 2).exp()


def entropy_matched_target(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, tau: float
) -> torch.Tensor:
    """``product`` at the per-position tau of :func:`entropy_matched_tau`; ``tau`` is unused."""
    with torch.no_grad():
        fitted = entropy_matched_tau(teacher_logits, student_logits)
    return F.log_softmax((student_logits + teacher_logits) / fitted.unsqueeze(-1), dim=-1)


_BY_NAME = {
    "teacher": teacher_target,
    "product": product_target,
    "clip": clip_target,
    "entropy_matched": entropy_matched_target,
}


def aggregate(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, name: str, tau: float) -> torch.Tensor:
    """Target log-probabilities ``[..., vocab]`` of the aggregation called ``name``."""
    if name not in _BY_NAME:
        raise ValueError(f"aggregation.name={name!r} is unknown; choose one of {', '.join(AGGREGATIONS)}")
    return _BY_NAME[name](teacher_logits, student_logits, tau=tau)


def aggregate_logprobs(t: torch.Tensor, s: torch.Tensor, *, name: str, tau: float) -> torch.Tensor:
    """:func:`aggregate` from teacher and student log-probabilities, which the loss already has.

    Every aggregation is invariant to per-position shifts of the logits, so log-probabilities
    serve as logits; this only skips recomputing the two log-softmaxes (``teacher`` returns ``t``).
    """
    if name == "teacher":
        return t
    if name == "clip":
        return _clip_from_logprobs(t, s, tau)
    return aggregate(t, s, name=name, tau=tau)
