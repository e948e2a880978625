"""vLLM as an optional rollout backend (``rollout.backend=vllm``, extra ``sdharness[vllm]``, CUDA only).

The engine is *colocated*: it runs inside the training process, on the training GPU, holding its
own copy of the weights in ``rollout.vllm_gpu_memory_utilization`` of the GPU memory (KV cache
included). After every optimiser step the live training weights are pushed into that copy with the
model's own ``load_weights`` (HF parameter names in, vLLM's fused layout out), and vLLM's prefix
cache is reset so no KV block computed with old weights is reused.

HF ``generate`` (sdharness/rollout/hf.py) stays the default and the CPU path; guided sampling
(sdharness/rollout/guided.py) is HF-only, which the config enforces. ``VLLMRollout.generate`` returns the
same :class:`~sdharness.rollout.hf.Rollout` as ``rollout.generate``: completion ids right-padded with
the pad token, a mask covering every token up to and including the first EOS, and texts decoded by
the training tokenizer (vLLM never tokenizes or detokenizes: prompts go in as token ids).

vLLM needs a directory it can load, while the training model may come from a GGUF file, the
shipped testbed or ``tiny_random``; so the constructor writes the current weights (LoRA merged) to
a temporary HF directory with ``save_pretrained`` and starts vLLM from it. The names stored there
are the names every later ``sync_weights`` pushes.

Limits:
  * one training process on one GPU: no DDP/FSDP across ranks (the constructor refuses a world
    size above 1) and no vLLM tensor parallelism; wrappers of a single process (DDP/FSDP1 at world
    size 1, ``torch.compile``, DTensor) are unwrapped or gathered for the sync;
  * weights are synced in full every call (no LoRA-only transfer); DoRA adapters and LoRA on a
    tied embedding cannot be merged faithfully and are refused;
  * no sleep mode: vLLM keeps its weights and KV cache on the GPU while training runs, so leave
    room for training (default 0.3 of the GPU for vLLM; vLLM refuses to start when less than that
    is free);
  * vLLM samples in its own dtype (``rollout.vllm_dtype``; ``auto`` is bfloat16 for a float32
    model), so rollouts come from a slightly different distribution than the float32 training
    weights define; the losses rescore them with the training model as before. Greedy decoding
    matches HF up to near-ties. Sampling uses vLLM's generator (seeded once from ``seed``; the
    global RNGs vLLM reseeds at its start are put back), so samples are not the ones HF
    ``generate`` would draw, and a resumed run does not redraw them bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import socket
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterable

import torch

from sdharness.rollout.hf import Rollout, eos_token_ids
from sdharness.rollout.vllm_weights import hf_state_dict, save_weights, unwrap_model
from sdharness.scale.resume import restore_rng, rng_state

log = logging.getLogger(__name__)

MISSING_VLLM = "rollout.backend=vllm needs the vllm extra: pip install 'sdharness[vllm]' (CUDA only)"
NO_CUDA = ("rollout.backend=vllm needs a CUDA GPU (torch.cuda.is_available() is False); use "
           "rollout.backend=hf on CPU")

# What the in-process engine needs in the environment; restored on close, so a later process group
# (the next run of a multirun, a test) does not find this engine's single-rank world.
ENGINE_ENVIRONMENT = ("VLLM_ENABLE_V1_MULTIPROCESSING", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")

# Where the in-process engine keeps its model runner, newest layout first (vLLM V1, in-process engine core).
_RUNNER_PATHS = (
    "llm_engine.model_executor.driver_worker.worker.model_runner",
    "llm_engine.model_executor.driver_worker.model_runner",
    "llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner",
    "llm_engine.engine_core.engine_core.model_executor.driver_worker.model_runner",
)


def import_vllm():
    """The ``vllm`` module, or an ImportError that says how to get it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as error:
        raise ImportError(MISSING_VLLM) from error


# --------------------------------------------------------------------------------------------
# Training weights -> HF checkpoint names
# ------------------------------------------------------------------------------


def prompt_token_lists(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Each row's real prompt tokens (padding dropped, wherever it is)."""
    mask = prompt_mask.bool().cpu()
    ids = prompt_ids.cpu()
    return [row[keep].tolist() for row, keep in zip(ids, mask)]


def completion_tokens(output: Any, eos_ids: Iterable[int]) -> list[int]:
    """A vLLM ``CompletionOutput``'s tokens up to and including the first EOS.

    vLLM keeps a stop token id in ``token_ids``; should a version leave it out (finish_reason
    ``stop`` with ``stop_reason`` the EOS id), it is put back, so EOS stays a trained token as it is
    under HF generate.
    """
    eos = set(eos_ids)
    tokens = [int(t) for t in output.token_ids]
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    stop_reason = getattr(output, "stop_reason", None)
    if getattr(output, "finish_reason", None) == "stop" and isinstance(stop_reason, int) and stop_reason in eos:
        tokens.append(stop_reason)
    return tokens


def to_rollout(token_lists: list[list[int]], tokenizer, device=None) -> Rollout:
    """Right-padded ids and mask exactly as ``rollout.generate`` returns them (width: the longest row)."""
    width = max((len(tokens) for tokens in token_lists), default=0)
    ids = torch.full((len(token_lists), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.bool)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = True
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return Rollout(ids.to(device), mask.to(device), texts)


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def outside_training_modes():
    """No autocast and no gradients: called from a Lightning training step, which runs under
    ``bf16-mixed`` autocast with grad enabled; vLLM keeps its own dtype and never trains."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False), torch.no_grad():
        yield


def _attribute(root: Any, path: str) -> Any:
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


class VLLMRollout:
    """A colocated vLLM engine that samples the student's completions.

    ``VLLMRollout(model, tokenizer, rollout_cfg, seed=cfg.seed)`` saves ``model``'s current
    weights and starts the engine (seconds to a minute); ``generate(prompt_ids, prompt_mask)``
    samples one completion per row; ``sync_weights(model)`` pushes the live weights after an
    optimiser step; ``close()`` frees the engine and its directory and restores the environment.

    ``max_prompt_tokens``: the longest prompt it will see; with ``rollout.max_new_tokens`` it is
    vLLM's ``max_model_len`` (unless ``rollout.vllm_max_model_len`` is set), so the KV cache is
    sized for the data, not for the model's whole context. Starting the engine leaves every RNG
    as it found it (vLLM seeds the global ones), so sampling elsewhere and exact resume are unchanged.
    """

    def __init__(self, model, tokenizer, rollout_cfg, *, seed: int = 0, directory: str | Path | None = None,
                 max_prompt_tokens: int | None = None):
        vllm = import_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError(NO_CUDA)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise NotImplementedError("rollout.backend=vllm runs one colocated engine in a single training process; "
                                      f"this run has {torch.distributed.get_world_size()} ranks. Use one device "
                                      "(trainer.devices=1) or rollout.backend=hf")
        self.vllm, self.tokenizer, self.cfg = vllm, tokenizer, rollout_cfg
        self.eos_ids = eos_token_ids(unwrap_model(model), tokenizer)
        self._owns_directory = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="sdharness-vllm-") if directory is None else directory)
        if self._owns_directory:
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        self.weight_names = save_weights(model, tokenizer, self.directory)
        self._started_distributed = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self._environment = {key: os.environ.get(key) for key in ENGINE_ENVIRONMENT}
        rng = rng_state()
        try:
            with outside_training_modes():
                self.llm = vllm.LLM(**self._engine_args(seed, max_prompt_tokens))
        finally:
            restore_rng(rng)
        self.syncs = 0

    def _engine_args(self, seed: int, max_prompt_tokens: int | None) -> dict[str, Any]:
        # In-process engine (as TRL's vllm_mode="colocate"): the torchrun-style "external launcher"
        # keeps the worker in this process, so load_weights can reach the model, and multiprocessing
        # of the V1 engine core is switched off for the same reason.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        cfg = self.cfg
        args: dict[str, Any] = dict(
            model=str(self.directory),
            tokenizer=str(self.directory),
            skip_tokenizer_init=True,  # token ids in, token ids out; texts come from the training tokenizer
            dtype=cfg.vllm_dtype,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            enforce_eager=cfg.vllm_enforce_eager,
            distributed_executor_backend="external_launcher",
            seed=seed,
        )
        if cfg.vllm_max_model_len is not None:
            args["max_model_len"] = cfg.vllm_max_model_len
        elif max_prompt_tokens is not None:
            args["max_model_len"] = max_prompt_tokens + cfg.max_new_tokens
        return args

    def sampling_params(self, *, greedy: bool = False):
        cfg = self.cfg
        return self.vllm.SamplingParams(
            n=1,
            max_tokens=cfg.max_new_tokens,
            temperature=0.0 if greedy else cfg.temperature,
            top_p=1.0 if greedy else cfg.top_p,
            stop_token_ids=list(self.eos_ids),
            detokenize=False,
        )

    @outside_training_modes()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, greedy: bool = False) -> Rollout:
        """One completion per prompt row, as :func:`sdharness.rollout.hf.generate` returns it."""
        prompts = [{"prompt_token_ids": tokens} for tokens in prompt_token_lists(prompt_ids, prompt_mask)]
        outputs = self.llm.generate(prompts, self.sampling_params(greedy=greedy), use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        tokens = [completion_tokens(output.outputs[0], self.eos_ids) for output in outputs]
        return to_rollout(tokens, self.tokenizer, device=prompt_ids.device)

    def engine_model(self):
        """vLLM's model object (the one whose ``load_weights`` takes HF-named tensors)."""
        for path in _RUNNER_PATHS:
            runner = _attribute(self.llm, path)
            if runner is None:
                continue
            get_model = getattr(runner, "get_model", None)
            model = get_model() if callable(get_model) else getattr(runner, "model", None)
            if model is not None and callable(getattr(model, "load_weights", None)):
                return model
        version = getattr(self.vllm, "__version__", "?")
        raise RuntimeError(f"rollout.backend=vllm: cannot reach the model inside vLLM {version} to load weights; the "
                           "engine must run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, external_launcher). Tried: "
                           + ", ".join(_RUNNER_PATHS))

    @outside_training_modes()
    def sync_weights(self, model) -> int:
        """Push ``model``'s live weights (LoRA merged) into the engine; returns the tensors pushed.

        Call after every optimiser step (before the next ``generate``). Every name stored at
        construction is pushed, so a renamed or missing weight is an error, never a stale copy.
        """
        state = hf_state_dict(model)
        missing = [name for name in self.weight_names if name not in state]
        if missing:
            raise RuntimeError(f"rollout.backend=vllm: the live model lacks weights the engine was built with: "
                               f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.engine_model().load_weights((name, state[name]) for name in self.weight_names)
        if callable(getattr(self.llm, "reset_prefix_cache", None)):
            self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.syncs += 1
        return len(self.weight_names)

    def close(self) -> None:
        """Free the engine (and the process group it started), delete its weight directory and put
        back the environment variables the engine set."""
        llm, self.llm = getattr(self, "llm", None), None
        del llm
        if self._started_distributed:
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception:  # noqa: BLE001 - best effort, the process may be exiting
                log.debug("vLLM distributed cleanup failed", exc_info=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self._owns_directory:
            self._cleanup()
        for key, value in getattr(self, "_environment", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
