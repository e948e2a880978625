"""The pretraining data: every example a token sequence exactly as the harness later sees it
(prompt, completion, EOS; the loss on the completion and EOS only), and the length-bucketed batches."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from sdharness.config import ConfigError, PromptConfig
from sdharness.data.builtin import builtin_task
from sdharness.data.prompts import encode_prompt, render_student, render_teacher
from sdharness.data.answers import ANSWER_MARKER
from sdharness.data.tasks import DIFFICULTY_STEPS
from testbed.pretrain_config import KINDS, MixConfig


@dataclass
class Example:
    """One training sequence: ``ids[:prompt_length]`` is the prompt, the rest is the completion + EOS.

    ``no_loss`` is a ``[begin, end)`` token span of the completion that carries no loss (a slip's
    wrong digits), or None."""

    ids: list[int]
    prompt_length: int
    kind: str  # one of KINDS
    early_answer: bool
    problem: str
    completion: str
    foreign_hint: bool = False
    no_loss: Optional[tuple[int, int]] = None


def split_counts(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to ``total`` closest to ``total * fraction`` (largest remainder)."""
    raw = {name: total * fraction for name, fraction in fractions.items()}
    counts = {name: math.floor(value) for name, value in raw.items()}
    by_remainder = sorted(raw, key=lambda name: (-(raw[name] - counts[name]), list(raw).index(name)))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def early_answer_line(answer: str) -> str:
    return f"{ANSWER_MARKER} {answer}."


def eval_problems(seed: int, size: int, task: str = "chain") -> dict[str, list[dict[str, str]]]:
    """The fixed held-out problems of ``task``: ``{'easy': [...], 'hard': [...], 'hard_foreign': [...]}``.

    ``hard_foreign`` are the ``hard`` problems with their solutions in the foreign notation."""
    split = builtin_task(task, "task").split
    problems = {difficulty: split(seed + offset, size, difficulty) for offset, difficulty in enumerate(DIFFICULTY_STEPS)}
    problems["hard_foreign"] = split(seed + list(DIFFICULTY_STEPS).index("hard"), size, "hard", "foreign")
    return problems


def build_examples(prompt: PromptConfig, tokenizer, *, size: int, mix: MixConfig | dict[str, float],
                   early_answer_fraction: float, seed: int, exclude: set[str] | None = None,
                   foreign_hint_fraction: float = 0.0, slip_fraction: float = 0.0, task: str = "chain") -> list[Example]:
    """``size`` training examples of ``task`` in a seeded random order.

    The kinds come in exactly the counts of :func:`split_counts`; of the teacher-format
    examples exactly ``round(early_answer_fraction * n)`` complete with the answer line only,
    ``round(foreign_hint_fraction * n)`` get their hint in the foreign notation, and
    ``round(slip_fraction * m)`` of the ``m`` others complete with the task's slipped solution (its
    slip carries no loss). Problems in ``exclude`` (the eval sets) never appear. With both new
    fractions 0 the random stream, and so every example, is the one before they existed.
    """
    fractions = asdict(mix) if isinstance(mix, MixConfig) else dict(mix)
    builder = builtin_task(task, "task")
    rng = random.Random(seed)
    counts = split_counts(size, {kind: fractions.get(kind, 0.0) for kind in KINDS})
    kinds = [kind for kind in KINDS for _ in range(counts[kind])]
    rng.shuffle(kinds)
    teacher_rows = [row for row, kind in enumerate(kinds) if kind.startswith("teacher")]
    early_rows = set(rng.sample(teacher_rows, round(early_answer_fraction * len(teacher_rows))))
    foreign_rows = set(rng.sample(teacher_rows, round(foreign_hint_fraction * len(teacher_rows)))
                       if foreign_hint_fraction else ())
    worked_rows = [row for row in teacher_rows if row not in early_rows]
    slip_rows = set(rng.sample(worked_rows, round(slip_fraction * len(worked_rows))) if slip_fraction else ())
    exclude = exclude or set()
    eos = [tokenizer.eos_token_id]
    examples = []
    for row, kind in enumerate(kinds):
        fmt, difficulty = kind.split("_")
        drawn = builder.draw(rng, difficulty)
        while builder.problem_text(drawn) in exclude:
            drawn = builder.draw(rng, difficulty)
        problem = builder.problem_text(drawn)
        solution, no_loss = builder.solution(drawn, "native"), None
        if fmt == "student":
            text = render_student(prompt, problem)
        else:
            hint = builder.solution(drawn, "foreign") if row in foreign_rows else solution
            text = render_teacher(prompt, problem, hint)
        if row in early_rows:
            completion = early_answer_line(builder.answer(drawn))
        elif row in slip_rows:
            completion, no_loss = builder.slipped_solution(rng, drawn)
        else:
            completion = solution
        prompt_ids = encode_prompt(prompt, tokenizer, text)
        ids = prompt_ids + _char_ids(tokenizer, completion) + eos
        examples.append(Example(ids, len(prompt_ids), kind, row in early_rows, problem, completion,
                                foreign_hint=row in foreign_rows, no_loss=no_loss))
    return examples


def _char_ids(tokenizer, text: str) -> list[int]:
    """One id per character: the testbed tokenizer's, which makes character spans token spans."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != len(text):
        raise ConfigError(f"the pretraining tokenizer must give one token per character; {text!r} gave {len(ids)}")
    return ids


def make_batches(examples: list[Example], batch_size: int, bucket_batches: int, seed: int,
                 pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, labels)`` batches, right-padded; labels are -100 on prompts and padding.

    Within each window of ``bucket_batches`` batches the examples are sorted by length (less
    padding), and the batch order is then shuffled with ``seed``.
    """
    window = batch_size * bucket_batches
    batches = []
    for start in range(0, len(examples), window):
        chunk = sorted(examples[start:start + window], key=lambda example: len(example.ids))
        for offset in range(0, len(chunk), batch_size):
            rows = chunk[offset:offset + batch_size]
            longest = max(len(example.ids) for example in rows)
            ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
            labels = torch.full((len(rows), longest), -100, dtype=torch.long)
            for row, example in enumerate(rows):
                ids[row, :len(example.ids)] = torch.tensor(example.ids)
                labels[row, example.prompt_length:len(example.ids)] = torch.tensor(example.ids[example.prompt_length:])
                if example.no_loss is not None:
                    begin, end = example.no_loss
                    labels[row, example.prompt_length + begin:example.prompt_length + end] = -100
            batches.append((ids, labels))
    random.Random(seed).shuffle(batches)
    return batches
