"""Full-vocabulary divergences and the chunked, masked self-distillation loss.

Divergences take log-probabilities ``[..., vocab]`` and return one value per position ``[...]``:

* ``forward_kl``: KL(target || student) = sum_v p_target (log p_target - log p_S)
* ``reverse_kl``: KL(student || target) = sum_v p_S (log p_S - log p_target)
* ``jsd``:        beta KL(target || M) + (1 - beta) KL(student || M),  M = beta p_target + (1 - beta) p_S

:func:`distillation_loss` evaluates aggregation and divergence over chunks of loss-carrying
positions and computes the gradient with respect to the student logits chunk by chunk, so the
only full ``[batch, length, vocab]`` tensors alive are the student logits and their gradient; the
teacher can be passed as hidden states and is projected to the vocabulary chunk by chunk. On the
steps it monitors, it also returns how far the target leaves the student
(:mod:`sdharness.distill.diagnostics`), from the tensors each chunk already holds.

``-inf`` logits (masked vocabulary entries) are probability 0 on every path: 0 log 0 = 0. A
divergence that is infinite by definition stays infinite (forward KL from the ``teacher`` target to
a student that gives 0 to a token the teacher supports; reverse KL to a target that drops a token
the student supports); the training step then skips the update.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sdharness.distill.aggregation import LOG2E, ChunkBits, aggregation_named
from sdharness.distill.diagnostics import target_diagnostics
from sdharness.distill.logits import LazyLogits

def kl_per_position(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position; terms with p = 0 count as 0, in the gradient too."""
    p = p_logp.exp()
    # The difference is masked before the product: p * NaN (-inf - -inf) would make a NaN gradient.
    return (p * torch.where(p > 0, p_logp - q_logp, torch.zeros_like(p))).sum(-1)


def _shifted_log_ratio(diff: torch.Tensor) -> torch.Tensor:
    """In place, for the fused chunk's shifted differences a - b of log2-probabilities (row constants
    not yet applied): -BIG where a = 0, i.e. where it is -inf or NaN; +inf (a > 0 = b) stays. Then
    every product with a's probabilities is 0 there (0 * finite), and a row max never picks it."""
    big = torch.finfo(diff.dtype).max
    return diff.nan_to_num_(nan=-big, posinf=math.inf, neginf=-big)


def _log_ratio_where_supported(log_ratio: torch.Tensor) -> torch.Tensor:
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


@dataclass(frozen=True)
class DistillationLoss:
    """Result of :func:`distillation_loss`.

    ``loss``: scalar (float32 for half-precision logits), the token mean of the divergence;
    differentiable w.r.t. the student logits only.
    ``teacher_student_kl``: token mean of KL(teacher || student), detached, for monitoring; None
    when it was not asked for (``monitor_kl=False``).
    ``tokens``: number of positions that carried loss.
    ``diagnostics``: None unless monitored; else, over the loss positions (unweighted), the token
    means of :func:`~sdharness.distill.diagnostics.target_diagnostics`' ``unconsidered_mass`` and
    ``kl_target_student``, and the mean and max over positions of its ``max_log_ratio``
    (``max_log_ratio_mean``, ``max_log_ratio_max``): ``{name: detached scalar}``, names in
    :data:`DIAGNOSTIC_METRICS`.
    """

    loss: torch.Tensor
    teacher_student_kl: torch.Tensor | None
    tokens: int
    diagnostics: dict | None = None


# Per-row monitored values, the columns the chunk bodies return; summed over rows (and
# max_log_ratio also maxed).
MONITORED = ("teacher_student_kl", "unconsidered_mass", "max_log_ratio", "kl_target_student")
DIAGNOSTIC_METRICS = ("unconsidered_mass", "kl_target_student", "max_log_ratio_mean", "max_log_ratio_max")


def forward_kl_with_grad(target_logp: torch.Tensor, student_logp: torch.Tensor):
    """KL(target || student) per row and its gradient w.r.t. the student logits, p_S - p_target."""
    target_p = target_logp.exp()
    value = (target_p * _log_ratio_where_supported(target_logp - student_logp)).sum(-1)
    return value, student_logp.exp().sub_(target_p)


def reverse_kl_with_grad(target_logp: torch.Tensor, student_logp: torch.Tensor):
    """KL(student || target) per row and its gradient p_S * (log p_S - log p_target - KL)."""
    student_p = student_logp.exp()
    log_ratio = _log_ratio_where_supported(student_logp - target_logp)
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
    ``fused``: written out pass by pass in the chunk body (:func:`_fused_chunk`)."""

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


# ---------------------------------------------------------------- the chunk body

class _Workspace:
    """``[rows, vocab]`` buffers reused by every chunk of one loss call.

    On CPU a fresh multi-megabyte temporary per elementwise op pays its page faults every time
    (an out-of-place add over a [32, 49152] chunk took ~3x an add into an existing buffer);
    with buffers, each pass over the chunk is one read-modify-write of cache-resident memory.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (rows, vocab), dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, rows: int) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return buffer[:rows]


LN2 = math.log(2.0)


def _softmax_parts(logits: torch.Tensor, shifted: torch.Tensor, exps: torch.Tensor, *, unit: float = LOG2E):
    """``shifted`` <- (logits - row max) * unit, ``exps`` <- 2 ** shifted; returns ``(log2 Z, 1 / Z)``
    ``[rows, 1]`` of the row sums Z of ``exps``.

    With the default unit, ``shifted`` holds the logits in bits (base 2) and ``exps`` the softmax
    up to 1 / Z: log2-probabilities are ``shifted - log2 Z`` and probabilities ``exps / Z``. They are
    never written out; the row constants are folded into the reductions and the gradient instead.
    ``torch.exp2`` is about twice as fast as ``torch.exp`` on CPU (AVX2) and the exp pass is the
    most expensive one here. ``unit=1`` takes ``logits`` already in bits; ``logits`` may be
    ``shifted`` itself (in place) and may have another dtype.
    """
    top = logits.amax(-1, keepdim=True)
    if logits.dtype == shifted.dtype:
        torch.add(top.mul_(-unit), logits, alpha=unit, out=shifted)
    else:
        shifted.copy_(logits)
        shifted.sub_(top.to(shifted.dtype)).mul_(unit)
    total = torch.exp2(shifted, out=exps).sum(-1, keepdim=True)
    return total.log2(), total.reciprocal()


def _rowdot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """sum_v a * b per row ``[rows, 1]``, through ``scratch`` (no temporary)."""
    return torch.mul(a, b, out=scratch).sum(-1, keepdim=True)


def _fused_chunk(z_s, z_t, work: _Workspace, grad_out, scale, *, aggregation, tau, divergence_name, monitor,
                 eps=1e-3):
    """``(per-row divergence, per-row KL(teacher || student) or None, scale * gradient)`` of one
    chunk, for an :class:`~sdharness.distill.aggregation.Aggregation` with a fused form and the two KLs, with one exp pass per
    distribution (student, teacher, target) and no full-size temporary: about 20 passes over the
    chunk, most of them in place.

    ``z_s``/``z_t``: student/teacher logits ``[rows, vocab]`` (read only). ``grad_out``: where the
    gradient w.r.t. the student logits may be written (a slice of the full gradient), or None; the
    returned gradient is ``grad_out`` or a workspace buffer. ``scale``: a float or ``[rows, 1]``.
    Log-probabilities are kept in bits, shifted by a row constant (see :func:`_softmax_parts`):
    every aggregation is invariant to per-row shifts and commutes with the change of unit, and
    the values are turned back into nats at the end. The teacher's softmax is computed only when
    the aggregation or the monitoring needs it. Monitoring (``eps``: the diagnostics' threshold)
    adds about 10 passes (forward KL; 13 for reverse KL) on the steps it runs; loss and gradient do
    not depend on it.
    """
    rows = z_s.shape[0]
    s, e_s = work("s", rows), grad_out if grad_out is not None else work("p_s", rows)
    log_zs, inv_zs = _softmax_parts(z_s, s, e_s)  # log2 p_S = s - log_zs, p_S = e_s * inv_zs
    scratch = work("scratch", rows)
    t = log_zt = None
    if monitor or aggregation.needs_teacher_bits:
        t, e_t = work("t", rows), work("p_t", rows)
        log_zt, inv_zt = _softmax_parts(z_t, t, e_t)
    g = aggregation.fused(ChunkBits(s, log_zs, z_t, t, log_zt, lambda name: work(name, rows)), work("target", rows),
                          tau)
    if g is t:
        e_g, log_zg, inv_zg = e_t, log_zt, inv_zt
    else:
        e_g = work("p_target", rows)
        log_zg, inv_zg = _softmax_parts(g, g, e_g, unit=1.0)
    # log2 p_target - log2 p_S = (g - s) - (log_zg - log_zs); the row constant is applied to the
    # reductions, and the differences are made finite where the first distribution is 0 (see
    # _shifted_log_ratio), one pass each.
    diff = None  # g - s, -BIG where p_target = 0
    if divergence_name == "forward_kl":  # sum p_target (log p_target - log p_S); gradient p_S - p_target
        diff = _shifted_log_ratio(torch.sub(g, s, out=work("diff", rows)))
        value = _rowdot(diff, e_g, scratch).mul_(inv_zg).sub_(log_zg - log_zs)
        grad = e_s.mul_(inv_zs * scale).addcmul_(e_g, inv_zg * -scale)
    else:  # sum p_S (log p_S - log p_target); gradient p_S (log p_S - log p_target - KL)
        log_ratio = _shifted_log_ratio(torch.sub(s, g, out=work("log_ratio", rows)))
        value = _rowdot(log_ratio, e_s, scratch).mul_(inv_zs).sub_(log_zs - log_zg)
        grad = e_s.mul_(log_ratio.sub_(log_zs - log_zg + value)).mul_(inv_zs * (LN2 * scale))
    monitored = None
    if monitor:
        if diff is None:
            diff = _shifted_log_ratio(torch.sub(g, s, out=work("diff", rows)))
            kl_target = _rowdot(diff, e_g, scratch).mul_(inv_zg).sub_(log_zg - log_zs)
        else:
            kl_target = value
        # KL(T || S); for the teacher target it is KL(target || S)
        kl = kl_target if g is t else _rowdot(_shifted_log_ratio(torch.sub(t, s, out=scratch)), e_t,
                                              scratch).mul_(inv_zt).sub_(log_zt - log_zs)
        # p_S < eps  <=>  s < log_zs + log2 eps, as a float 0/1 mask (a bool one was ~5x slower on CPU)
        unconsidered = _rowdot(torch.lt(s, log_zs + math.log2(eps), out=scratch), e_g, scratch).mul_(inv_zg * LOG2E)
        top = diff.amax(-1, keepdim=True).sub_(log_zg - log_zs)  # -BIG entries (p_target = 0) never win
        monitored = torch.cat([kl, unconsidered, top, kl_target], -1) * LN2
    return value.squeeze(-1) * LN2, monitored, grad


def _generic_chunk(z_s, z_t, work: _Workspace, grad_out, scale, *, target_fn, value_and_grad, monitor, eps=1e-3):
    """As :func:`_fused_chunk` for any aggregation and divergence, through the aggregation's reference
    and :func:`value_and_grad_fn` on explicit log-probabilities (nats); the diagnostics are
    :func:`~sdharness.distill.diagnostics.target_diagnostics` itself."""
    rows = z_s.shape[0]
    s, t, e_t, scratch = work("s", rows), work("t", rows), work("p_t", rows), work("scratch", rows)
    log_zs, _ = _softmax_parts(z_s, s, scratch)
    s.sub_(log_zs).mul_(LN2)
    log_zt, inv_zt = _softmax_parts(z_t, t, e_t)
    t.sub_(log_zt).mul_(LN2)
    target = target_fn(t, s)
    value, grad = value_and_grad(target, s)
    monitored = None
    if monitor:
        found = target_diagnostics(target, s, eps=eps)
        monitored = torch.stack([kl_per_position(t, s), found.unconsidered_mass, found.max_log_ratio, found.kl_target_student], -1)
    return value, monitored, grad.mul_(scale)


# The teacher's LM head projects this many positions at once (rounded to whole chunks): a GEMM
# over 32 rows re-reads the whole [vocab, hidden] head each time; 128 rows ran ~1.5x faster on CPU.
TEACHER_BLOCK_ROWS = 128


def _block_rows(chunk_size: int) -> int:
    return chunk_size * max(1, TEACHER_BLOCK_ROWS // chunk_size)


def _index(positions: torch.Tensor, host: list[int], start: int, stop: int):
    """Positions ``start:stop`` as a ``slice`` of flattened rows where they are consecutive (a view,
    no gather), else as the index tensor itself."""
    first, last = host[start], host[stop - 1]
    return slice(first, last + 1) if last - first + 1 == stop - start else positions[start:stop]


def _blocks(positions: torch.Tensor, chunk_size: int):
    """``(teacher index, [(student index, rows in the teacher block, start), ...])`` per block of
    whole chunks; ``start`` is the chunk's offset in ``positions``."""
    host = positions.tolist()
    block = _block_rows(chunk_size)
    for block_start in range(0, len(host), block):
        block_stop = min(block_start + block, len(host))
        chunks = [(_index(positions, host, start, min(start + chunk_size, block_stop)),
                   slice(start - block_start, min(start + chunk_size, block_stop) - block_start), start)
                  for start in range(block_start, block_stop, chunk_size)]
        yield _index(positions, host, block_start, block_stop), chunks


class _ChunkedDistillation(torch.autograd.Function):
    """Loss and student-logit gradient computed together, chunk by chunk (Liger-style).

    Autograd through a chunked loop would keep every chunk's softmax alive for backward, i.e.
    another full [positions, vocab] copy; computing each chunk's gradient immediately avoids that.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_rows, positions, uncovered, weight, chunk_size, body, row_weights,
                monitor):
        flat_student = student_logits.detach().reshape(-1, student_logits.shape[-1])
        # Half-precision logits are evaluated in float32; float64 stays float64.
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.empty_like(flat_student)  # every row is written: a loss row below, the rest zeroed
            if uncovered.numel():
                grad.index_fill_(0, uncovered, 0.0)
        loss = flat_student.new_zeros((), dtype=dtype)
        # MONITORED summed over rows, then the max over rows of max_log_ratio
        monitored = flat_student.new_zeros(len(MONITORED) + 1, dtype=dtype)
        monitored[-1] = -math.inf
        work = _Workspace(min(chunk_size, positions.numel()), flat_student.shape[-1], dtype, flat_student.device)
        with torch.no_grad():
            for block_rows, chunks in _blocks(positions, chunk_size):
                teacher_block = teacher_rows(block_rows)
                for rows, in_block, start in chunks:
                    consecutive = isinstance(rows, slice)
                    if consecutive:
                        z_s = flat_student[rows]
                    elif flat_student.dtype == dtype:
                        z_s = torch.index_select(flat_student, 0, rows, out=work("z_s", rows.numel()))
                    else:
                        z_s = flat_student[rows]
                    # The gradient goes straight into the full gradient where its rows are a same-dtype view.
                    grad_out = grad[rows] if grad is not None and consecutive and grad.dtype == dtype else None
                    # Each row's value and gradient carry 1 / tokens and its per-token weight, if any.
                    scale = weight if row_weights is None else \
                        row_weights[start : start + chunk_size].to(dtype) * weight
                    value, chunk_monitored, chunk_grad = body(z_s, teacher_block[in_block], work, grad_out,
                                                       scale if row_weights is None else scale.unsqueeze(-1),
                                                       slice(start, start + z_s.shape[0]))
                    if grad is not None and chunk_grad is not grad_out:
                        if consecutive:
                            grad[rows] = chunk_grad
                        else:
                            grad.index_copy_(0, rows, chunk_grad.to(grad.dtype))
                    del chunk_grad
                    loss += (value * scale).sum()
                    if chunk_monitored is not None:
                        monitored[:-1] += chunk_monitored.sum(0) * weight
                        monitored[-1] = torch.maximum(monitored[-1], chunk_monitored[:, 2].max())
                del teacher_block
        ctx.save_for_backward(grad.view_as(student_logits) if grad is not None else None)
        ctx.mark_non_differentiable(monitored)
        return loss, monitored

    @staticmethod
    def backward(ctx, grad_loss, grad_monitored):
        (grad,) = ctx.saved_tensors
        # In place: the saved gradient is used once, and a copy would be another [batch, length, vocab].
        # The usual upstream gradient is exactly 1 (loss.backward()): then this pass is skipped.
        if grad is not None and not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
            grad = grad.mul_(grad_loss.to(grad.dtype))
        # The target is detached by definition, so the teacher logits never get a gradient.
        return grad, None, None, None, None, None, None, None, None


def _chunk_body(chosen, measure, *, tau, divergence_name, beta, monitor, eps, support, top_k, topk_from,
                sampled_tokens, entry_clip):
    """``body(z_s, z_t, work, grad_out, scale, at)`` for one chunk; ``at``: the chunk's slice of the
    loss positions. The fused body covers every aggregation with a fused form under a fused
    divergence; the rest go through the aggregation's reference and the divergence's value and
    gradient; the supports and entry clipping of :mod:`sdharness.distill.variants` have their own."""
    # Imported here: the variants are built on this module's chunk primitives.
    from sdharness.distill import variants

    if support == "topk":
        return lambda z_s, z_t, work, grad_out, scale, at: variants.topk_chunk(
            z_s, z_t, work, grad_out, scale, aggregation=chosen, tau=tau, divergence_name=divergence_name, beta=beta,
            top_k=top_k, topk_from=topk_from, monitor=monitor, eps=eps)
    if support == "sampled":
        return lambda z_s, z_t, work, grad_out, scale, at: variants.sampled_chunk(
            z_s, z_t, work, grad_out, scale, sampled_tokens[at], aggregation=chosen, tau=tau, monitor=monitor, eps=eps)
    if chosen.fused is not None and measure.fused and entry_clip is None:
        return lambda z_s, z_t, work, grad_out, scale, at: _fused_chunk(
            z_s, z_t, work, grad_out, scale, aggregation=chosen, tau=tau, divergence_name=divergence_name,
            monitor=monitor, eps=eps)
    value_and_grad = value_and_grad_fn(divergence_name, beta) if entry_clip is None else \
        functools.partial(variants.entry_clipped_forward_kl_with_grad, clip=entry_clip)

    def target_fn(teacher_logp, student_logp):
        return chosen.target(teacher_logp, student_logp, tau=tau)

    return lambda z_s, z_t, work, grad_out, scale, at: _generic_chunk(
        z_s, z_t, work, grad_out, scale, target_fn=target_fn, value_and_grad=value_and_grad, monitor=monitor, eps=eps)


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
    monitor_kl: bool = True,
    unconsidered_eps: float = 1e-3,
    support: str = "full",
    top_k: int = 100,
    topk_from: str = "teacher",
    sampled_tokens: torch.Tensor | None = None,
    entry_clip: float | None = None,
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
        monitor_kl: also compute the monitoring KL(teacher || student) (``teacher_student_kl``)
            and the target's ``diagnostics`` (both None when False). Loss and gradient are the same
            either way; skipping them saves up to one exp pass and about 10 other passes per chunk.
        unconsidered_eps: the diagnostics' eps: target mass on tokens with p_S < eps.
        support: ``full`` (the whole vocabulary), ``topk`` (``top_k`` buckets of the ``topk_from``
            side's logits plus a tail) or ``sampled`` (the estimator on ``sampled_tokens``
            ``[batch, length]``, reverse KL only); see :mod:`sdharness.distill.variants`.
        entry_clip: cap in nats on each vocabulary entry's forward-KL term (full support only), or None.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if loss_mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the logits' shape without the vocabulary, "
                         f"{tuple(student_logits.shape[:-1])}")
    chosen = aggregation_named(aggregation)
    measure = divergence_named(divergence_name)
    from sdharness.distill.variants import check_variant  # the variants build on this module's chunk primitives

    check_variant(support, divergence_name, top_k, topk_from, sampled_tokens, entry_clip, loss_mask.shape)
    if token_weights is not None and token_weights.shape != loss_mask.shape:
        raise ValueError(f"token_weights {tuple(token_weights.shape)} must have loss_mask's shape "
                         f"{tuple(loss_mask.shape)}")
    flat_mask = loss_mask.reshape(-1).bool()
    positions = flat_mask.nonzero().squeeze(-1)
    tokens = positions.numel()
    if tokens == 0:
        zero = student_logits.sum() * 0.0
        if not monitor_kl:
            return DistillationLoss(zero, None, 0)
        return DistillationLoss(zero, zero.detach(), 0, {name: zero.detach() for name in DIAGNOSTIC_METRICS})

    body = _chunk_body(chosen, measure, tau=tau, divergence_name=divergence_name, beta=beta,
                       monitor=monitor_kl, eps=unconsidered_eps, support=support, top_k=top_k, topk_from=topk_from,
                       sampled_tokens=None if sampled_tokens is None else sampled_tokens.reshape(-1)[positions],
                       entry_clip=entry_clip)

    if isinstance(teacher_logits, LazyLogits):
        buffer = teacher_logits.hidden.new_empty(min(_block_rows(chunk_size), tokens), teacher_logits.shape[-1])

        def teacher_rows(rows):  # every block is projected into the same buffer
            count = rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
            return teacher_logits.rows(rows, out=buffer[:count])
    else:  # read only: the chunk body never writes into the teacher's rows
        teacher_rows = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).__getitem__
    loss, monitored = _ChunkedDistillation.apply(
        student_logits, teacher_rows, positions, (~flat_mask).nonzero().squeeze(-1), 1.0 / tokens, chunk_size,
        body, None if token_weights is None else token_weights.detach().reshape(-1)[positions], monitor_kl,
    )
    if not monitor_kl:
        return DistillationLoss(loss, None, tokens)
    diagnostics = dict(zip(DIAGNOSTIC_METRICS, (monitored[1], monitored[3], monitored[2], monitored[4])))
    return DistillationLoss(loss, monitored[0], tokens, diagnostics)


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
