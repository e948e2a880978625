"""The pretraining app's typed config (``testbed/conf/pretrain*.yaml``): the model's sizes, the
example mix, the run's settings and their checks, and composing a config as the app does."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf

from sdharness.config import CONF_DIR, PromptConfig, require
from sdharness.data.builtin import builtin_task

PRETRAIN_CONF_DIR = Path(__file__).resolve().parent / "conf"
REQUIRED_INIT = "REQUIRED"  # init_from of a stage config: the command line must name the base
KINDS = ("student_easy", "student_hard", "teacher_easy", "teacher_hard")
EVAL_SETS = {  # name -> (prompt format, problems: difficulty or difficulty_foreign for foreign-notation hints)
    "no_hint_easy": ("student", "easy"),
    "no_hint_hard": ("student", "hard"),
    "hint_hard": ("teacher", "hard"),
    "hint_easy": ("teacher", "easy"),
    "foreign_hint_hard": ("teacher", "hard_foreign"),
}


@dataclass
class ArchConfig:
    """The Llama's sizes; the vocabulary is the character tokenizer's (100 ids)."""

    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            require(getattr(self, name) >= 1, f"arch.{name} must be >= 1, got {getattr(self, name)}")
        require(self.hidden_size % self.num_heads == 0,
                 f"arch.hidden_size={self.hidden_size} must be divisible by arch.num_heads={self.num_heads}")


@dataclass
class MixConfig:
    """Fractions of the training examples by prompt format and difficulty; they must sum to 1."""

    student_easy: float = 0.35
    student_hard: float = 0.35
    teacher_easy: float = 0.05
    teacher_hard: float = 0.25

    def __post_init__(self):
        values = asdict(self)
        require(all(value >= 0 for value in values.values()), f"mix fractions must be >= 0, got {values}")
        require(abs(sum(values.values()) - 1) < 1e-6, f"mix fractions must sum to 1, got {sum(values.values())}")
        require(self.teacher_easy + self.teacher_hard > 0 and self.student_easy + self.student_hard > 0,
                 "mix needs both student-format and teacher-format examples")


@dataclass
class PretrainConfig:
    prompt: PromptConfig = field(default_factory=PromptConfig)
    task: str = "chain"  # the built-in task trained on (sdharness/data/builtin.py TASKS)
    arch: ArchConfig = field(default_factory=ArchConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    early_answer_fraction: float = 0.0  # of teacher-format examples: completion is only "The answer is N."
    foreign_hint_fraction: float = 0.0  # of teacher-format examples: the hint is in the foreign notation
    slip_fraction: float = 0.0  # of teacher-format examples without an early answer: one slip, then consistent
    steps: int = 7200
    batch_size: int = 4
    bucket_batches: int = 32  # examples are sorted by length within windows of this many batches (less padding)
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = 1.0
    seed: int = 0  # model initialisation, training problems, their order
    eval_seed: int = 20240  # the fixed held-out problems (excluded from training)
    eval_size: int = 100  # problems in each eval set
    eval_batch_size: int = 50
    eval_max_new_tokens: int = 96
    log_every: int = 500
    eval_every: int = 0  # > 0: also a quick greedy eval (on eval_every_size problems per set) every this many steps
    eval_every_size: int = 30
    threads: int = 1  # torch intra-op threads; 0 keeps torch's default. Results depend on it slightly.
    # A base (directory or pkg:// path, made by this app on the same task and eval problems)
    # to continue from instead of a fresh initialisation; it must have ``arch``'s sizes. A stage
    # config sets it to REQUIRED_INIT ('???' would not do: merged over null it leaves null, and the
    # stage would silently train from scratch).
    init_from: Optional[str] = None
    # Eval set -> accuracy: stop at the first quick eval (every eval_every steps) where every listed
    # set reaches its value, e.g. {no_hint_hard: 0.25} to stop while a skill is still being learned.
    stop_when: dict[str, float] = field(default_factory=dict)
    output_dir: Optional[str] = None  # null: the Hydra run directory

    def __post_init__(self):
        builtin_task(self.task, "task")
        for name in ("early_answer_fraction", "foreign_hint_fraction", "slip_fraction"):
            require(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("steps", "batch_size", "bucket_batches", "eval_batch_size", "eval_max_new_tokens", "log_every"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_size", "eval_every", "eval_every_size"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(0 <= self.warmup_steps < self.steps, f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        require(self.threads >= 0, f"threads must be >= 0, got {self.threads}")
        require(self.prompt.chat_template != "always",
                 "prompt.chat_template=always cannot work: the character tokenizer has no chat template")
        require(self.init_from != REQUIRED_INIT,
                "init_from must be set on the command line, e.g. init_from=DIR: this config is a stage that continues a base")
        for name, value in self.stop_when.items():
            require(name in EVAL_SETS, f"stop_when.{name}: unknown eval set; choose from {', '.join(EVAL_SETS)}")
            require(0 < value <= 1, f"stop_when.{name} must be in (0, 1], got {value}")
        require(not self.stop_when or self.eval_every > 0,
                 "stop_when needs the quick evals it is checked on; set eval_every > 0 (e.g. eval_every=100)")


class HarnessConfSearchPath(SearchPathPlugin):
    """The harness's ``conf/`` after ``testbed/conf``: the pretraining configs take their prompt
    from ``conf/prompt``. (``hydra.searchpath`` in a YAML would have to be in every stage config:
    Hydra reads it from the primary config only and refuses it in a config another one extends.)"""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="sdharness", path=f"file://{CONF_DIR}")


def register_configs() -> None:
    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)
    Plugins.instance().register(HarnessConfSearchPath)


def compose_pretrain_config(overrides: list[str] | None = None, config_name: str = "pretrain") -> DictConfig:
    """``testbed/conf/<config_name>.yaml`` with ``overrides``, composed as the app composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PRETRAIN_CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


def to_pretrain_config(dict_cfg: DictConfig) -> PretrainConfig:
    """The validated, typed config (unknown keys fail at compose through the schema)."""
    return OmegaConf.to_object(dict_cfg)
