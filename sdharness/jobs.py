"""One job of a Hydra sweep: a failing job is recorded, not fatal, and gets its own W&B run.

Hydra 1.3's basic launcher runs every job of a sweep in one process. A job that raises is marked
failed, but the basic sweeper re-raises its error once the batch is done, so the sweep ends with a
traceback and no ``on_multirun_end`` (no report); ``sys.exit`` inside a job ends the sweep at
once. In a multirun, ``sdharness.train.main`` therefore records the error in
``<job dir>/FAILED.json`` (read by ``sdharness-report``) and returns NaN, and the sweep goes on;
once every job has run, the command exits 1 naming the failed ones.
"""

from __future__ import annotations

import json
import math
import sys
import traceback
from pathlib import Path

FAILED_FILE = "FAILED.json"
# The shell's status for a process ended by SIGTERM (128 + 15): a preempted or cancelled run.
INTERRUPTED_EXIT = 143
# Job directories whose job failed in this process: the sweep's exit status (sdharness.cli.cli_errors).
failed_jobs: list[str] = []


class RunInterrupted(Exception):
    """SIGTERM stopped training (SLURM preemption, ``scancel``, ``timeout``); the checkpoint it
    resumes from, or None when none was written yet."""

    def __init__(self, checkpoint: Path | None, every_n_steps: int):
        self.checkpoint = checkpoint
        where = (f"the last checkpoint is {checkpoint}" if checkpoint else
                 f"no checkpoint was written yet (trainer.checkpoint_every_n_steps={every_n_steps}), so it restarts")
        super().__init__(f"stopped by SIGTERM; {where}")


def resume_command(output_dir: str | Path) -> str:
    """The command line that resumes this job in ``output_dir``: its own overrides, then
    ``hydra.run.dir=<output_dir> ckpt_path=last``."""
    import shlex

    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    words = ["sdharness-train"]
    config_dirs = [source.path for source in hydra_cfg.runtime.config_sources if source.provider == "command-line"]
    words += [f"--config-dir={path}" for path in config_dirs]
    if hydra_cfg.job.config_name != "train":
        words.append(f"--config-name={hydra_cfg.job.config_name}")
    words += [override for override in hydra_cfg.overrides.task
              if not override.startswith(("ckpt_path=", "hydra.run.dir="))]
    words += [f"hydra.run.dir={output_dir}", "ckpt_path=last"]
    return " ".join(shlex.quote(word) for word in words)


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def end_wandb_run(exit_code: int = 0) -> None:
    """Finish the W&B run of this job, if one is open, so the next job of the sweep starts its own
    (Lightning's WandbLogger otherwise reuses the open run). Never imports wandb itself."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def failure_record(error: BaseException, tail_lines: int = 40) -> dict:
    """Error type, message, the whole error line (``KeyError: 'answer'``, where the message alone
    is ``'answer'``) and the last ``tail_lines`` lines of its traceback."""
    lines = "".join(traceback.format_exception(type(error), error, error.__traceback__)).splitlines()
    error_line = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return {"error_type": type(error).__name__, "message": str(error), "error_line": error_line,
            "interrupted": isinstance(error, RunInterrupted), "traceback_tail": "\n".join(lines[-tail_lines:])}


def write_failure(output_dir: str | Path, error: BaseException) -> Path:
    """Write ``<output_dir>/FAILED.json`` (error type, message, traceback tail); returns its path."""
    path = Path(output_dir) / FAILED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(failure_record(error), indent=2) + "\n")
    return path


def record_failure(output_dir: str | Path, error: BaseException, show_traceback: bool = True) -> float:
    """Record a failed job (:func:`write_failure`) and print its traceback (or only the message);
    returns NaN, the job's value for the sweeper (Optuna counts a NaN trial as failed). The job's
    W&B run was already closed as failed by ``train``."""
    path = write_failure(output_dir, error)
    failed_jobs.append(str(output_dir))
    shown = failure_record(error)["traceback_tail"] if show_traceback else f"{type(error).__name__}: {error}"
    print(f"{shown}\nsdharness: job failed, recorded in {path}; the sweep goes on", file=sys.stderr, flush=True)
    return math.nan


def read_failure(run_dir: str | Path) -> dict | None:
    """The record written by :func:`record_failure`, or None when the job did not fail."""
    path = Path(run_dir) / FAILED_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return {"error_type": "unreadable FAILED.json", "message": str(error), "traceback_tail": ""}
