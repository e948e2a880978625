"""Synthetic chat logs for ``data=chatlog``: multi-turn refinements of arithmetic problems (wrong
attempts, the user says so, then a correct worked solution). The shipped set was written by::

    python -m sdharness.tools.synthetic_chats write sdharness/assets/chatlog/arithmetic_chats.jsonl \\
        --seed 0 --size 300 --difficulty easy
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from sdharness.data.tasks import ANSWER_MARKER, DIFFICULTY_STEPS, arithmetic_problem


_STEP = re.compile(r"^(-?\d+) ([-+*]) (-?\d+) = (-?\d+)$")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_ASK = ["{problem}", "Can you solve this? {problem}", "Please work this out step by step: {problem}",
        "Quick one: {problem}"]
_OBJECT = ["That's not right. Please check your steps.", "Hmm, I don't think that's correct. Try again?",
           "That answer is wrong. Can you redo it carefully?", "I checked and got something else. Please recheck.",
           "No, one of the steps is off. Please try again."]


def _steps(solution: str) -> list[tuple[str, int]]:
    """``(symbol, operand)`` of each step of a native worked solution."""
    lines = [_STEP.match(line) for line in solution.splitlines()[:-1]]
    return [(match.group(2), int(match.group(3))) for match in lines]


def _worked(start: int, steps: list[tuple[str, int]], slip: tuple[int, int] | None = None) -> tuple[str, int]:
    """A worked solution from ``start``; ``slip=(step, delta)`` gets that step's result wrong by
    ``delta`` and carries the error through the later steps."""
    value, lines = start, []
    for index, (symbol, operand) in enumerate(steps):
        result = _APPLY[symbol](value, operand) + (slip[1] if slip and slip[0] == index else 0)
        lines.append(f"{value} {symbol} {operand} = {result}")
        value = result
    return "\n".join(lines + [f"{ANSWER_MARKER} {value}."]), value


def synthetic_chat(rng: random.Random, steps: int) -> dict:
    """One conversation: the user asks an arithmetic problem, the assistant answers wrongly
    (a wrong step, carried through), the user objects, and so on; the last answer is right."""
    item = arithmetic_problem(rng, steps)
    start = int(re.match(r"Start with (-?\d+)\.", item["problem"]).group(1))
    ops = _steps(item["solution"])
    messages = [{"role": "user", "content": rng.choice(_ASK).format(problem=item["problem"])}]
    wrong_answers = set()
    for _ in range(2 if rng.random() < 0.3 else 1):
        for _ in range(100):
            slip = (rng.randrange(len(ops)), rng.choice([-1, 1]) * rng.randint(1, 10))
            text, value = _worked(start, ops, slip)
            if str(value) != item["answer"] and value not in wrong_answers:
                break
        wrong_answers.add(value)
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": rng.choice(_OBJECT)}]
    messages.append({"role": "assistant", "content": item["solution"]})
    return {"messages": messages, "answer": item["answer"]}


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
    parser = argparse.ArgumentParser(prog="python -m sdharness.tools.synthetic_chats", description=__doc__.split("\n\n")[0])
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
