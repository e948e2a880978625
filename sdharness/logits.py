"""Score a completion under a prompt: logits at the positions that predict ``g``.

``[prompt (left-padded), g (right-padded)]`` goes through the model once; position i of the
result predicts token i of ``g``. Because every prompt ends at the same column, the same
completion scored after the student prompt and after the teacher prompt lines up exactly.
"""

from __future__ import annotations

import torch


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
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    # Positions count real tokens only, exactly as generate() numbered them under left padding.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    new_tokens = completion_ids.shape[1]
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=new_tokens + 1,
        use_cache=False,
    )
    return output.logits[:, :-1]
