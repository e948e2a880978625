"""The shared policy plumbing of every method.

``PolicyModule`` owns what every method shares: the optimiser step (manual, so one batch may
take several steps, as GRPO's inner epochs do), non-finite handling, cost counters, checkpointed
state and metric logging. A method only implements ``losses(batch)``, a generator of
``(loss, metrics)`` pairs, one per optimiser step (``self_distill.py``, ``sft.py``, ``grpo.py``).
"""

from __future__ import annotations

import copy
import logging
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy

from sdharness.config import TrainConfig
from sdharness.data.datamodule import PromptBatch
from sdharness.eval.quick import completion_metrics, gathered_from_all_ranks
from sdharness.methods.accounting import Counters, WallClock, rollout_cost
from sdharness.methods.schedule import lr_lambda
from sdharness.rollout.hf import Rollout, eos_token_ids, generate
from sdharness.scale.checkpoints import StepCheckpoint
from sdharness.scale.resume import config_fingerprint, restore_rng, rng_state
from sdharness.scale.sharding import is_sharded, local_part, shard_model
from sdharness.scale.strategy import gradients_finite

log = logging.getLogger(__name__)


class SkippedUpdatesError(RuntimeError):
    pass


class PolicyModule(L.LightningModule):
    """Shared plumbing; subclasses implement ``losses(batch)``."""

    def __init__(self, model, tokenizer, cfg: TrainConfig):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.counters = Counters()  # the run's totals, summed over ranks after every step
        self.step_counts = Counters()  # this rank's work in the current step, not yet summed
        self.clock = WallClock(self.counters)
        self.skipped_in_a_row = 0
        self.step_metrics: dict = {}  # this step's train/* values, logged at its end (logging_step)
        # (epoch, batches of it trained): checkpointed, so a resumed run skips what it trained on
        self.data_position = (0, 0)
        self.rng_to_restore: dict | None = None
        self.vllm = None  # rollout.backend=vllm: see vllm_engine()
        self.weights_changed = False
        self.parameter_count = sum(p.numel() for p in model.parameters())
        self.eos_ids = eos_token_ids(model, tokenizer)

    def losses(self, batch: PromptBatch) -> Iterator[tuple[torch.Tensor, dict]]:
        raise NotImplementedError

    @property
    def loss_mean_over(self) -> str:
        """The step metric counting what each loss of ``losses`` is the mean over: its tokens
        (``train/loss_tokens``) unless the method says otherwise. Under DDP/FSDP the count is
        summed over ranks so that the update is the mean over all of them (:func:`global_mean_scale`)."""
        return "train/loss_tokens"

    def shadow_weights(self, attribute: str, mode: str, decay: float = 0.99) -> "ShadowWeights":
        """Scoring-only weights of the policy (:class:`ShadowWeights`); a copy of its own, if the mode
        makes one, is registered as ``attribute``, so it moves devices, is sharded and is checkpointed."""
        shadow = ShadowWeights(self.model, mode, decay)
        if shadow.copy is not None:
            setattr(self, attribute, shadow.copy)
        return shadow

    @property
    def sharded(self) -> bool:
        """Weights sharded over ranks (FSDP): generation must keep ranks in step."""
        return self.cfg.trainer.shards_weights and self._trainer is not None and self.trainer.world_size > 1

    def configure_model(self) -> None:
        """``trainer=fsdp``: shard the policy and any frozen/EMA copy in place with FSDP2
        (sdharness/scale/sharding.py) once Lightning has set up the ranks' device mesh."""
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        param_dtype = torch.bfloat16 if self.cfg.trainer.precision == "bf16-mixed" else None
        for model in self.children():  # the policy, and the teacher's or reference's own weights
            shard_model(model, self.device_mesh["data_parallel"], param_dtype=param_dtype)

    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Rollout:
        sampling = self.cfg.rollout
        if sampling.backend == "vllm":
            return self.vllm_engine().generate(prompt_ids, prompt_mask)
        return generate(self.model, self.tokenizer, prompt_ids, prompt_mask, max_new_tokens=sampling.max_new_tokens,
                        temperature=sampling.temperature, top_p=sampling.top_p, progress=sampling.progress,
                        synced=self.sharded)

    def vllm_engine(self):
        """The colocated vLLM engine (sdharness/rollout/vllm.py), started at the first rollout, once
        Lightning has put the model on its GPU."""
        if self.vllm is None:
            from sdharness.rollout.vllm import VLLMRollout

            datamodule = getattr(self.trainer, "datamodule", None)
            self.vllm = VLLMRollout(self.model, self.tokenizer, self.cfg.rollout, seed=self.cfg.seed,
                                    max_prompt_tokens=getattr(datamodule, "longest_student_prompt", None))
        elif self.weights_changed:  # once per rollout, however many optimiser steps came before it
            self.vllm.sync_weights(self.model)
        self.weights_changed = False
        return self.vllm

    def on_fit_end(self) -> None:
        if self.vllm is not None:
            self.vllm.close()

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        metrics: dict = {}
        for loss, step_metrics in self.losses(batch):
            loss = loss * self._global_mean_scale(step_metrics[self.loss_mean_over])
            metrics = {"train/loss": loss.detach(), **step_metrics}  # logged for skipped updates too
            optimizer.zero_grad()
            if torch.isfinite(loss):
                self.manual_backward(loss)
            if not self._all_finite(loss):
                self._skip_update("a non-finite loss or gradient")
                continue
            # No rank had a token to learn from (e.g. every rollout ended at once): AdamW would still
            # move the weights on its momentum alone, so no update.
            if self.trainer.strategy.reduce_boolean_decision(metrics.get("train/loss_tokens", 1) == 0, all=True):
                # Under sibling hints a batch whose groups all failed is data with nothing to teach, counted in
                # train/problems_without_success; on hard problems many come in a row, and that is no fault.
                no_hint = self.trainer.strategy.reduce_boolean_decision(
                    metrics.get("train/sibling_hint_rows", 1) == 0, all=True)
                self._skip_update("no group had a successful sibling" if no_hint else "no loss tokens",
                                  fault=not no_hint)
                continue
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.trainer.gradient_clip_val,
                                gradient_clip_algorithm="norm")
            optimizer.step()
            # Freed now: otherwise this step's gradients stay allocated through the next rollout.
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            self.skipped_in_a_row = 0
            self.after_optimizer_step()
            self.weights_changed = True
        optimizer.zero_grad(set_to_none=True)  # a skipped update's gradients too
        # Advanced here, not reset by on_train_epoch_start, which Lightning does not call when it
        # resumes from a checkpoint taken at an epoch's end.
        epoch, done = self.data_position
        self.data_position = (self.current_epoch, done + 1 if epoch == self.current_epoch else 1)
        self._sum_step_counts()
        self.step_metrics = metrics

    def _global_mean_scale(self, local_count: float) -> float:
        """Factor turning this rank's mean loss into its share of the mean over every rank's tokens
        (or sequences): the strategy averages gradients over ranks, which is the global mean only
        when every rank holds as many. 1 on one process."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return 1.0
        total = self.trainer.strategy.reduce(torch.tensor(float(local_count), dtype=torch.float64,
                                                          device=self.device), reduce_op="sum")
        return global_mean_scale(float(local_count), float(total), world)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Loss and every gradient finite, agreed across ranks (sharded strategies see parts)."""
        gradients = gradients_finite(list(self.model.parameters()), self.trainer.strategy)
        finite = bool(torch.isfinite(loss)) and gradients
        return self.trainer.strategy.reduce_boolean_decision(finite, all=True)

    def _skip_update(self, reason: str, *, fault: bool = True) -> None:
        self.counters.skipped_steps += 1
        if not fault:
            log.info("step %d: %s; update skipped", self.global_step, reason)
            return
        self.skipped_in_a_row += 1
        limit = self.cfg.trainer.max_consecutive_skipped
        log.warning("step %d: %s; update skipped (%d in a row, limit %d)", self.global_step, reason,
                    self.skipped_in_a_row, limit)
        if self.skipped_in_a_row >= limit:
            saved = next((callback.path for callback in self.trainer.callbacks
                          if isinstance(callback, StepCheckpoint) and callback.path.exists()), None)
            kept = (f"The last good checkpoint, {saved}, is kept" if saved else
                    f"No checkpoint was written yet (trainer.checkpoint_every_n_steps="
                    f"{self.cfg.trainer.checkpoint_every_n_steps})")
            resume = ", then resume with ckpt_path=last" if saved else ""
            raise SkippedUpdatesError(
                f"{self.skipped_in_a_row} consecutive updates were skipped (the last for {reason}); stopping. {kept}; "
                f"lower optim.lr or check the data and rollouts (are completions empty?){resume}")

    def count(self, **work) -> None:
        """Record this rank's work in the step (see ``Counters.add``); summed over ranks at step end."""
        self.step_counts.add(parameters=self.parameter_count, **work)

    def _sum_step_counts(self) -> None:
        values = torch.tensor(self.step_counts.summed(), dtype=torch.float64, device=self.device)
        self.counters.add_summed(self.trainer.strategy.reduce(values, reduce_op="sum").tolist())
        self.step_counts = Counters()

    def after_optimizer_step(self) -> None:
        """Hook for state that follows the weights (e.g. an EMA teacher)."""

    def on_train_start(self) -> None:
        if self.rng_to_restore is not None:  # last, after the start-of-training hooks, as in the original run
            restore_rng(self.rng_to_restore)
            self.rng_to_restore = None
        self.clock.restart()
        skipped = getattr(getattr(self.trainer, "datamodule", None), "skipped", None)
        if skipped:  # data the run could not use, by reason (also logged as warnings at setup)
            metrics = {f"data/skipped_{reason.replace(' ', '_')}": float(n) for reason, n in skipped.items()}
            for logger in self.trainer.loggers:
                logger.log_metrics({"data/skipped": float(sum(skipped.values())), **metrics}, step=self.global_step)

    @property
    def logging_step(self) -> bool:
        """Whether Lightning hands this step's logged values to the loggers: every
        ``trainer.log_every_n_steps``-th step and the step training stops at. What is logged on other
        steps is discarded, so it is neither computed (the SD diagnostics) nor logged (Lightning's
        per-value bookkeeping is a fixed cost of every step). Lightning has the rule only on its private
        logger connector; rebuilt from the loop's step counters it would drift after a resume."""
        return self._trainer is None or self.trainer._logger_connector.should_update_logs

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.clock.tick()
        metrics, self.step_metrics = self.step_metrics, {}
        if not self.logging_step:  # asked after the callbacks' hooks: BudgetStop may just have stopped training
            return
        if metrics:
            self.log_dict(metrics, batch_size=len(batch), sync_dist=True)  # mean over ranks
            if self.trainer.progress_bar_callback is not None:
                self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=len(batch))
        self.log_dict(self.counters.as_metrics(), batch_size=len(batch))

    def configure_optimizers(self):
        optim = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Lightning's AMP plugin (bf16-mixed, 16-mixed) refuses to clip for an optimiser that unscales
        # gradients itself, as fused AdamW declares; clipping comes first.
        clips_under_amp = bool(self.cfg.trainer.gradient_clip_val) and self._trainer is not None and isinstance(
            self.trainer.precision_plugin, MixedPrecision)
        optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas),
                                      fused=fused_adamw_supported(params) and not clips_under_amp)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(
            step, warmup_steps=optim.warmup_steps, total_steps=self.cfg.trainer.max_steps, schedule=optim.schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sdharness_counters"] = self.counters.state_dict()
        checkpoint["sdharness_state"] = {
            "data_position": self.data_position, "rng": self._rng_states_of_all_ranks(),
            "skipped_in_a_row": self.skipped_in_a_row}
        checkpoint["sdharness_config"] = config_fingerprint(self.cfg)
        # A resumed run continues the same W&B run rather than starting a second one.
        checkpoint["sdharness_wandb_id"] = next(
            (logger.version for logger in self.loggers if isinstance(logger, WandbLogger)), None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.cfg.resume_allow_changes and "state_dict" in checkpoint:
            adopt_scoring_weights(checkpoint["state_dict"], self.state_dict())
        self.counters.load_state_dict(checkpoint.get("sdharness_counters", {}))
        state = checkpoint.get("sdharness_state")
        if state:
            self.data_position = tuple(state["data_position"])
            self.skipped_in_a_row = state["skipped_in_a_row"]
            self.rng_to_restore = self._this_ranks_rng_state(state["rng"])
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is not None:
                datamodule.resume_position = self.data_position

    def _rng_states_of_all_ranks(self) -> list[dict]:
        """Every rank's RNG state: each rank samples its own rollouts, so each resumes its own
        stream (only rank 0 writes the checkpoint; every rank runs this hook)."""
        return gathered_from_all_ranks([rng_state()], self.trainer.world_size if self._trainer is not None else 1)

    def _this_ranks_rng_state(self, states: list[dict]) -> dict:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if self._trainer is not None and len(states) != self.trainer.world_size:
            log.warning("resuming on %d ranks from a checkpoint written by %d: rollouts will not repeat the "
                        "uninterrupted run's samples", self.trainer.world_size, len(states))
        return states[rank % len(states)]

    def rollout_metrics(self, rollout: Rollout, problems: list[dict]) -> dict[str, float]:
        metrics = {f"train/rollout_{k}": v for k, v in completion_metrics(
            rollout.texts, problems, self.cfg.data.answer_marker, self.cfg.prompt.leak_phrases,
            self.cfg.data.checker, self.cfg.data.task).items()}
        metrics["train/completion_length"] = rollout.lengths.float().mean().item()
        return metrics

    def count_rollout(self, prompt_mask: torch.Tensor, rollout: Rollout) -> int:
        """Record a plain rollout's cost; returns its forward-only tokens (prefill + decoding)."""
        cost = rollout_cost(prompt_mask, rollout)
        self.count(**cost)
        return cost["generated"]


def adopt_scoring_weights(state: dict, own: dict) -> None:
    """A checkpoint resumed with ``resume_allow_changes`` under another method or teacher: the scoring-only
    weights it holds and this module lacks (another method's frozen teacher) are dropped, and those this
    module holds and it lacks keep their construction (the initial weights), each said in a log line.
    The policy's own weights must be there: they are what is resumed."""
    dropped = sorted({key.split(".", 1)[0] for key in state if key not in own})
    kept = sorted({key.split(".", 1)[0] for key in own if key not in state})
    if "model" in dropped + kept:
        return  # a different model: the strict load names the keys
    for key in [key for key in state if key not in own]:
        del state[key]
    for key in [key for key in own if key not in state]:
        state[key] = own[key]
    for names, what in ((dropped, "dropped (this run does not use them)"), (kept, "not in the checkpoint; kept as "
                                                                             "constructed from the initial weights")):
        if names:
            log.warning("resume_allow_changes: the checkpoint's %s %s", ", ".join(names), what)


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW (one kernel for every tensor, as transformers' default
    ``adamw_torch_fused``) takes these parameters: floating tensors on CPU or CUDA, FSDP2's
    DTensors included (DTensor runs the fused kernel on each shard), so that sharded and
    replicated runs take the same steps."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def global_mean_scale(local_count: float, global_count: float, world_size: int) -> float:
    """``world_size * local_count / global_count``: a rank's mean loss (over ``local_count``
    tokens or sequences) times this, with gradients then averaged over ranks, gives the gradient of
    the mean over all ranks' (sum_r local_r mean_r / global). 0 when no rank has any."""
    return world_size * local_count / global_count if global_count > 0 else 0.0


class ShadowWeights:
    """Weights that only score, never train: the live model, its initial weights (a frozen copy, or under
    LoRA the live model with its adapters disabled), or an exponential moving average of the live model."""

    def __init__(self, live: torch.nn.Module, mode: str, decay: float = 0.99):
        self.mode, self.decay, self.live = mode, decay, live
        self.copy = None
        self.view = None
        if mode == "initial" and is_lora(live):
            self.view = AdapterFreeView(live)  # the base weights never train under LoRA: no second copy
        elif mode in ("initial", "ema"):
            self.copy = copy.deepcopy(live).eval().requires_grad_(False)

    @property
    def model(self):
        if self.view is not None:
            return self.view
        return self.live if self.copy is None else self.copy

    @torch.no_grad()
    def update(self) -> None:
        if self.mode == "ema":
            if is_sharded(self.copy):  # update the shards: FSDP2 keeps the root gathered after a no-grad forward
                self.copy.reshard()
            for shadow, live in zip(self.copy.parameters(), self.live.parameters()):
                local_part(shadow).lerp_(local_part(live).detach().to(shadow.dtype), 1.0 - self.decay)


def is_lora(model) -> bool:
    """A PEFT model whose adapters can be switched off (``model.lora_rank > 0``)."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


class AdapterFreeView:
    """A PEFT model's base weights, scoring and generating with the adapters disabled: the frozen initial
    weights under LoRA without holding a second copy (OPSD's way). Everything that runs a forward goes
    through the adapter switch; anything else (config, parameters, device) is the model's own."""

    def __init__(self, peft_model):
        self.peft = peft_model

    def _disabled(self, function):
        def run(*args, **kwargs):
            with self.peft.disable_adapter():
                return function(*args, **kwargs)
        return run

    def __call__(self, *args, **kwargs):
        return self._disabled(self.peft)(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._disabled(self.peft.generate)(*args, **kwargs)

    def get_decoder(self):
        return self._disabled(self.peft.get_decoder())

    def get_output_embeddings(self):
        head = self.peft.get_output_embeddings()
        return getattr(head, "base_layer", head)  # an adapted head's frozen layer

    def __getattr__(self, name):
        return getattr(self.peft, name)
