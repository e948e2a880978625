"""Online sibling hints, ``algo.hint_source=sibling`` under ``algo=sd`` (the step is
:meth:`~sdharness.methods.self_distill.SelfDistillModule.sibling_losses`): the teacher's reference is a
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
from sdharness.data.answers import trim_solution
from sdharness.data.prompts import encode_prompts, render_teacher


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
