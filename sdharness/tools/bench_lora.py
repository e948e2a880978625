"""``sdharness-bench --lora-teacher``: the memory a frozen initial teacher holds under LoRA, as the
adapter-free base (``teacher=initial`` with ``model.lora_rank`` set: no copy) against a frozen copy
of the weights (what ``teacher=initial`` holds without LoRA).

Each way runs in a fresh process: the LoRA model is built (rank 16 on q_proj and v_proj) and scores one
batch (so that its weights are resident), the RSS is read, the teacher is made and scores the batch,
and the growth of the RSS high-water mark over that read is the teacher's memory (CPU; on GPU,
allocated memory). The teacher's logits are checked equal
to the copy's, so the saving is not bought with a different teacher.
"""

from __future__ import annotations

import copy

import torch

from sdharness.distill.logits import completion_hidden
from sdharness.tools.bench_measure import load_model, peak_mb, reset_peak, setup_device

LORA_RANK = 16


def measure_teacher(model_name: str, way: str, threads: int | None) -> dict:
    from peft import LoraConfig, get_peft_model

    from sdharness.methods.policy import ShadowWeights

    device = setup_device(threads)
    model, _ = load_model(model_name)
    model = get_peft_model(model.to(device), LoraConfig(r=LORA_RANK, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                        task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompt = torch.randint(3, vocab, (2, 32), generator=generator).to(device)
    g = torch.randint(3, vocab, (2, 16), generator=generator).to(device)
    with torch.no_grad():  # the student's own pass first: its weights (memory-mapped from disk) become resident
        completion_hidden(model, prompt, torch.ones_like(prompt), g, torch.ones_like(g))
    baseline, reset = reset_peak(device)
    teacher = ShadowWeights(model, "initial").model if way == "adapter_free" else \
        copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        hidden = completion_hidden(teacher, prompt, torch.ones_like(prompt), g, torch.ones_like(g)).hidden
    return {"teacher_mb": peak_mb(device) - baseline, "peak_reset": reset,
            "parameters_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "hidden_sum": float(hidden.double().sum())}


def run_lora_teacher(fresh, model_name: str, threads: int | None = None) -> dict:
    """Both ways (``fresh(fn, *args)`` runs each in a new process) and the memory saved."""
    ways = {way: fresh(measure_teacher, model_name, way, threads) for way in ("adapter_free", "copy")}
    same = ways["adapter_free"]["hidden_sum"] == ways["copy"]["hidden_sum"]
    return {"model": model_name, "lora_rank": LORA_RANK, **ways, "same_teacher": same,
            "saved_mb": ways["copy"]["teacher_mb"] - ways["adapter_free"]["teacher_mb"]}


def format_lora_table(entry: dict) -> str:
    free, copied = entry["adapter_free"], entry["copy"]
    return "\n".join([
        f"teacher=initial under LoRA (rank {entry['lora_rank']}), {entry['model']}: teacher's memory (RSS high-water "
        "growth while it is made and scores one batch)",
        f"  adapter-free base {free['teacher_mb']:.1f} MB | frozen copy {copied['teacher_mb']:.1f} MB | saved "
        f"{entry['saved_mb']:.1f} MB (the weights: {copied['parameters_mb']:.1f} MB) | same teacher states: "
        f"{entry['same_teacher']}"])
