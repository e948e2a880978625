"""Synthetic chat logs for ``data=chatlog``: multi-turn refinements of built-in task problems (wrong
attempts, the user objects, the assistant retries). A builder of shipped assets, not part of the
installed package: run it from the repository root of a checkout. The shipped sets were written by::

    python -m scripts.synthetic_chats write sdharness/assets/chatlog/arithmetic_chats.jsonl \\
        --seed 0 --size 300 --difficulty easy
    python -m scripts.synthetic_chats write sdharness/assets/chatlog/columns_chats.jsonl --task columns \\
        --seed 0 --size 2304 --difficulty hard --wrong-accepted-share 0.2

``--task chain``: every conversation ends with a right worked solution. ``--task columns`` (the
testbed's task, :mod:`sdharness.data.columns`): the first answer has one of the student's slips
(a wrong column total, a misread digit or a dropped or invented carry, the later columns following
the written carries); the user names the slipped column; the assistant retries, fixing that column;
the last answer is the one the user accepts, right in most conversations but wrong (a slip in
another column) in exactly ``round(share x size)`` of them, marked ``"accepted_correct": false``.
``answer`` is always the true sum, so eval scores the truth, not what the user accepted.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from sdharness.data.answers import extract_answer
from sdharness.data.chain import arithmetic_chain, chain_values, native_solution, slipped_values
from sdharness.data.columns import COLUMNS
from sdharness.data.tasks import DIFFICULTY_STEPS

_ASK = ["{problem}", "Can you solve this? {problem}", "Please work this out step by step: {problem}",
        "Quick one: {problem}"]
_OBJECT = ["That's not right. Please check your steps.", "Hmm, I don't think that's correct. Try again?",
           "That answer is wrong. Can you redo it carefully?", "I checked and got something else. Please recheck.",
           "No, one of the steps is off. Please try again."]
# Column i counted from the units (hard problems have at most 7 digits, so at most 7 column lines).
_COLUMN_NAMES = ["units", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions"]
# Short, so that a conversation with two retries still fits the testbed base's 512-token context
# with the accepted answer as a hint (data.include_final=true).
_POINT = ["Check the {column} column.", "The {column} column is wrong.", "Redo the {column} column."]


def synthetic_chat(rng: random.Random, steps: int) -> dict:
    """One conversation: the user asks an arithmetic problem, the assistant answers wrongly
    (a wrong step, carried through), the user objects, and so on; the last answer is right."""
    problem, start, operations = arithmetic_chain(rng, steps)
    correct = chain_values(start, operations)
    messages = [{"role": "user", "content": rng.choice(_ASK).format(problem=problem)}]
    wrong_answers = set()
    for _ in range(2 if rng.random() < 0.3 else 1):
        for _ in range(100):
            step, delta = rng.randrange(len(operations)), rng.choice([-1, 1]) * rng.randint(1, 10)
            values = slipped_values(start, operations, correct, step, delta)
            if values[-1] != correct[-1] and values[-1] not in wrong_answers:
                break
        wrong_answers.add(values[-1])
        messages += [{"role": "assistant", "content": native_solution(start, operations, values)},
                     {"role": "user", "content": rng.choice(_OBJECT)}]
    messages.append({"role": "assistant", "content": native_solution(start, operations, correct)})
    return {"messages": messages, "answer": str(correct[-1])}


def slipped_columns_answer(rng: random.Random, drawn, avoid: int | None, stated: set[str]) -> tuple[str, int]:
    """``(text, column)``: a worked columns solution with one slip (:meth:`ColumnsTask.slipped_solution`)
    outside column ``avoid`` whose answer is neither the truth nor one already ``stated``."""
    truth = COLUMNS.answer(drawn)
    for _ in range(100):
        text, (begin, _end) = COLUMNS.slipped_solution(rng, drawn)
        column, answer = text[:begin].count("\n"), extract_answer(text)
        if column != avoid and answer != truth and answer not in stated:
            stated.add(answer)
            return text, column
    raise RuntimeError(f"no slip outside column {avoid} with a new answer for {COLUMNS.problem_text(drawn)!r}")


def columns_chat(rng: random.Random, difficulty: str, accepted_correct: bool) -> dict:
    """One conversation on a columns problem: slipped answers, each followed by the user naming its
    slipped column, then the accepted answer (right, or slipped in a column the user did not name)."""
    drawn = COLUMNS.draw(rng, difficulty)
    # The question is the bare problem text, as the base's student prompt holds it, so that eval
    # (answering the first user turn) measures the task the base was pretrained on.
    messages, stated, pointed = [{"role": "user", "content": COLUMNS.problem_text(drawn)}], set(), None
    for _ in range(2 if rng.random() < 0.3 else 1):
        text, pointed = slipped_columns_answer(rng, drawn, pointed, stated)
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": rng.choice(_POINT).format(column=_COLUMN_NAMES[pointed])}]
    accepted = (COLUMNS.solution(drawn, "native") if accepted_correct
                else slipped_columns_answer(rng, drawn, pointed, stated)[0])
    messages.append({"role": "assistant", "content": accepted})
    return {"messages": messages, "answer": COLUMNS.answer(drawn), "accepted_correct": accepted_correct}


def _distinct(size: int, draw) -> list[dict]:
    """``size`` conversations ``draw(index)`` with distinct first user turns (a repeat is drawn again)."""
    seen, chats = set(), []
    for _ in range(size * 100):
        if len(chats) == size:
            break
        chat = draw(len(chats))
        if chat["messages"][0]["content"] not in seen:
            seen.add(chat["messages"][0]["content"])
            chats.append(chat)
    return chats


def _check_difficulty(difficulty: str) -> None:
    if difficulty not in DIFFICULTY_STEPS:
        raise ValueError(f"difficulty={difficulty!r} is unknown; choose one of: {', '.join(DIFFICULTY_STEPS)}")


def synthetic_chats(seed: int, size: int, difficulty: str = "easy") -> list[dict]:
    """``size`` chain-arithmetic conversations with distinct problems, drawn deterministically from ``seed``."""
    _check_difficulty(difficulty)
    rng = random.Random(seed)
    return _distinct(size, lambda _index: synthetic_chat(rng, DIFFICULTY_STEPS[difficulty]))


def columns_chats(seed: int, size: int, difficulty: str = "hard", wrong_accepted_share: float = 0.2) -> list[dict]:
    """``size`` columns conversations with distinct problems, drawn deterministically from ``seed``;
    exactly ``round(wrong_accepted_share * size)`` of them, chosen by the seed, end with a wrong answer."""
    _check_difficulty(difficulty)
    if not 0.0 <= wrong_accepted_share <= 1.0:
        raise ValueError(f"--wrong-accepted-share must be in [0, 1], got {wrong_accepted_share}")
    rng = random.Random(seed)
    wrong = set(rng.sample(range(size), round(wrong_accepted_share * size)))
    return _distinct(size, lambda index: columns_chat(rng, difficulty, accepted_correct=index not in wrong))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.synthetic_chats", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write a synthetic chat log (JSONL)")
    write.add_argument("out", type=Path)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--size", type=int, default=300)
    write.add_argument("--difficulty", default="easy", choices=list(DIFFICULTY_STEPS))
    write.add_argument("--task", default="chain", choices=["chain", "columns"])
    write.add_argument("--wrong-accepted-share", type=float, default=None,
                       help="columns only: the share of conversations whose accepted answer is wrong (default 0.2)")
    args = parser.parse_args(argv)
    if args.task == "chain":
        if args.wrong_accepted_share is not None:
            parser.error("--wrong-accepted-share applies to --task columns (chain conversations end right)")
        chats = synthetic_chats(args.seed, args.size, args.difficulty)
    else:
        share = 0.2 if args.wrong_accepted_share is None else args.wrong_accepted_share
        chats = columns_chats(args.seed, args.size, args.difficulty, share)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(chat) + "\n" for chat in chats), encoding="utf-8")
    print(f"wrote {len(chats)} conversations to {args.out}")


if __name__ == "__main__":
    main()
