"""Stand-ins for ``sdharness-gpu-check --cpu-dry-run`` (sdharness/tools/gpu_rows.py): enough of
vLLM, on CPU, for the vLLM rows to run the harness's own code end to end.

The stand-in engine is an HF model loaded from the directory ``VLLMRollout`` wrote: it takes the
synced weights under their HF names as vLLM's ``load_weights`` does, and decodes greedily
(it has no sampler; sampled rollouts are greedy ones). It is installed only in the dry run's own
row processes, since it also makes ``torch.cuda.is_available()`` true there.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch


class StandInLLM:
    """``vllm.LLM`` as ``VLLMRollout`` drives it: in-process, token ids in and out."""

    def __init__(self, **engine_args):
        from transformers import AutoModelForCausalLM

        self.engine_args = engine_args
        self.model = AutoModelForCausalLM.from_pretrained(Path(engine_args["model"]), dtype=torch.float32).eval()
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self.load_weights))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            worker=SimpleNamespace(model_runner=runner))))

    def load_weights(self, weights) -> None:
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                if name in parameters:  # a tied head arrives as the embedding, as vLLM ties it
                    parameters[name].copy_(tensor)

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        outputs = []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            sequence = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=sampling_params.max_tokens,
                                           eos_token_id=sampling_params.stop_token_ids, pad_token_id=0)
            tokens = sequence[0, ids.shape[1]:].tolist()
            stopped = bool(tokens) and tokens[-1] in sampling_params.stop_token_ids
            completion = SimpleNamespace(token_ids=tokens, finish_reason="stop" if stopped else "length",
                                         stop_reason=tokens[-1] if stopped else None)
            outputs.append(SimpleNamespace(outputs=[completion]))
        return outputs

    def reset_prefix_cache(self) -> None:
        pass


def install_vllm_standin() -> None:
    """``import vllm`` gives the stand-in; CUDA reads as available (``VLLMRollout`` refuses to start
    otherwise) and CUDA's RNG state as empty (the RNG snapshot around the engine's start)."""
    module = types.ModuleType("vllm")
    module.LLM, module.__version__ = StandInLLM, "stand-in"
    module.SamplingParams = lambda **params: SimpleNamespace(**params)
    sys.modules["vllm"] = module
    torch.cuda.is_available = lambda: True
    torch.cuda.get_rng_state_all = lambda: []
    torch.cuda.set_rng_state_all = lambda states: None
