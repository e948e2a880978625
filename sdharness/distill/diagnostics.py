"""Impossible-knowledge diagnostics: how far a distillation target moves from the student.

The method promises that the teacher never hands the student a token the student is not already
seriously considering. With ``q`` the target and ``p_S`` the student at one position, the promise is
measured by

* ``unconsidered_mass``: sum of q over tokens with p_S < eps (the mass the student could not have
  found itself; the promise asks for < eps);
* ``max_log_ratio``: max over tokens with q > 0 of log q - log p_S (how much any one token gains);
  +inf where q puts mass on a token the student gives probability 0;
* ``kl_target_student``: KL(q || p_S), the nats the target asks the student to move.

These are the float64-checkable references; the chunked loss computes the same figures on the fly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TargetDiagnostics:
    """Per-position figures ``[...]`` of :func:`target_diagnostics`."""

    unconsidered_mass: torch.Tensor
    max_log_ratio: torch.Tensor
    kl_target_student: torch.Tensor


def target_diagnostics(target_logp: torch.Tensor, student_logp: torch.Tensor, *, eps: float = 1e-3
                       ) -> TargetDiagnostics:
    """Diagnostics of the target ``exp(target_logp)`` against the student ``exp(student_logp)``,
    both log-probabilities ``[..., vocab]``; tokens with q = 0 count as 0 (0 log 0 = 0)."""
    q = target_logp.exp()
    support = q > 0
    log_ratio = target_logp - student_logp
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    unconsidered = torch.where(student_logp < math.log(eps), q, zero).sum(-1)
    max_log_ratio = torch.where(support, log_ratio, torch.full((), -math.inf, dtype=q.dtype, device=q.device)).amax(-1)
    kl = torch.where(support, q * log_ratio, zero).sum(-1)
    return TargetDiagnostics(unconsidered, max_log_ratio, kl)
