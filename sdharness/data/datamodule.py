"""Problems in, tokenized student/teacher prompt batches out.

``ProblemDataModule`` builds the train and held-out splits (built-in arithmetic, or a JSONL file
of ``{"problem", "solution", "answer"?}`` rows, or a chat log, see :mod:`sdharness.data.chatlog`),
renders and tokenizes both prompts once, skips (and counts, in ``skipped`` by reason) problems
whose prompt plus completion would not fit the model's context, and yields :class:`PromptBatch`
objects. For a chat log, ``solution_ids`` is the logged assistant turn, which is ``g``.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch.utils.data import DataLoader

from sdharness.data import SOURCES
from sdharness.data.chatlog import EXCEEDS_CONTEXT, encode_chat, encode_completion, load_chats
from sdharness.errors import ConfigError
from sdharness.data.jsonl import EVAL_FIELDS, REQUIRED_FIELDS, DataError, read_jsonl
from sdharness.models import resolve_path
from sdharness.data.prompts import encode_prompt, left_pad, render_student, render_teacher, right_pad, teacher_context
from sdharness.data.builtin import builtin_task
from sdharness.data.answers import unreadable_answer
from sdharness.data.tasks import SOLUTION_STYLES
from sdharness.methods import METHODS

if TYPE_CHECKING:  # annotations only: data/ never imports the config schema, which imports data/
    from sdharness.config import DataConfig, PromptConfig

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


class EpochSampler(torch.utils.data.Sampler):
    """This rank's problems of a seeded permutation per epoch, in batch order, resumable mid-epoch.

    Epoch ``e`` shuffles with seed ``seed + e`` alone, so a resumed run rebuilds any epoch's order
    without replaying the ones before it. A global batch is ``batch_size x world_size`` consecutive
    problems of the permutation and rank ``r`` yields its ``r``-th slice, so ranks never share a
    problem within a step (the DataLoader groups them back into ``batch_size``). With several ranks
    the epoch is padded from its start to whole global batches (as ``DistributedSampler`` pads) so
    every rank takes the same number of steps; a single process just takes a smaller last batch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 resume_at: tuple[int, int] | None = None):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.resume_at = resume_at  # (epoch, batches already trained in it)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before each epoch
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        global_batch = self.batch_size * self.world_size
        if self.world_size > 1:
            padded = math.ceil(self.size / global_batch) * global_batch
            order = (order * math.ceil(padded / self.size))[:padded]
        batches = [order[start:start + global_batch][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                   for start in range(0, len(order), global_batch)]
        if self.resume_at is not None:  # only the first epoch iterated after a resume is partly done
            epoch, done = self.resume_at
            self.resume_at = None
            if epoch == self.epoch:
                batches = batches[done:]
        return batches

    def __iter__(self):
        for batch in self._batches():
            yield from batch

    def __len__(self) -> int:
        per_rank = math.ceil(self.size / (self.batch_size * self.world_size)) * self.batch_size
        return per_rank if self.world_size > 1 else self.size


@dataclass
class LoadedData:
    """Raw train and eval rows of the configured data set, before tokenization; ``skipped``
    counts unusable rows by reason (chat logs); ``contamination`` counts held-out problems that
    also occur in training (:func:`check_contamination`), logged as ``data/<name>``."""

    train: list[dict]
    evaluation: list[dict]
    skipped: Counter = field(default_factory=Counter)
    validation: list[dict] = field(default_factory=list)  # held out of the training rows (data.validation_size)
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
    train, evaluation, validation, skipped = load_chats(cfg)
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
    return LoadedData(train, evaluation, skipped, validation=validation)


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


@dataclass
class PromptBatch:
    """Left-padded prompts ``[batch, length]`` plus the raw problems they came from."""

    student_ids: torch.Tensor
    student_mask: torch.Tensor
    teacher_ids: torch.Tensor
    teacher_mask: torch.Tensor
    solution_ids: torch.Tensor  # [batch, length], right-padded reference solution + EOS (for SFT)
    solution_mask: torch.Tensor
    problems: list[dict] = field(default_factory=list)
    # The solutions are logged completions (data=chatlog): self-distillation scores them as g, no rollout.
    logged: bool = False

    def __len__(self) -> int:
        return len(self.problems)


class ProblemDataModule(L.LightningDataModule):
    def __init__(self, data: DataConfig, prompt: PromptConfig, tokenizer, *, max_context: int,
                 max_new_tokens: int, eval_batch_size: int = 16, loaded: LoadedData | None = None, algo: str = "sd",
                 run_seed: int = 0):
        super().__init__()
        self.cfg, self.prompt, self.tokenizer, self.algo = data, prompt, tokenizer, algo
        # data.seed fixes which problems form the splits; the run's seed also moves the training order,
        # so that runs of another seed are replicates of the method, not of one data order (seed 0
        # keeps the order of data.seed alone).
        self.order_seed = data.seed + run_seed
        self.max_context, self.max_new_tokens = max_context, max_new_tokens
        self.eval_batch_size = eval_batch_size
        self.loaded = loaded  # rows already read by load_data (the train app reads them before the model)
        self.skipped: Counter = Counter()  # reason -> problems, examples or conversations skipped
        self.train: list[dict] = []
        self.evaluation: list[dict] = []  # the scored split: eval, or validation with data.evaluate_on=validation
        self.validation: list[dict] = []  # data.evaluate_on=both: scored beside the eval split
        self.resume_position: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def _encode(self, problems: list[dict], split: str) -> list[dict]:
        """Problems as encoded items; those whose prompt + new tokens exceed the context are
        skipped and counted, or with ``data.strict`` an error naming file:line (or the problem)."""
        kept, too_long = [], 0
        for index, item in enumerate(problems):
            student = encode_prompt(self.prompt, self.tokenizer, render_student(self.prompt, item["problem"]))
            # Rows without a solution (GRPO's, a separate eval file's) are never scored by a teacher.
            teacher = student if "solution" not in item else encode_prompt(
                self.prompt, self.tokenizer, render_teacher(self.prompt, item["problem"], teacher_context(item)))
            needed = max(len(student), len(teacher)) + self.max_new_tokens
            if needed > self.max_context:
                if self.cfg.strict:
                    where = item.get("where") or f"{split} problem {index} ({item['problem'][:40]!r})"
                    raise DataError(f"{where}: the {'teacher' if len(teacher) > len(student) else 'student'} prompt "
                                    f"takes {max(len(student), len(teacher))} tokens, + {self.max_new_tokens} new "
                                    f"tokens (max of rollout.max_new_tokens and eval.max_new_tokens) = {needed}, "
                                    f"more than the model context of {self.max_context}; shorten the problem or "
                                    "solution, lower the max_new_tokens, or set data.strict=false to skip and count "
                                    "such problems")
                too_long += 1
                continue
            solution = self.tokenizer(item.get("solution", ""), add_special_tokens=False)["input_ids"]
            kept.append({**item, "student_ids": student, "teacher_ids": teacher,
                         "solution_ids": solution + [self.tokenizer.eos_token_id]})
        if too_long:
            self.skipped[EXCEEDS_CONTEXT] += too_long
            log.warning("skipped %d %s problem(s) (%s): prompt + %d new tokens exceeds the model context of %d; "
                        "data.strict=true makes this an error naming each", too_long, split, EXCEEDS_CONTEXT,
                        self.max_new_tokens, self.max_context)
        return kept

    def _encode_chats(self, examples: list[dict], split: str) -> list[dict]:
        """Chat-log examples (:func:`sdharness.data.chatlog.chat_examples`) as encoded items; too long
        ones are skipped and counted, or with ``data.strict`` an error naming file:line."""
        kept, too_long = [], 0
        for example in examples:
            student = encode_chat(self.prompt, self.tokenizer, example["context"])
            teacher = encode_chat(self.prompt, self.tokenizer, example["context"], hint=example["accepted"])
            completion = encode_completion(self.prompt, self.tokenizer, example["completion"])
            # Scoring needs prompt + logged turn; eval (and a generating method) student prompt + new tokens.
            needed = max(len(student), len(teacher)) + len(completion), len(student) + self.max_new_tokens
            if max(needed) > self.max_context:
                if self.cfg.strict:
                    raise DataError(f"{example['path']}:{example['line']}: the assistant turn at messages"
                                    f"[{example['turn']}] needs {max(needed)} tokens (conversation, accepted-answer "
                                    f"hint and turn, or prompt + {self.max_new_tokens} new tokens) but the model "
                                    f"context is {self.max_context}; shorten the conversation or set "
                                    "data.strict=false to skip it")
                too_long += 1
                continue
            item = {"problem": example["problem"], "solution": example["completion"], "accepted": example["accepted"],
                    "student_ids": student, "teacher_ids": teacher, "solution_ids": completion}
            if "answer" in example:
                item["answer"] = example["answer"]
            kept.append(item)
        if too_long:
            self.skipped[EXCEEDS_CONTEXT] += too_long
            log.warning("skipped %d %s chat example(s) (%s): conversation + turn or prompt + %d new tokens exceeds "
                        "the model context of %d", too_long, split, EXCEEDS_CONTEXT, self.max_new_tokens,
                        self.max_context)
        return kept

    def setup(self, stage: str | None = None) -> None:
        if self.train:
            return
        loaded = self.loaded or load_data(self.cfg, self.algo)
        self.skipped.update(loaded.skipped)
        encode = self._encode_chats if SOURCES[self.cfg.name].logged_completions else self._encode
        self.train = encode(loaded.train, "train")
        self.evaluation = encode(loaded.validation if self.cfg.evaluate_on == "validation" else loaded.evaluation,
                                 "eval")
        if self.cfg.evaluate_on == "both":
            self.validation = encode(loaded.validation, "validation")
        if not self.train:
            raise ConfigError(f"data: no training problem fits the model context of {self.max_context} tokens "
                              f"with {self.max_new_tokens} new tokens (max of rollout.max_new_tokens and "
                              "eval.max_new_tokens); shorten the problems or lower both max_new_tokens")
        if len(self.train) < self.cfg.batch_size:
            log.warning("only %d training problem(s), fewer than data.batch_size=%d: every batch holds all %d and "
                        "each step goes over them again", len(self.train), self.cfg.batch_size, len(self.train))
        if not self.evaluation:
            log.warning("no held-out problem to evaluate (data.eval_size=%d): eval metrics will be NaN; set "
                        "data.eval_path or data.eval_size, or add rows", self.cfg.eval_size)

    @property
    def longest_student_prompt(self) -> int:
        """Tokens in the longest training prompt a rollout starts from (after ``setup``)."""
        return max((len(item["student_ids"]) for item in self.train), default=0)

    def collate(self, items: list[dict]) -> PromptBatch:
        pad = self.tokenizer.pad_token_id
        student_ids, student_mask = left_pad([item["student_ids"] for item in items], pad)
        teacher_ids, teacher_mask = left_pad([item["teacher_ids"] for item in items], pad)
        solution_ids, solution_mask = right_pad([item["solution_ids"] for item in items], pad)
        problems = [{key: item[key] for key in ("problem", "solution", "answer", "accepted")
                     if key in item} for item in items]
        return PromptBatch(student_ids, student_mask, teacher_ids, teacher_mask, solution_ids, solution_mask.bool(),
                           problems, logged=SOURCES[self.cfg.name].logged_completions)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochSampler(len(self.train), self.cfg.batch_size, self.order_seed, rank=rank, world_size=world,
                               resume_at=self.resume_position)
        return DataLoader(self.train, batch_size=self.cfg.batch_size, sampler=sampler, collate_fn=self.collate,
                          generator=self._own_generator())

    def eval_dataloader(self) -> DataLoader:
        return DataLoader(self.evaluation, batch_size=self.eval_batch_size, collate_fn=self.collate,
                          generator=self._own_generator())

    def validation_dataloader(self) -> DataLoader:
        return DataLoader(self.validation, batch_size=self.eval_batch_size, collate_fn=self.collate,
                          generator=self._own_generator())

    def scored_splits(self) -> dict:
        """Metric prefix -> the dataloader of each split the quick evals score (data.evaluate_on); the
        first is the run's own. The validation split is logged as val/*, never as eval/*."""
        if self.cfg.evaluate_on == "validation":
            return {"val": self.eval_dataloader}
        return {"eval": self.eval_dataloader, **({"val": self.validation_dataloader} if self.validation else {})}

    def _own_generator(self) -> torch.Generator:
        # Without one, each new DataLoader iterator draws a seed from torch's global generator, the
        # one rollouts sample from: an eval, or an epoch starting before vs after a resume, would
        # shift every later sample.
        return torch.Generator().manual_seed(self.cfg.seed)
