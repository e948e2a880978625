"""The run's loggers: metrics.csv (flushed every step) and W&B (offline unless a key is set), with
every cost counter declared as an x-axis."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger

from sdharness.config import resolve_wandb_mode
from sdharness.methods.accounting import X_AXES
from sdharness.scale.resume import Resume, metric_rows_to_keep


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
