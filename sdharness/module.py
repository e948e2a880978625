"""Lightning modules: the shared policy plumbing and the self-distillation step.

``PolicyModule`` owns what every method shares: the optimiser step (manual, so one batch may
take several steps, as GRPO's inner epochs do), non-finite handling, cost counters, checkpointed
state and metric logging. A method only implements ``losses(batch)``, a generator of
``(loss, metrics)`` pairs, one per optimiser step. ``SelfDistillModule`` is the method this
harness exists for: rollout -> teacher logits (no grad) -> student logits -> aggregate -> loss.
SFT and GRPO live in ``baselines.py``.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Iterator

import lightning as L
import torch

from sdharness.accounting import Counters, WallClock
from sdharness.config import TrainConfig
from sdharness.data import PromptBatch
from sdharness.evaluation import completion_metrics
from sdharness.guided import guided_rollout, guided_token_weights
from sdharness.logits import completion_hidden, completion_logits
from sdharness.losses import distillation_loss
from sdharness.positions import loss_positions
from sdharness.rollout import Rollout, eos_token_ids, generate

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step``: linear warmup, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


class PolicyModule(L.LightningModule):
    """Shared plumbing; subclasses implement ``losses(batch)``."""

    def __init__(self, model, tokenizer, cfg: TrainConfig):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.counters = Counters()
        self.clock = WallClock(self.counters)
        self.nonfinite_in_a_row = 0
        self.parameter_count = sum(p.numel() for p in model.parameters())
        self.eos_ids = eos_token_ids(model, tokenizer)

    def losses(self, batch: PromptBatch) -> Iterator[tuple[torch.Tensor, dict]]:
        raise NotImplementedError

    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Rollout:
        sampling = self.cfg.rollout
        return generate(self.model, self.tokenizer, prompt_ids, prompt_mask, max_new_tokens=sampling.max_new_tokens,
                        temperature=sampling.temperature, top_p=sampling.top_p, progress=sampling.progress)

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        metrics: dict = {}
        for loss, metrics in self.losses(batch):
            optimizer.zero_grad()
            if torch.isfinite(loss):
                self.manual_backward(loss)
            if not self._all_finite(loss):
                self._skip_nonfinite()
                continue
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.trainer.gradient_clip_val,
                                gradient_clip_algorithm="norm")
            optimizer.step()
            schedule.step()
            self.nonfinite_in_a_row = 0
            self.after_optimizer_step()
            metrics = {"train/loss": loss.detach(), **metrics}
        if metrics:
            self.log_dict(metrics, batch_size=len(batch))
            self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=len(batch))

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Loss and every gradient finite, agreed across ranks (sharded strategies see parts)."""
        finite = bool(torch.isfinite(loss)) and all(
            bool(torch.isfinite(p.grad).all()) for p in self.model.parameters() if p.grad is not None)
        return self.trainer.strategy.reduce_boolean_decision(finite, all=True)

    def _skip_nonfinite(self) -> None:
        self.nonfinite_in_a_row += 1
        self.counters.skipped_steps += 1
        limit = self.cfg.trainer.max_consecutive_nonfinite
        log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row, limit %d)",
                    self.global_step, self.nonfinite_in_a_row, limit)
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} consecutive updates had a non-finite loss or gradient; stopping. The "
                "last good checkpoint is kept; lower optim.lr or check the data, then resume with ckpt_path=last")

    def after_optimizer_step(self) -> None:
        """Hook for state that follows the weights (e.g. an EMA teacher)."""

    def on_train_start(self) -> None:
        self.clock.restart()
        skipped = getattr(getattr(self.trainer, "datamodule", None), "skipped", None)
        if skipped:  # data the run could not use, by reason (also logged as warnings at setup)
            metrics = {f"data/skipped_{reason.replace(' ', '_')}": float(n) for reason, n in skipped.items()}
            for logger in self.trainer.loggers:
                logger.log_metrics({"data/skipped": float(sum(skipped.values())), **metrics}, step=self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.clock.tick()
        self.log_dict(self.counters.as_metrics(), batch_size=len(batch))

    def configure_optimizers(self):
        optim = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(
            step, warmup_steps=optim.warmup_steps, total_steps=self.cfg.trainer.max_steps, schedule=optim.schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sdharness_counters"] = self.counters.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.counters.load_state_dict(checkpoint.get("sdharness_counters", {}))

    def rollout_metrics(self, rollout: Rollout, problems: list[dict]) -> dict[str, float]:
        metrics = {f"train/rollout_{k}": v for k, v in completion_metrics(
            rollout.texts, problems, self.cfg.data.answer_marker, self.cfg.prompt.leak_phrases).items()}
        metrics["train/completion_length"] = rollout.lengths.float().mean().item()
        return metrics

    def count_rollout(self, prompt_mask: torch.Tensor, rollout: Rollout) -> int:
        """Record a rollout's cost; returns its forward-only tokens (prefill + decoding)."""
        generated = int(rollout.lengths.sum())
        self.counters.add(parameters=self.parameter_count, rollouts=len(rollout.texts), generated=generated,
                          forward_only=int(prompt_mask.sum()) + generated)
        return generated


class ShadowWeights:
    """Weights that only score, never train: the live model, a frozen copy of the initial
    weights, or an exponential moving average of the live model."""

    def __init__(self, live: torch.nn.Module, mode: str, decay: float = 0.99):
        self.mode, self.decay, self.live = mode, decay, live
        self.copy = None
        if mode in ("initial", "ema"):
            self.copy = copy.deepcopy(live).eval().requires_grad_(False)

    @property
    def model(self) -> torch.nn.Module:
        return self.live if self.copy is None else self.copy

    @torch.no_grad()
    def update(self) -> None:
        if self.mode == "ema":
            for shadow, live in zip(self.copy.parameters(), self.live.parameters()):
                shadow.lerp_(live.detach().to(shadow.dtype), 1.0 - self.decay)


class SelfDistillModule(PolicyModule):
    """Privileged on-policy self-distillation."""

    def __init__(self, model, tokenizer, cfg: TrainConfig):
        super().__init__(model, tokenizer, cfg)
        self.teacher = ShadowWeights(model, cfg.teacher.weights, cfg.teacher.ema_decay)
        if self.teacher.copy is not None:
            self.teacher_model = self.teacher.copy  # registered, so it moves devices and is checkpointed
        self.logged = cfg.data.name == "chatlog"  # g is the logged assistant turn: nothing is generated

    def logged_completions(self, batch: PromptBatch) -> Rollout:
        """The batch's logged completions (``solution_ids`` + EOS) as ``g``, for ``data=chatlog``."""
        texts = self.tokenizer.batch_decode(batch.solution_ids, skip_special_tokens=True)
        return Rollout(batch.solution_ids, batch.solution_mask, texts)

    def losses(self, batch: PromptBatch):
        if self.logged:  # sdharness/chatlog.py: distil logged turns, no rollout
            rollout, guidance = self.logged_completions(batch), {}
        elif self.cfg.rollout.guidance == "never":
            rollout, guidance = self.rollout(batch.student_ids, batch.student_mask), {}
        else:  # guided sampling (sdharness/guided.py): not strictly on-policy
            rollout, guidance = guided_rollout(self, batch)
        g, g_mask = rollout.completion_ids, rollout.completion_mask
        with torch.no_grad():
            teacher_logits = completion_hidden(self.teacher.model, batch.teacher_ids, batch.teacher_mask, g, g_mask)
        student_logits = completion_logits(self.model, batch.student_ids, batch.student_mask, g, g_mask)
        mask = loss_positions(self.tokenizer, g, g_mask, rollout.texts, mode=self.cfg.loss.positions,
                              answer_marker=self.cfg.data.answer_marker, eos_ids=self.eos_ids)
        weights, weight_metrics = guided_token_weights(rollout, mask, self.cfg.rollout)  # None unless enabled
        result = distillation_loss(student_logits, teacher_logits, mask, aggregation=self.cfg.aggregation.name,
                                   tau=self.cfg.aggregation.tau, divergence_name=self.cfg.loss.divergence,
                                   beta=self.cfg.loss.beta, chunk_size=self.cfg.loss.chunk_size, token_weights=weights)
        self._count(batch, rollout)
        yield result.loss, {"train/divergence_per_token": result.loss.detach(),
                            "train/teacher_student_kl": result.teacher_student_kl,
                            "train/loss_tokens": float(result.tokens), **self.rollout_metrics(rollout, batch.problems),
                            **guidance, **weight_metrics}

    def _count(self, batch: PromptBatch, rollout: Rollout) -> None:
        # Logged completions cost no rollout: generated_tokens stays 0, only the two scoring passes count.
        g_tokens = int(rollout.lengths.sum()) if self.logged else self.count_rollout(batch.student_mask, rollout)
        self.counters.add(parameters=self.parameter_count, problems=len(batch),
                          forward_only=int(batch.teacher_mask.sum()) + g_tokens,
                          trained=int(batch.student_mask.sum()) + g_tokens)

    def after_optimizer_step(self) -> None:
        self.teacher.update()
