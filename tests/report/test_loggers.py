"""The W&B logger's first screen: nothing from wandb offline (the run directory holds it all), and
online only what ``quiet`` keeps, the run's URL."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_offline_is_silent_and_online_quiet_keeps_the_run_url():
    from sdharness.report.loggers import wandb_settings

    wandb = pytest.importorskip("wandb")
    offline, online = wandb_settings(wandb, 10.0, offline=True), wandb_settings(wandb, 10.0, offline=False)
    assert offline.silent and offline.quiet
    assert online.quiet and not online.silent  # wandb prints "View run at <url>" unless silent


OFFLINE_RUN = """
from pathlib import Path

from sdharness.config import LoggerConfig, TrainConfig
from sdharness.jobs import end_wandb_run
from sdharness.report.loggers import make_loggers

run_dir = Path({out!r})
run_dir.mkdir()  # as Hydra makes it before the run starts
loggers = make_loggers(TrainConfig(logger=LoggerConfig(mode="offline")), run_dir, {{"seed": 0}}, None)
loggers[1].log_metrics({{"train/loss": 1.0}}, step=0)
assert loggers[1].experiment.settings.mode == "offline"
end_wandb_run()
"""


def test_an_offline_run_prints_nothing_from_wandb(tmp_path):
    """In a fresh interpreter without the test suite's WANDB_SILENT (tests/conftest.py): a user's offline run."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("WANDB_SILENT", "WANDB_API_KEY", "WANDB_MODE", "WANDB_QUIET")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", OFFLINE_RUN.format(out=str(tmp_path / "run"))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wandb" not in done.stdout + done.stderr, done.stdout + done.stderr
