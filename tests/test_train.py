"""End to end on tiny_random: the Hydra app trains, logs, checkpoints and saves."""

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sdharness.config import ModelConfig
from sdharness.models import char_tokenizer, tiny_random_model
from sdharness.train import train
from tests.conftest import TINY, compose_config

pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or sweeps


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_two_steps_write_checkpoint_metrics_wandb_and_a_changed_model(tmp_path):
    metrics = train(compose_config(TINY), tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = read_metrics(tmp_path)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    evals = [r for r in rows if r.get("eval/accuracy")]
    assert [int(r["step"]) for r in evals] == [0, 2] and 0.0 <= metrics["eval/accuracy"] <= 1.0
    counted = [r for r in rows if r.get("train/problems_seen")]
    assert float(counted[-1]["train/problems_seen"]) == 4.0  # 2 steps x batch 2
    assert float(counted[-1]["train/generated_tokens"]) > 0
    cfg = compose_config(TINY)
    initial = tiny_random_model(ModelConfig(**{k: cfg.model[k] for k in ("name", "source", "hidden_size", "num_layers",
                                                                          "num_heads", "max_position_embeddings", "seed")}),
                                char_tokenizer()).state_dict()
    final = load_file(tmp_path / "final_model" / "model.safetensors")
    assert any(not torch.equal(final[name], initial[name]) for name in final)


@pytest.mark.parametrize("teacher", ["initial", "ema"])
def test_frozen_teacher_keeps_the_initial_weights_and_ema_follows_the_policy(tmp_path, teacher):
    cfg = compose_config(TINY + [f"teacher={teacher}", "teacher.ema_decay=0.9", "trainer.max_steps=1",
                                 "eval.at_start=false", "logger.mode=disabled"])
    train(cfg, tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    initial = tiny_random_model(ModelConfig(**{k: cfg.model[k] for k in ("name", "source", "hidden_size", "num_layers",
                                                                          "num_heads", "max_position_embeddings", "seed")}),
                                char_tokenizer()).state_dict()
    moved = 0
    for name, start in initial.items():
        policy, shadow = state[f"model.{name}"], state[f"teacher_model.{name}"]
        moved += not torch.equal(policy, start)
        # One step: the frozen copy is the initial weights; the EMA is 0.9 initial + 0.1 policy.
        expected = start if teacher == "initial" else torch.lerp(start, policy, 0.1)
        torch.testing.assert_close(shadow, expected, rtol=0, atol=1e-6)
    assert moved > 0  # the policy itself trained


def test_jsd_on_reasoning_positions_trains_with_a_loss_within_the_jsd_bound(tmp_path):
    train(compose_config(TINY + ["loss=jsd", "aggregation=clip", "loss.positions=reasoning", "trainer.max_steps=2",
                                 "eval.at_start=false", "logger.mode=disabled"]), tmp_path)
    losses = [float(r["train/loss"]) for r in read_metrics(tmp_path) if r.get("train/loss")]
    assert len(losses) == 2 and all(0.0 < loss <= math.log(2) for loss in losses)  # JSD(beta=0.5) <= ln 2


def run_cli(tmp_path, *overrides):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sdharness.train", *TINY, f"hydra.run.dir={tmp_path}", *overrides],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_command_line_smoke_run_prints_before_and_after(tmp_path):
    result = run_cli(tmp_path, "trainer.max_steps=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "before" in result.stdout and "after" in result.stdout
    assert (tmp_path / "final_model" / "model.safetensors").exists()


def test_lm_eval_results_land_in_the_metrics(tmp_path):
    train(compose_config(TINY + ["trainer.max_steps=1", "logger.mode=disabled", "eval.tasks=[sdh_arithmetic_easy]",
                                 "eval.lm_eval_limit=2", "eval.max_new_tokens=4"]), tmp_path)
    rows = [r for r in read_metrics(tmp_path) if r.get("lmeval/sdh_arithmetic_easy/exact_match,strict-match")]
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert all(0.0 <= float(r["lmeval/sdh_arithmetic_easy/exact_match,strict-match"]) <= 1.0 for r in rows)


def test_lora_trains_adapters_only_and_saves_a_merged_model(tmp_path):
    train(compose_config(TINY + ["trainer.max_steps=1", "eval.at_start=false", "logger.mode=disabled",
                                 "model.lora_rank=4"]), tmp_path)
    final = load_file(tmp_path / "final_model" / "model.safetensors")
    assert not any("lora" in name for name in final)  # merged: plain HF weights that lm-eval can load
    cfg = compose_config(TINY)
    initial = tiny_random_model(ModelConfig(**{k: cfg.model[k] for k in ("name", "source", "hidden_size", "num_layers",
                                                                          "num_heads", "max_position_embeddings", "seed")}),
                                char_tokenizer()).state_dict()
    changed = {name for name in final if not torch.equal(final[name], initial[name])}
    assert changed and all("q_proj" in name or "v_proj" in name for name in changed)


def test_monitoring_kl_is_computed_on_the_logged_steps_only(tmp_path, monkeypatch):
    import sdharness.methods.self_distill as module_file

    asked = []
    loss = module_file.distillation_loss

    def recording(*args, monitor_kl=True, **kwargs):
        asked.append(monitor_kl)
        return loss(*args, monitor_kl=monitor_kl, **kwargs)

    monkeypatch.setattr(module_file, "distillation_loss", recording)
    train(compose_config(TINY + ["trainer.max_steps=4", "trainer.log_every_n_steps=2", "logger.mode=disabled",
                                 "eval.at_start=false"]), tmp_path)
    assert asked == [False, True, False, True]
    logged = [r for r in read_metrics(tmp_path) if r.get("train/loss")]
    assert len(logged) == 2 and all(math.isfinite(float(r["train/teacher_student_kl"])) for r in logged)


def test_train_metrics_are_logged_on_logging_steps_and_at_the_budget_stop(tmp_path):
    # log_every_n_steps=2 and a budget that stops training at step 3: Lightning writes steps 2 and 3
    # (the stop), and each written row carries that step's own train/* values and cumulative counters.
    cfg = compose_config(TINY + ["trainer.max_steps=10", "trainer.log_every_n_steps=2", "logger.mode=disabled",
                                 "eval.at_start=false", "eval.every_n_steps=0"])
    cfg.budget.problems = 3 * cfg.data.batch_size
    train(cfg, tmp_path)
    logged = [r for r in read_metrics(tmp_path) if r.get("train/loss")]
    assert [int(r["step"]) for r in logged] == [1, 2]  # Lightning's 0-based step of the 2nd and 3rd update
    assert [float(r["train/problems_seen"]) for r in logged] == [2 * cfg.data.batch_size, 3 * cfg.data.batch_size]
    assert all(math.isfinite(float(r["train/teacher_student_kl"])) for r in logged)


def test_runs_of_another_seed_train_on_another_order(tmp_path):
    # SFT draws nothing at random but its data order: before the run seed moved the order, seeds 0, 1
    # and 2 of a protocol's SFT were one run three times (the same loss at every step).
    losses = {}
    for seed in (0, 1):
        cfg = compose_config(TINY + ["algo=sft", "trainer.max_steps=2", "logger.mode=disabled", "eval.at_start=false",
                                     "eval.every_n_steps=0", f"seed={seed}"])
        train(cfg, tmp_path / str(seed))
        losses[seed] = [float(r["train/loss"]) for r in read_metrics(tmp_path / str(seed)) if r.get("train/loss")]
    assert len(losses[0]) == len(losses[1]) == 2 and losses[0] != losses[1]


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_lr_schedules_warm_up_then_decay_to_their_floor(floor):
    from sdharness.methods.schedule import lr_lambda

    def factor(step, schedule):
        return lr_lambda(step, warmup_steps=2, total_steps=10, schedule=schedule, min_lr_ratio=floor)

    for schedule in ("constant", "linear", "cosine"):
        assert [factor(s, schedule) for s in (0, 1)] == [0.5, 1.0]  # warmup
        assert factor(2, schedule) == 1.0
    assert factor(10, "constant") == factor(50, "constant") == 1.0
    # Halfway through the decay (step 6 of 2..10) both schedules stand halfway to the floor.
    assert factor(6, "linear") == pytest.approx(1 - (1 - floor) / 2)
    assert factor(6, "cosine") == pytest.approx(floor + (1 - floor) / 2)
    for schedule in ("linear", "cosine"):
        assert factor(10, schedule) == pytest.approx(floor) and factor(50, schedule) == pytest.approx(floor)


@pytest.mark.parametrize("algo", ["sd", "sft", "grpo"])
def test_gradients_are_freed_after_every_training_step(tmp_path, algo):
    """Last step's gradients must not stay allocated through the next rollout."""
    import lightning as L

    grads_after_step = []

    class Grads(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            grads_after_step.append([p.grad is None for p in module.model.parameters()])

    train(compose_config(TINY + [f"algo={algo}", "algo.group_size=2", "logger.mode=disabled", "eval.at_start=false"]),
          tmp_path, callbacks=(Grads(),))
    assert len(grads_after_step) == 2 and all(all(step) for step in grads_after_step)


def test_the_optimiser_is_fused_adamw_and_steps_as_adamw(tmp_path):
    """One fused kernel for every tensor (transformers' adamw_torch_fused) where the parameters allow
    it; the steps it takes are AdamW's, against a float64 reference written out."""
    import lightning as L

    from sdharness.methods.policy import fused_adamw_supported

    seen = []

    class Optimiser(L.Callback):
        def on_train_start(self, trainer, module):
            optimizer = trainer.optimizers[0]
            seen.append((type(optimizer), optimizer.defaults["fused"]))

    train(compose_config(TINY + ["logger.mode=disabled", "eval.at_start=false", "trainer.max_steps=1"]), tmp_path,
          callbacks=(Optimiser(),))
    assert seen == [(torch.optim.AdamW, True)]
    assert fused_adamw_supported([torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)])
    assert not fused_adamw_supported([torch.zeros(2, device="meta")]) and not fused_adamw_supported([torch.zeros(2, dtype=torch.long)])
    assert not fused_adamw_supported([])

    torch.manual_seed(0)
    start, grads = torch.randn(5, 3), [torch.randn(5, 3) for _ in range(3)]
    lr, decay, (beta1, beta2), eps = 1e-2, 0.1, (0.9, 0.98), 1e-8
    weight = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=decay, betas=(beta1, beta2), eps=eps, fused=True)
    expected, m, v = start.double(), torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64)
    for step, grad in enumerate(grads, start=1):
        weight.grad = grad.clone()
        optimizer.step()
        g = grad.double()
        expected = expected * (1 - lr * decay)  # decoupled weight decay
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        expected = expected - lr * (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)
    torch.testing.assert_close(weight.detach().double(), expected, rtol=1e-5, atol=1e-6)
