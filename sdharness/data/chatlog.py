"""Logged chats -> self-distillation with no new generation (``data=chatlog``).

Input: JSONL, one conversation per line in the OpenAI messages format::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], "answer": "42"}

The last assistant message is the answer the user accepted. Every earlier assistant turn (or
only the first, ``data.turns=first``; the final turn too with ``data.include_final=true``) is
one training example: the student context is the conversation before that turn, the teacher
context is the same conversation with the accepted answer as a hint (``prompt.chat_hint``, a
system message placed first), and the already-written assistant turn is ``g``. The loss is the
self-distillation loss on ``g``; nothing is generated, so ``train/generated_tokens`` stays 0 and
a step costs two scoring passes, about what an SFT step costs. ``data.turns=accepted`` instead
makes the accepted turn the one example of each conversation, as the reply to its opening (the
context of its first assistant turn): SFT on it is SFT on the accepted answers. ``answer`` is
optional; when present, quick eval greedily answers each held-out conversation's first user turn
and checks it (and scores how often it gives the accepted answer where that was wrong).

Validation: a conversation that ends with a non-assistant message, has no assistant turn, uses
a role other than system/user/assistant, or (checked after tokenizing, in
:class:`sdharness.data.datamodule.ProblemDataModule`) does not fit the model context is skipped and
counted by reason, or with ``data.strict=true`` rejected with file:line. Malformed lines (not
UTF-8, not JSON, not an object with a ``messages`` list of ``{"role", "content"}`` objects) are
always errors.

A synthetic set ships in ``sdharness/assets/chatlog`` (written by ``scripts/synthetic_chats.py`` in the checkout).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from sdharness.data.answers import answer_checker
from sdharness.data.jsonl import DataError, json_objects
from sdharness.data.prompts import uses_chat_template
from sdharness.models import resolve_path

if TYPE_CHECKING:  # annotations only: data/ never imports the config schema, which imports data/
    from sdharness.config import PromptConfig

ROLES = ("system", "user", "assistant")
TURNS = ("all", "first", "accepted")
# Skip reasons (the keys of the ``skipped`` counters).
NO_ASSISTANT = "no assistant turn"
UNKNOWN_ROLE = "unknown role"
EXCEEDS_CONTEXT = "exceeds context"
_FIXES = {
    NO_ASSISTANT: "a conversation needs at least one assistant turn (the last one is the accepted answer)",
    UNKNOWN_ROLE: "roles must be system, user or assistant",
}




def _content(value, where: str) -> str:
    """A message's text: a string, or OpenAI content parts of type ``text`` joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                       and isinstance(part.get("text"), str) for part in value):
        return "".join(part["text"] for part in value)
    raise DataError(f"{where}: content must be a string (or a list of text parts), got {type(value).__name__}")


def unusable_reason(messages: list[dict]) -> str | None:
    """The reason a well-formed conversation cannot be used, or None when it can."""
    roles = [message["role"] for message in messages]
    unknown = sorted({role for role in roles if role not in ROLES})
    if unknown:
        return UNKNOWN_ROLE
    if "assistant" not in roles:
        return NO_ASSISTANT
    if roles[-1] != "assistant":
        return f"ends with a {roles[-1]} message"
    return None


def read_chats(path: str | Path, *, strict: bool = False) -> tuple[list[dict], Counter]:
    """``(conversations, skipped)``: the usable conversations of a JSONL chat log and the count
    of skipped ones by reason. Each conversation is its row (``messages`` with string contents,
    ``answer`` as a string when present) plus ``path`` and ``line``."""
    conversations, skipped = [], Counter()
    path = Path(path)
    for number, row in json_objects(path):
        where = f"{path}:{number}"
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field messages missing or not a non-empty list; every line needs "
                              '{"messages": [{"role": ..., "content": ...}, ...]}')
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
                raise DataError(f"{where}: messages[{index}] must be an object with role and content")
        reason = unusable_reason(messages)
        if reason is not None:
            if strict:
                fix = _FIXES.get(reason, "the last message must be the accepted assistant answer")
                raise DataError(f"{where}: unusable conversation ({reason}); {fix} (or set data.strict=false "
                                  "to skip and count such conversations)")
            skipped[reason] += 1
            continue
        for index, message in enumerate(messages):  # roles are known now (tool calls were skipped)
            message["content"] = _content(message["content"], f"{where}: messages[{index}]")
        if "answer" in row:
            row["answer"] = str(row["answer"])
        conversations.append({**row, "path": str(path), "line": number})
    if not conversations and not skipped:
        raise DataError(f"{path}: no rows; the file is empty or holds only blank lines. Write one conversation "
                        'per line: {"messages": [{"role": ..., "content": ...}, ...]}')
    return conversations, skipped


def _example(conversation: dict, index: int, turn: int | None = None) -> dict:
    """The example whose context is the conversation before ``messages[index]`` and whose completion
    is the assistant turn ``messages[turn]`` (by default that same ``index``)."""
    messages = conversation["messages"]
    turn = index if turn is None else turn
    final = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    users = [message["content"] for message in messages[:index] if message["role"] == "user"]
    example = {"context": messages[:index], "completion": messages[turn]["content"],
               "accepted": messages[final]["content"], "problem": users[-1] if users else "",
               "path": conversation.get("path"), "line": conversation.get("line"), "turn": turn}
    if "answer" in conversation:
        example["answer"] = conversation["answer"]
    return example


def chat_examples(conversations: list[dict], *, turns: str = "all", include_final: bool = False) -> list[dict]:
    """One example per selected assistant turn: ``{"context", "completion", "accepted", ...}``.

    ``turns``: ``all`` earlier (non-final) assistant turns, or only the ``first`` of them, or the
    ``accepted`` (final) turn after the context of the first; ``include_final`` adds the accepted
    turn itself, after the whole conversation before it.
    """
    if turns not in TURNS:
        raise ValueError(f"data.turns={turns!r} is unknown; choose one of: {', '.join(TURNS)}")
    examples = []
    for conversation in conversations:
        assistant = [i for i, message in enumerate(conversation["messages"]) if message["role"] == "assistant"]
        if turns == "accepted":
            examples.append(_example(conversation, assistant[0], turn=assistant[-1]))
        selected = {"all": assistant[:-1], "first": assistant[:-1][:1], "accepted": []}[turns]
        if include_final:
            selected.append(assistant[-1])
        examples += [_example(conversation, index) for index in selected]
    return examples


def first_turn_examples(conversations: list[dict]) -> list[dict]:
    """The first assistant turn of each conversation (held-out eval: answer the first question)."""
    return [_example(conversation, next(i for i, m in enumerate(conversation["messages"]) if m["role"] == "assistant"))
            for conversation in conversations]


def load_chats(cfg) -> tuple[list[dict], list[dict], list[dict], list[dict], Counter]:
    """``(train examples, eval examples, validation examples, wrongly accepted, skipped)`` for a
    ``data=chatlog`` config. Without ``data.eval_path``, ``data.eval_size`` conversations are held out
    (as for ``data=jsonl``); then ``data.validation_size`` more are held out of the training
    conversations, so that validation is disjoint from both. Held-out examples are each conversation's
    first assistant turn. ``wrongly accepted``: the same for up to ``data.eval_size`` training
    conversations whose accepted answer is wrong (:func:`accepted_wrongly`): scored, they say how much
    of the users' mistakes a run learned from the conversations it trained on."""
    conversations, skipped = read_chats(resolve_path(cfg.path, "data.path"), strict=cfg.strict)
    if cfg.eval_path:
        held_out, more = read_chats(resolve_path(cfg.eval_path, "data.eval_path"), strict=cfg.strict)
        skipped.update(more)
        train = conversations
    else:
        shuffled = conversations[:]
        random.Random(cfg.seed).shuffle(shuffled)
        count = max(0, min(cfg.eval_size, len(shuffled) - 1))
        train, held_out = shuffled[count:], shuffled[:count]
    if cfg.validation_size >= len(train):
        raise DataError(f"data.validation_size={cfg.validation_size} leaves no conversation to train on of the "
                        f"{len(train)} in data.path={cfg.path} (skipped: {dict(skipped) or 'none'}); lower it")
    validation, train = train[:cfg.validation_size], train[cfg.validation_size:]
    check = answer_checker(cfg.checker, cfg.answer_marker)
    wrong = [conversation for conversation in train if accepted_wrongly(conversation, check)][:cfg.eval_size]
    return (chat_examples(train, turns=cfg.turns, include_final=cfg.include_final), first_turn_examples(held_out),
            first_turn_examples(validation), first_turn_examples(wrong), skipped)


def accepted_wrongly(conversation: dict, check) -> bool:
    """Whether the conversation's accepted (last assistant) answer fails ``check`` against its ``answer``;
    False without an ``answer``."""
    if conversation.get("answer") in (None, ""):
        return False
    accepted = next(m["content"] for m in reversed(conversation["messages"]) if m["role"] == "assistant")
    return not check(accepted, str(conversation["answer"]))


def _with_hint(prompt_cfg: PromptConfig, messages: list[dict], hint: str | None) -> list[dict]:
    messages = [dict(message) for message in messages]
    if prompt_cfg.system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": prompt_cfg.system})
    if hint is None:
        return messages
    text = prompt_cfg.chat_hint.format(accepted=hint)
    if prompt_cfg.chat_hint_position == "last":  # the last message before the turn is a user message
        messages[-1]["content"] += "\n" + text
    elif messages and messages[0]["role"] == "system":  # one system message: some templates allow no second
        messages[0]["content"] = text + "\n\n" + messages[0]["content"]
    else:
        messages.insert(0, {"role": "system", "content": text})
    return messages


def _assistant_prefix(prompt_cfg: PromptConfig) -> tuple[str, str]:
    """The plain rendering's assistant prefix split where the context ends: a trailing space
    belongs to the turn (BPE vocabularies join it to the next word)."""
    prefix = prompt_cfg.chat_roles["assistant"]
    head = prefix.rstrip(" ")
    return head, prefix[len(head):]


def encode_chat(prompt_cfg: PromptConfig, tokenizer, messages: list[dict], hint: str | None = None) -> list[int]:
    """Token ids of a conversation prefix, ending where the next assistant turn starts.

    With the tokenizer's chat template (``uses_chat_template``) the generation prompt is added;
    otherwise each message is ``<prompt.chat_roles[role]><content>\n`` and the context ends with
    the assistant prefix. ``hint`` (the accepted answer), rendered with ``prompt.chat_hint``, goes
    in as a system message placed first (a conversation's own system message follows it in the
    same message) or, with ``prompt.chat_hint_position=last``, at the end of the last user message.
    """
    messages = _with_hint(prompt_cfg, messages, hint)
    if uses_chat_template(prompt_cfg, tokenizer):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    roles = prompt_cfg.chat_roles
    plain = "".join(f"{roles[m['role']]}{m['content']}\n" for m in messages) + _assistant_prefix(prompt_cfg)[0]
    return tokenizer(plain, add_special_tokens=True)["input_ids"]


def encode_completion(prompt_cfg: PromptConfig, tokenizer, content: str) -> list[int]:
    """Token ids of a logged assistant turn plus EOS (in the plain rendering, after what is left
    of the assistant prefix, as earlier turns have it in the context)."""
    text = content if uses_chat_template(prompt_cfg, tokenizer) else _assistant_prefix(prompt_cfg)[1] + content
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
