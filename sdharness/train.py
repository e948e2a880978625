"""Train a model with privileged on-policy self-distillation (a Hydra app).

    sdharness-train                                   # the default experiment
    sdharness-train model=tiny_random data=arithmetic trainer.max_steps=2
    sdharness-train aggregation=clip aggregation.tau=0.5 data=jsonl data.path=train.jsonl

Reads straight down: validate config -> load model -> data -> module -> fit -> save -> report.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from omegaconf import DictConfig, OmegaConf

from sdharness.checkpoints import AtomicCheckpointIO, StepCheckpoint
from sdharness.cli import cli_errors
from sdharness.config import ConfigError, check_resume, register_configs, resolve_wandb_mode, to_train_config
from sdharness.data import DataError, ProblemDataModule, load_data
from sdharness.evaluation import QuickEval
from sdharness.jobs import end_wandb_run, in_multirun, record_failure
from sdharness.models import load_model_and_tokenizer, save_for_inference
from sdharness.accounting import X_AXES, BudgetStop
from sdharness.baselines import GRPOModule, SFTModule
from sdharness.module import SelfDistillModule, SkippedUpdatesError
from sdharness.prompts import uses_chat_template
from sdharness.sharding import full_state_dict, is_sharded

log = logging.getLogger(__name__)
register_configs()
MODULES = {"sd": SelfDistillModule, "sft": SFTModule, "grpo": GRPOModule}
# Hydra's own files live in the run directory too; the CSV logger only adds metrics.csv there.
warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
# The data position is restored by EpochSampler (sdharness/data.py), which Lightning cannot see.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
# Lightning 2.6 builds torch pytree leaves the way torch 2.13 deprecates; nothing for a user to do.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # the checkout's conf/ (editable install)


@dataclass
class Resume:
    """What a resumed run needs from its checkpoint before the Trainer restores the rest."""

    path: str
    problems_seen: int  # metric rows past this point are from steps the checkpoint does not hold
    wandb_id: str | None


def resume_from(cfg, output_dir: Path) -> Resume | None:
    """The checkpoint to resume from, checked against this config before any model loads.

    ``last`` with no checkpoint yet starts afresh, so a requeued job can always pass it."""
    if cfg.ckpt_path is None:
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.exists():
        if cfg.ckpt_path == "last":
            log.info("ckpt_path=last: no checkpoint in %s yet; starting from the beginning", path.parent)
            return None
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such file; give a .ckpt file, or ckpt_path=last with "
                          "hydra.run.dir=<the run directory to resume>")
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    check_resume(checkpoint.get("sdharness_config", {}), cfg, str(path))
    return Resume(str(path), checkpoint.get("sdharness_counters", {}).get("problems_seen", 0),
                  checkpoint.get("sdharness_wandb_id"))


def make_loggers(cfg, output_dir: Path, config_dict: dict, resume: Resume | None) -> list:
    kept = metric_rows_to_keep(output_dir / "metrics.csv", resume)
    # Flushed every step: a killed run keeps its metrics up to the last step.
    csv_logger = CSVLogger(output_dir, name="", version="", flush_logs_every_n_steps=1)
    if kept:  # the resumed run appends to its metrics up to the checkpoint (the logger deletes the file)
        header, rows = kept
        csv_logger.experiment.metrics, csv_logger.experiment.metrics_keys = rows, header
        csv_logger.experiment.save()
    loggers = [csv_logger]
    mode = resolve_wandb_mode(cfg.logger.mode)
    if mode != "disabled":
        same_run = {"id": resume.wandb_id, "resume": "allow"} if resume and resume.wandb_id else {}
        wandb = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                            tags=list(cfg.tags), save_dir=str(output_dir), offline=mode == "offline",
                            name=output_dir.name, **same_run)
        wandb.log_hyperparams(config_dict)
        for axis in X_AXES:  # every cost counter is offered as an x-axis for every curve
            wandb.experiment.define_metric(f"train/{axis}")
        wandb.experiment.define_metric("eval/*", step_metric="train/problems_seen")
        loggers.append(wandb)
    return loggers


def metric_rows_to_keep(path: Path, resume: Resume | None) -> tuple[list[str], list[dict]] | None:
    """``(header, rows)`` of a resumed run's metrics up to its checkpoint; later rows are from
    steps that are about to be re-run."""
    if resume is None:
        return None
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [row for row in reader
                    if not row.get("train/problems_seen") or float(row["train/problems_seen"]) <= resume.problems_seen]
    except FileNotFoundError:  # no metrics yet (or, on ranks > 0, rank 0 is rewriting them; only it writes)
        return None
    return list(reader.fieldnames or []), rows


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
    if not options or not isinstance(name, str):
        return name
    entry = StrategyRegistry[name]
    return entry["strategy"](**{**entry["init_params"], **options})


def train(dict_cfg: DictConfig, output_dir: str | Path, callbacks: tuple = ()) -> dict[str, float]:
    """Run one experiment; returns the final eval metrics. ``callbacks`` are added to the Trainer's."""
    cfg = to_train_config(dict_cfg)  # runs every check before any model loads
    # Checked here, where the job runs, not at compose time: a SLURM sweep composes on a CPU login node.
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator} (trainer=gpu, ddp, fsdp and deepspeed) but "
                          "no CUDA GPU is visible here; on CPU use trainer=cpu, or trainer=ddp (or fsdp) "
                          "trainer.accelerator=cpu trainer.devices=2 trainer.precision=32-true")
    output_dir = Path(output_dir)
    resume = resume_from(cfg, output_dir)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    loaded = load_data(cfg.data)  # a malformed data file fails now, not after a model load
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    uses_chat_template(cfg.prompt, tokenizer)  # fails now, not mid-run, if a required template is missing
    datamodule = ProblemDataModule(cfg.data, cfg.prompt, tokenizer,
                                   max_context=getattr(model.config, "max_position_embeddings", 10**9),
                                   max_new_tokens=max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens),
                                   eval_batch_size=cfg.eval.batch_size, loaded=loaded)
    datamodule.setup()
    module = MODULES[cfg.algo.name](model, tokenizer, cfg)

    quick_eval = QuickEval(datamodule.eval_dataloader, cfg.eval, cfg.data.answer_marker, cfg.prompt.leak_phrases)
    checkpoints = StepCheckpoint(output_dir / "checkpoints" / "last.ckpt", cfg.trainer.checkpoint_every_n_steps)
    loggers = make_loggers(cfg, output_dir, OmegaConf.to_container(dict_cfg, resolve=True), resume)
    try:
        trainer = L.Trainer(
            accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
            strategy=build_strategy(cfg.trainer), precision=cfg.trainer.precision,
            max_steps=cfg.trainer.max_steps, log_every_n_steps=cfg.trainer.log_every_n_steps, logger=loggers,
            # The budget decides whether this is the final step, then the eval, then the checkpoint
            # (which holds its step's eval). Data is sharded by EpochSampler.
            callbacks=[BudgetStop(cfg.budget), quick_eval, checkpoints, *callbacks], default_root_dir=output_dir,
            plugins=[AtomicCheckpointIO()], enable_checkpointing=False, enable_model_summary=False,
            use_distributed_sampler=False,
            **cfg.trainer.extra,
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None)
    except BaseException:
        end_wandb_run(exit_code=1)
        raise
    # Closed here, not left open: the next run in this process (a multirun's next job) gets its own.
    end_wandb_run()

    # FSDP2 shards in place: the full weights are gathered (every rank takes part) for rank 0 to save.
    weights = full_state_dict(module.model) if is_sharded(module.model) else None
    if not trainer.is_global_zero:
        return quick_eval.history[-1][1].as_metrics()
    save_for_inference(module.model, tokenizer, output_dir / "final_model", state_dict=weights)
    return report(quick_eval, module, output_dir)


def report(quick_eval: QuickEval, module, output_dir: Path) -> dict[str, float]:
    """Print before/after eval accuracy and the run's cost; return the final metrics."""
    evals = quick_eval.history
    labelled = [("before", *evals[0]), ("after", *evals[-1])] if evals[0][0] == 0 else [("after", *evals[-1])]
    counters = module.counters
    lines = [
        f"{'':<14}{'step':>6}{'accuracy':>10}{'early_answer':>14}{'length':>8}",
        *(f"{label:<14}{step:>6}{result.accuracy:>10.3f}{result.early_answer_rate:>14.3f}{result.completion_length:>8.1f}"
          for label, step, result in labelled),
        f"problems {counters.problems_seen}, generated tokens {counters.generated_tokens}, "
        f"train seconds {counters.wall_seconds:.1f}, run dir {output_dir}",
    ]
    print("\n".join(lines), flush=True)
    return evals[-1][1].as_metrics()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(dict_cfg: DictConfig) -> float:
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = train(dict_cfg, output_dir)
    except (ConfigError, DataError, SkippedUpdatesError) as error:  # say what to fix, no traceback
        print(f"sdharness: error: {error}", file=sys.stderr, flush=True)
        if in_multirun():  # the sweep goes on; the job is recorded in <job dir>/FAILED.json
            return record_failure(output_dir, error, show_traceback=False)
        sys.exit(1 if isinstance(error, SkippedUpdatesError) else 2)  # 2: bad input, 1: the run failed
    except Exception as error:
        if not in_multirun():
            raise
        return record_failure(output_dir, error)
    return metrics["eval/accuracy"]


main = cli_errors(main)  # composition errors (unknown option, misspelt key) as one line, exit 2

if __name__ == "__main__":
    main()
