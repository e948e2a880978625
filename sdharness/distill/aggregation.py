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

Every aggregation is one :class:`Aggregation` in :data:`AGGREGATIONS`, the only list of them:
its reference function (logits in, target log-probabilities out) and, optionally, its fused form
for the chunked loss (:func:`sdharness.distill.losses.distillation_loss`), written next to it.
Adding one is one entry here and ``conf/aggregation/<name>.yaml``; tests compare every fused form
with its reference. Select one by name with :func:`aggregate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

LOG2E = 1.0 / math.log(2.0)


def teacher_target(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, tau: float) -> torch.Tensor:
    """target = log_softmax(z_T); the student and tau are ignored."""
    return F.log_softmax(teacher_logits, dim=-1)


def product_target(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, tau: float) -> torch.Tensor:
    """target = log_softmax((z_S + z_T) / tau)."""
    return F.log_softmax((student_logits + teacher_logits) / tau, dim=-1)


def clip_target(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, tau: float) -> torch.Tensor:
    """target = log_softmax(s + min(0, (t - s) / tau))."""
    t, s = F.log_softmax(teacher_logits, dim=-1), F.log_softmax(student_logits, dim=-1)
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


@dataclass(frozen=True)
class ChunkBits:
    """One chunk of logits as the fused loss holds them: in bits (base 2), each row shifted by a
    constant, so ``log2 p_S = s - log_zs`` (``[rows, vocab]`` and ``[rows, 1]``). ``t``/``log_zt``
    are the teacher's, or None when the aggregation said it does not need them; ``z_t`` is the
    teacher's raw logits (nats)."""

    s: torch.Tensor
    log_zs: torch.Tensor
    z_t: torch.Tensor
    t: Optional[torch.Tensor]
    log_zt: Optional[torch.Tensor]


def _teacher_fused(x: ChunkBits, out: torch.Tensor, tau: float) -> torch.Tensor:
    return x.t


def _product_fused(x: ChunkBits, out: torch.Tensor, tau: float) -> torch.Tensor:
    # From the teacher's raw logits: without the monitoring KL the teacher needs no softmax at all.
    return torch.add(x.s, x.z_t, alpha=LOG2E, out=out).mul_(1.0 / tau)


def _clip_fused(x: ChunkBits, out: torch.Tensor, tau: float) -> torch.Tensor:
    # s + min(0, (t - s) / tau) with the log-probabilities' row constants restored.
    return torch.sub(x.t, x.s, out=out).sub_(x.log_zt - x.log_zs).mul_(1.0 / tau).clamp_(max=0.0).add_(x.s)


@dataclass(frozen=True)
class Aggregation:
    """One aggregation. ``target(teacher_logits, student_logits, *, tau)`` is the reference.
    ``fused(chunk: ChunkBits, out, tau)`` returns the unnormalised target in bits (any per-row
    shift), written into ``out`` or an input it may return as is; None sends the aggregation
    through the reference in the loss. ``uses_tau``: False where tau is ignored (reports and
    sweeps then leave it out of the label)."""

    target: Callable[..., torch.Tensor]
    fused: Optional[Callable[[ChunkBits, torch.Tensor, float], torch.Tensor]] = None
    needs_teacher_bits: bool = True
    uses_tau: bool = True


AGGREGATIONS: dict[str, Aggregation] = {
    "teacher": Aggregation(teacher_target, _teacher_fused, uses_tau=False),
    "product": Aggregation(product_target, _product_fused, needs_teacher_bits=False),
    "clip": Aggregation(clip_target, _clip_fused),
    "entropy_matched": Aggregation(entropy_matched_target, uses_tau=False),
}


def aggregation_named(name: str) -> Aggregation:
    """The :class:`Aggregation` called ``name``; a ValueError naming the valid ones otherwise."""
    if name not in AGGREGATIONS:
        raise ValueError(f"aggregation.name={name!r} is unknown; choose one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[name]


def aggregate(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, name: str, tau: float) -> torch.Tensor:
    """Target log-probabilities ``[..., vocab]`` of the aggregation called ``name``.

    Every aggregation is invariant to per-position shifts of its inputs, so log-probabilities
    serve as logits too."""
    return aggregation_named(name).target(teacher_logits, student_logits, tau=tau)
