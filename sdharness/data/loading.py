"""Reading and validating the configured data before any tokenizer: the built-in task's problems,
a JSONL file's rows or a chat log's turns, split into train, validation and eval (:func:`load_data`),
with the fields each method needs checked, bootstrapped solutions swapped in and contamination
between the splits counted. :mod:`sdharness.data.datamodule` tokenizes what this returns."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sdharness.data import SOURCES
from sdharness.data.answers import unreadable_answer
from sdharness.data.builtin import builtin_task
from sdharness.data.chatlog import load_chats
from sdharness.data.jsonl import EVAL_FIELDS, REQUIRED_FIELDS, DataError, read_jsonl
from sdharness.data.tasks import SOLUTION_STYLES
from sdharness.methods import METHODS
from sdharness.models import resolve_path

if TYPE_CHECKING:  # annotations only: data/ never imports the config schema, which imports data/
    from sdharness.config import DataConfig

log = logging.getLogger(__name__)

NO_SOLUTION = "no bootstrap solution"  # training problems data.solutions_path lacks (data/skipped_*)


def required_fields(algo: str, hint_source: str = "reference") -> tuple[str, ...]:
    """What every training row of ``algo`` needs: the worked solution where the method reads it
    (:class:`sdharness.methods.Method`, SD's teacher prompt and SFT's target); otherwise (GRPO, and SD with
    ``algo.hint_source=sibling``, sampled from the problem alone) the answer that is checked."""
    reads = METHODS[algo].reads_reference and hint_source != "sibling"
    return REQUIRED_FIELDS if reads else ("problem", "answer")


def reference_styles(cfg: DataConfig, problems: list[dict]) -> dict[str, list[dict]]:
    """``problems`` that have a reference, per notation of it: for a built-in task its own style and the
    other one (the same problems, the reference written in the other notation); for other data the
    references as given (``given``)."""
    with_reference = [row for row in problems if row.get("solution")]
    if not with_reference:
        return {}
    if not SOURCES[cfg.name].built_in_task:
        return {"given": with_reference}
    other = next(style for style in SOLUTION_STYLES if style != cfg.solution_style)
    train, evaluation = load_problems(replace(cfg, solution_style=other))
    solutions = {row["problem"]: row["solution"] for row in train + evaluation}
    return {cfg.solution_style: with_reference,
            other: [{**row, "solution": solutions[row["problem"]]} for row in with_reference]}


def data_path(path: str, field: str) -> str | Path:
    """``pkg://PACKAGE/file`` resolved inside the installed package; other paths as given."""
    return resolve_path(path, field) if path.startswith("pkg://") else path


def solutions_file(cfg: DataConfig) -> str | Path | None:
    """The file the training rows' solutions come from (``data.solutions_path``, or ``data=jsonl``'s
    ``data.path``); None for a generated task's own and for a chat log."""
    if cfg.solutions_path:
        return data_path(cfg.solutions_path, "data.solutions_path")
    source = SOURCES[cfg.name]
    return data_path(cfg.path, "data.path") if source.reads_path and not source.logged_completions else None


def load_problems(cfg: DataConfig, algo: str = "sd", hint_source: str = "reference") -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` problem lists for the configured data set; rows need the fields ``algo``
    trains on (:func:`required_fields`), a separate eval file only problem and answer."""
    if SOURCES[cfg.name].built_in_task:
        task = builtin_task(cfg.task)
        train = task.split(cfg.seed, cfg.train_size, cfg.difficulty, cfg.solution_style)
        evaluation = task.split(cfg.seed + 1, cfg.eval_size, cfg.eval_difficulty or cfg.difficulty,
                                cfg.solution_style, exclude={row["problem"] for row in train})
        return train, evaluation
    rows = read_jsonl(data_path(cfg.path, "data.path"), required_fields(algo, hint_source), where=True)
    if cfg.eval_path:
        return rows, read_jsonl(data_path(cfg.eval_path, "data.eval_path"), EVAL_FIELDS, field="data.eval_path",
                                where=True)
    shuffled = rows[:]
    random.Random(cfg.seed).shuffle(shuffled)
    held_out = min(cfg.eval_size, len(rows) - 1)
    if held_out < cfg.eval_size or held_out > len(rows) - held_out:  # too few rows, or more held out than trained
        log.warning("data.path=%s has %d row(s): holding out %d for eval (data.eval_size=%d) leaves %d to train on; "
                    "add rows, lower data.eval_size or give data.eval_path", cfg.path, len(rows), held_out,
                    cfg.eval_size, len(rows) - held_out)
    return shuffled[held_out:], shuffled[:held_out]


@dataclass
class LoadedData:
    """Raw train and eval rows of the configured data set, before tokenization; ``skipped``
    counts unusable rows by reason (chat logs); ``contamination`` counts held-out problems that
    also occur in training (:func:`check_contamination`), logged as ``data/<name>``."""

    train: list[dict]
    evaluation: list[dict]
    skipped: Counter = field(default_factory=Counter)
    validation: list[dict] = field(default_factory=list)  # held out of the training rows (data.validation_size)
    # chat logs: training conversations whose accepted answer is wrong (sdharness.data.chatlog.load_chats)
    wrongly_accepted: list[dict] = field(default_factory=list)
    contamination: dict[str, int] = field(default_factory=dict)


def shared_problems(rows: list[dict], others: list[dict]) -> list[dict]:
    """The rows of ``rows`` whose problem, with whitespace runs made one space, is also one of ``others``'."""
    seen = {" ".join(other["problem"].split()) for other in others}
    return [row for row in rows if " ".join(row["problem"].split()) in seen]


def check_contamination(cfg: DataConfig, loaded: LoadedData) -> dict[str, int]:
    """``{"eval_in_train", "validation_in_train", "validation_in_eval"}``: how many held-out problems
    a split shares with another. Each overlap is warned with its first example (an error under
    ``data.strict``); a validation split that selects (``data.evaluate_on=validation``, or ``both``: the
    checkpoint the report keeps) sharing problems with the eval split is always an error, since the eval
    split would not be unseen."""
    pairs = {"eval_in_train": (loaded.evaluation, loaded.train, "eval", "training"),
             "validation_in_train": (loaded.validation, loaded.train, "validation", "training"),
             "validation_in_eval": (loaded.validation, loaded.evaluation, "validation", "eval")}
    counts = {}
    for name, (held_out, others, held_out_name, others_name) in pairs.items():
        shared = shared_problems(held_out, others)
        counts[name] = len(shared)
        if not shared:
            continue
        first = shared[0]
        message = (f"{len(shared)} of {len(held_out)} {held_out_name} problems also occur in the {others_name} "
                   f"problems (whitespace normalised), e.g. {first['problem'][:60]!r}"
                   f"{' at ' + first['where'] if 'where' in first else ''}; their scores measure recall, not "
                   f"reasoning: remove them from data.path or data.eval_path")
        if cfg.strict or (name == "validation_in_eval" and cfg.evaluate_on in ("validation", "both")):
            raise DataError(message + ("" if cfg.strict else f"; data.evaluate_on={cfg.evaluate_on} selects on a "
                                       "split that must not overlap the eval split"))
        log.warning("%s (data/%s; data.strict=true makes this an error)", message, name)
    return counts


def load_data(cfg: DataConfig, algo: str = "sd", hint_source: str = "reference") -> LoadedData:
    """Read and validate the configured data for training with ``algo`` (and SD's ``algo.hint_source``);
    needs no tokenizer, so it runs before any model loads."""
    if not SOURCES[cfg.name].logged_completions:
        train, evaluation = load_problems(cfg, algo, hint_source)
        if cfg.validation_size and cfg.validation_size >= len(train):
            raise DataError(f"data.validation_size={cfg.validation_size} leaves no training problem of the "
                            f"{len(train)} (it is taken from them); lower it, or raise data.train_size or add rows")
        check_answers(train + evaluation, cfg.checker)
        # From the training rows, so it is disjoint from the eval split as the training rows are.
        loaded = LoadedData(train[cfg.validation_size:], evaluation, validation=train[:cfg.validation_size])
        if cfg.solutions_path:
            loaded.train, lacking = with_solutions(loaded.train, cfg.solutions_path)
            if lacking:
                loaded.skipped[NO_SOLUTION] = lacking
                log.warning("left out %d of %d training problem(s) (%s): data.solutions_path=%s has no solution for "
                            "them (no bootstrap sample checked, or they were not in its input)", lacking,
                            len(loaded.train) + lacking, NO_SOLUTION, cfg.solutions_path)
        loaded.contamination = check_contamination(cfg, loaded)
        return loaded
    train, evaluation, validation, wrongly_accepted, skipped = load_chats(cfg)
    for reason, count in sorted(skipped.items()):
        log.warning("skipped %d conversation(s) of %s: %s", count, cfg.path, reason)
    if not train:
        raise DataError(f"data.path={cfg.path}: no assistant turn to train on; with data.turns={cfg.turns} and "
                        "data.include_final=false only conversations with more than one assistant turn give "
                        "examples; set data.include_final=true")
    unanswered = next((example for example in train if "answer" not in example), None)
    if "answer" in required_fields(algo) and unanswered is not None:
        raise DataError(f"{unanswered['path']}:{unanswered['line']}: algo={algo} rewards the answer, but this "
                        "conversation has no \"answer\" field; give every conversation one, or use algo=sd")
    check_answers([{**example, "where": f"{example['path']}:{example['line']}"}
                   for example in train + evaluation + validation if "answer" in example], cfg.checker)
    return LoadedData(train, evaluation, skipped, validation=validation, wrongly_accepted=wrongly_accepted)


def with_solutions(train: list[dict], path: str) -> tuple[list[dict], int]:
    """The rows of ``train`` that the JSONL ``path`` (rows with problem and solution) solves, in their own
    order, with its solution as their reference; and how many it does not solve. A row of ``path`` whose
    problem is not one of ``train``'s (a validation or eval problem, or another config's) is refused."""
    training = {row["problem"] for row in train}
    solutions: dict[str, str] = {}
    for row in read_jsonl(data_path(path, "data.solutions_path"), REQUIRED_FIELDS, field="data.solutions_path",
                          where=True):
        if row["problem"] not in training:
            raise DataError(f"{row['where']}: problem {row['problem'][:60]!r} is not one of this config's training "
                            "problems (validation and eval problems included); data.solutions_path must solve the "
                            "pool `python -m sdharness.tools.answer_pool` writes for the same data settings")
        solutions.setdefault(row["problem"], row["solution"])
    kept = [{**row, "solution": solutions[row["problem"]]} for row in train if row["problem"] in solutions]
    return kept, len(train) - len(kept)


def check_answers(rows: list[dict], checker: str) -> None:
    """Refuse, naming file:line, the first gold answer ``checker`` cannot read (:func:`unreadable_answer`)."""
    for row in rows:
        why = unreadable_answer(row["answer"], checker) if "answer" in row else None
        if why:
            raise DataError(f"{row.get('where', 'data')}: {why}")
