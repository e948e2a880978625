"""GRPO and SFT maths against hand-computed references; accounting and budgets on tiny runs."""

import csv
import math

import pytest
import torch

from sdharness.methods.grpo import GRPOModule
from sdharness.methods.sft import SFTModule
from sdharness.config import ConfigError, to_train_config
from sdharness.data.datamodule import ProblemDataModule
from sdharness.models import load_model_and_tokenizer
from sdharness.methods.self_distill import SelfDistillModule
from sdharness.methods.policy_gradient import clipped_policy_loss, group_advantages, zero_variance_groups
from sdharness.train import train
from tests.conftest import TINY, compose_config


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    centred = group_advantages(rewards, scale="none")
    assert torch.allclose(centred, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75], [0.0] * 4]))
    scaled = group_advantages(rewards, scale="group", eps=0.0)
    std = torch.tensor([0.5773502691896258, 0.5])  # sample std (n - 1) of each group
    assert torch.allclose(scaled[0], centred[0] / std[0]) and torch.allclose(scaled[1], centred[1] / std[1])
    assert torch.equal(group_advantages(rewards)[2], torch.zeros(4))
    assert zero_variance_groups(rewards) == 1


def reference_loss(logp, old, adv, mask, eps, beta, ref, aggregation):
    rows = []
    for b in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = float(torch.exp(logp[b, t] - old[b, t]))
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            term = -min(ratio * float(adv[b]), clipped * float(adv[b]))
            if beta:
                d = float(ref[b, t] - logp[b, t])
                term += beta * (math.exp(d) - d - 1)
            terms.append(term)
        rows.append(terms)
    if aggregation == "token_mean":
        flat = [x for r in rows for x in r]
        return sum(flat) / len(flat)
    return sum(sum(r) / len(r) for r in rows if r) / sum(1 for r in rows if r)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_clipped_loss_matches_hand_computed_reference(aggregation, beta):
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    old = logp.detach() + torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.3  # ratios beyond 1 +- eps too
    ref = logp.detach() + torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.2
    adv = torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss, stats = clipped_policy_loss(logp, old, adv, mask, epsilon=0.2, beta=beta, ref_logprobs=ref,
                                      aggregation=aggregation)
    assert loss.item() == pytest.approx(reference_loss(logp.detach(), old, adv, mask, 0.2, beta, ref, aggregation),
                                        abs=1e-12)
    assert 0 < stats["clip_fraction"] < 1


def test_zero_variance_group_gives_zero_gradient():
    logp = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    adv = group_advantages(torch.ones(1, 4)).view(-1).double()
    loss, _ = clipped_policy_loss(logp, logp.detach(), adv, torch.ones(4, 3, dtype=torch.bool))
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_group_size_one_is_rejected():
    with pytest.raises(ConfigError, match=r"algo.group_size=1: GRPO needs at least 2 samples per problem"):
        to_train_config(compose_config(TINY + ["algo=grpo", "algo.group_size=1"]))


def make(algo_overrides):
    cfg = to_train_config(compose_config(TINY + algo_overrides))
    model, tok = load_model_and_tokenizer(cfg.model)
    dm = ProblemDataModule(cfg.data, cfg.prompt, tok, max_context=1024, max_new_tokens=cfg.rollout.max_new_tokens)
    dm.setup()
    return cfg, model, tok, next(iter(dm.train_dataloader()))


def test_sft_loss_is_token_mean_cross_entropy_over_solution_tokens():
    cfg, model, tok, batch = make(["algo=sft"])
    loss, _ = next(SFTModule(model, tok, cfg).losses(batch))
    nll, count = 0.0, 0
    for row in range(len(batch)):
        prompt = batch.student_ids[row][batch.student_mask[row].bool()].tolist()
        solution = batch.solution_ids[row][batch.solution_mask[row]].tolist()
        logits = model(torch.tensor([prompt + solution])).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
        nll -= logp[torch.arange(len(solution)), torch.tensor(solution)].sum().item()
        count += len(solution)
    assert solution[-1] == tok.eos_token_id
    assert loss.item() == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.parametrize("module_class,overrides", [(SelfDistillModule, ["algo=sd"]),
                                                     (GRPOModule, ["algo=grpo", "algo.group_size=3", "algo.beta=0.1",
                                                                   "algo.inner_epochs=2"])])
def test_counters_add_up_exactly(module_class, overrides):
    cfg, model, tok, batch = make(overrides)
    module = module_class(model, tok, cfg)
    seen = []
    sample = module.rollout
    module.rollout = lambda ids, mask: seen.append((mask, sample(ids, mask))) or seen[-1][1]
    for _ in module.losses(batch):
        pass
    (prompt_mask, rollout), = seen
    generated = int(rollout.completion_mask.sum())
    prompt = int(prompt_mask.sum())
    c = module.step_counts  # this step's work, before the sum over ranks
    assert c.problems_seen == len(batch) and c.rollouts == prompt_mask.shape[0] and c.generated_tokens == generated
    if module_class is SelfDistillModule:
        teacher = int(batch.teacher_mask.sum())
        assert c.forward_tokens == (prompt + generated) + (teacher + generated) + (prompt + generated)
        assert c.trained_tokens == prompt + generated
    else:  # rollout, old-policy pass, reference pass, then two trained passes
        assert c.forward_tokens == 5 * (prompt + generated) and c.trained_tokens == 2 * (prompt + generated)
    n = module.parameter_count
    assert c.flops == 2 * n * (c.forward_tokens - c.trained_tokens) + 6 * n * c.trained_tokens


def test_grpo_logs_the_share_of_groups_whose_rewards_are_all_equal():
    cfg, model, tok, batch = make(["algo=grpo", "algo.group_size=2", "data.batch_size=4"])
    module = GRPOModule(model, tok, cfg)
    # Groups of 2 in row order: (1, 1) and (0, 0) are all equal, (1, 0) and (0, 1) are not.
    rewards = iter([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    module.reward_fn = lambda text, problem, marker: next(rewards)
    _, metrics = next(module.losses(batch))
    assert len(batch) == 4
    assert metrics["train/zero_variance_groups"] == 2.0 and metrics["train/zero_variance_share"] == 0.5


@pytest.mark.parametrize("algo", ["sft", "grpo"])
def test_problem_budget_stops_each_method_at_the_same_point(tmp_path, algo):
    train(compose_config(TINY + [f"algo={algo}", "algo.group_size=2", "budget.problems=4", "trainer.max_steps=50",
                                 "eval.at_start=false", "logger.mode=disabled"]), tmp_path)
    with open(tmp_path / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/problems_seen")]
    assert float(rows[-1]["train/problems_seen"]) == 4.0  # 2 steps of 2 problems, not 50
