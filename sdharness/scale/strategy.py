"""Lightning strategies by name; ``fsdp`` is FSDP2 (the model sharded by ``PolicyModule.configure_model``)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as plain FSDP2: one data-parallel dimension over every rank, and
    checkpoints gathered into one file on rank 0 (they resume under any strategy and world size)."""

    def __init__(self, **options: Any):
        options.setdefault("save_distributed_checkpoint", False)
        super().__init__(tensor_parallel_size=1, **options)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def build_strategy(trainer_cfg):
    """Lightning's strategy by name, built with ``trainer.strategy_options`` when there are any;
    ``fsdp`` is FSDP2 (:class:`FSDP2Strategy`, the model sharded by ``PolicyModule.configure_model``)."""
    name, options = trainer_cfg.strategy, dict(trainer_cfg.strategy_options)
    if name == "fsdp":
        return FSDP2Strategy(**options)
    if not isinstance(name, str) or not (options or name.startswith("deepspeed")):
        return name
    entry = StrategyRegistry[name]
    strategy = entry["strategy"](**{**entry["init_params"], **options})
    if name.startswith("deepspeed"):
        # The engine clips only by its config: Lightning's DeepSpeed precision ignores clip_gradients,
        # and fills the config from Trainer(gradient_clip_val), which manual optimisation leaves unset.
        strategy.config.setdefault("gradient_clipping", trainer_cfg.gradient_clip_val or 0.0)
    return strategy
