"""Synthetic chat logs for ``data=chatlog``: multi-turn refinements of arithmetic problems (wrong
attempts, the user says so, then a correct worked solution). A builder of a shipped asset, not part
of the installed package: run it from the repository root of a checkout. The shipped set was written by::

    python -m scripts.synthetic_chats write sdharness/assets/chatlog/arithmetic_chats.jsonl \\
        --seed 0 --size 300 --difficulty easy
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from sdharness.data.chain import arithmetic_chain, chain_values, native_solution, slipped_values
from sdharness.data.tasks import DIFFICULTY_STEPS

_ASK = ["{problem}", "Can you solve this? {problem}", "Please work this out step by step: {problem}",
        "Quick one: {problem}"]
_OBJECT = ["That's not right. Please check your steps.", "Hmm, I don't think that's correct. Try again?",
           "That answer is wrong. Can you redo it carefully?", "I checked and got something else. Please recheck.",
           "No, one of the steps is off. Please try again."]


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


def synthetic_chats(seed: int, size: int, difficulty: str = "easy") -> list[dict]:
    """``size`` conversations with distinct problems, drawn deterministically from ``seed``."""
    if difficulty not in DIFFICULTY_STEPS:
        raise ValueError(f"difficulty={difficulty!r} is unknown; choose one of: {', '.join(DIFFICULTY_STEPS)}")
    rng, seen, chats = random.Random(seed), set(), []
    for _ in range(size * 100):
        if len(chats) == size:
            break
        chat = synthetic_chat(rng, DIFFICULTY_STEPS[difficulty])
        if chat["messages"][0]["content"] not in seen:
            seen.add(chat["messages"][0]["content"])
            chats.append(chat)
    return chats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.synthetic_chats", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write a synthetic chat log (JSONL)")
    write.add_argument("out", type=Path)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--size", type=int, default=300)
    write.add_argument("--difficulty", default="easy", choices=list(DIFFICULTY_STEPS))
    args = parser.parse_args(argv)
    chats = synthetic_chats(args.seed, args.size, args.difficulty)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(chat) + "\n" for chat in chats), encoding="utf-8")
    print(f"wrote {len(chats)} conversations to {args.out}")


if __name__ == "__main__":
    main()
