"""The run's config groups: budgets (``budget``), the optimiser (``optim``), the quick eval
(``eval``), Lightning's Trainer (``trainer``) and W&B (``logger``). Their defaults are the defaults:
an option YAML in conf/ states only what differs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from sdharness.schema.checks import choice, positive, require


@dataclass
class BudgetConfig:
    """Stop at the first budget reached (0: no limit), in units every method shares."""

    problems: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    def __post_init__(self):
        for name in ("problems", "generated_tokens", "seconds"):
            value = getattr(self, name)
            require(0 <= value < math.inf, f"budget.{name} must be >= 0 (0: no limit), got {value!r}")


@dataclass
class OptimConfig:
    """AdamW on fp32 master weights with warmup and a ``constant``/``linear``/``cosine`` decay."""

    lr: float = 2e-6  # SmolLM2-135M collapsed within 12 steps at 1e-5 (LOG.md)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"

    def __post_init__(self):
        positive("optim.lr", self.lr)
        choice("optim.schedule", self.schedule, ("constant", "linear", "cosine"))


@dataclass
class EvalConfig:
    """Greedy accuracy on the held-out split with the student prompt."""

    every_n_steps: int = 0  # 0: only before and after training
    max_new_tokens: int = 64
    batch_size: int = 32
    at_start: bool = True
    # lm-eval tasks run at the same points (local ones in evals/tasks, or standard hub tasks).
    tasks: list[str] = field(default_factory=list)
    lm_eval_limit: Optional[int] = None  # documents per task; None: all
    # SD runs: the teacher's health at every eval point (sdharness/eval/teacher_health.py) on the first
    # health_size problems of the scored split. Its drift figure holds a frozen copy of the initial weights
    # unless the teacher is that copy or LoRA gives them by disabling the adapters.
    teacher_health: bool = True
    health_size: int = 32

    def __post_init__(self):
        require(self.every_n_steps >= 0, f"eval.every_n_steps must be >= 0, got {self.every_n_steps}")
        require(self.health_size >= 1, f"eval.health_size must be >= 1, got {self.health_size}; "
                "eval.teacher_health=false turns the health figures off")
        require(self.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}; the "
                 "eval decodes the answer, e.g. eval.max_new_tokens=96")
        require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}; e.g. eval.batch_size=16")


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer``; anything Lightning accepts can go in ``extra``."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"  # auto | ddp | fsdp (FSDP2) | deepspeed_stage_2 | any other Lightning name
    strategy_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the strategy class
    precision: Any = "32-true"
    max_steps: int = 12
    gradient_clip_val: Optional[float] = 1.0
    log_every_n_steps: int = 1
    checkpoint_every_n_steps: int = 50
    max_consecutive_skipped: int = 5  # updates skipped in a row (non-finite, or no loss tokens) before the run stops
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shards_weights(self) -> bool:
        """FSDP: each rank holds a slice of the weights, so every forward is a collective."""
        return self.strategy == "fsdp"

    def __post_init__(self):
        from lightning.pytorch.strategies import StrategyRegistry

        require(self.max_steps >= 1, f"trainer.max_steps must be >= 1, got {self.max_steps}")
        if isinstance(self.strategy, str):
            choice("trainer.strategy", self.strategy, ["auto", *sorted(StrategyRegistry)])
            require(not self.strategy.startswith("deepspeed_stage_3"),
                     f"trainer.strategy={self.strategy} shards parameters with ZeRO-3, which gathers them only "
                     "inside a module's forward, but the teacher's LM head is applied chunk by chunk outside one; "
                     "shard parameters with trainer=fsdp (FSDP2), or use trainer=deepspeed (ZeRO-2)")
            require(not (self.strategy.startswith("fsdp") and self.strategy != "fsdp"),
                     f"trainer.strategy={self.strategy} is Lightning's FSDP1, which sdharness does not drive; use "
                     "trainer=fsdp (FSDP2)")
            require(self.accelerator != "cpu" or not self.strategy.startswith("deepspeed"),
                     f"trainer.strategy={self.strategy} runs on GPUs only (Lightning's DeepSpeed); on CPU use "
                     "trainer=fsdp or trainer=ddp, with trainer.accelerator=cpu trainer.precision=32-true")


@dataclass
class LoggerConfig:
    """W&B through Lightning's WandbLogger; ``mode=offline`` writes under the run directory."""

    project: str = "sdharness"
    mode: str = "auto"  # auto: online when WANDB_API_KEY is set, offline otherwise
    group: Optional[str] = None
    entity: Optional[str] = None
    # When online logging cannot start (no network, a bad key): error (one line, the run stops) or offline
    # (a warning, the run logs under <run dir>/wandb). init_timeout_s bounds W&B's own wait (90 s).
    if_online_fails: str = "error"
    init_timeout_s: float = 10.0

    def __post_init__(self):
        choice("logger.mode", self.mode, ("auto", "online", "offline", "disabled"))
        choice("logger.if_online_fails", self.if_online_fails, ("error", "offline"))
