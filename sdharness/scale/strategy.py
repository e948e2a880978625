"""Lightning strategies by name; ``fsdp`` is FSDP2 (the model sharded by ``PolicyModule.configure_model``),
``deepspeed_*`` DeepSpeed with the trainer's gradient clipping and float32 frozen copies."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy, StrategyRegistry

from sdharness.scale.sharding import local_part


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as plain FSDP2: one data-parallel dimension over every rank, and
    checkpoints gathered into one file on rank 0 (they resume under any strategy and world size)."""

    def __init__(self, **options: Any):
        options.setdefault("save_distributed_checkpoint", False)
        super().__init__(tensor_parallel_size=1, **options)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


class ShadowsFP32DeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` whose frozen copies of the policy (an EMA or initial teacher, GRPO's
    reference) stay in float32: under bf16 the engine casts the whole LightningModule, and an EMA
    update at decay 0.99 moves a weight by 1% of a difference, which bf16's 8 bits mostly round
    away. The policy itself is bf16 as DeepSpeed keeps it (its float32 master is the optimiser's)."""

    def setup(self, trainer) -> None:
        super().setup(trainer)  # deepspeed.initialize casts every submodule here
        frozen_copies_to_float32(self.lightning_module)


def frozen_copies_to_float32(module: torch.nn.Module) -> None:
    """Cast every direct child of ``module`` that trains nothing (a scoring-only copy) to float32."""
    for child in module.children():
        parameters = list(child.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            child.float()


def build_strategy(trainer_cfg):
    """Lightning's strategy by name, built with ``trainer.strategy_options`` when there are any;
    ``fsdp`` is FSDP2 (:class:`FSDP2Strategy`, the model sharded by ``PolicyModule.configure_model``)."""
    name, options = trainer_cfg.strategy, dict(trainer_cfg.strategy_options)
    if name == "fsdp":
        return FSDP2Strategy(**options)
    if not isinstance(name, str) or not (options or name.startswith("deepspeed")):
        return name
    entry = StrategyRegistry[name]
    kind = ShadowsFP32DeepSpeedStrategy if entry["strategy"] is DeepSpeedStrategy else entry["strategy"]
    strategy = kind(**{**entry["init_params"], **options})
    if name.startswith("deepspeed"):
        # The engine clips only by its config: Lightning's DeepSpeed precision ignores clip_gradients,
        # and fills the config from Trainer(gradient_clip_val), which manual optimisation leaves unset.
        strategy.config.setdefault("gradient_clipping", trainer_cfg.gradient_clip_val or 0.0)
    return strategy


def gradients_finite(parameters: Iterable[torch.Tensor], strategy) -> bool:
    """Whether every gradient this rank can see is finite (a sharded DTensor's local shard).

    ZeRO-2 frees ``p.grad`` once the backward has reduced it into the optimiser's partitions, so
    under DeepSpeed each full gradient is assembled from them (``safe_get_full_grad``, between the
    backward and the step); it is a collective, so every rank asks for every parameter."""
    if isinstance(strategy, DeepSpeedStrategy):
        from deepspeed.utils import safe_get_full_grad

        grads = [safe_get_full_grad(p) for p in parameters if p.requires_grad]
        return all([bool(torch.isfinite(grad).all()) for grad in grads if grad is not None])
    return all(bool(torch.isfinite(local_part(p.grad)).all()) for p in parameters if p.grad is not None)
