"""Quick eval: greedy accuracy on the held-out split(s) with the student prompt.

Besides accuracy it reports the early-answer rate (the final answer appears before the step
that derives it) and the mean completion length; on a chat log whose held-out conversations
include accepted answers that are wrong, how often the model gives that wrong answer
(``wrong_accepted_rate``); in SD runs, the teacher's health (:mod:`sdharness.eval.teacher_health`)
at the same points.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import lightning as L
import torch

from sdharness.scale.checkpoints import is_final_step
from sdharness.config import DataConfig, EvalConfig, PromptConfig
from sdharness.data.loading import reference_styles
from sdharness.data.prompts import encode_prompt, encode_prompts, left_pad, render_teacher
from sdharness.eval.teacher_health import TokenSums, add_token_figures, token_metrics
from sdharness.methods.accounting import Stopwatch
from sdharness.rollout.hf import Rollout, generate
from sdharness.data.builtin import builtin_task
from sdharness.data.answers import answer_checker, extract_answer, is_early_answer


def leaked(text: str, phrases: list[str]) -> bool:
    """True when ``text`` contains wording only the teacher prompt has (case-insensitive)."""
    lowered = text.lower()
    return any(phrase.lower() in lowered for phrase in phrases)


def wrongly_accepted(problem: dict, check, answer_marker: str) -> str | None:
    """The answer a logged conversation's user accepted (its ``accepted`` turn's marked answer) when
    ``check`` finds it differs from the true ``answer``; None for a right one, or a problem that is no
    chat, has no answer, or whose accepted turn states none."""
    if not problem.get("answer") or "accepted" not in problem:
        return None
    accepted = extract_answer(problem["accepted"], answer_marker)
    return None if accepted is None or check(problem["accepted"], problem["answer"]) else accepted


def completion_metrics(texts: list[str], problems: list[dict], answer_marker: str,
                       leak_phrases: list[str] = (), checker: str = "builtin", task: str = "chain") -> dict[str, float]:
    """Accuracy (by ``checker``, see :func:`sdharness.data.answers.answer_checker`) and early-answer rate
    against the problems' answers (what counts as a derivation is ``task``'s, see
    :meth:`sdharness.data.tasks.BuiltinTask.derived_at`), and the leakage rate; on chats whose accepted
    answer is wrong (:func:`wrongly_accepted`), ``wrong_accepted_rate``: the share of them where the
    completion gives that wrong answer (how much of the users' mistakes the model learned)."""
    metrics = {"leakage_rate": sum(leaked(t, leak_phrases) for t in texts) / len(texts)} if texts else {}
    checked = [(text, problem["answer"]) for text, problem in zip(texts, problems) if problem.get("answer")]
    if checked:
        check = answer_checker(checker, answer_marker)
        metrics["accuracy"] = sum(check(text, answer) for text, answer in checked) / len(checked)
        derived_at = builtin_task(task).derived_at
        metrics["early_answer_rate"] = sum(is_early_answer(text, answer, answer_marker, derived_at)
                                           for text, answer in checked) / len(checked)
        wrong = [(text, accepted) for text, problem in zip(texts, problems)
                 if (accepted := wrongly_accepted(problem, check, answer_marker)) is not None]
        if wrong:
            metrics["wrong_accepted_rate"] = sum(check(text, accepted) for text, accepted in wrong) / len(wrong)
    return metrics


@dataclass
class EvalResult:
    accuracy: float
    early_answer_rate: float
    leakage_rate: float
    completion_length: float
    size: int
    wrong_accepted_rate: float = math.nan  # chat logs with wrong accepted answers only

    def as_metrics(self, prefix: str = "eval") -> dict[str, float]:
        metrics = {f"{prefix}/accuracy": self.accuracy, f"{prefix}/early_answer_rate": self.early_answer_rate,
                   f"{prefix}/leakage_rate": self.leakage_rate, f"{prefix}/completion_length": self.completion_length}
        if not math.isnan(self.wrong_accepted_rate):
            metrics[f"{prefix}/wrong_accepted_rate"] = self.wrong_accepted_rate
        return metrics


@dataclass
class PromptRows:
    """A batch of rendered prompts (left-padded) and the problems they were rendered from; any prompt
    (student or hinted teacher) is decoded the same way by :func:`evaluate_greedy`."""

    student_ids: torch.Tensor
    student_mask: torch.Tensor
    problems: list[dict]


def prompt_batches(prompt: PromptConfig, tokenizer, texts: list[str], problems: list[dict],
                   batch_size: int) -> list[PromptRows]:
    """``texts`` (rendered prompts, one per problem) as :class:`PromptRows` of ``batch_size``."""
    return [PromptRows(*encode_prompts(prompt, tokenizer, texts[start:start + batch_size]),
                       problems[start:start + batch_size]) for start in range(0, len(texts), batch_size)]


def hinted_batches(data: DataConfig, prompt: PromptConfig, tokenizer, items: list[dict],
                   batch_size: int) -> list[PromptRows]:
    """Teacher prompts (problem + reference) of the encoded eval ``items`` that have a reference, in every
    reference style (:func:`sdharness.data.datamodule.reference_styles`; each row's ``reference_style``
    says which): the items' own teacher prompts for the data's references, the teacher template rendered
    with the other notation's. The styles share batches: a decoding call costs about the same for a few
    rows more, so one call scores both."""
    rows, ids = [], []
    for style, styled in reference_styles(data, items).items():
        own = style in (data.solution_style, "given")
        for row in styled:
            rows.append({**row, "reference_style": style})
            ids.append(row["teacher_ids"] if own else encode_prompt(prompt, tokenizer, render_teacher(
                prompt, row["problem"], row["solution"])))
    return [PromptRows(*left_pad(ids[start:start + batch_size], tokenizer.pad_token_id), rows[start:start + batch_size])
            for start in range(0, len(rows), batch_size)]


def accuracy_by_style(decoded: list, *, answer_marker: str, checker: str, world_size: int = 1) -> dict[str, float]:
    """Greedy accuracy per ``reference_style`` of the rows :func:`evaluate_greedy` decoded (``decoded``, this
    rank's; gathered from every rank)."""
    texts, styles, answers = [], [], []
    for batch, rollout, weight in decoded:
        if weight:
            texts += rollout.texts
            styles += [row["reference_style"] for row in batch.problems]
            answers += [row.get("answer") for row in batch.problems]
    texts, styles, answers = (gathered_from_all_ranks(part, world_size) for part in (texts, styles, answers))
    check = answer_checker(checker, answer_marker)
    accuracy = {}
    for style in dict.fromkeys(styles):
        checked = [(text, answer) for text, s, answer in zip(texts, styles, answers) if s == style and answer]
        if checked:
            accuracy[style] = sum(check(text, answer) for text, answer in checked) / len(checked)
    return accuracy


def evaluate_greedy(model, tokenizer, batches, *, max_new_tokens: int, answer_marker: str,
                    leak_phrases: list[str] = (), checker: str = "builtin", task: str = "chain", synced: bool = False,
                    rank: int = 0, world_size: int = 1, decoded: list | None = None) -> EvalResult:
    """Greedy-decode every batch of student prompts and score the completions.

    On several ranks each decodes every ``world_size``-th batch and the completions are gathered,
    so every rank returns the same result for the whole set. ``synced`` (sharded weights): a rank
    with one batch fewer decodes a stand-in batch, discarded, so that it keeps joining the
    all-gathers of the others. ``decoded``: a list that receives this rank's ``(batch, rollout,
    weight)``, weight 0 for a stand-in, for scoring the completions afterwards."""
    batches = list(batches)
    texts, problems, lengths = [], [], []
    device = next(model.parameters()).device
    rounds = math.ceil(len(batches) / world_size)
    for index in range(rank, rounds * world_size if synced else len(batches), world_size):
        batch = batches[index] if index < len(batches) else batches[0]
        rollout = generate(model, tokenizer, batch.student_ids.to(device), batch.student_mask.to(device),
                           max_new_tokens=max_new_tokens, greedy=True, synced=synced)
        if decoded is not None:
            decoded.append((batch, rollout, 1.0 if index < len(batches) else 0.0))
        if index < len(batches):
            texts += rollout.texts
            problems += batch.problems
            lengths += rollout.lengths.tolist()
    texts, problems, lengths = (gathered_from_all_ranks(part, world_size) for part in (texts, problems, lengths))
    metrics = completion_metrics(texts, problems, answer_marker, leak_phrases, checker, task)
    nan = float("nan")
    return EvalResult(metrics.get("accuracy", nan), metrics.get("early_answer_rate", nan),
                      metrics.get("leakage_rate", nan), sum(lengths) / len(lengths) if lengths else 0.0, len(texts),
                      metrics.get("wrong_accepted_rate", nan))


def gathered_from_all_ranks(items: list, world_size: int) -> list:
    """Every rank's ``items``, concatenated in rank order, on every rank (a collective when
    ``world_size`` > 1: every rank must call it)."""
    if world_size == 1:
        return items
    parts = [None] * world_size
    torch.distributed.all_gather_object(parts, items)
    return [item for part in parts for item in part]


class QuickEval(L.Callback):
    """Runs :func:`evaluate_greedy` before training, every ``every_n_steps`` and at the final step.

    ``splits``: metric prefix -> a callable giving that split's batches (``eval``, ``val`` or both);
    the first is the run's own, kept in ``history``. ``hinted_batches`` (SD runs): a callable giving the
    teacher prompts per reference style, for the teacher's health on the first split
    (:mod:`sdharness.eval.teacher_health`), measured on its first ``cfg.health_size`` problems."""

    def __init__(self, splits: dict[str, Callable], cfg: EvalConfig, answer_marker: str,
                 leak_phrases: list[str] = (), hinted_batches: Callable | None = None):
        self.splits, self.cfg, self.prefix = splits, cfg, next(iter(splits))
        self.answer_marker, self.leak_phrases = answer_marker, list(leak_phrases)
        self.hinted_batches = hinted_batches
        self.eval_clock, self.health_clock = Stopwatch(), Stopwatch()
        self.history: list[tuple[int, EvalResult]] = []

    def _decode(self, trainer: L.Trainer, module, model, batches, decoded: list | None = None) -> EvalResult:
        return evaluate_greedy(model, module.tokenizer, batches, max_new_tokens=self.cfg.max_new_tokens,
                               answer_marker=self.answer_marker, leak_phrases=self.leak_phrases,
                               checker=module.cfg.data.checker, task=module.cfg.data.task, synced=module.sharded,
                               rank=trainer.global_rank, world_size=trainer.world_size, decoded=decoded)

    def run(self, trainer: L.Trainer, module) -> EvalResult:
        if self.history and self.history[-1][0] == trainer.global_step:
            return self.history[-1][1]
        module.clock.pause()  # evaluation time is not training time
        metrics, decoded = {}, []
        with self.eval_clock:
            for prefix, batches in self.splits.items():
                own = prefix == self.prefix
                result = self._decode(trainer, module, module.model, batches(), decoded if own else None)
                metrics |= result.as_metrics(prefix)
                if own:
                    kept = result
            metrics |= self.lm_eval(module)
        if self.hinted_batches is not None:
            metrics |= self.teacher_health(trainer, module, decoded)
        metrics |= {**module.counters.as_metrics(), "time/eval_seconds": self.eval_clock.seconds}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.history.append((trainer.global_step, kept))
        module.clock.restart()
        return kept

    def teacher_health(self, trainer: L.Trainer, module, decoded: list) -> dict[str, float]:
        """``health/*`` (:mod:`sdharness.eval.teacher_health`): hint accuracy of the teacher's (and, when
        they differ, the current) weights per reference style; entropies and drift on the eval's completions."""
        models = module.health_models()
        with self.health_clock:
            metrics = {}
            for name, model in (("teacher", models.teacher), ("policy", models.policy)):
                if name == "policy" and model is models.teacher:
                    continue
                hinted: list = []
                self._decode(trainer, module, model, self.hinted_batches(), hinted)
                accuracy = accuracy_by_style(hinted, answer_marker=self.answer_marker, checker=module.cfg.data.checker,
                                             world_size=trainer.world_size)
                metrics |= {f"health/{name}_hint_accuracy_{style}": value for style, value in accuracy.items()}
            sums, device = TokenSums(), module.device
            # As many batches on every rank (sharded ranks decoded stand-ins to stay in step): about health_size rows.
            for batch, rollout, weight in decoded[:math.ceil(self.cfg.health_size / self.cfg.batch_size)]:
                add_token_figures(sums, policy=models.policy, teacher=models.teacher, initial=models.initial,
                                  student_ids=batch.student_ids.to(device), student_mask=batch.student_mask.to(device),
                                  teacher_ids=batch.teacher_ids.to(device), teacher_mask=batch.teacher_mask.to(device),
                                  rollout=Rollout(rollout.completion_ids.to(device),
                                                  rollout.completion_mask.to(device), rollout.texts), weight=weight)
            summed = sums.as_tensor(device)
            if trainer.world_size > 1:
                summed = trainer.strategy.reduce(summed, reduce_op="sum")
            metrics |= token_metrics(summed.tolist(), teacher_is_policy=models.teacher is models.policy,
                                     with_drift=models.initial is not None)
        metrics["time/health_seconds"] = self.health_clock.seconds
        return metrics

    def lm_eval(self, module) -> dict[str, float]:
        """``lmeval/<task>/<metric>`` for the configured lm-eval tasks (none by default)."""
        if not self.cfg.tasks:
            return {}
        from sdharness.eval.lmeval import run_lm_eval

        results = run_lm_eval(module.model, module.tokenizer, list(self.cfg.tasks), limit=self.cfg.lm_eval_limit,
                              max_gen_toks=self.cfg.max_new_tokens, prompt=module.cfg.prompt,
                              device=str(module.device), batch_size=self.cfg.batch_size)
        return {f"lmeval/{task}/{metric}": value for task, metrics in results.items()
                for metric, value in metrics.items() if "stderr" not in metric}

    def on_train_start(self, trainer, module) -> None:
        if self.cfg.at_start and trainer.global_step == 0:  # a resumed run evaluated its start already
            self.run(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        every = self.cfg.every_n_steps
        # The final eval runs inside the loop too, so the final checkpoint holds it.
        if is_final_step(trainer) or (every and trainer.global_step % every == 0):
            self.run(trainer, module)

    def state_dict(self) -> dict:  # checkpointed, so a resumed run still reports its starting accuracy
        return {"history": [(step, asdict(result)) for step, result in self.history],
                "eval_seconds": self.eval_clock.seconds, "health_seconds": self.health_clock.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(step, EvalResult(**result)) for step, result in state["history"]]
        self.eval_clock = Stopwatch(state.get("eval_seconds", 0.0))
        self.health_clock = Stopwatch(state.get("health_seconds", 0.0))


def print_summary(evals: list, counters, output_dir, prefix: str = "eval") -> dict[str, float]:
    """Print before/after eval accuracy (``QuickEval.history``) and the run's cost; return the final
    metrics (``prefix``: ``val`` when the validation split was scored)."""
    labelled = [("before", *evals[0]), ("after", *evals[-1])] if evals[0][0] == 0 else [("after", *evals[-1])]
    lines = [
        f"{'':<14}{'step':>6}{'accuracy':>10}{'early_answer':>14}{'length':>8}",
        *(f"{label:<14}{step:>6}{result.accuracy:>10.3f}{result.early_answer_rate:>14.3f}{result.completion_length:>8.1f}"
          for label, step, result in labelled),
        f"problems {counters.problems_seen}, generated tokens {counters.generated_tokens}, "
        f"train seconds {counters.wall_seconds:.1f}, run dir {output_dir}",
    ]
    print("\n".join(lines), flush=True)
    return evals[-1][1].as_metrics(prefix)
