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
# Job directories whose job failed in this process: the sweep's exit status (sdharness.cli.cli_errors).
failed_jobs: list[str] = []


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
            "traceback_tail": "\n".join(lines[-tail_lines:])}


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
