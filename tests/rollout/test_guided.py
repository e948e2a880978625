"""Guided sampling: limits of the aggregate, KV cache against a no-cache reference, weights, CLI, training step."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sdharness.distill.aggregation import aggregate
from sdharness.config import ModelConfig, to_train_config
from sdharness.data.datamodule import ProblemDataModule
from sdharness.rollout.guided import (
    GuidedRollout,
    finish_rollout,
    guided_generate,
    guided_token_weights,
    importance_weights,
    merge_rollouts,
    next_token,
    shape_logprobs,
    stack_contexts,
)
from sdharness.models import load_model_and_tokenizer
from sdharness.methods.self_distill import SelfDistillModule
from sdharness.data.prompts import left_pad
from sdharness.rollout.hf import Rollout, completion_mask, eos_token_ids, generate
from tests.conftest import TINY, assert_rollout_trains_like_its_copy, compose_config

STUDENT = [[1, 10, 11], [1, 30, 31, 32, 33], [1, 50]]
TEACHER = [[1, 10, 11, 60, 61, 62, 63], [1, 30, 31, 32, 33, 70], [1, 50, 80, 81, 82, 83, 84, 85, 86]]


def peaked(model):
    """A random model's next-token distributions are almost uniform and barely depend on the context,
    so any two samplers with one seed agree; larger (tied) embeddings make them peaked and
    context-dependent (entropy ~3 nats of 4.6; the two contexts' distributions differ by TV ~0.5)."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def tiny():
    """float64 so cached and uncached logits agree far below any sampling boundary."""
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny", source="tiny_random", hidden_size=16))
    return peaked(model.double()), tok


def prompts(tok, student=STUDENT, teacher=TEACHER):
    return (*left_pad(student, tok.pad_token_id), *left_pad(teacher, tok.pad_token_id))


def full_logits(model, ids, mask):
    """Last-position logits of every row, one full forward, no cache."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]


@torch.no_grad()
def reference_guided_generate(model, tok, s_ids, s_mask, t_ids, t_mask, *, aggregation, parameter, max_new_tokens,
                              temperature=1.0, top_p=1.0, greedy=False, generator=None):
    """The slow reference: every step re-runs full forwards of both contexts, no KV cache."""
    eos = eos_token_ids(model, tok)
    ids, mask = stack_contexts(s_ids, s_mask, t_ids, t_mask, tok.pad_token_id)
    batch = s_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool)
    tokens, sampling, student = [], [], []
    for _ in range(max_new_tokens):
        token, s_lp, st_lp = next_token(full_logits(model, ids, mask), aggregation=aggregation, parameter=parameter,
                                        temperature=temperature, top_p=top_p, greedy=greedy, generator=generator)
        token = token.masked_fill(done, tok.pad_token_id)
        tokens.append(token), sampling.append(s_lp), student.append(st_lp)
        done |= torch.isin(token, torch.tensor(eos))
        if done.all():
            break
        ids = torch.cat([ids, torch.cat([token, token]).unsqueeze(-1)], dim=1)
        mask = torch.cat([mask, torch.ones(2 * batch, 1, dtype=mask.dtype)], dim=1)
    return finish_rollout(tok, eos, tokens, sampling, student)


@torch.no_grad()
def reference_plain_sample(model, tok, ids, mask, *, max_new_tokens, temperature=1.0, top_p=1.0, generator=None):
    """Plain sampling from one context only (no second context, no aggregation), full forwards.

    Draws exactly as the guided sampler does (one ``multinomial`` over ``[B, vocab]`` per step with
    ``generator``), so with the same seed the two agree iff their distributions do.
    """
    eos = eos_token_ids(model, tok)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    tokens = []
    for _ in range(max_new_tokens):
        logp = shape_logprobs(F.log_softmax(full_logits(model, ids, mask), -1), temperature=temperature, top_p=top_p)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1).masked_fill(done, tok.pad_token_id)
        tokens.append(token)
        done |= torch.isin(token, torch.tensor(eos))
        if done.all():
            break
        ids = torch.cat([ids, token.unsqueeze(-1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    out = torch.stack(tokens, 1)
    keep = completion_mask(out, eos)
    return out.masked_fill(~keep, tok.pad_token_id), keep


def seeded(seed):
    return torch.Generator().manual_seed(seed)


SAMPLED = dict(max_new_tokens=10, temperature=1.3, top_p=0.9)


# ---------------------------------------------------------------- limits of the aggregate

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_teacher_aggregation_samples_exactly_as_the_teacher_context_alone(tiny, seed):
    model, tok = tiny
    s_ids, s_mask, t_ids, t_mask = prompts(tok)
    guided = guided_generate(model, tok, s_ids, s_mask, t_ids, t_mask, aggregation="teacher", parameter=1.0,
                             generator=seeded(seed), **SAMPLED)
    ids, mask = reference_plain_sample(model, tok, t_ids, t_mask, generator=seeded(seed), **SAMPLED)
    assert torch.equal(guided.completion_ids, ids) and torch.equal(guided.completion_mask, mask)
    # and it is not the student's: another context gives other tokens
    student_ids, _ = reference_plain_sample(model, tok, s_ids, s_mask, generator=seeded(seed), **SAMPLED)
    assert not torch.equal(guided.completion_ids, student_ids)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_at_huge_tau_samples_exactly_as_the_student_alone(tiny, seed):
    model, tok = tiny
    s_ids, s_mask, t_ids, t_mask = prompts(tok)
    guided = guided_generate(model, tok, s_ids, s_mask, t_ids, t_mask, aggregation="clip", parameter=1e9,
                             generator=seeded(seed), **SAMPLED)
    ids, mask = reference_plain_sample(model, tok, s_ids, s_mask, generator=seeded(seed), **SAMPLED)
    assert torch.equal(guided.completion_ids, ids) and torch.equal(guided.completion_mask, mask)
    # sampling distribution == student distribution: log-probs agree, importance weights are 1
    torch.testing.assert_close(guided.sampling_logprobs, guided.student_logprobs, rtol=0, atol=1e-6)


def test_greedy_limits_match_hugging_face_generate(tiny):
    """An implementation-independent check: HF generate (its own loop and cache) on one context."""
    model, tok = tiny
    s_ids, s_mask, t_ids, t_mask = prompts(tok)
    for aggregation, tau, ids, mask in (("teacher", 1.0, t_ids, t_mask), ("clip", 1e9, s_ids, s_mask)):
        guided = guided_generate(model, tok, s_ids, s_mask, t_ids, t_mask, aggregation=aggregation, parameter=tau,
                                 max_new_tokens=10, greedy=True)
        plain = generate(model, tok, ids, mask, max_new_tokens=10, greedy=True)
        assert torch.equal(guided.completion_ids, plain.completion_ids), aggregation
        assert guided.texts == plain.texts
    assert model.training  # mode restored


# ---------------------------------------------------------------- KV cache vs full forwards

@pytest.mark.parametrize("aggregation,tau", [("product", 2.0), ("clip", 0.5), ("entropy_matched", 1.0)])
@pytest.mark.parametrize("greedy", [False, True])
def test_kv_cached_generation_equals_the_no_cache_reference(tiny, aggregation, tau, greedy):
    model, tok = tiny
    inputs = prompts(tok)
    kwargs = dict(aggregation=aggregation, parameter=tau, greedy=greedy, **SAMPLED)
    for seed in (0, 1):
        fast = guided_generate(model, tok, *inputs, generator=seeded(seed), **kwargs)
        slow = reference_guided_generate(model, tok, *inputs, generator=seeded(seed), **kwargs)
        assert torch.equal(fast.completion_ids, slow.completion_ids)
        assert torch.equal(fast.completion_mask, slow.completion_mask)
        assert fast.texts == slow.texts
        torch.testing.assert_close(fast.sampling_logprobs, slow.sampling_logprobs, rtol=0, atol=1e-8)
        torch.testing.assert_close(fast.student_logprobs, slow.student_logprobs, rtol=0, atol=1e-8)


def test_rollout_is_right_padded_after_eos_and_logprobs_are_the_aggregate(tiny):
    model, tok = tiny
    model.generation_config.eos_token_id = [tok.eos_token_id, 40]  # a frequent extra stop token: rows end early
    try:
        out = guided_generate(model, tok, *prompts(tok), aggregation="product", parameter=2.0, max_new_tokens=30,
                              generator=seeded(3))
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    eos = [tok.eos_token_id, 40]
    assert torch.equal(out.completion_mask, completion_mask(out.completion_ids, eos))
    assert (out.completion_ids[~out.completion_mask] == tok.pad_token_id).all()
    assert (out.sampling_logprobs[~out.completion_mask] == 0).all()
    assert (out.sampling_logprobs[out.completion_mask] <= 0).all() and out.guided.all()
    # sampling log-prob of the first token == the aggregate's at temperature 1, by hand
    s_ids, s_mask, t_ids, t_mask = prompts(tok)
    with torch.no_grad():
        target = aggregate(full_logits(model, t_ids, t_mask), full_logits(model, s_ids, s_mask), name="product",
                           parameter=2.0)
    expected = target.gather(-1, out.completion_ids[:, :1]).squeeze(-1)
    torch.testing.assert_close(out.sampling_logprobs[:, 0], expected, rtol=0, atol=1e-10)


def test_a_guided_rollout_can_be_saved_for_backward(tiny):
    """Guided decoding runs under inference mode; its rollout still indexes a gather and weights a loss."""
    model, tok = tiny
    s_ids, s_mask, t_ids, t_mask = prompts(tok)
    out = guided_generate(model, tok, s_ids, s_mask, t_ids, t_mask, aggregation="clip", parameter=1.0, max_new_tokens=4,
                          generator=seeded(0))
    assert not out.student_logprobs.is_inference()
    assert_rollout_trains_like_its_copy(model, s_ids, s_mask, out, weights=out.sampling_logprobs)


def test_a_separate_teacher_model_gets_its_own_forward(tiny):
    model, tok = tiny
    other, _ = load_model_and_tokenizer(ModelConfig(name="other", source="tiny_random", hidden_size=16, seed=7))
    peaked(other.double())
    s_ids, s_mask, t_ids, t_mask = prompts(tok)
    out = guided_generate(model, tok, s_ids, s_mask, t_ids, t_mask, aggregation="teacher", parameter=1.0,
                          teacher_model=other, generator=seeded(4), **SAMPLED)
    ids, _ = reference_plain_sample(other, tok, t_ids, t_mask, generator=seeded(4), **SAMPLED)
    assert torch.equal(out.completion_ids, ids)


def test_top_p_keeps_the_smallest_nucleus():
    logp = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64).log()
    kept = shape_logprobs(logp, top_p=0.75).exp()
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(shape_logprobs(logp, top_p=0.1).exp() > 0, torch.tensor([[True, False, False, False]]))
    torch.testing.assert_close(shape_logprobs(logp, temperature=2.0), F.log_softmax(logp / 2, -1))


# ---------------------------------------------------------------- importance weights and merging

def test_importance_weights_are_one_on_policy_and_clipped():
    student = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.1, 0.1]]))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert torch.equal(importance_weights(student, student, mask), torch.ones(2, 3))
    sampling = torch.log(torch.tensor([[0.1, 0.4, 0.9], [0.2, 0.01, 0.3]])).requires_grad_()
    weights = importance_weights(student, sampling, mask, clip=3.0)
    torch.testing.assert_close(weights, torch.tensor([[3.0, 0.5, 1.0], [0.5, 3.0, 1.0]]))
    assert not weights.requires_grad


def test_merge_replaces_failed_rows_and_pads_to_one_length(tiny):
    _, tok = tiny
    pad = tok.pad_token_id
    plain = Rollout(torch.tensor([[5, 6], [7, 2], [8, 9]]), torch.tensor([[1, 1], [1, 1], [1, 1]]).bool(),
                    ["a", "b", "c"])
    guided = GuidedRollout(torch.tensor([[11, 12, 2], [13, 2, pad]]), torch.tensor([[1, 1, 1], [1, 1, 0]]).bool(),
                           ["x", "y"], torch.full((2, 3), -1.0), torch.full((2, 3), -2.0), torch.ones(2).bool())
    merged = merge_rollouts(plain, guided, [0, 2], pad)
    assert merged.completion_ids.tolist() == [[11, 12, 2], [7, 2, pad], [13, 2, pad]]
    assert merged.completion_mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0]]
    assert merged.texts == ["x", "b", "y"] and merged.guided.tolist() == [True, False, True]
    weights = importance_weights(merged.student_logprobs, merged.sampling_logprobs, merged.completion_mask)
    assert weights[1].tolist() == [1.0, 1.0, 1.0]  # the plain row keeps weight 1
    assert math.isclose(weights[0, 0].item(), math.exp(-1.0), rel_tol=1e-6)


def test_guided_token_weights_apply_is_clip_only_to_rows_not_sampled_from_the_student():
    mask = torch.tensor([[True, True], [True, False]])
    plain = Rollout(torch.tensor([[5, 6], [7, 2]]), mask, ["a", "b"])
    sampling, student = torch.log(torch.tensor([[0.1, 0.8], [0.5, 1.0]])), torch.log(torch.tensor([[0.5, 0.4], [0.5, 1.0]]))
    guided = GuidedRollout(plain.completion_ids, mask, ["a", "b"], sampling, student, torch.tensor([True, False]))
    assert guided_token_weights(plain, mask, 2.0) == (None, {})  # on policy: nothing to correct
    assert guided_token_weights(guided, mask, None) == (None, {})  # loss.is_clip=null: unweighted
    unguided = GuidedRollout(plain.completion_ids, mask, ["a", "b"], sampling, student, torch.tensor([False, False]))
    assert guided_token_weights(unguided, mask, 2.0) == (None, {})
    weights, metrics = guided_token_weights(guided, mask, 2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5], [1.0, 1.0]]))
    assert metrics["train/importance_weight"] == pytest.approx(1.25)


# ---------------------------------------------------------------- CLI

def write_problems(tmp_path):
    problems = tmp_path / "problems.jsonl"
    rows = [{"problem": "Start with 3. Add 4. What is the result?", "solution": "3 + 4 = 7\nThe answer is 7.",
             "answer": "7"},
            {"problem": "Start with 2. Add 2.", "solution": "2 + 2 = 4"}]
    problems.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return problems, rows


CLI_ARGS = ["--model", "tiny_random", "--aggregation", "clip", "--tau", "1.0", "--prompt", "testbed",
            "--max-new-tokens", "5", "--seed", "3"]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("guidance,guided", [("always", [True, True]), ("on_failure", [True, False]),
                                             ("never", [False, False])])
def test_cli_writes_one_json_line_per_problem(tmp_path, capsys, guidance, guided):
    from sdharness.tools.generate import main

    problems, rows = write_problems(tmp_path)
    out = tmp_path / "out" / "samples.jsonl"
    main(["--problems", str(problems), "--out", str(out), "--guidance", guidance, *CLI_ARGS])
    lines = read_lines(out)
    assert [line["problem"] for line in lines] == [r["problem"] for r in rows]
    assert all(isinstance(line["completion"], str) for line in lines)
    # a random model gets the answer wrong (so on_failure guides it); the second problem has no answer
    assert [line["guided"] for line in lines] == guided
    assert lines[0]["is_correct"] is False and lines[1]["is_correct"] is None
    assert f"2 completions ({sum(guided)} guided)" in capsys.readouterr().out
    # same seed, same completions
    main(["--problems", str(problems), "--out", str(tmp_path / "again.jsonl"), "--guidance", guidance, *CLI_ARGS])
    assert read_lines(tmp_path / "again.jsonl") == lines


@pytest.mark.slow
def test_cli_runs_as_a_program(tmp_path):
    problems, _ = write_problems(tmp_path)
    out = tmp_path / "samples.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sdharness.tools.generate", "--problems", str(problems), "--out",
                             str(out), "--guidance", "always", *CLI_ARGS], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_lines(out)) == 2
    bad = subprocess.run([sys.executable, "-m", "sdharness.tools.generate", "--problems", str(problems), "--out", str(out),
                          "--model", "nope"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "tiny_random" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------- training step

def sd_step(overrides):
    cfg = to_train_config(compose_config(TINY + ["algo=sd"] + overrides))
    model, tok = load_model_and_tokenizer(cfg.model)
    dm = ProblemDataModule(cfg.data, cfg.prompt, tok, max_context=1024, max_new_tokens=cfg.rollout.max_new_tokens)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = SelfDistillModule(model, tok, cfg)
    (loss, metrics), = list(module.losses(batch))
    loss.backward()
    return module, batch, loss, metrics


@pytest.mark.parametrize("overrides,fraction", [
    (["rollout.guidance=always", "loss.is_clip=null"], 1.0),
    (["rollout.guidance=always", "teacher=initial"], 1.0),
    (["rollout.guidance=on_failure", "rollout.guidance_samples=2", "loss.is_clip=1.5"], 1.0),
])
def test_training_step_with_guidance_runs_and_logs_the_guided_fraction(overrides, fraction):
    module, batch, loss, metrics = sd_step(overrides)
    assert math.isfinite(loss.item())
    assert metrics["train/guided_fraction"] == fraction  # a random model fails every problem
    assert 0.0 <= metrics["train/guided_accuracy"] <= 1.0
    if "loss.is_clip=null" in overrides:
        assert "train/importance_weight" not in metrics
    else:  # loss.is_clip (default 2.0) weights every guided token
        assert 0.0 <= metrics["train/importance_weight"] <= module.cfg.loss.is_clip
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    counters = module.step_counts
    samples = 2 if "rollout.guidance_samples=2" in overrides else 0
    assert counters.rollouts == len(batch) * (1 + samples) and counters.problems_seen == len(batch)
    assert counters.generated_tokens >= metrics["train/completion_length"] * len(batch)
    if overrides == ["rollout.guidance=always", "loss.is_clip=null"]:  # exact: guided rollout, teacher scoring, student pass
        student, teacher, generated = int(batch.student_mask.sum()), int(batch.teacher_mask.sum()), \
            counters.generated_tokens
        assert generated == metrics["train/completion_length"] * len(batch)
        assert counters.forward_tokens == (student + teacher + 2 * generated) + (teacher + generated) + (
            student + generated)
        assert counters.trained_tokens == student + generated


def test_on_failure_counts_every_plain_sample_and_the_guided_resample_exactly(monkeypatch):
    """Discarded plain samples and the guided resample's two contexts are all in the step's cost."""
    import sdharness.rollout.guided as guided

    cfg = to_train_config(compose_config(TINY + ["algo=sd", "rollout.guidance=on_failure", "rollout.guidance_samples=2"]))
    model, tok = load_model_and_tokenizer(cfg.model)
    dm = ProblemDataModule(cfg.data, cfg.prompt, tok, max_context=1024, max_new_tokens=cfg.rollout.max_new_tokens)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = SelfDistillModule(model, tok, cfg)
    plain, resampled = [], []
    sample, guide = module.rollout, guided.guided_generate
    module.rollout = lambda ids, mask: plain.append(sample(ids, mask)) or plain[-1]
    monkeypatch.setattr(guided, "guided_generate", lambda *a, **k: resampled.append(guide(*a, **k)) or resampled[-1])
    (_, metrics), = list(module.losses(batch))
    assert len(plain) == 2 and len(resampled) == 1 and metrics["train/guided_fraction"] == 1.0  # a random model fails
    student, teacher = int(batch.student_mask.sum()), int(batch.teacher_mask.sum())
    plain_tokens = sum(int(r.lengths.sum()) for r in plain)
    g = int(resampled[0].lengths.sum())  # every row failed, so g is the guided rollout
    c = module.step_counts
    assert c.rollouts == 3 * len(batch) and c.generated_tokens == plain_tokens + g
    assert c.forward_tokens == (2 * student + plain_tokens) + (student + teacher + 2 * g) + (teacher + g) + (student + g)
    assert c.trained_tokens == student + g
    n = module.parameter_count
    assert c.flops == 2 * n * (c.forward_tokens - c.trained_tokens) + 6 * n * c.trained_tokens


def test_plain_rows_of_on_failure_stay_plain(monkeypatch):
    """Problems the student solves keep their plain sample; only the others are guided."""
    import sdharness.rollout.guided as guided

    calls = []
    monkeypatch.setattr(guided, "answer_checks", lambda texts, problems, marker: [i % 2 == 1 for i in range(len(texts))])
    original = guided.guided_generate
    monkeypatch.setattr(guided, "guided_generate", lambda *a, **k: calls.append(a[2].shape[0]) or original(*a, **k))
    _, batch, _, metrics = sd_step(["rollout.guidance=on_failure"])
    assert calls == [1] and metrics["train/guided_fraction"] == 0.5
