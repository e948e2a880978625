"""Rollout: the student samples its own continuation ``g``.

``rollout.backend`` picks the engine: ``hf`` (batched Hugging Face ``generate``, ``hf.py``) or
``vllm`` (a colocated vLLM engine, ``vllm.py``); ``rollout.guidance`` optionally samples from the
teacher-student aggregate instead (``guided.py``, HF only). These tuples are the only lists of
either; the config check reads them.
"""

BACKENDS = ("hf", "vllm")
GUIDANCE_MODES = ("never", "always", "on_failure")
