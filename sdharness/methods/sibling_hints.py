"""Online sibling hints, ``algo.hint_source=sibling`` under ``algo=sd``: the teacher's reference is a
sibling's completion whose answer checks, not a worked solution from the data (SDPO's reprompting).

Each problem gets ``algo.group_size`` completions from the student prompt, checked by the run's
answer checker (``data.checker``). Completion ``j`` of a group is scored by the teacher prompt with
``{solution}`` filled by the text of the first successful completion ``k != j`` of its group
(:func:`sibling_hints`; the text trimmed after its answer line, as ``sdharness-bootstrap`` trims a kept
trace), then distilled exactly as plain SD distils a completion under its reference
(:func:`~sdharness.methods.self_distill.score_and_distil`), on the rows that have a hint only:

* a group with no success gives no row a hint: its problem contributes no loss and is counted in
  ``train/problems_without_success`` (a cumulative counter, :class:`~sdharness.methods.accounting.Counters`);
* the only success of a group gets no hint either: its own text as the teacher's reference would make
  the teacher copy it, a target that only says "say it again" (SDPO's don't-reprompt-on-self-success);
* a step where no row has a hint is a skipped update (``train/loss_tokens`` 0), as any step with
  nothing to learn from.

Cost: every sampled token is counted once (the rollout), the problems once each, and the teacher and
student scoring passes for the rows scored.
"""

from __future__ import annotations

import torch

from sdharness.config import ConfigError, PromptConfig
from sdharness.data.datamodule import PromptBatch
from sdharness.data.prompts import encode_prompts, render_teacher
from sdharness.data.answers import answer_checker
from sdharness.distill.positions import loss_positions
from sdharness.rollout.hf import Rollout
from sdharness.tools.bootstrap import trim_solution


def sibling_hints(successes: list[bool], group_size: int) -> list[int | None]:
    """For each row of consecutive groups of ``group_size`` rows, the index of its hint: the first row
    of its group other than itself whose answer checked; None where there is none."""
    hints: list[int | None] = []
    for row in range(len(successes)):
        start = row - row % group_size
        hints.append(next((other for other in range(start, start + group_size)
                           if other != row and successes[other]), None))
    return hints


def problems_without_success(successes: list[bool], group_size: int) -> int:
    """Groups of ``group_size`` consecutive rows none of whose answers checked."""
    return sum(not any(successes[start:start + group_size]) for start in range(0, len(successes), group_size))


def sibling_teacher_prompts(prompt: PromptConfig, tokenizer, problems: list[str], texts: list[str],
                            hint_of: dict[int, int], answer_marker: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded teacher prompts ``(ids, mask)``, one per key ``row`` of ``hint_of`` in its order: the row's
    problem with the text of row ``hint_of[row]`` as its reference, trimmed after its answer line as
    ``sdharness-bootstrap`` trims a kept trace, so that both answer-only routes give the teacher the same
    kind of reference."""
    references = {row: trim_solution(texts[hint], answer_marker) for row, hint in hint_of.items()}
    return encode_prompts(prompt, tokenizer, [render_teacher(prompt, problems[row], reference)
                                              for row, reference in references.items()])


def check_fits_context(teacher_mask: torch.Tensor, g_mask: torch.Tensor, max_context: int) -> None:
    """A sibling's text lengthens the teacher prompt by up to ``rollout.max_new_tokens``, which the data's
    context check (made with the student prompt) does not see; a longer input would be scored at positions
    the model never learnt."""
    longest = int((teacher_mask.sum(-1) + g_mask.sum(-1)).max())
    if longest > max_context:
        raise ConfigError(f"algo.hint_source=sibling: a teacher prompt holding a sibling's completion, plus the "
                          f"completion it scores, takes {longest} tokens, more than the model context of "
                          f"{max_context}; lower rollout.max_new_tokens or shorten prompt.teacher")


class SiblingHintLosses:
    """``sibling_losses(batch)`` for :class:`~sdharness.methods.self_distill.SelfDistillModule`."""

    def sibling_losses(self, batch: PromptBatch):
        # Imported here: self_distill imports this module for its class.
        from sdharness.methods.self_distill import score_and_distil

        group = self.cfg.algo.group_size
        prompt_ids = batch.student_ids.repeat_interleave(group, dim=0)
        prompt_mask = batch.student_mask.repeat_interleave(group, dim=0)
        problems = [problem for problem in batch.problems for _ in range(group)]
        rollout = self.rollout(prompt_ids, prompt_mask)
        self.count_rollout(prompt_mask, rollout)
        check = answer_checker(self.cfg.data.checker, self.cfg.data.answer_marker)
        successes = [bool(check(text, problem["answer"])) for text, problem in zip(rollout.texts, problems)]
        hints = sibling_hints(successes, group)
        self.count(problems=len(batch), problems_without_success=problems_without_success(successes, group))
        hint_of = {row: hint for row, hint in enumerate(hints) if hint is not None}
        # No hint anywhere: row 0 is still scored (under its own text), with no loss position, so that every
        # rank runs the forward passes its strategy (DDP, FSDP) expects; the step has no loss tokens and is skipped.
        scored = hint_of or {0: 0}
        teacher_ids, teacher_mask = sibling_teacher_prompts(
            self.cfg.prompt, self.tokenizer, [problem["problem"] for problem in problems], rollout.texts, scored,
            self.cfg.data.answer_marker)
        teacher_ids, teacher_mask = teacher_ids.to(self.device), teacher_mask.to(self.device)
        index = torch.tensor(list(scored), device=rollout.completion_ids.device)
        hinted = Rollout(rollout.completion_ids[index], rollout.completion_mask[index],
                         [rollout.texts[row] for row in scored])
        g, g_mask = hinted.completion_ids, hinted.completion_mask
        check_fits_context(teacher_mask, g_mask, getattr(self.model.config, "max_position_embeddings", 10**9))
        mask = loss_positions(self.tokenizer, g, g_mask, hinted.texts, mode=self.cfg.loss.positions,
                              answer_marker=self.cfg.data.answer_marker, eos_ids=self.eos_ids)
        if not hint_of:
            mask = torch.zeros_like(mask)
        student_ids, student_mask = prompt_ids[index], prompt_mask[index]
        result = score_and_distil(self.model, self.teacher.model, student_ids, student_mask, teacher_ids,
                                  teacher_mask, g, g_mask, mask, self.cfg.aggregation, self.cfg.loss,
                                  monitor=self.logging_step)
        g_tokens = int(hinted.lengths.sum())
        self.count(forward_only=int(teacher_mask.sum()) + g_tokens, trained=int(student_mask.sum()) + g_tokens)
        monitored = {} if result.teacher_student_kl is None else {
            "train/teacher_student_kl": result.teacher_student_kl,
            **{f"train/{name}": value for name, value in result.diagnostics.items()}}
        yield result.loss, {"train/divergence_per_token": result.loss.detach(), **monitored,
                            "train/loss_tokens": float(result.tokens), "train/sibling_hint_rows": float(len(hint_of)),
                            **self.rollout_metrics(rollout, problems)}
