"""Scale-out on Lightning's DDP: two CPU processes (gloo) train as one run. Both ranks end with
identical weights, each rank trains on its own slice of every global batch, and the cost
counters are the totals over ranks, equal to a single process doing the same global batches."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["model=tiny_random", "data.eval_size=4", "rollout.max_new_tokens=8", "rollout.progress=false",
            "eval.max_new_tokens=8", "eval.batch_size=4", "trainer.max_steps=3", "optim.lr=1e-2", "threads=1",
            "logger.mode=disabled"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
# Lightning's DDP launcher re-runs this script once per extra rank, so it must be a file.
SCRIPT = """
import sys
import lightning as L
import torch
from tests.conftest import compose_config
from sdharness.train import train

out, overrides = sys.argv[1], sys.argv[2:]

class SaveWeights(L.Callback):
    def on_train_end(self, trainer, module):
        torch.save({k: v.detach().clone() for k, v in module.model.state_dict().items()},
                   f"{out}/rank{trainer.global_rank}.pt")

class SaveBatches(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        torch.save([p["problem"] for p in batch.problems], f"{out}/rank{trainer.global_rank}_step{trainer.global_step}.pt")

train(compose_config(overrides), out, callbacks=(SaveBatches(), SaveWeights()))
"""


def run(tmp_path: Path, name: str, *overrides: str) -> Path:
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script), str(out), *TINY_RUN, *overrides], capture_output=True,
                            text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def last_counters(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/problems_seen")]
    return {key: float(value) for key, value in rows[-1].items()
            if key.startswith("train/") and key[6:] in ("problems_seen", "rollouts", "generated_tokens",
                                                         "forward_tokens", "trained_tokens", "flops")}


def assert_identical_weights(run_dir: Path) -> None:
    zero, one = torch.load(run_dir / "rank0.pt"), torch.load(run_dir / "rank1.pt")
    assert zero.keys() == one.keys() and all(torch.equal(zero[k], one[k]) for k in zero)


def assert_disjoint_rank_batches(run_dir: Path, steps: int) -> None:
    for step in range(steps):
        zero = torch.load(run_dir / f"rank0_step{step}.pt")
        one = torch.load(run_dir / f"rank1_step{step}.pt")
        assert len(zero) == len(one) == 2 and not set(zero) & set(one)


@pytest.mark.slow
def test_two_process_ddp_self_distillation_matches_single_process_totals(tmp_path):
    # Logged chats: no sampling, so every counter is exact and comparable with one process
    # training the same global batches of 4.
    chat = ["data=chatlog"]
    ddp = run(tmp_path, "ddp_chat", *chat, *DDP, "data.batch_size=2")
    single = run(tmp_path, "single_chat", *chat, "data.batch_size=4")
    assert_identical_weights(ddp)
    assert_disjoint_rank_batches(ddp, 3)
    totals = last_counters(ddp)
    assert totals == last_counters(single)
    assert totals["train/problems_seen"] == 12 and totals["train/generated_tokens"] == 0
    # On-policy rollouts: each rank samples its own problems; weights still agree after every step.
    sampled = run(tmp_path, "ddp_sampled", "data.train_size=8", *DDP, "data.batch_size=2")
    assert_identical_weights(sampled)
    assert_disjoint_rank_batches(sampled, 3)
    totals = last_counters(sampled)
    assert totals["train/problems_seen"] == totals["train/rollouts"] == 12  # 3 steps x 2 ranks x 2
    assert totals["train/generated_tokens"] > 0


def test_fsdp_wraps_each_decoder_layer_and_saves_full_state_dicts():
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from sdharness.config import ModelConfig, to_train_config
    from sdharness.models import char_tokenizer, tiny_random_model
    from sdharness.train import build_strategy
    from tests.conftest import compose_config

    cfg = to_train_config(compose_config(["model=tiny_random", "trainer=fsdp",
                                          "trainer.strategy_options.sharding_strategy=SHARD_GRAD_OP"]))
    strategy = build_strategy(cfg.trainer, tiny_random_model(ModelConfig(), char_tokenizer()))
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert strategy._state_dict_type == "full" and strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    assert build_strategy(to_train_config(compose_config(["trainer=ddp"])).trainer, None) == "ddp"


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_3"])
def test_sharded_strategies_on_cpu_are_config_errors(strategy):
    from sdharness.config import ConfigError, to_train_config
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match=f"trainer.strategy={strategy} runs on GPUs only.*trainer=ddp"):
        to_train_config(compose_config([f"trainer.strategy={strategy}"]))
