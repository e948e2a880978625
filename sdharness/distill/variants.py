"""Loss variants the peers expose, beside the full-vocabulary divergences of :mod:`divergences`.

With q the (detached) target and p_S the student at one position:

* ``topk`` support (``loss.support=topk``, ``loss.top_k``, ``loss.topk_from``): the divergence
  between q and p_S restricted to k + 1 buckets, the top-k tokens of the teacher's (or the
  student's) logits, one bucket each, and one tail bucket holding the rest of each distribution's
  mass (lasgroup/SDPO, TRL's ``topk_logits``). Both sides keep their full normalisers, so the
  buckets are exact marginals: the divergence is a lower bound of the full one (data processing),
  equal to it when the tail is empty. The gradient reaches every vocabulary entry: a top-k entry
  gets its bucket's gradient, a tail entry the tail's in proportion p_S(v) / p_S(tail).
* ``sampled`` support (``loss.support=sampled``): the per-token policy-gradient estimator on the
  completion's own token g (TRL SDPO's ``sampled_token``, OPSD's tinker loss, tinker-cookbook):
  gradient -A grad log p_S(g) with A = sg(log q(g) - log p_S(g)). Under g ~ p_S its mean is
  sum_g p_S(g) (log p_S(g) - log q(g)) grad log p_S(g), exactly the gradient of KL(p_S || q) for a
  detached q. The reported value is the single-sample estimate log p_S(g) - log q(g), whose mean
  is that KL. Only reverse KL has this form, so it requires ``loss.divergence=reverse_kl``.
* ``entry_clip`` (``loss.entry_clip``): forward KL with each vocabulary entry's term
  q_v (log q_v - log p_S(v)) capped at ``entry_clip`` nats; a capped entry contributes a constant,
  hence no gradient, so a few tokens the target likes and the student does not cannot dominate
  the update. A token the student masks (p_S = 0 < q) is capped too: the loss stays finite.

Each has its float64 reference here (``*_reference``) and a chunk body for
:func:`sdharness.distill.losses.distillation_loss`; tests tie the two. ``-inf`` logits are
probability 0 throughout (0 log 0 = 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sdharness.distill.aggregation import LOG2E, ChunkBits
from sdharness.distill.diagnostics import target_diagnostics
from sdharness.distill.chunks import LN2, softmax_parts
from sdharness.distill.divergences import divergence, kl_per_position, log_ratio_where_supported, value_and_grad_fn

SUPPORTS = ("full", "topk", "sampled")
TOPK_FROM = ("teacher", "student")


def check_variant(support, divergence_name, top_k, topk_from, sampled_tokens, entry_clip, shape) -> None:
    """A ValueError naming the argument when :func:`~sdharness.distill.losses.distillation_loss` cannot
    run this variant (``shape``: the loss mask's)."""
    if support not in SUPPORTS:
        raise ValueError(f"loss.support={support!r} is unknown; choose one of {', '.join(SUPPORTS)}")
    if support == "topk" and (top_k < 1 or topk_from not in TOPK_FROM):
        raise ValueError(f"loss.top_k={top_k} must be >= 1 and loss.topk_from={topk_from!r} one of "
                         f"{', '.join(TOPK_FROM)}")
    if support == "sampled" and divergence_name != "reverse_kl":
        raise ValueError(f"loss.support=sampled estimates the reverse KL's gradient, not {divergence_name}'s; "
                         "set loss.divergence=reverse_kl")
    if support == "sampled" and (sampled_tokens is None or sampled_tokens.shape != shape):
        raise ValueError(f"loss.support=sampled needs the sampled tokens with loss_mask's shape {tuple(shape)}")
    if entry_clip is not None and (support != "full" or divergence_name != "forward_kl" or not entry_clip > 0):
        raise ValueError(f"loss.entry_clip={entry_clip} caps forward-KL terms over the full vocabulary: it needs a "
                         "positive value, loss.divergence=forward_kl and loss.support=full")


# ---------------------------------------------------------------- references (log-probabilities in nats)

def topk_buckets(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[..., k + 1]``: the entries at ``index`` ``[..., k]``, then the tail's (the
    log of the rest of the mass; -inf when the rest is empty)."""
    tail = logp.scatter(-1, index, -math.inf).logsumexp(-1, keepdim=True)
    return torch.cat([logp.gather(-1, index), tail], -1)


def topk_reference(target_logp, student_logp, index, *, name: str, beta: float = 0.5) -> torch.Tensor:
    """Per position, the divergence ``name`` between the top-k + tail buckets of target and student."""
    return divergence(topk_buckets(target_logp, index), topk_buckets(student_logp, index), name=name, beta=beta)


def sampled_reference(target_logp, student_logp, tokens) -> torch.Tensor:
    """Per position, the surrogate -sg(log q(g) - log p_S(g)) log p_S(g), whose gradient is the
    sampled-token estimator (its value is not the reported one)."""
    pick = tokens.unsqueeze(-1)
    student_g = student_logp.gather(-1, pick).squeeze(-1)
    advantage = (target_logp.gather(-1, pick).squeeze(-1) - student_g).detach()
    return -advantage * student_g


def entry_clip_reference(target_logp, student_logp, *, clip: float) -> torch.Tensor:
    """Forward KL with each entry's term q_v (log q_v - log p_S(v)) capped at ``clip``, per position."""
    q = target_logp.exp()
    terms = q * torch.where(q > 0, target_logp - student_logp, torch.zeros_like(q))
    return terms.clamp(max=clip).sum(-1)


def entry_clipped_forward_kl_with_grad(target_logp: torch.Tensor, student_logp: torch.Tensor, *, clip: float):
    """:func:`entry_clip_reference` per row and its gradient w.r.t. the student logits in closed form:
    with K the uncapped entries, p_S * q(K) - q * [v in K]."""
    q = target_logp.exp()
    terms = q * log_ratio_where_supported(target_logp - student_logp)
    kept_q = torch.where(terms <= clip, q, torch.zeros_like(q))  # clamp passes the gradient at equality too
    value = terms.clamp_(max=clip).sum(-1)
    return value, student_logp.exp().mul_(kept_q.sum(-1, keepdim=True)).sub_(kept_q)


def largest_entry_term(target_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Per position, the largest entry q_v (log q_v - log p_S(v)) of the forward KL: what
    ``loss.entry_clip`` caps (+inf where q has mass on a token the student masks)."""
    q = target_logp.exp()
    return torch.where(q > 0, q * (target_logp - student_logp), torch.full_like(q, -math.inf)).amax(-1)


# ---------------------------------------------------------------- chunk bodies

def chunk_target(z_s, z_t, work, aggregation, parameter: float | None, student_exps=None):
    """Student and target of one chunk in shifted bits, ``(s, log_zs, inv_zs, e_s, g, log_zg, e_g)``:
    log2 p_S = s - log_zs, p_S = e_s * inv_zs, log2 q = g - log_zg, q = e_g / 2^log_zg. Through the
    aggregation's fused form where it has one (as the fused chunk), else its reference. ``e_s`` is
    written into ``student_exps`` when given (the gradient's slice: the bodies scale it in place)."""
    rows = z_s.shape[0]
    s, e_s = work("s", rows), work("p_s", rows) if student_exps is None else student_exps
    log_zs, inv_zs = softmax_parts(z_s, s, e_s)
    t = e_t = log_zt = None
    if aggregation.fused is None or aggregation.needs_teacher_bits:
        t, e_t = work("t", rows), work("p_t", rows)
        log_zt, _ = softmax_parts(z_t, t, e_t)
    if aggregation.fused is not None:
        g = aggregation.fused(ChunkBits(s, log_zs, z_t, t, log_zt, lambda name: work(name, rows)),
                              work("target", rows), parameter)
        if g is t:
            return s, log_zs, inv_zs, e_s, t, log_zt, e_t
    else:
        target = aggregation.reference((t - log_zt) * LN2, (s - log_zs) * LN2, parameter)
        g = work("target", rows).copy_(target).mul_(LOG2E)
    e_g = work("p_target", rows)
    log_zg, _ = softmax_parts(g, g, e_g, unit=1.0)
    return s, log_zs, inv_zs, e_s, g, log_zg, e_g


def _monitored(z_t, s, log_zs, g, log_zg, eps: float) -> torch.Tensor:
    """The chunk's per-row monitored columns (chunks.MONITORED) over the full vocabulary."""
    student, target = (s - log_zs) * LN2, (g - log_zg) * LN2
    teacher = F.log_softmax(z_t.to(s.dtype), dim=-1)
    found = target_diagnostics(target, student, eps=eps)
    return torch.stack([kl_per_position(teacher, student), found.unconsidered_mass, found.max_log_ratio,
                        found.kl_target_student], -1)


def topk_chunk(z_s, z_t, work, grad_out, scale, *, aggregation, parameter, divergence_name, beta, top_k, topk_from,
               monitor, eps):
    """``(per-row divergence, monitored or None, scale * gradient)`` over the top-k + tail buckets.

    The buckets cost a top-k, two gathers and one pass per distribution zeroing the top-k entries
    and summing the rest (the tail's mass as a sum of what is left, not 1 minus the top-k's, which
    would cancel to 0 when the tail is small); the divergence itself runs on ``[rows, k + 1]``."""
    index = (z_t if topk_from == "teacher" else z_s).topk(min(top_k, z_s.shape[-1]), dim=-1).indices
    s, log_zs, _, e_s, g, log_zg, e_g = chunk_target(z_s, z_t, work, aggregation, parameter, grad_out)
    monitored = _monitored(z_t, s, log_zs, g, log_zg, eps) if monitor else None

    def buckets(bits, log_z, exps):
        top = bits.gather(-1, index).sub_(log_z)
        tail = exps.scatter_(-1, index, 0.0).sum(-1, keepdim=True)
        return torch.cat([top, tail.log2() - log_z], -1).mul_(LN2), tail

    student, student_tail = buckets(s, log_zs, e_s)
    target, _ = buckets(g, log_zg, e_g)
    value, bucket_grad = value_and_grad_fn(divergence_name, beta)(target, student)
    # d(bucket logit)/dz_v is 1 on a top-k entry and p_S(v) / p_S(tail) on a tail entry; an empty
    # tail (all its entries 0) takes no gradient.
    per_tail_unit = torch.where(student_tail > 0, bucket_grad[:, -1:] / student_tail, torch.zeros_like(student_tail))
    grad = e_s.mul_(per_tail_unit * scale).scatter_(-1, index, bucket_grad[:, :-1] * scale)
    return value, monitored, grad


def sampled_chunk(z_s, z_t, work, grad_out, scale, tokens, *, aggregation, parameter, monitor, eps):
    """``(per-row log p_S(g) - log q(g), monitored or None, scale * estimator gradient)``; the
    gradient is (log p_S(g) - log q(g)) (onehot(g) - p_S)."""
    s, log_zs, inv_zs, e_s, g, log_zg, _ = chunk_target(z_s, z_t, work, aggregation, parameter, grad_out)
    monitored = _monitored(z_t, s, log_zs, g, log_zg, eps) if monitor else None
    pick = tokens.unsqueeze(-1)
    estimate = (s.gather(-1, pick) - log_zs - g.gather(-1, pick) + log_zg).mul_(LN2)  # [rows, 1]
    weighted = estimate * scale
    grad = e_s.mul_(-weighted * inv_zs).scatter_add_(-1, pick, weighted)
    return estimate.squeeze(-1), monitored, grad
