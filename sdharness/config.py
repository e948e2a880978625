"""Typed schema of every config group, registered with Hydra's ConfigStore.

``conf/train.yaml`` lists ``train_schema`` first in its defaults, so every YAML in ``conf/``
is merged into these dataclasses: unknown keys and ill-typed values fail at compose, and
``OmegaConf.to_object`` runs the ``__post_init__`` checks below before any model loads.
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sdharness.distill.aggregation import AGGREGATIONS
from sdharness.distill.divergences import DIVERGENCES
from sdharness.distill.variants import SUPPORTS, TOPK_FROM
from sdharness.data import SOURCES
from sdharness.data.builtin import builtin_task
from sdharness.data.answers import answer_checker
from sdharness.data.tasks import DIFFICULTY_STEPS, SOLUTION_STYLES
from sdharness.methods import METHODS
from sdharness.rollout import BACKENDS, GUIDANCE_MODES
from sdharness.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"  # the checkout's conf/ (the package is installed editable)
SWEEPS_DIR = PACKAGE_DIR.parent / "sweeps"


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(field_name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    require(value in choices, f"{field_name}={value!r} is unknown; choose one of: {', '.join(choices)}")


def _positive(field_name: str, value: float, fix: str = "") -> None:
    require(0 < value < math.inf, f"{field_name} must be a finite positive number, got {value!r}" +
             (f"; {fix}" if fix else ""))


def placeholders(template: str, field_name: str = "template") -> set[str]:
    """Names of the ``{placeholders}`` in a format string; a malformed one (an unmatched brace)
    is a :class:`ConfigError` naming ``field_name``."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ConfigError(f"{field_name}={template!r} is not a valid template ({error}); placeholders are "
                          "written {name}, a literal brace as {{ or }}") from None


@dataclass
class ModelConfig:
    """Where the weights come from. ``source``: ``hf`` (a local directory), ``gguf`` (a .gguf
    file, dequantised by transformers) or ``tiny_random`` (built in code, for tests).
    ``path`` may be ``pkg://PACKAGE`` for a directory inside an installed Python package."""

    name: str = "model"
    source: str = "tiny_random"
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: str = "float32"
    # GGUF conversion takes ~40 s for 135M parameters; the converted copy is kept here.
    cache_dir: str = "~/.cache/sdharness/models"
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0
    lora_rank: int = 0  # > 0 trains LoRA adapters (PEFT) instead of all weights
    lora_alpha: float = 16.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        _choice("model.source", self.source, ("hf", "gguf", "tiny_random"))
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.source in ("hf", "gguf"):
            require(bool(self.path), f"model.path is required for model.source={self.source}; "
                     "set it to a local directory, e.g. model.path=/models/my-model")
        if self.source == "gguf":
            require(bool(self.gguf_file), "model.gguf_file is required for model.source=gguf (the .gguf file name)")


@dataclass
class DataConfig:
    """Problems with worked solutions: the built-in ``arithmetic`` task or a ``jsonl`` file
    with fields ``problem``, ``solution`` and optional ``answer``; or ``chatlog``, logged
    conversations whose assistant turns are distilled without generation (sdharness/data/chatlog.py).
    ``path`` may be ``pkg://PACKAGE/sub/path`` for chatlog."""

    name: str = "arithmetic"
    # data=arithmetic: the generated task (sdharness/data/builtin.py TASKS): chain (chained
    # operations) or columns (multi-digit addition written column by column).
    task: str = "chain"
    path: Optional[str] = None
    eval_path: Optional[str] = None
    difficulty: str = "easy"
    eval_difficulty: Optional[str] = None  # defaults to difficulty
    solution_style: str = "native"
    train_size: int = 256
    eval_size: int = 32
    seed: int = 1234  # which problems form the splits; the training order follows data.seed + the run's seed
    batch_size: int = 4
    answer_marker: str = "The answer is"
    # How a completion's answer is checked, by eval, GRPO's reward, bootstrap and the probe alike:
    # builtin (the number after answer_marker; integers, decimals, fractions compared exactly) or
    # math_verify (the math-verify package, for free-form answers such as \frac{1}{2}).
    checker: str = "builtin"
    # chatlog only: train on `all` earlier assistant turns or only the `first`; also the accepted
    # final turn.
    turns: str = "all"
    include_final: bool = False
    # Every data set: reject (file:line) rather than skip and count problems whose prompt does not fit
    # the model context, and (chatlog) unusable conversations.
    strict: bool = False
    # Validation split, for choosing hyperparameters without touching the eval split: the first
    # validation_size training problems are held out (never trained on). evaluate_on=validation
    # makes the quick evals score them, logged as val/* instead of eval/*; both scores both at every
    # eval point (early stopping chosen on val/*, reported on eval/*).
    validation_size: int = 0
    evaluate_on: str = "eval"

    def __post_init__(self):
        _choice("data.name", self.name, tuple(SOURCES))
        builtin_task(self.task)
        answer_checker(self.checker, self.answer_marker)  # an unknown name, or math_verify not installed, fails now
        if SOURCES[self.name].reads_path:
            require(bool(self.path), f"data.path is required for data={self.name}; e.g. data.path=train.jsonl")
        _choice("data.turns", self.turns, ("all", "first"))
        _choice("data.difficulty", self.difficulty, list(DIFFICULTY_STEPS))
        if self.eval_difficulty is not None:
            _choice("data.eval_difficulty", self.eval_difficulty, list(DIFFICULTY_STEPS))
        _choice("data.solution_style", self.solution_style, SOLUTION_STYLES)
        require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        require(self.train_size >= 1 and self.eval_size >= 0, "data.train_size must be >= 1 and data.eval_size >= 0")
        _choice("data.evaluate_on", self.evaluate_on, ("eval", "validation", "both"))
        require(self.validation_size >= 0, f"data.validation_size must be >= 0, got {self.validation_size}")
        require(self.name != "chatlog" or self.validation_size == 0,
                "data.validation_size is for problem data (arithmetic, jsonl), not data=chatlog; set it to 0")
        require(self.evaluate_on == "eval" or self.validation_size > 0, f"data.evaluate_on={self.evaluate_on} needs a "
                "validation split: set data.validation_size, e.g. data.validation_size=256")


@dataclass
class PromptConfig:
    """Student and teacher templates. The student sees ``{problem}``; the teacher sees
    ``{problem}`` and ``{solution}``. ``chat_template``: ``auto`` uses the tokenizer's chat
    template when it has one, ``always`` requires it, ``never`` feeds the plain text."""

    name: str = "cot"
    student: str = "{problem}"
    teacher: str = "{problem}\n{solution}"
    system: Optional[str] = None
    chat_template: str = "auto"
    # Wording only the teacher prompt has; a student completion containing it has leaked.
    leak_phrases: list[str] = field(default_factory=lambda: ["reference solution"])
    # data=chatlog: the teacher's hint, a system message placed first; {accepted} is the accepted reply.
    chat_hint: str = ("A reply the user later accepted follows. Use it only as a hint; answer in your own words.\n"
                      "{accepted}")
    # Where the hint goes: `first` (a system message opening the conversation) or `last` (right
    # before the assistant turn being scored; with a chat template, appended to the last user message).
    chat_hint_position: str = "first"
    # Without a chat template, each message is rendered as <prefix><content>\n with these per-role
    # prefixes; the context ends with the assistant prefix (a trailing space moves into the turn).
    chat_roles: dict[str, str] = field(default_factory=lambda: {
        "system": "System: ", "user": "User: ", "assistant": "Assistant: "})

    def __post_init__(self):
        _choice("prompt.chat_template", self.chat_template, ("auto", "always", "never"))
        _placeholders_exactly("prompt.chat_hint", self.chat_hint, {"accepted"}, " (the accepted reply)")
        _choice("prompt.chat_hint_position", self.chat_hint_position, ("first", "last"))
        require(set(self.chat_roles) == {"system", "user", "assistant"}, "prompt.chat_roles must give a prefix for "
                 f"exactly system, user and assistant; it has {sorted(self.chat_roles)}")
        _placeholders_exactly("prompt.student", self.student, {"problem"}, "; the student never sees the solution")
        _placeholders_exactly("prompt.teacher", self.teacher, {"problem", "solution"})


def _placeholders_exactly(field_name: str, template: str, expected: set[str], note: str = "") -> None:
    used = placeholders(template, field_name)
    if used == expected:
        return
    wanted = " and ".join(f"{{{name}}}" for name in sorted(expected, key=["problem", "solution", "accepted"].index))
    problems = []
    if expected - used:
        problems.append(f"missing {', '.join(f'{{{name}}}' for name in sorted(expected - used))}")
    if used - expected:
        problems.append(f"unknown {', '.join(f'{{{name}}}' for name in sorted(used - expected))} "
                        "(write a literal brace as {{ or }})")
    raise ConfigError(f"{field_name} must use exactly the placeholder{'s' * (len(expected) > 1)} {wanted}{note}; "
                      f"{'; '.join(problems)}")


@dataclass
class RolloutConfig:
    """How the student samples its own completion ``g`` from the student prompt."""

    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    progress: bool = True
    # Guided sampling (sdharness/rollout/guided.py): never | always | on_failure. Guided rollouts are off-policy.
    guidance: str = "never"
    guidance_samples: int = 1  # on_failure: plain samples per problem; guided when all fail the answer check
    # Sampler: hf (transformers generate; default, CPU or GPU) | vllm (sdharness/rollout/vllm.py: a vLLM
    # engine colocated on the training GPU, weights synced after each optimiser step; CUDA and the
    # `sdharness[vllm]` extra). The vllm_* fields apply to backend=vllm only.
    backend: str = "hf"
    vllm_gpu_memory_utilization: float = 0.3  # share of the GPU vLLM may take (weights + KV cache)
    vllm_dtype: str = "auto"  # auto: vLLM's choice (bfloat16/float16 for float32 checkpoints)
    vllm_max_model_len: Optional[int] = None  # None: the longest training prompt + max_new_tokens
    vllm_enforce_eager: bool = False  # true: no CUDA graphs (faster start, slower decoding)

    def __post_init__(self):
        _positive("rollout.temperature", self.temperature, "rollouts sample, so set e.g. rollout.temperature=1.0 "
                  "(on-policy); the quick eval is greedy already")
        require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        require(self.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _choice("rollout.guidance", self.guidance, GUIDANCE_MODES)
        require(self.guidance_samples >= 1, f"rollout.guidance_samples must be >= 1, got {self.guidance_samples}")
        _choice("rollout.backend", self.backend, BACKENDS)
        require(not (self.backend == "vllm" and self.guidance != "never"),
                 f"rollout.guidance={self.guidance} needs rollout.backend=hf: guided sampling is HF-only (it mixes "
                 "student and teacher logits token by token); set rollout.guidance=never or rollout.backend=hf")
        require(0 < self.vllm_gpu_memory_utilization <= 1, "rollout.vllm_gpu_memory_utilization must be in (0, 1], "
                 f"got {self.vllm_gpu_memory_utilization}")
        _choice("rollout.vllm_dtype", self.vllm_dtype, ("auto", "float32", "bfloat16", "float16"))
        require(self.vllm_max_model_len is None or self.vllm_max_model_len >= 1,
                 f"rollout.vllm_max_model_len must be >= 1 (or null), got {self.vllm_max_model_len}")


@dataclass
class AggregationConfig:
    """The target: one of ``sdharness.distill.aggregation.AGGREGATIONS`` at temperature tau; for
    ``trust_region`` tau is the bound delta on KL(target || student) per token, in nats."""

    name: str = "product"
    tau: float = 2.0

    def __post_init__(self):
        _choice("aggregation.name", self.name, AGGREGATIONS)
        _positive("aggregation.tau", self.tau,
                  "e.g. aggregation.tau=2.0 (product), 1.0 (clip) or 0.1 (trust_region, its KL bound)")


@dataclass
class LossConfig:
    """Divergence between target and student. ``positions``: ``all`` completion tokens, or
    ``reasoning`` (those before the final-answer marker; answer tokens and EOS excluded)."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    positions: str = "all"
    chunk_size: int = 32
    # Logged diagnostics: target mass on tokens the student gives probability < unconsidered_eps.
    unconsidered_eps: float = 1e-3
    # Vocabulary the divergence runs over (sdharness/distill/variants.py): full | topk (top_k buckets of
    # the topk_from side's logits + one tail bucket) | sampled (the estimator on g; reverse_kl only).
    support: str = "full"
    top_k: int = 100
    topk_from: str = "teacher"
    entry_clip: Optional[float] = None  # cap in nats on each entry's forward-KL term; null: none
    # Tokens not sampled from the current student (guided rows): loss weighted by
    # min(p_student / p_sampling, is_clip); null: unweighted.
    is_clip: Optional[float] = 2.0

    def __post_init__(self):
        _choice("loss.divergence", self.divergence, DIVERGENCES)
        _choice("loss.positions", self.positions, ("all", "reasoning"))
        require(0 < self.beta < 1, f"loss.beta must be in (0, 1), got {self.beta}")
        require(self.chunk_size >= 1, f"loss.chunk_size must be >= 1, got {self.chunk_size}")
        require(0 < self.unconsidered_eps < 1, f"loss.unconsidered_eps must be in (0, 1), got {self.unconsidered_eps}")
        _choice("loss.support", self.support, SUPPORTS)
        require(self.top_k >= 1, f"loss.top_k must be >= 1, got {self.top_k}")
        _choice("loss.topk_from", self.topk_from, TOPK_FROM)
        require(self.support != "sampled" or self.divergence == "reverse_kl", "loss.support=sampled estimates the "
                f"reverse KL's gradient, not {self.divergence}'s; set loss.divergence=reverse_kl")
        if self.entry_clip is not None:
            _positive("loss.entry_clip", self.entry_clip, "or null for no cap")
            require(self.divergence == "forward_kl" and self.support == "full", "loss.entry_clip caps forward-KL "
                    f"terms over the full vocabulary; set loss.divergence=forward_kl and loss.support=full (got "
                    f"{self.divergence}, {self.support}) or loss.entry_clip=null")
        if self.is_clip is not None:
            _positive("loss.is_clip", self.is_clip, "or null for unweighted off-policy tokens")


@dataclass
class AlgoConfig:
    """The method: ``sd`` (self-distillation), ``sft`` or ``grpo``. The GRPO fields apply to
    grpo only; ``reward`` is a built-in name or ``module:function`` taking
    ``(completion, problem_dict, answer_marker)`` and returning a float."""

    name: str = "sd"
    group_size: int = 8
    reward: str = "answer_match"
    scale_rewards: str = "group"
    epsilon: float = 0.2
    inner_epochs: int = 1
    beta: float = 0.0
    loss_aggregation: str = "token_mean"
    # sd only: below 1, w * SD + (1 - w) * GRPO's clipped loss on group_size rollouts per problem
    # (sdharness/methods/distill_pg.py); 0 is GRPO.
    distillation_weight: float = 1.0

    def __post_init__(self):
        from sdharness.methods.policy_gradient import LOSS_AGGREGATIONS, SCALES

        _choice("algo.name", self.name, tuple(METHODS))
        _choice("algo.scale_rewards", self.scale_rewards, SCALES)
        _choice("algo.loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
        if self.name == "grpo":
            require(self.group_size >= 2, f"algo.group_size={self.group_size}: GRPO needs at least 2 samples per "
                     "problem, since advantages are relative to the group; set algo.group_size=8 (default)")
        require(self.inner_epochs >= 1, f"algo.inner_epochs must be >= 1, got {self.inner_epochs}")
        require(self.epsilon > 0, f"algo.epsilon must be positive, got {self.epsilon}")
        require(self.beta >= 0, f"algo.beta must be >= 0, got {self.beta}")
        require(0 <= self.distillation_weight <= 1, f"algo.distillation_weight must be in [0, 1], got "
                f"{self.distillation_weight}")
        if self.distillation_weight < 1:
            require(self.name == "sd", f"algo.distillation_weight mixes GRPO into algo=sd, not algo={self.name}; "
                    "set algo=sd or algo.distillation_weight=1")
            require(self.group_size >= 2 and self.inner_epochs == 1 and self.beta == 0, "algo.distillation_weight < 1 "
                    "adds GRPO's clipped loss with one step per batch and no KL term; set algo.group_size >= 2 "
                    f"(got {self.group_size}), algo.inner_epochs=1 (got {self.inner_epochs}), algo.beta=0 "
                    f"(got {self.beta})")


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
class TeacherConfig:
    """Weights that score the teacher prompt: the frozen ``initial`` weights (default: a live teacher's
    hint reading decays as SD trains the student prompt, and the loop runs down; README), the ``live``
    student, or an ``ema`` of it (``ema_decay`` 0.99 is SDFT's rate of 0.01 per step, 0.95 SDPO's 0.05).
    Under LoRA the initial teacher is the model with its adapters disabled, not a copy."""

    weights: str = "initial"
    ema_decay: float = 0.99

    def __post_init__(self):
        _choice("teacher.weights", self.weights, ("live", "initial", "ema"))
        require(0 < self.ema_decay < 1, f"teacher.ema_decay must be in (0, 1), got {self.ema_decay}")


@dataclass
class OptimConfig:
    """AdamW on fp32 master weights with warmup and a ``constant``/``linear``/``cosine`` decay."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        _choice("optim.schedule", self.schedule, ("constant", "linear", "cosine"))


@dataclass
class EvalConfig:
    """Greedy accuracy on the held-out split with the student prompt."""

    every_n_steps: int = 0  # 0: only before and after training
    max_new_tokens: int = 96
    batch_size: int = 16
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
    max_steps: int = 20
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
            _choice("trainer.strategy", self.strategy, ["auto", *sorted(StrategyRegistry)])
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
        _choice("logger.mode", self.mode, ("auto", "online", "offline", "disabled"))
        _choice("logger.if_online_fails", self.if_online_fails, ("error", "offline"))


def resolve_wandb_mode(mode: str) -> str:
    """``auto``: ``WANDB_MODE`` if set, else online when ``WANDB_API_KEY`` is set, else offline."""
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


@dataclass
class TrainConfig:
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    seed: int = 0
    threads: str = "auto"  # torch intra-op threads: auto (by model size, sdharness.models.torch_threads), 0 (torch's default) or N
    tags: list[str] = field(default_factory=list)
    ckpt_path: Optional[str] = None  # a checkpoint file, or "last" to resume this run directory
    # Resuming refuses a checkpoint whose RESUME_GROUPS settings or data file contents differ; true allows it.
    resume_allow_changes: bool = False
    output_dir: Optional[str] = None  # filled from Hydra's run directory

    def __post_init__(self):
        check_threads(self.threads)
        require(not (self.trainer.shards_weights and self.rollout.guidance != "never"),
                 f"rollout.guidance={self.rollout.guidance} needs unsharded weights: guided sampling steps each "
                 f"problem on its own schedule, which trainer.strategy={self.trainer.strategy} cannot keep in "
                 "step across ranks; use trainer=ddp, or rollout.guidance=never")
        require(not (self.trainer.strategy == "fsdp" and self.model.lora_rank > 0),
                 "trainer=fsdp shards full weights; LoRA adapters (model.lora_rank="
                 f"{self.model.lora_rank}) are small enough for trainer=ddp, or set model.lora_rank=0")
        require(not (self.rollout.backend == "vllm" and self.trainer.devices not in (1, "1")),
                 f"rollout.backend=vllm runs one colocated engine on one GPU; set trainer.devices=1 (got "
                 f"{self.trainer.devices}) or rollout.backend=hf")
        require(not (self.loss.support == "sampled" and SOURCES[self.data.name].logged_completions),
                f"loss.support=sampled estimates the reverse KL from tokens the student sampled; data={self.data.name} "
                "completions are logged, not sampled: use loss.support=full or topk")
        require(self.algo.distillation_weight == 1 or (self.rollout.guidance == "never" and not
                SOURCES[self.data.name].logged_completions), "algo.distillation_weight < 1 samples plain group "
                "rollouts for its policy gradient; set rollout.guidance=never and use problem data, not data=chatlog")
        require(not (SOURCES[self.data.name].logged_completions and self.rollout.guidance != "never"),
                 f"rollout.guidance={self.rollout.guidance} cannot apply to data=chatlog: its completions are "
                 "logged, not sampled; set rollout.guidance=never")




def check_threads(value: str, field_name: str = "threads") -> None:
    require(value == "auto" or (value.isdigit()), f"{field_name}={value!r} must be auto (by model size), "
            "0 (torch's default: one thread per core) or a positive number of threads")


def _unknown_keys(given: dict, known: dict, prefix: str = "") -> list[str]:
    unknown = []
    for key, value in given.items():
        if key not in known:
            unknown.append(f"{prefix}{key} (known: {', '.join(sorted(known))})")
        elif isinstance(value, dict) and isinstance(known[key], dict) and known[key]:
            unknown += _unknown_keys(value, known[key], f"{prefix}{key}.")
    return unknown


def to_train_config(dict_cfg: DictConfig) -> TrainConfig:
    """The validated, typed config. Keys added with ``+key=...`` that the schema does not know
    are errors rather than silently dropped settings; free-form dicts (``trainer.extra``) pass."""
    cfg = OmegaConf.to_object(dict_cfg)
    known = OmegaConf.to_container(OmegaConf.structured(cfg))
    unknown = _unknown_keys(OmegaConf.to_container(dict_cfg), known)
    require(not unknown, "unknown config key(s): " + "; ".join(unknown))
    return cfg


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
