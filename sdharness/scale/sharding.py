"""FSDP2 (``torch.distributed.fsdp.fully_shard``), applied by ``PolicyModule.configure_model`` under
``trainer=fsdp`` (Lightning's ``ModelParallelStrategy``, see ``scale.strategy.FSDP2Strategy``).

Each decoder layer (the classes an HF model lists as ``_no_split_modules``) is one FSDP unit, the
model itself the root, which keeps the embeddings, final norm and LM head. FSDP2 shards in place,
so ``module.model`` stays the HF model and every call into it gathers what it needs:

* ``model(...)`` and ``model.generate(...)``: the root's forward hooks gather the root weights,
  each layer gathers its own.
* The teacher is scored through the decoder alone plus the head's weight (``logits.
  completion_hidden``), which is not the root's forward, so :func:`shard_model` registers that
  path (``decoder_forward``) as a forward method of the root. The root keeps its weights
  gathered after a forward (FSDP2 frees them after the backward), so the head's weight is whole
  while the loss projects it chunk by chunk.

Unlike FSDP1 this runs on CPU with gloo, so ``tests/scale/test_distributed.py`` checks it against DDP.
"""

from __future__ import annotations

import types

import torch

DECODER_FORWARD = "decoder_forward"


def layer_classes(model: torch.nn.Module) -> set[type]:
    """The model's transformer block classes, from HF's ``_no_split_modules``."""
    names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or []}
    classes = {type(module) for module in model.modules() if type(module).__name__ in names}
    if not classes:
        raise ValueError(f"{type(model).__name__} lists no `_no_split_modules`; trainer=fsdp cannot tell its layers")
    return classes


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, mesh, *, param_dtype: torch.dtype | None = None) -> None:
    """Shard ``model`` in place over ``mesh``: one unit per layer, the model as the root.

    ``param_dtype``: the dtype weights are gathered and computed in (bf16 halves the traffic);
    gradients are still reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if is_sharded(model):  # Lightning may call configure_model more than once
        return
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    classes = tuple(layer_classes(model))
    for module in list(model.modules()):
        if isinstance(module, classes):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    setattr(model, DECODER_FORWARD, types.MethodType(lambda self, **inputs: self.get_decoder()(**inputs), model))
    register_fsdp_forward_method(model, DECODER_FORWARD)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a ``DTensor``); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU on rank 0, empty on the others (a collective: every rank
    must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
