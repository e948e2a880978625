"""Student and teacher prompts: render templates, apply the chat template, tokenize, left-pad.

The student prompt holds the problem; the teacher prompt holds the problem and the reference
solution. Both end where the model's answer begins, so a completion ``g`` sampled after the
student prompt can be scored after the teacher prompt token for token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sdharness.errors import ConfigError

if TYPE_CHECKING:  # annotations only: data/ never imports the config schema, which imports data/
    from sdharness.config import PromptConfig


def render_student(cfg: PromptConfig, problem: str) -> str:
    return cfg.student.format(problem=problem)


def render_teacher(cfg: PromptConfig, problem: str, solution: str) -> str:
    return cfg.teacher.format(problem=problem, solution=solution)


def teacher_context(row: dict) -> str:
    """What fills the teacher template's ``{solution}`` for a problem row: its own ``hint`` (a JSONL
    field, e.g. a privileged context written for that problem) where it has one, else its solution."""
    return row.get("hint") or row["solution"]


def uses_chat_template(cfg: PromptConfig, tokenizer) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template == "always" and not has_template:
        raise ConfigError("prompt.chat_template=always, but this tokenizer has no chat template; "
                          "set prompt.chat_template=never (plain text) or use a chat model")
    return has_template and cfg.chat_template != "never"


def encode_prompt(cfg: PromptConfig, tokenizer, text: str) -> list[int]:
    """Token ids of one rendered prompt, ending where the model's answer starts."""
    if uses_chat_template(cfg, tokenizer):
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": text}
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    plain = (cfg.system + "\n\n" if cfg.system else "") + text + "\n"
    return tokenizer(plain, add_special_tokens=True)["input_ids"]


def encode_prompts(cfg: PromptConfig, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered prompts as one left-padded batch ``(ids, attention_mask)`` (:func:`encode_prompt`, :func:`left_pad`)."""
    return left_pad([encode_prompt(cfg, tokenizer, text) for text in texts], tokenizer.pad_token_id)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of shape ``[batch, longest]``, padded on the left.

    Left padding makes every prompt end at the same column, so completions line up across
    rows and across the student and teacher batches.
    """
    longest = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, longest - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, longest - len(seq):] = 1
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of shape ``[batch, longest]``, padded on the right (completions)."""
    ids, mask = left_pad([seq[::-1] for seq in sequences], pad_id)
    return ids.flip(1), mask.flip(1)
