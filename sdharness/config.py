"""Typed schema of every config group, registered with Hydra's ConfigStore.

``conf/train.yaml`` lists ``train_schema`` first in its defaults, so every YAML in ``conf/``
is merged into these dataclasses: unknown keys and ill-typed values fail at compose, and
``OmegaConf.to_object`` runs the ``__post_init__`` checks before any model loads. The dataclasses'
defaults are the defaults; an option YAML states only what makes it that option. Here: what the run
reads (model, data, prompt), the whole :class:`TrainConfig` and its loading; the method's groups are in
:mod:`sdharness.schema.method`, the run's in :mod:`sdharness.schema.run`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sdharness.data import SOURCES
from sdharness.data.answers import answer_checker
from sdharness.data.builtin import builtin_task, check_difficulty
from sdharness.data.tasks import SOLUTION_STYLES
from sdharness.errors import ConfigError
from sdharness.paths import config_dir
from sdharness.schema.checks import choice as _choice, placeholders, require
from sdharness.schema.method import AggregationConfig, AlgoConfig, LossConfig, RolloutConfig, TeacherConfig
from sdharness.schema.run import BudgetConfig, EvalConfig, LoggerConfig, OptimConfig, TrainerConfig

CONF_DIR = config_dir("conf")
SWEEPS_DIR = config_dir("sweeps")


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
    # data=arithmetic: the training problems' references come from this JSONL instead (sdharness-bootstrap's
    # output for the answer-only pool `python -m sdharness.tools.answer_pool` writes); training problems it
    # lacks are left out and counted, and the validation and eval splits stay the task's own.
    solutions_path: Optional[str] = None
    difficulty: str = "single"  # chain: single 1 operation, easy 2, hard 4; columns: 1-2, 3-4, 6-7, seven 7 digits
    eval_difficulty: Optional[str] = None  # defaults to difficulty
    solution_style: str = "native"  # native: written like the student's own chain of thought; foreign: terse notation
    train_size: int = 256
    eval_size: int = 64  # held out of the training data when there is no eval_path
    seed: int = 1234  # which problems form the splits; the training order follows data.seed + the run's seed
    batch_size: int = 4
    answer_marker: str = "The answer is"
    # How a completion's answer is checked, by eval, GRPO's reward, bootstrap and the probe alike:
    # builtin (the number after answer_marker; integers, decimals, fractions compared exactly) or
    # math_verify (the math-verify package, for free-form answers such as \frac{1}{2}).
    checker: str = "builtin"
    # chatlog only: train on `all` earlier assistant turns or only the `first`, or on the `accepted`
    # (final) turn as the reply to the opening question; include_final: also the accepted turn in its place.
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
        require(self.solutions_path is None or SOURCES[self.name].built_in_task,
                f"data.solutions_path is for the built-in task (data=arithmetic), not data={self.name}, whose "
                "file holds its own solutions: point data.path at the solved file instead")
        _choice("data.turns", self.turns, ("all", "first", "accepted"))
        check_difficulty("data.difficulty", self.difficulty, self.task)
        if self.eval_difficulty is not None:
            check_difficulty("data.eval_difficulty", self.eval_difficulty, self.task)
        _choice("data.solution_style", self.solution_style, SOLUTION_STYLES)
        require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        require(self.train_size >= 1 and self.eval_size >= 0, "data.train_size must be >= 1 and data.eval_size >= 0")
        _choice("data.evaluate_on", self.evaluate_on, ("eval", "validation", "both"))
        require(self.validation_size >= 0, f"data.validation_size must be >= 0, got {self.validation_size}")
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
        if self.algo.hint_source == "sibling":
            require(self.rollout.guidance == "never", "algo.hint_source=sibling samples plain groups from the "
                    f"student prompt; set rollout.guidance=never (got {self.rollout.guidance})")
            require(not SOURCES[self.data.name].logged_completions, f"algo.hint_source=sibling samples and checks "
                    f"completions; data={self.data.name} has logged ones: use problem data with answers (arithmetic, "
                    "jsonl) or algo.hint_source=reference")




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
