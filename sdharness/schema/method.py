"""The method's config groups: how the student samples (``rollout``), the target (``aggregation``),
the divergence (``loss``), the method and its GRPO settings (``algo``) and the teacher's weights
(``teacher``). Their defaults are the defaults: an option YAML in conf/ states only what differs."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from sdharness.distill.aggregation import AGGREGATIONS, PARAMETER_NAMES, aggregations_using
from sdharness.distill.divergences import DIVERGENCES
from sdharness.distill.variants import SUPPORTS, TOPK_FROM
from sdharness.methods import METHODS
from sdharness.rollout import BACKENDS, GUIDANCE_MODES
from sdharness.schema.checks import choice, positive, require


@dataclass
class RolloutConfig:
    """How the student samples its own completion ``g`` from the student prompt."""

    max_new_tokens: int = 64
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
        positive("rollout.temperature", self.temperature, "rollouts sample, so set e.g. rollout.temperature=1.0 "
                  "(on-policy); the quick eval is greedy already")
        require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        require(self.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        choice("rollout.guidance", self.guidance, GUIDANCE_MODES)
        require(self.guidance_samples >= 1, f"rollout.guidance_samples must be >= 1, got {self.guidance_samples}")
        choice("rollout.backend", self.backend, BACKENDS)
        require(not (self.backend == "vllm" and self.guidance != "never"),
                 f"rollout.guidance={self.guidance} needs rollout.backend=hf: guided sampling is HF-only (it mixes "
                 "student and teacher logits token by token); set rollout.guidance=never or rollout.backend=hf")
        require(0 < self.vllm_gpu_memory_utilization <= 1, "rollout.vllm_gpu_memory_utilization must be in (0, 1], "
                 f"got {self.vllm_gpu_memory_utilization}")
        choice("rollout.vllm_dtype", self.vllm_dtype, ("auto", "float32", "bfloat16", "float16"))
        require(self.vllm_max_model_len is None or self.vllm_max_model_len >= 1,
                 f"rollout.vllm_max_model_len must be >= 1 (or null), got {self.vllm_max_model_len}")


@dataclass
class AggregationConfig:
    """The target: one of ``sdharness.distill.aggregation.AGGREGATIONS`` at the value of its
    parameter (its ``Parameter``): ``tau``, the temperature of ``product`` and ``clip``, or
    ``kl_bound``, ``trust_region``'s bound on KL(target || student) per token in nats; ``teacher``
    and ``entropy_matched`` have none. Setting another aggregation's parameter is an error."""

    name: str = "product"
    tau: float = AGGREGATIONS["product"].parameter.default
    kl_bound: float = AGGREGATIONS["trust_region"].parameter.default

    def __post_init__(self):
        choice("aggregation.name", self.name, AGGREGATIONS)
        positive("aggregation.tau", self.tau, "e.g. aggregation.tau=2.0 (product) or 1.0 (clip)")
        positive("aggregation.kl_bound", self.kl_bound, "e.g. aggregation.kl_bound=0.1 (trust_region)")
        own = AGGREGATIONS[self.name].parameter
        for unused in fields(self):
            if unused.name in PARAMETER_NAMES and (own is None or own.name != unused.name):
                value = getattr(self, unused.name)
                whose = (f"whose parameter is aggregation.{own.name} ({own.meaning}); drop aggregation."
                         f"{unused.name} (set aggregation.{own.name})" if own
                         else f"which has no parameter; drop aggregation.{unused.name}")
                require(value == unused.default, f"aggregation.{unused.name}={value:g} does not apply to aggregation="
                        f"{self.name}, {whose} or choose aggregation={' or '.join(aggregations_using(unused.name))}")

    @property
    def parameter(self) -> Optional[float]:
        """The value of this aggregation's parameter (``tau`` or ``kl_bound``); None where it has none."""
        own = AGGREGATIONS[self.name].parameter
        return None if own is None else getattr(self, own.name)


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
        choice("loss.divergence", self.divergence, DIVERGENCES)
        choice("loss.positions", self.positions, ("all", "reasoning"))
        require(0 < self.beta < 1, f"loss.beta must be in (0, 1), got {self.beta}")
        require(self.chunk_size >= 1, f"loss.chunk_size must be >= 1, got {self.chunk_size}")
        require(0 < self.unconsidered_eps < 1, f"loss.unconsidered_eps must be in (0, 1), got {self.unconsidered_eps}")
        choice("loss.support", self.support, SUPPORTS)
        require(self.top_k >= 1, f"loss.top_k must be >= 1, got {self.top_k}")
        choice("loss.topk_from", self.topk_from, TOPK_FROM)
        require(self.support != "sampled" or self.divergence == "reverse_kl", "loss.support=sampled estimates the "
                f"reverse KL's gradient, not {self.divergence}'s; set loss.divergence=reverse_kl")
        if self.entry_clip is not None:
            positive("loss.entry_clip", self.entry_clip, "or null for no cap")
            require(self.divergence == "forward_kl" and self.support == "full", "loss.entry_clip caps forward-KL "
                    f"terms over the full vocabulary; set loss.divergence=forward_kl and loss.support=full (got "
                    f"{self.divergence}, {self.support}) or loss.entry_clip=null")
        if self.is_clip is not None:
            positive("loss.is_clip", self.is_clip, "or null for unweighted off-policy tokens")


@dataclass
class AlgoConfig:
    """The method: ``sd`` (self-distillation), ``sft`` or ``grpo``. The GRPO fields apply to
    grpo only; ``reward`` is a built-in name or ``module:function`` taking
    ``(completion, problem_dict, answer_marker)`` and returning a float."""

    name: str = "sd"
    group_size: int = 8
    reward: str = "answer_match"
    scale_rewards: str = "group"  # group: divide by the group's std | none
    epsilon: float = 0.2
    inner_epochs: int = 1
    beta: float = 0.0  # > 0 adds beta * KL(policy || initial weights), k3 estimator
    loss_aggregation: str = "token_mean"  # token_mean | sequence_mean
    # sd only: below 1, w * SD + (1 - w) * GRPO's clipped loss on group_size rollouts per problem
    # (sdharness/methods/distill_pg.py); 0 is GRPO.
    distillation_weight: float = 1.0
    # sd only: the teacher's hint. reference: the row's worked solution (or hint). sibling: of group_size
    # completions per problem, one whose answer checks is the reference of the others; rows need only
    # problem and answer (sdharness/methods/sibling_hints.py).
    hint_source: str = "reference"

    def __post_init__(self):
        from sdharness.methods.policy_gradient import LOSS_AGGREGATIONS, SCALES

        choice("algo.name", self.name, tuple(METHODS))
        choice("algo.scale_rewards", self.scale_rewards, SCALES)
        choice("algo.loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
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
        choice("algo.hint_source", self.hint_source, ("reference", "sibling"))
        if self.hint_source == "sibling":
            require(self.name == "sd", f"algo.hint_source=sibling chooses SD's teacher hint, not algo={self.name}'s; "
                    "set algo=sd or algo.hint_source=reference")
            require(self.group_size >= 2, f"algo.hint_source=sibling needs algo.group_size >= 2 (a completion's hint "
                    f"is a sibling's), got {self.group_size}; e.g. algo.group_size=8")
            require(self.distillation_weight == 1, "algo.hint_source=sibling is pure self-distillation; set "
                    f"algo.distillation_weight=1 (got {self.distillation_weight}) or algo.hint_source=reference")


@dataclass
class TeacherConfig:
    """Weights that score the teacher prompt: the frozen ``initial`` weights (default: a live teacher's
    hint reading decays as SD trains the student prompt, and the loop runs down; README), the ``live``
    student, or an ``ema`` of it (``ema_decay`` 0.99 is SDFT's rate of 0.01 per step, 0.95 SDPO's 0.05).
    Under LoRA the initial teacher is the model with its adapters disabled, not a copy."""

    weights: str = "initial"
    ema_decay: float = 0.99

    def __post_init__(self):
        choice("teacher.weights", self.weights, ("live", "initial", "ema"))
        require(0 < self.ema_decay < 1, f"teacher.ema_decay must be in (0, 1), got {self.ema_decay}")
