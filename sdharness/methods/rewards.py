"""GRPO's rewards by ``algo.reward``: the built-in answer match, or ``package.module:function``."""

from __future__ import annotations

import functools
import importlib

from sdharness.data.answers import ANSWER_MARKER, answer_checker


def answer_match_reward(completion: str, problem: dict, answer_marker: str = ANSWER_MARKER, *,
                        checker: str = "builtin") -> float:
    """1.0 when the completion's marked answer equals the problem's answer (by ``checker``), else 0.0."""
    return float(answer_checker(checker, answer_marker)(completion, problem["answer"]))


REWARDS = {"answer_match": answer_match_reward}


def resolve_reward(name: str, checker: str = "builtin"):
    """A built-in reward by name (answer checks by ``checker``, see :func:`answer_checker`), or
    ``package.module:function``."""
    if name in REWARDS:
        return functools.partial(REWARDS[name], checker=checker)
    module_name, _, function = name.partition(":")
    if not function:
        raise ValueError(f"algo.reward={name!r} is unknown; choose one of {', '.join(REWARDS)} "
                         "or give module:function")
    return getattr(importlib.import_module(module_name), function)
