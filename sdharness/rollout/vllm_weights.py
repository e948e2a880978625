"""The training model's live weights under the names an HF checkpoint has, LoRA merged: what the vLLM
rollout (:mod:`sdharness.rollout.vllm`) loads at its start and pushes into its engine after every
optimiser step. DDP and ``torch.compile`` wrappers are unwrapped, FSDP1 names cleaned and DTensor
shards (FSDP2) gathered.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Path components that wrappers add to parameter names and HF checkpoints never have.
_WRAPPER_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def unwrap_model(model):
    """The module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_peft(model) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def _clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: DTensor shards (FSDP2) gathered; detached."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach()


def _peft_state_dict(model) -> dict[str, torch.Tensor]:
    """HF-named weights of a PEFT model with the active LoRA adapters merged, without touching the
    model (merge/unmerge in place would drift the base weights by rounding every step)."""
    base = model.get_base_model()
    tied = bool(getattr(getattr(base, "config", None), "tie_word_embeddings", False))
    tied_modules = {id(m) for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None}
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if not (hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
                continue
            if getattr(module, "merged", False):
                continue  # the base weight already holds the delta
            adapters = [a for a in module.active_adapters
                        if a in getattr(module, "lora_A", {}) or a in getattr(module, "lora_embedding_A", {})]
            if not adapters:
                continue
            if any(getattr(module, "use_dora", {}).get(a, False) for a in adapters):
                raise NotImplementedError(f"rollout.backend=vllm: {name} is a DoRA adapter, which cannot be merged "
                                          "into a plain weight for vLLM; use rollout.backend=hf")
            if tied and id(module) in tied_modules:
                raise NotImplementedError(f"rollout.backend=vllm: LoRA on {name}, whose weight is tied to the LM "
                                          "head: vLLM would tie the merged weight, training does not. Leave the "
                                          "embeddings out of model.lora_target_modules or use rollout.backend=hf")
            delta = sum(module.get_delta_weight(a) for a in adapters)
            deltas[_clean_name(f"{name}.weight")] = delta
    active = set(model.active_adapters) if hasattr(model, "active_adapters") else {"default"}
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        parts = _clean_name(key).split(".")
        if any(part.startswith("lora_") for part in parts) or "original_module" in parts:
            continue
        if "modules_to_save" in parts:  # modules trained in full: take the active adapter's copy
            i = parts.index("modules_to_save")
            if parts[i + 1] not in active:
                continue
            parts = parts[:i] + parts[i + 2:]
        parts = [part for part in parts if part != "base_layer"]
        name = ".".join(parts)
        tensor = _full(tensor)
        if name in deltas:
            tensor = tensor + deltas.pop(name).to(tensor.dtype)
        weights[name] = tensor
    if deltas:
        raise RuntimeError(f"rollout.backend=vllm: LoRA deltas without a base weight: {sorted(deltas)}")
    return weights


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The live weights under the names ``save_pretrained`` writes (``model.layers.0...``), LoRA merged.

    Handles DDP/``torch.compile`` wrappers (unwrapped), FSDP1 (its default full state dict, names
    cleaned) and DTensor shards (gathered). Tensors are views of the live weights where possible.
    """
    model = unwrap_model(model)
    if _is_peft(model):
        return _peft_state_dict(model)
    return {_clean_name(key): _full(tensor) for key, tensor in model.state_dict().items()}


def _hf_model(model):
    """The transformers ``PreTrainedModel`` (for its config and ``save_pretrained``)."""
    model = unwrap_model(model)
    return model.get_base_model() if _is_peft(model) else model


def save_weights(model, tokenizer, directory: str | Path) -> list[str]:
    """Write the live weights (LoRA merged) as an HF directory vLLM can load; returns the stored names."""
    from safetensors import safe_open

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_model = _hf_model(model)
    state = hf_state_dict(model)
    hf_model.save_pretrained(directory, state_dict=state)
    tokenizer.save_pretrained(directory)
    names: list[str] = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names += list(handle.keys())
    if not names:
        raise RuntimeError(f"rollout.backend=vllm: save_pretrained wrote no safetensors files to {directory}")
    return sorted(names)
