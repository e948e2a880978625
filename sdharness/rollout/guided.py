"""Guided sampling: the student writes ``g`` token by token from the aggregate of two contexts.

At every step the student context (student prompt + ``g`` so far) and the teacher context
(teacher prompt + the same ``g``) each give next-token logits; the configured aggregation
(``aggregation.name`` at the value of its parameter, see :mod:`sdharness.distill.aggregation`)
combines them, temperature and top-p shape the result, one token is drawn and appended to *both* contexts.
Both contexts live in one batch of ``2B`` rows with one KV cache (student rows first), so each
step is one forward over ``2B`` new tokens. A separate teacher model (``teacher.weights=initial``
or ``ema``) gets its own forward and cache.

``rollout.guidance``: ``never`` (plain student sampling, the default), ``always`` (every rollout
is guided), ``on_failure`` (sample plainly; problems whose ``rollout.guidance_samples`` plain
samples all fail the answer check are resampled with guidance and the guided completion replaces
the first plain one; problems without an ``answer`` are never guided).

**A guided rollout is not strictly on-policy.** ``g`` is drawn from the aggregate ``q``, not from
the student ``p_S``, so the loss averages over a distribution the student would not produce by
itself: the student is taught on prefixes a teacher helped write. The closer the aggregate stays to
the student (``clip`` or ``product`` at large tau, ``trust_region`` at a small kl_bound), the smaller
the shift. With ``on_failure`` the distribution also depends on the answer check: rows of problems the student
solves stay plain on-policy samples, the rest come from ``q``.

``loss.is_clip`` (default 2.0, as TRL and SDPO; null turns it off) corrects the token-level shift:
the divergence at position ``i`` of a guided row (and its gradient) is multiplied by ``w_i =
min(p_S(g_i | g_<i) / q(g_i | g_<i), loss.is_clip)``, both probabilities taken at sampling time under the
same temperature and top-p (so plain rows have ``w = 1``). This is truncated per-token importance
sampling: it reweights each position by how likely the student itself was to write that token,
clipped from above to bound the variance; it does not correct for the prefix (the product of the
earlier ratios), so the estimate is still biased towards the guided prefixes. The loss stays a mean
over loss tokens: weights change how much each token counts, not the denominator.

``sdharness-generate`` (:mod:`sdharness.tools.generate`) samples with or without guidance from the
command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from sdharness.data.answers import Checker
from sdharness.distill.aggregation import aggregate
from sdharness.methods.accounting import guided_rollout_cost, rollout_cost
from sdharness.rollout.hf import Rollout, completion_mask, eos_token_ids



@dataclass
class GuidedRollout(Rollout):
    """A :class:`Rollout` plus what importance weighting needs, all ``[batch, new_tokens]``.

    ``sampling_logprobs``: log-probability of each token under the distribution it was drawn from
    (the tempered, top-p filtered aggregate); ``student_logprobs``: the same token under the
    student's own sampling distribution (student context, same temperature and top-p). Both are 0
    at padding and on plain rows. ``guided``: ``[batch]`` bool, which rows were guided.
    """

    sampling_logprobs: torch.Tensor
    student_logprobs: torch.Tensor
    guided: torch.Tensor


def shape_logprobs(logp: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Log-probabilities ``[..., vocab]`` after temperature, then top-p (nucleus) filtering.

    Top-p follows Hugging Face's ``TopPLogitsWarper``: the smallest set of most likely tokens whose
    mass reaches ``top_p`` is kept (at least one token), everything else gets probability 0.
    """
    logp = F.log_softmax(logp / temperature, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1)
        drop_sorted = sorted_logp.exp().cumsum(-1) <= 1 - top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logp = F.log_softmax(logp.masked_fill(drop, -math.inf), dim=-1)
    return logp


def sample_token(logp: torch.Tensor, *, greedy: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logp`` ``[batch, vocab]``: argmax, or a draw with ``generator``."""
    if greedy:
        return logp.argmax(-1)
    return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)


def _pad_left(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int):
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask
    return F.pad(ids, (extra, 0), value=pad_id), F.pad(mask, (extra, 0), value=0)


def _pad_right(tensor: torch.Tensor, length: int, value) -> torch.Tensor:
    return F.pad(tensor, (0, length - tensor.shape[1]), value=value)


class _TwoContexts:
    """Student and teacher rows ``[2B, ...]`` and their KV cache(s); ``step`` returns next-token logits."""

    def __init__(self, model, teacher_model, batch: int):
        self.model, self.teacher_model, self.batch = model, teacher_model, batch
        self.shared = teacher_model is None or teacher_model is model
        self.caches = [None, None]

    def _forward(self, index: int, model, ids, mask, positions):
        if self.caches[index] is None:
            self.caches[index] = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.caches[index],
                    use_cache=True, logits_to_keep=1)
        self.caches[index] = out.past_key_values
        return out.logits[:, -1]

    def step(self, ids, mask, positions) -> torch.Tensor:
        if self.shared:
            return self._forward(0, self.model, ids, mask, positions)
        b = self.batch
        return torch.cat([self._forward(0, self.model, ids[:b], mask[:b], positions[:b]),
                          self._forward(1, self.teacher_model, ids[b:], mask[b:], positions[b:])])


def next_token(logits: torch.Tensor, *, aggregation: str, parameter: float | None, temperature: float,
               top_p: float, greedy: bool, generator: torch.Generator | None):
    """From ``[2B, vocab]`` logits (student rows, then teacher rows): ``(tokens, sampling_logp, student_logp)``.

    The aggregate is the target of :func:`sdharness.distill.aggregation.aggregate`; with ``greedy`` the
    log-probabilities reported are the untempered, unfiltered ones.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    student, teacher = logits.chunk(2)
    target = aggregate(teacher, student, name=aggregation, parameter=parameter)
    student = F.log_softmax(student, dim=-1)
    if not greedy:
        target = shape_logprobs(target, temperature=temperature, top_p=top_p)
        student = shape_logprobs(student, temperature=temperature, top_p=top_p)
    tokens = sample_token(target, greedy=greedy, generator=generator)
    pick = tokens.unsqueeze(-1)
    return tokens, target.gather(-1, pick).squeeze(-1), student.gather(-1, pick).squeeze(-1)


def stack_contexts(student_ids, student_mask, teacher_ids, teacher_mask, pad_id: int):
    """Both prompt sets left-padded to one length and stacked: ``(ids, mask)`` ``[2B, length]``."""
    length = max(student_ids.shape[1], teacher_ids.shape[1])
    s_ids, s_mask = _pad_left(student_ids, student_mask, length, pad_id)
    t_ids, t_mask = _pad_left(teacher_ids, teacher_mask, length, pad_id)
    return torch.cat([s_ids, t_ids]), torch.cat([s_mask, t_mask]).long()


def finish_rollout(tokenizer, eos: list[int], tokens: list[torch.Tensor], sampling: list[torch.Tensor],
                   student: list[torch.Tensor]) -> GuidedRollout:
    """Stack per-step ``[B]`` tensors into a right-padded :class:`GuidedRollout`."""
    ids = torch.stack(tokens, dim=1)
    mask = completion_mask(ids, eos)
    ids = ids.masked_fill(~mask, tokenizer.pad_token_id)
    sampling_logp = torch.stack(sampling, dim=1).masked_fill(~mask, 0.0)
    student_logp = torch.stack(student, dim=1).masked_fill(~mask, 0.0)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    guided = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    return GuidedRollout(ids, mask, texts, sampling_logp, student_logp, guided)


def guided_generate(
    model,
    tokenizer,
    student_ids: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_mask: torch.Tensor,
    *,
    aggregation: str,
    parameter: float | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    teacher_model=None,
) -> GuidedRollout:
    """Sample one completion per problem from the aggregate of its student and teacher contexts.

    Prompts are left-padded ``[B, length]`` (the two sets may differ in length). Both contexts are
    prefilled as one ``[2B, L]`` batch, then each step forwards the ``2B`` new tokens through the
    KV cache, aggregates the two halves' logits, draws one token per problem (``torch.multinomial``
    with ``generator``; ``None`` uses torch's global generator) and appends it to both contexts.
    Rows stop at EOS and are padded from then on; generation ends when every row has stopped.
    ``teacher_model`` (default: ``model``) scores the teacher context; when it is another module
    the two halves run as two forwards with two caches. The model's train/eval mode is restored.
    """
    batch = student_ids.shape[0]
    eos = eos_token_ids(model, tokenizer)
    eos_tensor = torch.tensor(eos, device=student_ids.device)
    pad = tokenizer.pad_token_id
    ids, mask = stack_contexts(student_ids, student_mask, teacher_ids, teacher_mask, pad)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    models = [model] + ([teacher_model] if teacher_model is not None and teacher_model is not model else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    # Inference mode as in hf.generate (guidance is refused under sharded weights); the rollout is
    # assembled outside it, so its tensors are normal ones that a loss may save for backward.
    with torch.inference_mode():
        try:
            contexts = _TwoContexts(model, teacher_model, batch)
            logits = contexts.step(ids, mask, positions)
            done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
            tokens, sampling, student = [], [], []
            for step in range(max_new_tokens):
                token, sampling_logp, student_logp = next_token(
                    logits, aggregation=aggregation, parameter=parameter, temperature=temperature, top_p=top_p,
                    greedy=greedy, generator=generator)
                token = token.masked_fill(done, pad)
                tokens.append(token)
                sampling.append(sampling_logp)
                student.append(student_logp)
                done = done | torch.isin(token, eos_tensor)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, mask.new_ones(2 * batch, 1)], dim=1)
                positions = positions[:, -1:] + 1
                logits = contexts.step(torch.cat([token, token]).unsqueeze(-1), mask, positions)
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)
    return finish_rollout(tokenizer, eos, tokens, sampling, student)


def importance_weights(student_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor,
                       *, clip: float = 2.0) -> torch.Tensor:
    """Truncated importance weights ``min(exp(student - sampling), clip)`` ``[B, N]``, detached.

    Positions where ``mask`` is false get weight 1 (nothing to correct).
    """
    ratio = (student_logprobs.detach() - sampling_logprobs.detach()).exp().clamp(max=clip)
    return torch.where(mask.bool(), ratio, torch.ones_like(ratio))


def as_guided(rollout: Rollout) -> GuidedRollout:
    """A plain rollout as an unguided :class:`GuidedRollout` (log-probs 0: importance weight 1)."""
    zeros = torch.zeros(rollout.completion_ids.shape, device=rollout.completion_ids.device)
    return GuidedRollout(rollout.completion_ids, rollout.completion_mask, list(rollout.texts), zeros, zeros.clone(),
                         torch.zeros(len(rollout.texts), dtype=torch.bool, device=rollout.completion_ids.device))


def merge_rollouts(plain: Rollout, guided: GuidedRollout, rows: list[int], pad_id: int) -> GuidedRollout:
    """``plain`` with rows ``rows`` replaced by the rows of ``guided`` (in order), padded to one length."""
    base = as_guided(plain)
    length = max(base.completion_ids.shape[1], guided.completion_ids.shape[1])
    ids = _pad_right(base.completion_ids, length, pad_id)
    mask = _pad_right(base.completion_mask, length, False)
    sampling = _pad_right(base.sampling_logprobs, length, 0.0)
    student = _pad_right(base.student_logprobs, length, 0.0)
    index = torch.tensor(rows, dtype=torch.long, device=ids.device)
    ids[index] = _pad_right(guided.completion_ids, length, pad_id)
    mask[index] = _pad_right(guided.completion_mask, length, False)
    sampling[index] = _pad_right(guided.sampling_logprobs, length, 0.0).to(sampling.dtype)
    student[index] = _pad_right(guided.student_logprobs, length, 0.0).to(student.dtype)
    texts = list(base.texts)
    for row, text in zip(rows, guided.texts):
        texts[row] = text
    flags = base.guided.clone()
    flags[index] = True
    return GuidedRollout(ids, mask, texts, sampling, student, flags)


def answer_checks(texts: list[str], problems: list[dict], check: Checker) -> list[bool | None]:
    """Answer check per row (``check``: :func:`sdharness.data.answers.answer_checker`); None where
    the problem has no answer."""
    return [check(text, problem["answer"]) if problem.get("answer") else None
            for text, problem in zip(texts, problems)]


def sample_with_guidance(mode: str, size: int, *, plain_samples: int, sample_plain: Callable[[], Rollout],
                         guide: Callable[[list[int]], "GuidedRollout"], check: Callable[[list[str]], list],
                         pad_id: int) -> tuple["GuidedRollout", list[int], list[Rollout]]:
    """``(rollout, guided rows, plain rollouts drawn)`` under guidance ``always`` or ``on_failure``.

    ``on_failure`` draws ``plain_samples`` plain rollouts; rows whose answer check (``check``: None
    where there is no answer) fails in every one of them are sampled again from the aggregate
    (``guide(rows)``) and replace the first plain sample's rows. ``always`` guides every row.
    """
    if mode == "always":
        failed, plain = list(range(size)), []
    else:
        plain = [sample_plain() for _ in range(plain_samples)]
        checks = [check(rollout.texts) for rollout in plain]
        failed = [row for row in range(size) if checks[0][row] is not None and not any(c[row] for c in checks)]
    if not failed:
        return as_guided(plain[0]), failed, plain
    guided = guide(failed)
    return (merge_rollouts(plain[0], guided, failed, pad_id) if plain else guided), failed, plain


def guided_rollout(batch, sampling, aggregation, check: Checker, *, model, teacher_model, tokenizer,
                   sample_plain: Callable[[], Rollout]) -> tuple["GuidedRollout", dict[str, float], dict[str, int]]:
    """The self-distillation training rollout under ``rollout.guidance`` != ``never``.

    Returns the rollout, ``train/guided_fraction`` / ``train/guided_accuracy`` (the latter when a
    guided row has an answer), and the whole cost of sampling it (:meth:`Counters.add` keywords):
    the plain samples drawn (discarded ones included) and, for guided rows, the student and teacher
    contexts' prefill and their decoding.
    """

    def guide(rows: list[int]) -> GuidedRollout:
        index = torch.tensor(rows, dtype=torch.long, device=batch.student_ids.device)
        return guided_generate(
            model, tokenizer, batch.student_ids[index], batch.student_mask[index],
            batch.teacher_ids[index], batch.teacher_mask[index], aggregation=aggregation.name,
            parameter=aggregation.parameter, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, teacher_model=teacher_model)

    rollout, failed, plain = sample_with_guidance(
        sampling.guidance, len(batch), plain_samples=sampling.guidance_samples, sample_plain=sample_plain, guide=guide,
        check=lambda texts: answer_checks(texts, batch.problems, check), pad_id=tokenizer.pad_token_id)
    parts = [rollout_cost(batch.student_mask, drawn) for drawn in plain]
    if failed:
        index = torch.tensor(failed, dtype=torch.long, device=batch.student_ids.device)
        parts.append(guided_rollout_cost(batch.student_mask[index], batch.teacher_mask[index], rollout.lengths[index]))
    cost = {name: sum(part[name] for part in parts) for name in ("rollouts", "generated", "forward_only")}
    metrics = {"train/guided_fraction": len(failed) / len(batch)}
    guided_checks = [c for c in answer_checks([rollout.texts[r] for r in failed], [batch.problems[r] for r in failed],
                                              check) if c is not None]
    if guided_checks:
        metrics["train/guided_accuracy"] = sum(guided_checks) / len(guided_checks)
    return rollout, metrics, cost


def guided_token_weights(rollout: Rollout, mask: torch.Tensor, is_clip: float | None
                         ) -> tuple[torch.Tensor | None, dict]:
    """Per-token loss weights for the rows not sampled from the current student, clipped at
    ``loss.is_clip`` (None when it is null or every row is on-policy)."""
    if is_clip is None or not isinstance(rollout, GuidedRollout) or not bool(rollout.guided.any()):
        return None, {}
    weights = importance_weights(rollout.student_logprobs, rollout.sampling_logprobs, mask, clip=is_clip)
    guided_tokens = mask & rollout.guided.unsqueeze(-1)
    metrics = {}
    if bool(guided_tokens.any()):
        metrics["train/importance_weight"] = weights[guided_tokens].mean().item()
    return weights, metrics
