"""Scale-out on Lightning's DDP and FSDP2, two CPU processes (gloo) training as one run.

DDP: both ranks end with identical weights, each rank trains on its own slice of every global
batch, and the cost counters are the totals over ranks, equal to a single process doing the same
global batches. FSDP: the same run ends with the same weights and counters as DDP (rollouts
and an EMA teacher included, both sharded), and resumes from its gathered checkpoint exactly."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or sweeps

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = ["model=tiny_random", "data.eval_size=4", "rollout.max_new_tokens=8", "rollout.progress=false",
            "eval.max_new_tokens=8", "eval.batch_size=4", "trainer.max_steps=3", "optim.lr=1e-2", "threads=1",
            "logger.mode=disabled"]
ON_TWO_CPUS = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
DDP = ["trainer=ddp", *ON_TWO_CPUS]
FSDP = ["trainer=fsdp", *ON_TWO_CPUS]
# Lightning's DDP launcher re-runs this script once per extra rank, so it must be a file.
SCRIPT = """
import sys
import lightning as L
import torch
from tests.conftest import compose_config
from sdharness.scale.sharding import is_sharded
from sdharness.train import train

out, overrides = sys.argv[1], sys.argv[2:]

class SaveWeights(L.Callback):
    def on_train_end(self, trainer, module):
        if not is_sharded(module.model):  # FSDP ranks hold shards; final_model/ has the gathered weights
            torch.save({k: v.detach().clone() for k, v in module.model.state_dict().items()},
                   f"{out}/rank{trainer.global_rank}.pt")

class SaveBatches(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        torch.save([p["problem"] for p in batch.problems], f"{out}/rank{trainer.global_rank}_step{trainer.global_step}.pt")
        torch.save(int(batch.solution_mask.sum()), f"{out}/rank{trainer.global_rank}_step{trainer.global_step}_solution_tokens.pt")

class SaveFirstGradients(L.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step == 0 and not is_sharded(module.model):
            torch.save({name: p.grad.detach().clone() for name, p in module.model.named_parameters() if p.grad is not None},
                       f"{out}/rank{trainer.global_rank}_gradients.pt")

train(compose_config(overrides), out, callbacks=(SaveBatches(), SaveWeights(), SaveFirstGradients()))
"""


def run(tmp_path: Path, name: str, *overrides: str) -> Path:
    out = tmp_path / name
    out.mkdir(exist_ok=True)  # exists when resuming
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


def eval_rows(run_dir: Path) -> list[tuple]:
    """``(step, accuracy, completion length, early answers)`` of every eval: on several ranks each
    decodes its share of the eval batches and the completions are gathered."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [(row["step"], row["eval/accuracy"], row["eval/completion_length"], row["eval/early_answer_rate"])
                for row in csv.DictReader(handle) if row.get("eval/accuracy")]


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
    assert len(eval_rows(ddp)) == 2 and eval_rows(ddp) == eval_rows(single)  # one eval batch: rank 0 decodes it
    # On-policy rollouts: each rank samples its own problems; weights still agree after every step.
    sampled = run(tmp_path, "ddp_sampled", "data.train_size=8", *DDP, "data.batch_size=2")
    assert_identical_weights(sampled)
    assert_disjoint_rank_batches(sampled, 3)
    totals = last_counters(sampled)
    assert totals["train/problems_seen"] == totals["train/rollouts"] == 12  # 3 steps x 2 ranks x 2
    assert totals["train/generated_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", [["data=chatlog"], ["algo=sft", "data.train_size=8"]], ids=["sd_logged_chats", "sft"])
def test_ddp_gradient_is_the_mean_over_every_ranks_loss_tokens(tmp_path, method):
    """Two ranks holding different numbers of loss tokens (logged turns or solutions of different
    lengths, no sampling) take the update one process takes on their whole global batch."""
    ddp = run(tmp_path, "ddp", *method, *DDP, "data.batch_size=2", "trainer.max_steps=1", "trainer.gradient_clip_val=null")
    single = run(tmp_path, "single", *method, "data.batch_size=4", "trainer.max_steps=1", "trainer.gradient_clip_val=null")
    tokens = [torch.load(ddp / f"rank{rank}_step0_solution_tokens.pt") for rank in range(2)]
    assert tokens[0] != tokens[1] and sum(tokens) == torch.load(single / "rank0_step0_solution_tokens.pt")
    ours, theirs = torch.load(ddp / "rank0_gradients.pt"), torch.load(single / "rank0_gradients.pt")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-7, msg=name)
    assert_identical_weights(ddp)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_grpo_rank_losses_scaled_by_their_share_average_to_the_whole_batch_gradient(aggregation):
    """What DDP does with two ranks' GRPO losses (each scaled by global_mean_scale, then the
    gradients averaged), in float64: the gradient of the loss over the whole batch."""
    from sdharness.methods.policy import global_mean_scale
    from sdharness.methods.policy_gradient import clipped_policy_loss

    torch.manual_seed(0)
    logprobs = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    advantages = torch.randn(4, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 3, 0])  # rank 0 holds 8 tokens in 2 sequences, rank 1 3 in 1
    mask = torch.arange(6) < lengths[:, None]

    def loss(rows):
        return clipped_policy_loss(logprobs[rows], logprobs[rows].detach(), advantages[rows], mask[rows],
                                   aggregation=aggregation)[0]

    def count(rows):
        return float(mask[rows].sum() if aggregation == "token_mean" else (mask[rows].sum(-1) > 0).sum())

    (whole,) = torch.autograd.grad(loss(slice(0, 4)), logprobs)
    ranks = [slice(0, 2), slice(2, 4)]
    total = sum(count(rows) for rows in ranks)
    averaged = sum(torch.autograd.grad(loss(rows) * global_mean_scale(count(rows), total, 2), logprobs)[0]
                   for rows in ranks) / 2
    torch.testing.assert_close(averaged, whole, rtol=1e-12, atol=1e-15)
    unscaled = sum(torch.autograd.grad(loss(rows), logprobs)[0] for rows in ranks) / 2
    assert not torch.allclose(unscaled, whole)  # the per-rank mean DDP took before


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "final_model" / "model.safetensors")


def assert_same_weights(run_dir: Path, other: Path) -> None:
    ours, theirs = final_weights(run_dir), final_weights(other)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_fsdp_trains_like_ddp_on_logged_chats(tmp_path):
    chat = ["data=chatlog", "data.batch_size=2"]
    fsdp = run(tmp_path, "fsdp_chat", *chat, *FSDP)
    ddp = run(tmp_path, "ddp_chat", *chat, *DDP)
    assert_same_weights(fsdp, ddp)
    assert_disjoint_rank_batches(fsdp, 3)
    assert last_counters(fsdp) == last_counters(ddp)
    assert eval_rows(fsdp) == eval_rows(ddp)  # rank 1 decodes a discarded stand-in batch to keep in step
    assert (fsdp / "checkpoints" / "last.ckpt").is_file()  # gathered into one file, not a folder of shards
    reloaded = AutoModelForCausalLM.from_pretrained(fsdp / "final_model")
    assert not any(isinstance(p, DTensor) for p in reloaded.parameters())


@pytest.mark.slow
def test_fsdp_rollouts_and_ema_teacher_match_ddp_and_resume_exactly(tmp_path):
    # Each rank samples its own problems, so ranks finish generating at different steps (synced
    # generation keeps them in the all-gathers); the EMA teacher is a second sharded model.
    sampled = ["data.train_size=8", "data.batch_size=2", "teacher=ema", "teacher.ema_decay=0.5",
               "eval.batch_size=2"]  # one eval batch per rank
    fsdp, ddp = run(tmp_path, "fsdp", *sampled, *FSDP), run(tmp_path, "ddp", *sampled, *DDP)
    assert_same_weights(fsdp, ddp)
    assert eval_rows(fsdp) == eval_rows(ddp)
    assert last_counters(fsdp)["train/rollouts"] == 12
    run(tmp_path, "resumed", *sampled, *FSDP, "trainer.max_steps=2")
    resumed = run(tmp_path, "resumed", *sampled, *FSDP, "ckpt_path=last")
    assert_same_weights(resumed, fsdp)
    assert last_counters(resumed) == last_counters(fsdp)


def test_fsdp_shards_each_decoder_layer_and_scores_the_teacher_through_the_root(tmp_path):
    # One process (world size 1) is enough to check the wrapping and the registered decoder path.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from sdharness.config import ModelConfig
    from sdharness.distill.logits import completion_hidden, completion_logits
    from sdharness.models import char_tokenizer, tiny_random_model
    from sdharness.scale.sharding import shard_model

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_random_model(ModelConfig(), char_tokenizer())
        prompt, completion = torch.randint(3, 40, (2, 5)), torch.randint(3, 40, (2, 4))
        ones = torch.ones_like
        expected = completion_logits(model, prompt, ones(prompt), completion, ones(completion))
        shard_model(model, init_device_mesh("cpu", (1,)))
        assert isinstance(model, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in model.model.layers)
        with torch.no_grad():
            teacher = completion_hidden(model, prompt, ones(prompt), completion, ones(completion)).materialize()
        torch.testing.assert_close(teacher, expected.detach())
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_with_lora_is_a_config_error():
    from sdharness.config import ConfigError, to_train_config
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match="trainer=fsdp shards full weights.*model.lora_rank"):
        to_train_config(compose_config(["trainer=fsdp", "trainer.accelerator=cpu", "model.lora_rank=4"]))


@pytest.mark.parametrize("strategy, message", [
    ("deepspeed_stage_2", "runs on GPUs only.*trainer=fsdp or trainer=ddp"),
    ("deepspeed_stage_3_offload", "shards parameters with ZeRO-3.*trainer=fsdp \\(FSDP2\\)"),
    ("fsdp_cpu_offload", "is Lightning's FSDP1.*use trainer=fsdp"),
])
def test_strategies_sdharness_cannot_run_here_are_config_errors(strategy, message):
    from sdharness.config import ConfigError, to_train_config
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match=f"trainer.strategy={strategy} {message}"):
        to_train_config(compose_config([f"trainer.strategy={strategy}"]))


def test_sharded_model_on_one_rank_samples_then_trains(tmp_path):
    """trainer=fsdp at world size 1 still shards the model: a rollout must run under no_grad, since
    FSDP2 could not update parameters gathered under inference mode in the next optimiser step."""
    from torch.distributed.device_mesh import init_device_mesh

    from sdharness.config import ModelConfig
    from sdharness.models import char_tokenizer, tiny_random_model
    from sdharness.rollout.hf import generate
    from sdharness.scale.sharding import full_state_dict, shard_model

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        tokenizer = char_tokenizer()
        model = tiny_random_model(ModelConfig(), tokenizer)
        shard_model(model, init_device_mesh("cpu", (1,)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        prompt = tokenizer(["12+7=", "3+4="], return_tensors="pt", padding=True)
        rollout = generate(model, tokenizer, prompt.input_ids, prompt.attention_mask, max_new_tokens=4)
        before = {name: tensor.clone() for name, tensor in full_state_dict(model).items()}
        ids = torch.cat([prompt.input_ids, rollout.completion_ids], dim=1)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        after = full_state_dict(model)
        assert all(not torch.equal(after[name], before[name]) for name in before)
    finally:
        torch.distributed.destroy_process_group()
