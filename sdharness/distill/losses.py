"""The chunked, masked self-distillation loss.

:func:`distillation_loss` evaluates aggregation and divergence (:mod:`sdharness.distill.divergences`)
over chunks of loss-carrying positions and computes the gradient with respect to the student logits
chunk by chunk (:mod:`sdharness.distill.chunks`), so the only full ``[batch, length, vocab]`` tensors
alive are the student logits and their gradient; the teacher can be passed as hidden states and is
projected to the vocabulary chunk by chunk. On the steps it monitors, it also returns how far the
target leaves the student (:mod:`sdharness.distill.diagnostics`), from the tensors each chunk
already holds. A divergence that is infinite by definition stays infinite; the training step then
skips the update.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from sdharness.distill import variants
from sdharness.distill.aggregation import aggregation_named
from sdharness.distill.chunks import MONITORED, Workspace, fused_chunk, generic_chunk
from sdharness.distill.divergences import divergence_named, value_and_grad_fn
from sdharness.distill.logits import LazyLogits


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


DIAGNOSTIC_METRICS = ("unconsidered_mass", "kl_target_student", "max_log_ratio_mean", "max_log_ratio_max")


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
        work = Workspace(min(chunk_size, positions.numel()), flat_student.shape[-1], dtype, flat_student.device)
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


def _chunk_body(chosen, measure, *, parameter, divergence_name, beta, monitor, eps, support, top_k, topk_from,
                sampled_tokens, entry_clip):
    """``body(z_s, z_t, work, grad_out, scale, at)`` for one chunk; ``at``: the chunk's slice of the
    loss positions. The fused body covers every aggregation with a fused form under a fused
    divergence; the rest go through the aggregation's reference and the divergence's value and
    gradient; the supports and entry clipping of :mod:`sdharness.distill.variants` have their own."""
    if support == "topk":
        return lambda z_s, z_t, work, grad_out, scale, at: variants.topk_chunk(
            z_s, z_t, work, grad_out, scale, aggregation=chosen, parameter=parameter, divergence_name=divergence_name,
            beta=beta, top_k=top_k, topk_from=topk_from, monitor=monitor, eps=eps)
    if support == "sampled":
        return lambda z_s, z_t, work, grad_out, scale, at: variants.sampled_chunk(
            z_s, z_t, work, grad_out, scale, sampled_tokens[at], aggregation=chosen, parameter=parameter,
            monitor=monitor, eps=eps)
    if chosen.fused is not None and measure.fused and entry_clip is None:
        return lambda z_s, z_t, work, grad_out, scale, at: fused_chunk(
            z_s, z_t, work, grad_out, scale, aggregation=chosen, parameter=parameter, divergence_name=divergence_name,
            monitor=monitor, eps=eps)
    value_and_grad = value_and_grad_fn(divergence_name, beta) if entry_clip is None else \
        functools.partial(variants.entry_clipped_forward_kl_with_grad, clip=entry_clip)

    def target_fn(teacher_logp, student_logp):
        return chosen.reference(teacher_logp, student_logp, parameter)

    return lambda z_s, z_t, work, grad_out, scale, at: generic_chunk(
        z_s, z_t, work, grad_out, scale, target_fn=target_fn, value_and_grad=value_and_grad, monitor=monitor, eps=eps)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | LazyLogits,
    loss_mask: torch.Tensor,
    *,
    aggregation: str,
    parameter: float | None,
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
        aggregation, parameter: the target's aggregation by name and the value of its parameter
            (:class:`~sdharness.distill.aggregation.Parameter`: ``tau`` or ``kl_bound``; ignored where it has none).
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
    variants.check_variant(support, divergence_name, top_k, topk_from, sampled_tokens, entry_clip, loss_mask.shape)
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

    body = _chunk_body(chosen, measure, parameter=parameter, divergence_name=divergence_name, beta=beta,
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
