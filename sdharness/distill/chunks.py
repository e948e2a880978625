"""The chunk bodies of the chunked loss: one chunk of loss positions' divergence, monitored values and
gradient with respect to the student logits, in reused ``[rows, vocab]`` buffers.

:func:`fused_chunk` writes out, pass by pass, every aggregation with a fused form under forward or
reverse KL; :func:`generic_chunk` covers the rest through the references. The support variants
(:mod:`sdharness.distill.variants`) build on the same primitives.
"""

from __future__ import annotations

import math

import torch

from sdharness.distill.aggregation import LOG2E, ChunkBits
from sdharness.distill.diagnostics import target_diagnostics
from sdharness.distill.divergences import kl_per_position

# Per-row monitored values, the columns the chunk bodies return; summed over rows (and
# max_log_ratio also maxed).
MONITORED = ("teacher_student_kl", "unconsidered_mass", "max_log_ratio", "kl_target_student")


def shifted_log_ratio(diff: torch.Tensor) -> torch.Tensor:
    """In place, for the fused chunk's shifted differences a - b of log2-probabilities (row constants
    not yet applied): -BIG where a = 0, i.e. where it is -inf or NaN; +inf (a > 0 = b) stays. Then
    every product with a's probabilities is 0 there (0 * finite), and a row max never picks it."""
    big = torch.finfo(diff.dtype).max
    return diff.nan_to_num_(nan=-big, posinf=math.inf, neginf=-big)


class Workspace:
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


def softmax_parts(logits: torch.Tensor, shifted: torch.Tensor, exps: torch.Tensor, *, unit: float = LOG2E):
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


def rowdot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """sum_v a * b per row ``[rows, 1]``, through ``scratch`` (no temporary)."""
    return torch.mul(a, b, out=scratch).sum(-1, keepdim=True)


def fused_chunk(z_s, z_t, work: Workspace, grad_out, scale, *, aggregation, parameter, divergence_name, monitor,
                 eps=1e-3):
    """``(per-row divergence, per-row KL(teacher || student) or None, scale * gradient)`` of one
    chunk, for an :class:`~sdharness.distill.aggregation.Aggregation` with a fused form and the two KLs, with one exp pass per
    distribution (student, teacher, target) and no full-size temporary: about 20 passes over the
    chunk, most of them in place.

    ``z_s``/``z_t``: student/teacher logits ``[rows, vocab]`` (read only). ``grad_out``: where the
    gradient w.r.t. the student logits may be written (a slice of the full gradient), or None; the
    returned gradient is ``grad_out`` or a workspace buffer. ``scale``: a float or ``[rows, 1]``.
    Log-probabilities are kept in bits, shifted by a row constant (see :func:`softmax_parts`):
    every aggregation is invariant to per-row shifts and commutes with the change of unit, and
    the values are turned back into nats at the end. The teacher's softmax is computed only when
    the aggregation or the monitoring needs it. Monitoring (``eps``: the diagnostics' threshold)
    adds about 10 passes (forward KL; 13 for reverse KL) on the steps it runs; loss and gradient do
    not depend on it.
    """
    rows = z_s.shape[0]
    s, e_s = work("s", rows), grad_out if grad_out is not None else work("p_s", rows)
    log_zs, inv_zs = softmax_parts(z_s, s, e_s)  # log2 p_S = s - log_zs, p_S = e_s * inv_zs
    scratch = work("scratch", rows)
    t = log_zt = None
    if monitor or aggregation.needs_teacher_bits:
        t, e_t = work("t", rows), work("p_t", rows)
        log_zt, inv_zt = softmax_parts(z_t, t, e_t)
    g = aggregation.fused(ChunkBits(s, log_zs, z_t, t, log_zt, lambda name: work(name, rows)), work("target", rows),
                          parameter)
    if g is t:
        e_g, log_zg, inv_zg = e_t, log_zt, inv_zt
    else:
        e_g = work("p_target", rows)
        log_zg, inv_zg = softmax_parts(g, g, e_g, unit=1.0)
    # log2 p_target - log2 p_S = (g - s) - (log_zg - log_zs); the row constant is applied to the
    # reductions, and the differences are made finite where the first distribution is 0 (see
    # shifted_log_ratio), one pass each.
    diff = None  # g - s, -BIG where p_target = 0
    if divergence_name == "forward_kl":  # sum p_target (log p_target - log p_S); gradient p_S - p_target
        diff = shifted_log_ratio(torch.sub(g, s, out=work("diff", rows)))
        value = rowdot(diff, e_g, scratch).mul_(inv_zg).sub_(log_zg - log_zs)
        grad = e_s.mul_(inv_zs * scale).addcmul_(e_g, inv_zg * -scale)
    else:  # sum p_S (log p_S - log p_target); gradient p_S (log p_S - log p_target - KL)
        log_ratio = shifted_log_ratio(torch.sub(s, g, out=work("log_ratio", rows)))
        value = rowdot(log_ratio, e_s, scratch).mul_(inv_zs).sub_(log_zs - log_zg)
        grad = e_s.mul_(log_ratio.sub_(log_zs - log_zg + value)).mul_(inv_zs * (LN2 * scale))
    monitored = None
    if monitor:
        if diff is None:
            diff = shifted_log_ratio(torch.sub(g, s, out=work("diff", rows)))
            kl_target = rowdot(diff, e_g, scratch).mul_(inv_zg).sub_(log_zg - log_zs)
        else:
            kl_target = value
        # KL(T || S); for the teacher target it is KL(target || S)
        kl = kl_target if g is t else rowdot(shifted_log_ratio(torch.sub(t, s, out=scratch)), e_t,
                                              scratch).mul_(inv_zt).sub_(log_zt - log_zs)
        # p_S < eps  <=>  s < log_zs + log2 eps, as a float 0/1 mask (a bool one was ~5x slower on CPU)
        unconsidered = rowdot(torch.lt(s, log_zs + math.log2(eps), out=scratch), e_g, scratch).mul_(inv_zg * LOG2E)
        top = diff.amax(-1, keepdim=True).sub_(log_zg - log_zs)  # -BIG entries (p_target = 0) never win
        monitored = torch.cat([kl, unconsidered, top, kl_target], -1) * LN2
    return value.squeeze(-1) * LN2, monitored, grad


def generic_chunk(z_s, z_t, work: Workspace, grad_out, scale, *, target_fn, value_and_grad, monitor, eps=1e-3):
    """As :func:`fused_chunk` for any aggregation and divergence, through the aggregation's reference
    and :func:`~sdharness.distill.divergences.value_and_grad_fn` on explicit log-probabilities (nats);
    the diagnostics are :func:`~sdharness.distill.diagnostics.target_diagnostics` itself."""
    rows = z_s.shape[0]
    s, t, e_t, scratch = work("s", rows), work("t", rows), work("p_t", rows), work("scratch", rows)
    log_zs, _ = softmax_parts(z_s, s, scratch)
    s.sub_(log_zs).mul_(LN2)
    log_zt, inv_zt = softmax_parts(z_t, t, e_t)
    t.sub_(log_zt).mul_(LN2)
    target = target_fn(t, s)
    value, grad = value_and_grad(target, s)
    monitored = None
    if monitor:
        found = target_diagnostics(target, s, eps=eps)
        monitored = torch.stack([kl_per_position(t, s), found.unconsidered_mass, found.max_log_ratio, found.kl_target_student], -1)
    return value, monitored, grad.mul_(scale)
