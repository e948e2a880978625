"""Train a model with privileged on-policy self-distillation (a Hydra app).

    sdharness-train                                   # the default experiment
    sdharness-train model=tiny_random data=arithmetic trainer.max_steps=2
    sdharness-train aggregation=clip aggregation.tau=0.5 data=jsonl data.path=train.jsonl

Reads straight down: validate config -> load model -> data -> module -> fit -> save -> report.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import DictConfig, OmegaConf

from sdharness.cli import cli_errors
from sdharness.config import CONF_DIR, ConfigError, TrainConfig, register_configs, to_train_config
from sdharness.data.datamodule import DataError, ProblemDataModule
from sdharness.data.loading import load_data, solutions_file
from sdharness.data.prompts import uses_chat_template
from sdharness.eval.quick import QuickEval, hinted_batches, print_summary
from sdharness.jobs import (INTERRUPTED_EXIT, RunInterrupted, end_wandb_run, in_multirun, record_failure,
                            resume_command, write_failure)
from sdharness.methods import method_class
from sdharness.methods.accounting import BudgetStop
from sdharness.methods.policy import SkippedUpdatesError
from sdharness.methods.progress import BudgetProgressBar
from sdharness.models import check_pretrained_task, load_model_and_tokenizer, save_for_inference, set_threads_for
from sdharness.report.loggers import make_loggers
from sdharness.run_lock import run_directory_lock
from sdharness.scale.checkpoints import AtomicCheckpointIO, DiskFullError, StepCheckpoint
from sdharness.scale.resume import resume_from
from sdharness.scale.sharding import full_state_dict, is_sharded
from sdharness.scale.strategy import build_strategy
from sdharness.tools.provenance import bootstrap_metrics, bootstrap_record

log = logging.getLogger(__name__)
register_configs()
# Hydra's own files live in the run directory too; the CSV logger only adds metrics.csv there.
warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
# The data position is restored by EpochSampler (sdharness/data/datamodule.py), which Lightning cannot see.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
# Lightning 2.6 builds torch pytree leaves the way torch 2.13 deprecates; nothing for a user to do.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
# The frozen copies (the initial teacher, the reference of GRPO's KL) stay in eval mode by design.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training",
                        category=PossibleUserWarning)


class _WithoutLitLoggerTip(logging.Filter):
    """Lightning advertises its cloud logger on every run that does not use it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip: For seamless cloud logging")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_WithoutLitLoggerTip())


def train(dict_cfg: DictConfig, output_dir: str | Path, callbacks: tuple = ()) -> dict[str, float]:
    """Run one experiment; returns the final eval metrics. ``callbacks`` are added to the Trainer's."""
    cfg = to_train_config(dict_cfg)  # runs every check before any model loads
    # Checked here, where the job runs, not at compose time: a SLURM sweep composes on a CPU login node.
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator} (trainer=gpu, ddp, fsdp and deepspeed) but "
                          "no CUDA GPU is visible here; on CPU use trainer=cpu, or trainer=ddp (or fsdp) "
                          "trainer.accelerator=cpu trainer.devices=2 trainer.precision=32-true")
    with run_directory_lock(output_dir):  # refused, before anything is written, if another run holds it
        return _fit(cfg, dict_cfg, Path(output_dir), callbacks)


def _fit(cfg: TrainConfig, dict_cfg: DictConfig, output_dir: Path, callbacks: tuple) -> dict[str, float]:
    resume = resume_from(cfg, output_dir)
    L.seed_everything(cfg.seed, workers=True)
    # A malformed data file fails now, not after a model load.
    loaded = load_data(cfg.data, cfg.algo.name, cfg.algo.hint_source)
    bootstrap = bootstrap_record(solutions_file(cfg.data))  # the sampling that found the solutions, if any
    check_pretrained_task(cfg.model, cfg.data)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    set_threads_for(model, cfg.threads)
    uses_chat_template(cfg.prompt, tokenizer)  # fails now, not mid-run, if a required template is missing
    datamodule = ProblemDataModule(cfg.data, cfg.prompt, tokenizer,
                                   max_context=getattr(model.config, "max_position_embeddings", 10**9),
                                   max_new_tokens=max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens),
                                   eval_batch_size=cfg.eval.batch_size, loaded=loaded, algo=cfg.algo.name,
                                   run_seed=cfg.seed)
    datamodule.setup()
    module = method_class(cfg.algo.name)(model, tokenizer, cfg)
    if bootstrap:  # the x-axes count the bootstrap's sampling from step 0; a resume loads the counters instead
        module.counters.load_state_dict(bootstrap["cost"])

    # Scoring the validation split (hyperparameter selection) is logged as val/*, never as eval/*.
    # The teacher's health (methods with a teacher) on the scored split's first eval.health_size problems.
    hinted = None
    if cfg.eval.teacher_health and hasattr(module, "health_models"):
        hinted = functools.cache(lambda: hinted_batches(cfg.data, cfg.prompt, tokenizer,
                                                        datamodule.evaluation[:cfg.eval.health_size],
                                                        cfg.eval.batch_size))
    quick_eval = QuickEval(datamodule.scored_splits(), cfg.eval, cfg.data.answer_marker, cfg.prompt.leak_phrases,
                           hinted_batches=hinted)
    checkpoints = StepCheckpoint(output_dir / "checkpoints" / "last.ckpt", cfg.trainer.checkpoint_every_n_steps)
    loggers = make_loggers(cfg, output_dir, OmegaConf.to_container(dict_cfg, resolve=True), resume)
    if loaded.contamination and resume is None:  # a resumed run keeps this row (it has no problems_seen)
        for logger in loggers:
            logger.log_metrics({f"data/{name}": float(n) for name, n in loaded.contamination.items()}, step=0)
    if bootstrap and resume is None:
        for logger in loggers:
            logger.log_metrics(bootstrap_metrics(bootstrap), step=0)
    # The bar counts towards the limit that ends the run (steps, problems, tokens or seconds), not epochs.
    progress = [BudgetProgressBar(cfg.budget, cfg.trainer.max_steps)] if cfg.trainer.extra.get(
        "enable_progress_bar", True) else []
    try:
        trainer = L.Trainer(
            accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
            strategy=build_strategy(cfg.trainer), precision=cfg.trainer.precision,
            max_steps=cfg.trainer.max_steps, log_every_n_steps=cfg.trainer.log_every_n_steps, logger=loggers,
            # The budget decides whether this is the final step, then the eval, then the checkpoint
            # (which holds its step's eval). Data is sharded by EpochSampler.
            callbacks=[BudgetStop(cfg.budget), quick_eval, checkpoints, *progress, *callbacks],
            default_root_dir=output_dir,
            plugins=[AtomicCheckpointIO()], enable_checkpointing=False, enable_model_summary=False,
            use_distributed_sampler=False,
            **cfg.trainer.extra,
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None)
    except SIGTERMException:  # Lightning's SystemExit() after the step SIGTERM arrived in: status 0
        end_wandb_run(exit_code=1)
        raise RunInterrupted(checkpoints.path if checkpoints.path.exists() else None,
                             cfg.trainer.checkpoint_every_n_steps) from None
    except BaseException:
        end_wandb_run(exit_code=1)
        raise
    # Closed here, not left open: the next run in this process (a multirun's next job) gets its own.
    end_wandb_run()
    if trainer.global_step > cfg.trainer.max_steps:  # resumed past it: nothing trained, final_model/ left as it is
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps}, but the checkpoint resumed is already at step "
                          f"{trainer.global_step}; raise trainer.max_steps above {trainer.global_step} to train on, "
                          "or use its final_model/ as it is")

    # FSDP2 shards in place: the full weights are gathered (every rank takes part) for rank 0 to save.
    weights = full_state_dict(module.model) if is_sharded(module.model) else None
    if not trainer.is_global_zero:
        return quick_eval.history[-1][1].as_metrics(quick_eval.prefix)
    save_for_inference(module.model, tokenizer, output_dir / "final_model", state_dict=weights)
    return print_summary(quick_eval.history, module.counters, output_dir, quick_eval.prefix)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(dict_cfg: DictConfig) -> float:
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = train(dict_cfg, output_dir)
    except RunInterrupted as error:  # the scheduler's, make's and the shell's `&&` see a failure, not success
        print(f"sdharness: {error}; resume with: {resume_command(output_dir)}", file=sys.stderr, flush=True)
        if in_multirun():
            write_failure(output_dir, error)
        sys.exit(INTERRUPTED_EXIT)  # a sweep stops too: the whole process was asked to end
    except (ConfigError, DataError, SkippedUpdatesError, DiskFullError) as error:  # say what to fix, no traceback
        print(f"sdharness: error: {error.strerror if isinstance(error, OSError) else error}", file=sys.stderr,
              flush=True)
        if in_multirun():  # the sweep goes on; the job is recorded in <job dir>/FAILED.json
            return record_failure(output_dir, error, show_traceback=False)
        sys.exit(2 if isinstance(error, (ConfigError, DataError)) else 1)  # 2: bad input, 1: the run failed
    except Exception as error:
        if not in_multirun():
            raise
        return record_failure(output_dir, error)
    # What a sweeper maximises: the validation accuracy when the run scored that split, else the eval's.
    return metrics["val/accuracy"] if "val/accuracy" in metrics else metrics["eval/accuracy"]


main = cli_errors(main)  # composition errors (unknown option, misspelt key) as one line, exit 2

if __name__ == "__main__":
    main()
