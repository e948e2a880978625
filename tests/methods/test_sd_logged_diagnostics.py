"""The SD step logs the target diagnostics on its logging steps, with loss.unconsidered_eps."""

import csv
import math

import pytest

from sdharness.train import train
from tests.conftest import TINY, compose_config

DIAGNOSTICS = ("train/unconsidered_mass", "train/kl_target_student", "train/max_log_ratio_mean",
               "train/max_log_ratio_max")


@pytest.mark.slow  # a training run
def test_diagnostics_are_logged_every_logging_step_with_the_configured_eps(tmp_path, monkeypatch):
    import sdharness.methods.self_distill as module_file

    asked = []
    loss = module_file.distillation_loss

    def recording(*args, **kwargs):
        asked.append((kwargs["monitor_kl"], kwargs["unconsidered_eps"]))
        return loss(*args, **kwargs)

    monkeypatch.setattr(module_file, "distillation_loss", recording)
    train(compose_config(TINY + ["trainer.max_steps=3", "trainer.log_every_n_steps=1", "logger.mode=disabled",
                                 "eval.at_start=false", "aggregation=trust_region", "aggregation.kl_bound=0.05",
                                 "loss.unconsidered_eps=0.01"]), tmp_path)
    assert asked == [(True, 0.01)] * 3
    with open(tmp_path / "metrics.csv", newline="") as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(logged) == 3
    for row in logged:
        values = {key: float(row[key]) for key in DIAGNOSTICS}
        assert all(math.isfinite(v) for v in values.values()), values
        assert 0 <= values["train/unconsidered_mass"] <= 1
        assert values["train/kl_target_student"] <= 0.05 + 1e-5  # the bound holds per token, so in the mean
        assert 0 <= values["train/max_log_ratio_mean"] <= values["train/max_log_ratio_max"]
