"""Faults: a run killed with SIGKILL resumes from its last checkpoint and ends exactly where an
uninterrupted run ends; a resume under a different model/data config is refused by name."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdharness.config import ConfigError
from sdharness.data.datamodule import EpochSampler
from sdharness.train import train
from tests.conftest import TINY, compose_config

pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or sweeps

ROOT = Path(__file__).resolve().parents[2]
# 6 problems in batches of 2: steps 3 and 6 start new epochs, so the kill after the step-4
# checkpoint lands mid-epoch; eval every 3 steps puts an eval both before and after the kill.
RUN = TINY + ["data.train_size=6", "trainer.max_steps=7", "trainer.checkpoint_every_n_steps=2",
              "eval.every_n_steps=3", "threads=1"]
# Runs `train` in a fresh process; the callback SIGKILLs the process in `hook` (after every other
# callback's) once global_step is `kill_at`.
SCRIPT = """
import os, signal, sys
import lightning as L
from tests.conftest import compose_config
from sdharness.train import train

out, kill_at, hook, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]

class KillAt(L.Callback):
    pass

def kill(self, trainer, *args):
    if trainer.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

setattr(KillAt, hook, kill)

train(compose_config(overrides), out, callbacks=(KillAt(),))
"""


def run(out: Path, *overrides: str, kill_at: int = -1, hook: str = "on_train_batch_start") -> subprocess.CompletedProcess:
    # Without WANDB_SERVICE: a child would join this test process's W&B service (started by an earlier
    # in-process test), which keeps the killed child's run id "in use", so the resume could not take it.
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(kill_at), hook, *RUN, *overrides],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def metric_rows(run_dir: Path) -> list[dict]:
    """The rows without their wall-clock seconds (training, evals, health), which no rerun repeats."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "train/wall_seconds" and not k.startswith("time/")}
                for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights_and_metrics(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(whole).returncode == 0
    first = run(killed, kill_at=5)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = run(killed, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # Optimiser, schedule, RNG, data position and counters all feed the weights: bit-identical.
    a, b = load_file(whole / "final_model" / "model.safetensors"), load_file(killed / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    # Every metric row (losses, counters, evals before and after the kill) is kept once; only
    # wall-clock seconds differ. The resumed W&B run continues the killed one (same run id).
    assert metric_rows(killed) == metric_rows(whole)
    assert len({path.name.split("-")[-1] for path in (killed / "wandb").glob("offline-run-*")}) == 1
    assert "before             0" in resumed.stdout  # the start eval survives the kill in the checkpoint


@pytest.mark.slow
def test_a_kill_right_after_a_checkpoint_is_written_keeps_that_steps_metrics_row(tmp_path):
    """Lightning writes a step's metrics row after every callback's ``on_train_batch_end``, so a
    kill there, just after the step-4 checkpoint, is the instant between checkpoint and row."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(whole).returncode == 0
    first = run(killed, kill_at=4, hook="on_train_batch_end")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    resumed = run(killed, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metric_rows(killed) == metric_rows(whole)
    a, b = load_file(whole / "final_model" / "model.safetensors"), load_file(killed / "final_model" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_ckpt_path_last_with_no_checkpoint_starts_afresh(tmp_path):
    train(compose_config(TINY + ["trainer.max_steps=1", "logger.mode=disabled", "ckpt_path=last"]), tmp_path)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_missing_checkpoint_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path=.*nope.ckpt: no such file"):
        train(compose_config(TINY + ["ckpt_path=" + str(tmp_path / "nope.ckpt")]), tmp_path)


def test_resume_with_a_different_data_or_model_config_is_refused_by_field(tmp_path):
    base = TINY + ["trainer.max_steps=1", "logger.mode=disabled", "eval.at_start=false"]
    train(compose_config(base), tmp_path)
    changed = base + ["trainer.max_steps=2", "ckpt_path=last", "data.train_size=10", "model.hidden_size=48"]
    with pytest.raises(ConfigError) as error:
        train(compose_config(changed), tmp_path)
    message = str(error.value)
    assert "data.train_size: checkpoint 8, now 10" in message and "model.hidden_size: checkpoint 32, now 48" in message
    assert "resume_allow_changes=true" in message
    # A trainer-only change (more steps) is a normal resume; the override lets a data change through.
    train(compose_config(base + ["trainer.max_steps=2", "ckpt_path=last", "data.train_size=10",
                                 "resume_allow_changes=true"]), tmp_path)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.parametrize("change", ["algo=sft", "optim.lr=2e-2", "optim.weight_decay=0.1", "aggregation=clip",
                                    "aggregation.tau=3.0", "data file edited in place"])
def test_resume_refuses_a_changed_method_optimiser_aggregation_or_data_file(tmp_path, change):
    rows = [{"problem": f"Start with {i}. Add 3.", "solution": f"{i} + 3 = {i + 3}\nThe answer is {i + 3}.",
             "answer": str(i + 3)} for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = TINY + ["data=jsonl", f"data.path={data}", "data.eval_size=2", "trainer.max_steps=1",
                   "logger.mode=disabled", "eval.at_start=false"]
    train(compose_config(base), tmp_path / "run")
    if change == "data file edited in place":
        data.write_text("".join(json.dumps({**row, "answer": "0"}) + "\n" for row in rows))
        overrides, field = [], r"data.path contents \(sha256\): checkpoint '[0-9a-f]{64}', now '[0-9a-f]{64}'"
    else:
        overrides = [change]
        key = {"algo=sft": "algo.name", "aggregation=clip": "aggregation.name"}.get(change, change.split("=")[0])
        field = rf"{re.escape(key)}: checkpoint .*, now "
    resume = base + ["trainer.max_steps=2", "ckpt_path=last", *overrides]
    with pytest.raises(ConfigError, match=rf"was trained with a different config: .*{field}.*resume_allow_changes=true"):
        train(compose_config(resume), tmp_path / "run")
    train(compose_config(resume + ["resume_allow_changes=true"]), tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def batches(sampler: EpochSampler, batch_size: int) -> list[list[int]]:
    order = list(sampler)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def test_epoch_sampler_shards_ranks_disjointly_and_resumes_mid_epoch():
    single = EpochSampler(10, 4, seed=3)
    single.set_epoch(1)
    whole = batches(single, 4)
    assert sorted(sum(whole, [])) == list(range(10)) and [len(b) for b in whole] == [4, 4, 2]
    # Two ranks of batch 2 see, step by step, the single process's batches of 4 split in halves
    # (the last global batch padded from the epoch's start so both ranks take a third step).
    ranks = [EpochSampler(10, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(1)
    zero, one = batches(ranks[0], 2), batches(ranks[1], 2)
    assert len(zero) == len(one) == 3 == len(ranks[0]) // 2
    assert [z + o for z, o in zip(zero, one)][:2] == whole[:2] and zero[2] == whole[2]
    assert not set(sum(zero, [])) & set(sum(one[:2], []))
    # Resuming epoch 1 after 2 batches yields the rest of it, then whole epochs again.
    resumed = EpochSampler(10, 4, seed=3, resume_at=(1, 2))
    resumed.set_epoch(1)
    assert batches(resumed, 4) == whole[2:]
    resumed.set_epoch(1)
    assert batches(resumed, 4) == whole


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from sdharness.scale.checkpoints import AtomicCheckpointIO

    target = tmp_path / "checkpoints" / "last.ckpt"
    writer = AtomicCheckpointIO()
    writer.save_checkpoint({"global_step": 4, "weights": torch.ones(3)}, target)

    def dies_halfway(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # stands in for the kill arriving mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        writer.save_checkpoint({"global_step": 6, "weights": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["global_step"] == 4
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def poison_losses(monkeypatch, bad_batches: set[int] | None):
    """SelfDistillModule yields a NaN loss on the given batches (all when None)."""
    from sdharness.methods.self_distill import SelfDistillModule

    losses, seen = SelfDistillModule.losses, []

    def poisoned(self, batch):
        seen.append(len(seen))
        for loss, metrics in losses(self, batch):
            yield (loss * float("nan") if bad_batches is None or seen[-1] in bad_batches else loss), metrics

    monkeypatch.setattr(SelfDistillModule, "losses", poisoned)


def test_a_nan_loss_skips_the_update_and_training_goes_on(tmp_path, monkeypatch):
    poison_losses(monkeypatch, {1})
    train(compose_config(TINY + ["trainer.max_steps=3", "logger.mode=disabled", "eval.at_start=false"]), tmp_path)
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    assert [float(r["train/skipped_steps"]) for r in rows] == [0.0, 1.0, 1.0, 1.0]  # 4 batches for 3 updates
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    final = load_file(tmp_path / "final_model" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in final.values())


def test_nan_losses_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    from sdharness.methods.policy import SkippedUpdatesError

    train(compose_config(TINY + ["trainer.max_steps=1", "logger.mode=disabled", "eval.at_start=false"]), tmp_path)
    good = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    poison_losses(monkeypatch, None)
    with pytest.raises(SkippedUpdatesError, match=r"2 consecutive updates were skipped \(the last for a non-finite "
                       r"loss or gradient\); stopping. The last good checkpoint, .*last.ckpt, is kept; .*then resume "
                       r"with ckpt_path=last$"):
        train(compose_config(TINY + ["trainer.max_steps=4", "trainer.max_consecutive_skipped=2", "ckpt_path=last",
                                     "trainer.checkpoint_every_n_steps=1", "logger.mode=disabled"]), tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == good


@pytest.mark.slow
def test_command_line_reports_a_diverged_run_in_one_line(tmp_path):
    """lr 1e30: the first update makes the weights huge, every later loss is inf or NaN."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sdharness.train", *TINY, "algo=sft", "optim.lr=1e30",
                             "trainer.max_steps=6", "trainer.max_consecutive_skipped=2", "trainer.checkpoint_every_n_steps=1",
                             "logger.mode=disabled",
                             f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "sdharness: error: 2 consecutive updates were skipped (the last for a non-finite loss" in result.stderr
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_extending_a_finished_run_and_evaluating_more_often_change_no_sample(tmp_path):
    # 4 problems in batches of 2: the finished 2-step run ends at an epoch boundary, where a
    # checkpoint taken after fit (or a DataLoader seeding itself from torch's generator) would
    # shift the data or the rollouts' samples. Evals draw nothing either.
    base = TINY + ["data.train_size=4", "logger.mode=disabled", "threads=1"]
    train(compose_config(base + ["trainer.max_steps=3"]), tmp_path / "whole")
    train(compose_config(base + ["trainer.max_steps=2"]), tmp_path / "extended")
    train(compose_config(base + ["trainer.max_steps=3", "ckpt_path=last"]), tmp_path / "extended")
    train(compose_config(base + ["trainer.max_steps=3", "eval.every_n_steps=1"]), tmp_path / "evaluated")
    whole = load_file(tmp_path / "whole" / "final_model" / "model.safetensors")
    for other in ("extended", "evaluated"):
        weights = load_file(tmp_path / other / "final_model" / "model.safetensors")
        assert all(torch.equal(whole[name], weights[name]) for name in whole), other


# 6 problems in batches of 2: an epoch is 3 steps, so stopping at 1, 2, 3, 4, 6 covers a checkpoint
# one batch into an epoch, in its middle and at its end, and a chain of resumes crosses several.
RESUME_RUN = TINY + ["data.train_size=6", "trainer.checkpoint_every_n_steps=1", "logger.mode=disabled", "threads=1",
                     "eval.every_n_steps=4"]


def final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "final_model" / "model.safetensors")


@pytest.mark.parametrize("stops", [[1], [2], [3], [4], [3, 6], [3, 5], [2, 3, 4, 6], [1, 2, 3, 4, 5, 6, 7]],
                         ids=lambda stops: "-".join(map(str, stops)))
def test_resuming_at_any_step_gives_the_uninterrupted_weights_and_metrics(tmp_path, stops):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(compose_config(RESUME_RUN + ["trainer.max_steps=8"]), whole)
    for number, stop in enumerate([*stops, 8]):
        train(compose_config(RESUME_RUN + [f"trainer.max_steps={stop}", *(["ckpt_path=last"] * bool(number))]),
              resumed)
        position = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["sdharness_state"]
        assert tuple(position["data_position"]) == divmod(stop - 1, 3)[0:1] + (((stop - 1) % 3) + 1,), stop
    a, b = final_weights(whole), final_weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    # Every training row is the uninterrupted run's; the resumed run has the same evals plus the
    # final eval of each shorter run it was extended from.
    trained = [[row for row in metric_rows(run) if row["train/loss"]] for run in (whole, resumed)]
    assert len(trained[0]) == 8 and trained[1] == trained[0]
    evals = [[row for row in metric_rows(run) if row["eval/accuracy"]] for run in (whole, resumed)]
    steps = {row["step"] for row in evals[0]}
    assert [row for row in evals[1] if row["step"] in steps] == evals[0]
    assert {int(row["step"]) for row in evals[1] if row["step"] not in steps} <= set(stops)


def test_a_checkpoint_written_before_a_schema_field_existed_resumes_at_its_default():
    """A checkpoint's fingerprint lacks the fields added since (here algo.distillation_weight): at the
    default it resumes; set to anything else it is a difference like any other."""
    from sdharness.config import to_train_config
    from sdharness.scale.resume import check_resume, config_fingerprint

    cfg = to_train_config(compose_config(TINY))
    saved = {key: value for key, value in config_fingerprint(cfg).items() if key != "algo.distillation_weight"}
    check_resume(saved, cfg, "old.ckpt")
    mixed = to_train_config(compose_config(TINY + ["algo.distillation_weight=0.5", "algo.group_size=2"]))
    with pytest.raises(ConfigError, match=r"algo.distillation_weight: checkpoint None, now 0.5"):
        check_resume(saved, mixed, "old.ckpt")


def test_a_changed_method_keeps_the_policy_and_adopts_only_scoring_weights():
    from sdharness.methods.policy import adopt_scoring_weights

    one, two = torch.ones(2), torch.zeros(2)
    state = {"model.w": one, "teacher_model.w": one}  # an SD checkpoint with its frozen teacher
    adopt_scoring_weights(state, {"model.w": two, "reference_model.w": two})  # resumed as GRPO with a reference
    assert state == {"model.w": one, "reference_model.w": two}  # the policy resumed, the reference as built
    other = {"model.v": one}
    adopt_scoring_weights(other, {"model.w": two})  # another model: left for the strict load to name
    assert other == {"model.v": one}
