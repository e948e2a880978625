"""Train a model with privileged on-policy self-distillation (a Hydra app).

    sdharness-train                                   # the default experiment
    sdharness-train model=tiny_random data=arithmetic trainer.max_steps=2
    sdharness-train aggregation=clip aggregation.tau=0.5 data=jsonl data.path=train.jsonl

Reads straight down: validate config -> load model -> data -> module -> fit -> save -> report.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from sdharness.config import ConfigError, register_configs, resolve_wandb_mode, to_train_config
from sdharness.data import DataError, ProblemDataModule
from sdharness.evaluation import QuickEval
from sdharness.jobs import end_wandb_run, in_multirun, record_failure
from sdharness.models import load_model_and_tokenizer, save_for_inference
from sdharness.accounting import X_AXES, BudgetStop
from sdharness.baselines import GRPOModule, SFTModule
from sdharness.module import SelfDistillModule
from sdharness.prompts import uses_chat_template

log = logging.getLogger(__name__)
register_configs()
MODULES = {"sd": SelfDistillModule, "sft": SFTModule, "grpo": GRPOModule}
# Hydra's own files live in the run directory too; the CSV logger only adds metrics.csv there.
warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # the checkout's conf/ (editable install)


def make_loggers(cfg, output_dir: Path, config_dict: dict) -> list:
    # Flushed every step: a killed run keeps its metrics up to the last step.
    loggers = [CSVLogger(output_dir, name="", version="", flush_logs_every_n_steps=1)]
    mode = resolve_wandb_mode(cfg.logger.mode)
    if mode != "disabled":
        wandb = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                            tags=list(cfg.tags), save_dir=str(output_dir), offline=mode == "offline",
                            name=output_dir.name)
        wandb.log_hyperparams(config_dict)
        for axis in X_AXES:  # every cost counter is offered as an x-axis for every curve
            wandb.experiment.define_metric(f"train/{axis}")
        wandb.experiment.define_metric("eval/*", step_metric="train/problems_seen")
        loggers.append(wandb)
    return loggers


def train(dict_cfg: DictConfig, output_dir: str | Path) -> dict[str, float]:
    """Run one experiment; returns the final eval metrics."""
    cfg = to_train_config(dict_cfg)  # runs every check before any model loads
    output_dir = Path(output_dir)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    uses_chat_template(cfg.prompt, tokenizer)  # fails now, not mid-run, if a required template is missing
    datamodule = ProblemDataModule(cfg.data, cfg.prompt, tokenizer,
                                   max_context=getattr(model.config, "max_position_embeddings", 10**9),
                                   max_new_tokens=max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens),
                                   eval_batch_size=cfg.eval.batch_size)
    datamodule.setup()
    module = MODULES[cfg.algo.name](model, tokenizer, cfg)

    quick_eval = QuickEval(datamodule.eval_dataloader, cfg.eval, cfg.data.answer_marker, cfg.prompt.leak_phrases)
    checkpoints = ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True, save_top_k=0,
                                  every_n_train_steps=cfg.trainer.checkpoint_every_n_steps)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy, precision=cfg.trainer.precision, max_steps=cfg.trainer.max_steps,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=make_loggers(cfg, output_dir, OmegaConf.to_container(dict_cfg, resolve=True)),
        callbacks=[checkpoints, quick_eval, BudgetStop(cfg.budget)], default_root_dir=output_dir,
        enable_model_summary=False, **cfg.trainer.extra,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    if trainer.is_global_zero:
        save_for_inference(module.model, tokenizer, output_dir / "final_model")
    return report(quick_eval, module, output_dir)


def report(quick_eval: QuickEval, module, output_dir: Path) -> dict[str, float]:
    """Print before/after eval accuracy and the run's cost; return the final metrics."""
    first_step, first = quick_eval.history[0]
    last_step, last = quick_eval.history[-1]
    counters = module.counters
    lines = [
        f"{'':<14}{'step':>6}{'accuracy':>10}{'early_answer':>14}{'length':>8}",
        *(f"{label:<14}{step:>6}{result.accuracy:>10.3f}{result.early_answer_rate:>14.3f}{result.completion_length:>8.1f}"
          for label, (step, result) in (("before", (first_step, first)), ("after", (last_step, last)))),
        f"problems {counters.problems_seen}, generated tokens {counters.generated_tokens}, "
        f"train seconds {counters.wall_seconds:.1f}, run dir {output_dir}",
    ]
    print("\n".join(lines), flush=True)
    return last.as_metrics()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(dict_cfg: DictConfig) -> float:
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = train(dict_cfg, output_dir)
    except (ConfigError, DataError) as error:  # bad input: say what to fix, no traceback
        print(f"sdharness: error: {error}", file=sys.stderr, flush=True)
        if in_multirun():  # the sweep goes on; the job is recorded in <job dir>/FAILED.json
            return record_failure(output_dir, error, show_traceback=False)
        sys.exit(2)
    except Exception as error:
        if not in_multirun():
            raise
        return record_failure(output_dir, error)
    finally:
        end_wandb_run()  # jobs of a multirun share one process: each gets its own W&B run
    return metrics["eval/accuracy"]


if __name__ == "__main__":
    main()
