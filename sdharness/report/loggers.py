"""The run's loggers: metrics.csv (flushed every step) and W&B (offline unless a key is set), with
every cost counter declared as an x-axis."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger

from sdharness.config import ConfigError, resolve_wandb_mode
from sdharness.jobs import end_wandb_run
from sdharness.methods.accounting import X_AXES
from sdharness.scale.resume import Resume, metric_rows_to_keep

log = logging.getLogger(__name__)


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
    if mode == "disabled":
        return loggers
    try:
        loggers.append(_wandb_logger(cfg, output_dir, config_dict, resume, offline=mode == "offline"))
    except Exception as error:  # noqa: BLE001 - wandb raises many kinds; each is reported in one line
        if mode != "online":
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if cfg.logger.if_online_fails == "error":
            raise ConfigError(f"W&B online logging failed: {reason}; set logger.mode=offline or WANDB_MODE=offline, "
                              "or logger.if_online_fails=offline to fall back") from None
        end_wandb_run(exit_code=1)
        log.warning("W&B online logging failed: %s; logging offline under %s instead (logger.if_online_fails="
                    "offline)", reason, output_dir / "wandb")
        loggers.append(_wandb_logger(cfg, output_dir, config_dict, resume, offline=True))
    return loggers


def wandb_settings(wandb_module, init_timeout: float, offline: bool):
    """quiet: no banner and no run summary on the console (the run directory holds both); online, wandb
    still prints the run's URL. Offline, silent: quiet still prints three lines of sync hints at the
    start and end, while the run directory (printed by the harness) is all there is to see."""
    return wandb_module.Settings(init_timeout=init_timeout, quiet=True, silent=offline)


def _wandb_logger(cfg, output_dir: Path, config_dict: dict, resume: Resume | None, offline: bool) -> WandbLogger:
    import wandb as wandb_module

    same_run = {"id": resume.wandb_id, "resume": "allow"} if resume and resume.wandb_id else {}
    wandb = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                        tags=list(cfg.tags), save_dir=str(output_dir), offline=offline,
                        name=output_dir.name,
                        settings=wandb_settings(wandb_module, cfg.logger.init_timeout_s, offline),
                        # Said to wandb.init too: its settings may have been read while the mode was online.
                        **({"mode": "offline"} if offline else {}), **same_run)
    # Lightning passes anonymous=None to wandb.init, which wandb warns is deprecated; leave it unset.
    wandb._wandb_init.pop("anonymous", None)
    wandb.log_hyperparams(config_dict)
    for axis in X_AXES:  # every cost counter is offered as an x-axis for every curve
        wandb.experiment.define_metric(f"train/{axis}")
    wandb.experiment.define_metric("eval/*", step_metric="train/problems_seen")
    return wandb
