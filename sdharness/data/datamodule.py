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
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch.utils.data import DataLoader

from sdharness.data import SOURCES
from sdharness.data.chatlog import EXCEEDS_CONTEXT, encode_chat, encode_completion
from sdharness.data.jsonl import DataError
from sdharness.data.loading import LoadedData, load_data
from sdharness.data.prompts import encode_prompt, left_pad, render_student, render_teacher, right_pad, teacher_context
from sdharness.errors import ConfigError

if TYPE_CHECKING:  # annotations only: data/ never imports the config schema, which imports data/
    from sdharness.config import DataConfig, PromptConfig

log = logging.getLogger(__name__)
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
        self.wrongly_accepted: list[dict] = []  # chat logs: trained-on conversations whose accepted answer is wrong
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
        if self.cfg.evaluate_on != "validation" and loaded.wrongly_accepted:
            self.wrongly_accepted = encode(loaded.wrongly_accepted, "wrongly accepted")
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

    def _held_out_loader(self, items: list[dict]) -> DataLoader:
        return DataLoader(items, batch_size=self.eval_batch_size, collate_fn=self.collate,
                          generator=self._own_generator())

    def eval_dataloader(self) -> DataLoader:
        return self._held_out_loader(self.evaluation)

    def validation_dataloader(self) -> DataLoader:
        return self._held_out_loader(self.validation)

    def scored_splits(self) -> dict:
        """Metric prefix -> the dataloader of each split the quick evals score (data.evaluate_on); the
        first is the run's own. The validation split is logged as val/*, never as eval/*; a chat log's
        trained-on conversations whose accepted answer is wrong as wrongly_accepted/* (not while selecting
        on validation)."""
        if self.cfg.evaluate_on == "validation":
            return {"val": self.eval_dataloader}
        splits = {"eval": self.eval_dataloader}
        if self.validation:
            splits["val"] = self.validation_dataloader
        if self.wrongly_accepted:
            splits["wrongly_accepted"] = lambda: self._held_out_loader(self.wrongly_accepted)
        return splits

    def _own_generator(self) -> torch.Generator:
        # Without one, each new DataLoader iterator draws a seed from torch's global generator, the
        # one rollouts sample from: an eval, or an epoch starting before vs after a resume, would
        # shift every later sample.
        return torch.Generator().manual_seed(self.cfg.seed)
