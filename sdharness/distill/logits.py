"""Score a completion under a prompt: logits (or hidden states) at the positions that predict ``g``.

``[prompt (left-padded), g (right-padded)]`` goes through the model once; position i of the
result predicts token i of ``g``. Because every prompt ends at the same column, the same
completion scored after the student prompt and after the teacher prompt lines up exactly.

The teacher needs no gradient, so it is scored as :class:`LazyLogits`: final hidden states plus
the LM head, turned into vocabulary logits only chunk by chunk inside the loss. A full
``[batch, length, vocab]`` teacher tensor never exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdharness.scale.sharding import DECODER_FORWARD


def _inputs(prompt_ids, prompt_mask, completion_ids, completion_mask) -> dict[str, torch.Tensor]:
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    # Positions count real tokens only, exactly as generate() numbered them under left padding.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def completion_logits(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits ``[batch, new_tokens, vocab]`` for ``completion_ids`` ``[batch, new_tokens]``.

    Only the completion's positions go through the LM head (``logits_to_keep``), so the prompt
    costs no vocabulary-sized memory.
    """
    total, new_tokens = prompt_ids.shape[1] + completion_ids.shape[1], completion_ids.shape[1]
    # The exact positions, not "last N+1" then a slice: slicing's backward allocates a full-size zero tensor.
    keep = torch.arange(total - new_tokens - 1, total - 1, device=prompt_ids.device)
    output = model(**_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask), logits_to_keep=keep,
                   use_cache=False)
    return output.logits


@dataclass
class LazyLogits:
    """Final hidden states ``[batch, length, hidden]`` and the LM head that maps them to logits."""

    hidden: torch.Tensor
    head: torch.nn.Module
    softcap: float | None = None  # Gemma-style final logit soft-capping

    @property
    def shape(self) -> torch.Size:
        return torch.Size([*self.hidden.shape[:-1], self.head.weight.shape[0]])

    def rows(self, flat_positions: torch.Tensor | slice, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[len(flat_positions), vocab]`` of the given flattened positions (an index
        tensor, or a ``slice`` for consecutive ones: no gather of the hidden states).

        ``out``: a buffer of that shape to write into, used when the head is a plain ``nn.Linear``
        of the hidden states' dtype and no gradient is recorded (a fresh tensor is returned
        otherwise); reusing it skips a fresh multi-megabyte allocation, and its page faults, per call.
        """
        hidden = self.hidden.reshape(-1, self.hidden.shape[-1])[flat_positions]
        weight = self.head.weight
        differentiable = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        if (out is not None and not differentiable and type(self.head) is torch.nn.Linear
                and out.dtype == hidden.dtype == weight.dtype and out.shape[0] == hidden.shape[0]):
            logits = torch.matmul(hidden, weight.t(), out=out)
            if self.head.bias is not None:
                logits.add_(self.head.bias)
            if self.softcap:
                logits.div_(self.softcap).tanh_().mul_(self.softcap)
            return logits
        logits = self.head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def materialize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.shape[:-1].numel(), device=self.hidden.device)).view(self.shape)


def completion_hidden(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> LazyLogits:
    """Like :func:`completion_logits`, but stops before the LM head."""
    new_tokens = completion_ids.shape[1]
    # A model sharded with FSDP2 has the decoder registered as a forward of its root, so the
    # root's weights (embeddings, norm, head) are gathered for it (sdharness/scale/sharding.py).
    decoder = getattr(model, DECODER_FORWARD, None) or model.get_decoder()
    output = decoder(**_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask), use_cache=False)
    hidden = output.last_hidden_state[:, -new_tokens - 1:-1]
    return LazyLogits(hidden, model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None))
