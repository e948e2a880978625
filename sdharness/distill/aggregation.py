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
* ``trust_region``:     target = log_softmax((1 - w) s + w t) with, per position, the largest w in
  [0, 1] such that KL(target || student) <= kl_bound (nats; see
  :func:`trust_region_weight`). The only aggregation whose distance from the student is bounded
  by construction, and with it the mass it can hand to tokens the student is not considering
  (:func:`unconsidered_mass_bound`). ``clip``'s q / p_S is bounded only by 1 / Z, and Z -> 0
  where teacher and student disagree sharply; ``product``'s q / p_S grows like sqrt(p_T / p_S)
  without bound. Both keep their definitions, with no guard for Z -> 0: a guard would make them
  a different aggregation with a second knob; the loss's logged diagnostics
  (:mod:`sdharness.distill.diagnostics`) show where they leave the student, and ``trust_region``
  is the one that cannot.

``-inf`` logits (masked vocabulary entries) are probability 0 in every aggregation (0 log 0 = 0):
a token the student masks stays masked in every target but ``teacher``'s.

Every aggregation is one :class:`Aggregation` in :data:`AGGREGATIONS`, the only list of them:
its :class:`Parameter` (``tau``, a temperature; ``kl_bound``, a bound in nats; or none), its
reference function (logits in, target log-probabilities out) and, optionally, its fused form for
the chunked loss (:func:`sdharness.distill.losses.distillation_loss`), written next to it. Adding
one is one entry here and ``conf/aggregation/<name>.yaml``; tests compare every fused form with
its reference. Select one by name with :func:`aggregate`; the loss and guided sampling hand each
aggregation the value of its parameter (``parameter``, ignored where it has none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

LOG2E = 1.0 / math.log(2.0)


def teacher_target(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """target = log_softmax(z_T); the student is ignored."""
    return F.log_softmax(teacher_logits, dim=-1)


def product_target(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, tau: float) -> torch.Tensor:
    """target = log_softmax((z_S + z_T) / tau)."""
    return F.log_softmax((student_logits + teacher_logits) / tau, dim=-1)


def clip_target(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, tau: float) -> torch.Tensor:
    """target = log_softmax(s + min(0, (t - s) / tau))."""
    t, s = F.log_softmax(teacher_logits, dim=-1), F.log_softmax(student_logits, dim=-1)
    # = min(s, s + (t - s) / tau); fmin skips the NaN that s = -inf leaves (-inf - -inf): it stays -inf.
    return F.log_softmax(torch.fmin(s, s + (t - s) / tau), dim=-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the distributions ``exp(logp)``; shape ``[...]`` (0 log 0 = 0)."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


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


def entropy_matched_target(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``product`` at the per-position tau of :func:`entropy_matched_tau`."""
    with torch.no_grad():
        fitted = entropy_matched_tau(teacher_logits, student_logits)
    return F.log_softmax((student_logits + teacher_logits) / fitted.unsqueeze(-1), dim=-1)


TRUST_REGION_STEPS = 16  # bisection steps: w is the largest feasible weight to within 2 ** -16


def _common_support(t: torch.Tensor, s: torch.Tensor):
    """``(s on the common support else -inf, t - s there else 0)``."""
    both = torch.isfinite(s) & torch.isfinite(t)
    return torch.where(both, s, -math.inf), torch.where(both, t - s, torch.zeros_like(s))


def trust_region_weight(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, *, delta: float, steps: int = TRUST_REGION_STEPS
) -> torch.Tensor:
    """Per position ``[...]``, the largest w in [0, 1] (to within 2 ** -steps, rounded down) with
    KL(q_w || p_S) <= delta, where q_w is proportional to p_S^(1 - w) p_T^w (log-probabilities in).

    Why bisection works: with d = log(p_T / p_S) and A(w) = log E_{p_S}[exp(w d)],
    log q_w = log p_S + w d - A(w), so KL(q_w || p_S) = w A'(w) - A(w), whose derivative is
    w A''(w) = w Var_{q_w}(d) >= 0: the KL grows monotonically from 0 at w = 0 to KL(p_T || p_S)
    at w = 1. The answer is 1 when the teacher itself is within delta, else the last feasible
    midpoint, so KL(q_w || p_S) <= delta holds exactly, not only to the bisection's precision.

    For w in (0, 1], q_w lives on the tokens both distributions support (0 log 0 = 0): a teacher
    that gives 0 to tokens the student supports makes KL(q_{0+} || p_S) = -log p_S(common support)
    jump above 0, and where that exceeds delta (or the supports are disjoint) w = 0, the student.
    """
    s_common, d = _common_support(teacher_logp, student_logp)

    def within(w: torch.Tensor) -> torch.Tensor:
        q_logp = F.log_softmax(s_common + w.unsqueeze(-1) * d, dim=-1)
        supported = torch.isfinite(q_logp)
        kl = torch.where(supported, q_logp.exp() * (q_logp - student_logp), torch.zeros_like(q_logp)).sum(-1)
        return (kl <= delta) & supported.any(-1)  # no common support: no q_w at all

    lo = torch.zeros(student_logp.shape[:-1], dtype=student_logp.dtype, device=student_logp.device)
    hi = torch.ones_like(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok = within(mid)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(within(torch.ones_like(lo)), torch.ones_like(lo), lo)


def unconsidered_mass_bound(student_mass: torch.Tensor, delta: float, steps: int = 60) -> torch.Tensor:
    """The most mass any q with KL(q || p_S) <= delta can put on a set of tokens to which the
    student gives total mass ``student_mass`` (e.g. the tokens with p_S < eps); input's shape.

    Derivation: merging the set into one outcome and the rest into another can only lower a KL
    (data processing), so m = q(set) must satisfy kl(m || p) <= delta for the two-point KL
    kl(m || p) = m log(m / p) + (1 - m) log((1 - m) / (1 - p)), p = p_S(set); this returns the
    largest such m >= p (bisection; kl grows with m above p). Closed forms it implies:
    m <= p + sqrt(delta / 2) (Pinsker) and m <= (delta + log 2) / log(1 / p) (dropping the
    (1 - m) term, which is >= -log 2 after adding the entropy). With delta = 0.1 and a set the
    student gives 1e-3, m <= 0.0375: ``trust_region`` cannot hand most of its target to tokens the
    student is not considering, as ``clip`` can (the issue's example: 0.57).
    """
    p = student_mass.to(torch.float64).clamp(0.0, 1.0)

    def two_point_kl(m):
        first = torch.where(m > 0, m * (m / p).log(), torch.zeros_like(m))
        second = torch.where(m < 1, (1 - m) * ((1 - m) / (1 - p)).log(), torch.zeros_like(m))
        return first + second

    lo, hi = p.clone(), torch.ones_like(p)
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok = two_point_kl(mid) <= delta
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    top = torch.where(two_point_kl(torch.ones_like(p)) <= delta, torch.ones_like(p), hi)
    return top.to(student_mass.dtype)


def trust_region_target(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, kl_bound: float
) -> torch.Tensor:
    """log_softmax((1 - w) s + w t) at the per-position w of :func:`trust_region_weight`, delta = ``kl_bound``."""
    t, s = F.log_softmax(teacher_logits, dim=-1), F.log_softmax(student_logits, dim=-1)
    with torch.no_grad():
        w = trust_region_weight(t, s, delta=kl_bound).unsqueeze(-1)
    s_common, d = _common_support(t, s)
    return torch.where(w > 0, F.log_softmax(s_common + w * d, dim=-1), s)


@dataclass(frozen=True)
class ChunkBits:
    """One chunk of logits as the fused loss holds them: in bits (base 2), each row shifted by a
    constant, so ``log2 p_S = s - log_zs`` (``[rows, vocab]`` and ``[rows, 1]``). ``t``/``log_zt``
    are the teacher's, or None when the aggregation said it does not need them; ``z_t`` is the
    teacher's raw logits (nats). ``work(name)``: a reusable ``[rows, vocab]`` buffer of the chunk's
    dtype by name (the loss's workspace), for a fused form that needs more than ``out``."""

    s: torch.Tensor
    log_zs: torch.Tensor
    z_t: torch.Tensor
    t: Optional[torch.Tensor]
    log_zt: Optional[torch.Tensor]
    work: Callable[[str], torch.Tensor]


def _teacher_fused(x: ChunkBits, out: torch.Tensor, parameter: None) -> torch.Tensor:
    return x.t


def _product_fused(x: ChunkBits, out: torch.Tensor, tau: float) -> torch.Tensor:
    # From the teacher's raw logits: without the monitoring KL the teacher needs no softmax at all.
    return torch.add(x.s, x.z_t, alpha=LOG2E, out=out).mul_(1.0 / tau)


def _neg_inf_for_nan(x: torch.Tensor) -> torch.Tensor:
    return x.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _clip_fused(x: ChunkBits, out: torch.Tensor, tau: float) -> torch.Tensor:
    # s + min(0, (t - s) / tau) with the log-probabilities' row constants restored. NaN only where
    # s = t = -inf: that token stays at probability 0 (fmin would do it too, ~10x slower on CPU).
    return _neg_inf_for_nan(
        torch.sub(x.t, x.s, out=out).sub_(x.log_zt - x.log_zs).mul_(1.0 / tau).clamp_(max=0.0).add_(x.s))


def _trust_region_fused(x: ChunkBits, out: torch.Tensor, kl_bound: float) -> torch.Tensor:
    """:func:`trust_region_target` in shifted bits, with the same bisection. Per evaluated w:
    KL_bits(q_w || p_S) = w E_q[d] - log2 E_{p_S}[2^(w d)] with d = log2(p_T / p_S), about 6 passes
    over the chunk, TRUST_REGION_STEPS + 1 times."""
    s, log_zs = x.s, x.log_zs
    d, s_common, exps, scratch = x.work("tr_d"), x.work("tr_s"), x.work("tr_exps"), x.work("tr_scratch")
    torch.sub(x.t, s, out=d).sub_(x.log_zt - log_zs)  # log2(p_T / p_S): finite exactly on the common support
    # s there, else -inf: 0 * d is 0 on the common support and NaN off it (isfinite + masked_fill
    # were ~10x slower on CPU: boolean masks are slow there).
    _neg_inf_for_nan(torch.mul(d, 0.0, out=s_common).add_(s))
    d.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    bound = kl_bound * LOG2E

    def within(w):  # [rows, 1] bool
        torch.addcmul(s_common, d, w, out=out)
        top = out.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # a row without common support stays -inf
        total = torch.exp2(out.sub_(top), out=exps).sum(-1, keepdim=True)
        mean_d = torch.mul(exps, d, out=scratch).sum(-1, keepdim=True) / total
        return w * mean_d - (top + total.log2() - log_zs) <= bound  # NaN (no common support) is not within

    lo = torch.zeros_like(log_zs)
    hi = torch.ones_like(lo)
    for _ in range(TRUST_REGION_STEPS):
        mid = (lo + hi) / 2
        ok = within(mid)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    w = torch.where(within(torch.ones_like(lo)), torch.ones_like(lo), lo)
    torch.addcmul(s_common, d, w, out=out)
    student_rows = (w.squeeze(-1) == 0).nonzero().squeeze(-1)  # the target is the student itself
    if student_rows.numel():
        out[student_rows] = s[student_rows]
    return out


@dataclass(frozen=True)
class Parameter:
    """An aggregation's one number: ``name`` is the :class:`~sdharness.config.AggregationConfig` field
    that sets it, ``default`` its value under ``aggregation=<name>``."""

    name: str
    meaning: str
    default: float


TEMPERATURE = "temperature"
KL_BOUND = "bound on KL(target||student) per token, nats"


@dataclass(frozen=True)
class Aggregation:
    """One aggregation. ``target(teacher_logits, student_logits[, <parameter.name>=value])`` is the
    reference; :meth:`reference` calls it with the value of its :class:`Parameter` (None: it has
    none). ``fused(chunk: ChunkBits, out, value)`` returns the unnormalised target in bits (any
    per-row shift), written into ``out`` or an input it may return as is; None sends the
    aggregation through the reference in the loss."""

    target: Callable[..., torch.Tensor]
    parameter: Optional[Parameter]
    fused: Optional[Callable[[ChunkBits, torch.Tensor, Optional[float]], torch.Tensor]] = None
    needs_teacher_bits: bool = True

    def reference(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                  parameter: Optional[float]) -> torch.Tensor:
        """The target at ``parameter``, the value of this aggregation's parameter (ignored where it has none)."""
        if self.parameter is None:
            return self.target(teacher_logits, student_logits)
        return self.target(teacher_logits, student_logits, **{self.parameter.name: parameter})


AGGREGATIONS: dict[str, Aggregation] = {
    "teacher": Aggregation(teacher_target, None, _teacher_fused),
    "product": Aggregation(product_target, Parameter("tau", TEMPERATURE, 2.0), _product_fused,
                           needs_teacher_bits=False),
    "clip": Aggregation(clip_target, Parameter("tau", TEMPERATURE, 1.0), _clip_fused),
    "entropy_matched": Aggregation(entropy_matched_target, None),
    "trust_region": Aggregation(trust_region_target, Parameter("kl_bound", KL_BOUND, 0.1), _trust_region_fused),
}
# Every Parameter's name, each an AggregationConfig field: ("tau", "kl_bound").
PARAMETER_NAMES = tuple(dict.fromkeys(a.parameter.name for a in AGGREGATIONS.values() if a.parameter))


def aggregations_using(parameter: str) -> list[str]:
    """The names of the aggregations whose :class:`Parameter` is called ``parameter``."""
    return [name for name, a in AGGREGATIONS.items() if a.parameter is not None and a.parameter.name == parameter]


def aggregation_named(name: str) -> Aggregation:
    """The :class:`Aggregation` called ``name``; a ValueError naming the valid ones otherwise."""
    if name not in AGGREGATIONS:
        raise ValueError(f"aggregation.name={name!r} is unknown; choose one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[name]


def aggregate(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, name: str,
              parameter: Optional[float] = None) -> torch.Tensor:
    """Target log-probabilities ``[..., vocab]`` of the aggregation called ``name`` at ``parameter``,
    the value of its :class:`Parameter`.

    Every aggregation is invariant to per-position shifts of its inputs, so log-probabilities
    serve as logits too."""
    return aggregation_named(name).reference(teacher_logits, student_logits, parameter)
