"""sdharness-bootstrap: answer-only problems -> checked worked solutions, with a provenance cache."""

from __future__ import annotations

import importlib.metadata
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from sdharness.tools import bootstrap as bs
from sdharness.data.answers import trim_solution
from sdharness.tools.provenance import provenance_path
from sdharness.tools.bootstrap import (
    BootstrapSettings,
    answer_hint,
    bootstrap,
    bootstrap_to_file,
    pick_solution,
)
from sdharness.config import ConfigError, ModelConfig, PromptConfig
from sdharness.data.jsonl import DataError, read_jsonl
from sdharness.tools.generate import named_config
from sdharness.models import load_model_and_tokenizer
from sdharness.data.answers import answer_checker, is_correct
from sdharness.data.chain import CHAIN
from sdharness.data.prompts import encode_prompt, render_student, render_teacher
from sdharness.rollout.hf import Rollout
from tests.conftest import TESTBED_CHAIN

pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or sweeps

TINY = ModelConfig(name="tiny_random", source="tiny_random")
PROBLEMS = [{"problem": f"Start with {n}. Add 1. What is the result?", "answer": str(n + 1)} for n in range(4)]


def fake_cost(texts: list[str]) -> dict[str, int]:
    """A fake sampler's cost: a token per character and a 10-token prompt per sample."""
    generated = sum(len(text) for text in texts)
    return {"rollouts": len(texts), "generated": generated, "forward_only": 10 * len(texts) + generated}


def fake_sampler(log: list | None = None):
    """Row 0: every sample correct, lengths differ; row 1: only sample 2 correct; row 2: never
    correct; row 3: samples 0 and 3 correct, 3 shorter, 0 with junk after the answer line."""

    def sample(requests):
        if log is not None:
            log.append(requests)
        texts = []
        for r in requests:
            right, wrong = f"The answer is {r['answer']}.", f"The answer is {int(r['answer']) + 100}."
            row, j = r["row"], r["sample"]
            if row == 0:
                texts.append("x" * (4 - j) + " = y\n" + right)
            elif row == 1:
                texts.append(right if j == 2 else wrong)
            elif row == 2:
                texts.append("no marker at all" if j % 2 else wrong)
            else:
                texts.append({0: "long working here\n" + right + "\nQ: junk", 3: right}.get(j, wrong))
        return texts, fake_cost(texts)

    return sample


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --------------------------------------------------------------------------- (a) pure helpers


def test_pick_solution_shortest_first_and_none():
    number = answer_checker("builtin")
    candidates = ["a long way round\nThe answer is 7.", "The answer is 8.", "3 + 4 = 7\nThe answer is 7.",
                  "The answer is 7.0", "The answer is 7."]
    assert pick_solution(candidates, "7", checker=number, rule="first") == candidates[0]
    assert pick_solution(candidates, "7", checker=number, rule="shortest") == candidates[4]
    ties = ["The answer is 7.", "The answer is 7!"]
    assert pick_solution(ties, "7", checker=number) == ties[0]  # shortest: first on ties
    assert pick_solution(["The answer is 8.", "seven", ""], "7", checker=number) is None
    assert pick_solution([], "7", checker=number) is None
    with pytest.raises(ConfigError, match="--rule"):
        pick_solution(candidates, "7", checker=number, rule="longest")


def test_helpers_hint_trim_and_checker_names():
    assert answer_hint("32") == "The answer is 32." and answer_hint(7) == "The answer is 7."
    assert trim_solution("1 + 1 = 2\nThe answer is 2.\nQ: Start with") == "1 + 1 = 2\nThe answer is 2."
    assert trim_solution("  no marker \n") == "no marker"
    with pytest.raises(ConfigError, match=r"data.checker='sympy' is unknown; choose one of: builtin, math_verify"):
        answer_checker("sympy")


def test_math_verify_checker_free_form_answers():
    pytest.importorskip("math_verify")
    check = answer_checker("math_verify")
    assert check("1/2 of it\nThe answer is \\frac{1}{2}.", "0.5")
    assert check("The answer is 0.5.", "\\frac{1}{2}")
    assert check("so x = 3\nThe answer is 3.\nThe answer is 4.", "3")  # the first committed answer
    assert not check("The answer is 4.", "3")
    assert not check("", "3")


# --------------------------------------------------------------------------- (b) bootstrap itself


@pytest.mark.parametrize("unsolved", ["drop", "answer_hint"])
def test_bootstrap_with_fake_sampler_exact_counts(unsolved):
    log: list = []
    rows, summary = bootstrap(None, None, PROBLEMS, BootstrapSettings(k=4, unsolved=unsolved, batch_size=3, guidance=True),
                              sample_fn=fake_sampler(log))
    cost = summary.pop("cost")
    assert summary == {"problems": 4, "solved": 3, "unsolved": 1, "samples": 16, "correct_samples": 4 + 1 + 0 + 2,
                       "pass_rate": 7 / 16, "kept": 4 if unsolved == "answer_hint" else 3,
                       "dropped": 0 if unsolved == "answer_hint" else 1, "unsolved_rows": [2]}
    # every sampled character once, untrimmed; no model, so no parameters to count FLOPs with
    characters = sum(fake_cost(fake_sampler()(batch)[0])["generated"] for batch in log)
    assert cost["rollouts"] == 16 and cost["generated_tokens"] == characters
    assert cost["forward_tokens"] == 160 + characters and cost["flops"] == 0.0 and cost["trained_tokens"] == 0
    assert cost["problems_without_success"] == 1 and cost["problems_seen"] == 0 and cost["wall_seconds"] >= 0
    assert [len(batch) for batch in log] == [3, 3, 3, 3, 3, 1]
    assert all(r["hint"] == f"The answer is {r['answer']}." for batch in log for r in batch)
    by_row = {row["bootstrap"]["row"]: row for row in rows}
    assert by_row[0]["solution"] == "x = y\nThe answer is 1." and by_row[0]["bootstrap"]["picked"] == 3
    assert by_row[1]["bootstrap"] == {"row": 1, "samples": 4, "correct": 1, "pass_rate": 0.25, "picked": 2,
                                      "guided": True, "answer_only": False}
    assert by_row[3]["solution"] == "The answer is 4." and by_row[3]["bootstrap"]["picked"] == 3
    for row in rows:
        assert set(row) == {"problem", "solution", "answer", "bootstrap"}
        assert is_correct(row["solution"], row["answer"])
        assert row["bootstrap"]["answer_only"] == (row["bootstrap"]["picked"] is None)
    if unsolved == "answer_hint":
        assert by_row[2]["solution"] == "The answer is 3." and by_row[2]["bootstrap"]["answer_only"]
        assert [row["bootstrap"]["row"] for row in rows] == [0, 1, 2, 3]  # input order kept
    else:
        assert 2 not in by_row


def test_bootstrap_rule_first_and_no_trim():
    rows, _ = bootstrap(None, None, PROBLEMS, BootstrapSettings(k=4, rule="first", trim=False), sample_fn=fake_sampler())
    by_row = {row["bootstrap"]["row"]: row for row in rows}
    assert by_row[0]["bootstrap"]["picked"] == 0 and by_row[0]["solution"].startswith("xxxx")
    assert by_row[3]["solution"] == "long working here\nThe answer is 4.\nQ: junk"
    with pytest.raises(ConfigError, match="-k"):
        bootstrap(None, None, PROBLEMS, BootstrapSettings(k=0), sample_fn=fake_sampler())
    with pytest.raises(ConfigError, match="--unsolved"):
        bootstrap(None, None, PROBLEMS, BootstrapSettings(k=1, unsolved="keep"), sample_fn=fake_sampler())


@pytest.mark.parametrize("guidance", [False, True])
def test_bootstrap_tiny_random_model(guidance):
    model, tokenizer = load_model_and_tokenizer(TINY)
    prompt = PromptConfig(**named_config("prompt", "testbed"))
    problems = CHAIN.split(0, 3, "easy")
    rows, summary = bootstrap(model, tokenizer, problems, BootstrapSettings(k=2, max_new_tokens=6, guidance=guidance,
                                                                       unsolved="answer_hint", batch_size=4, seed=1),
                              prompt_cfg=prompt)
    assert summary["samples"] == 6 and summary["problems"] == 3
    assert summary["solved"] + summary["unsolved"] == 3 == summary["kept"] + summary["dropped"] == len(rows)
    assert summary["correct_samples"] == sum(row["bootstrap"]["correct"] for row in rows)
    for row in rows:
        assert row["bootstrap"]["guided"] is guidance and row["bootstrap"]["samples"] == 2
        assert is_correct(row["solution"], row["answer"])  # sampled or the answer alone, it verifies


@pytest.mark.parametrize("guidance", [False, True])
def test_sampling_cost_is_counted_as_training_counts_it(monkeypatch, guidance):
    """A sampler that makes request ``j`` of each batch generate ``j + 1`` tokens: its samples, generated
    tokens, forward tokens (prefill of each real prompt token; under guidance both contexts, and each token
    through both) and FLOPs (2 per parameter per forward token) are exact."""
    model, tokenizer = load_model_and_tokenizer(TINY)
    prompt = PromptConfig(**named_config("prompt", "testbed"))

    def fake_rollout(ids: torch.Tensor) -> Rollout:
        mask = (torch.arange(5).expand(ids.shape[0], 5) <= torch.arange(ids.shape[0])[:, None]).long()
        return Rollout(torch.ones_like(mask), mask, ["The answer is 2."] * ids.shape[0])

    monkeypatch.setattr(bs, "generate", lambda model, tokenizer, ids, mask, **sampling: fake_rollout(ids))
    monkeypatch.setattr(bs, "guided_generate", lambda model, tokenizer, ids, *contexts, **sampling: fake_rollout(ids))
    _, summary = bootstrap(model, tokenizer, PROBLEMS[:3], BootstrapSettings(k=2, batch_size=4, guidance=guidance),
                           prompt_cfg=prompt)
    generated = (1 + 2 + 3 + 4) + (1 + 2)  # batches of 4 and 2 requests
    student = sum(2 * len(encode_prompt(prompt, tokenizer, render_student(prompt, p["problem"]))) for p in PROBLEMS[:3])
    teacher = sum(2 * len(encode_prompt(prompt, tokenizer, render_teacher(prompt, p["problem"],
                                                                          answer_hint(p["answer"]))))
                  for p in PROBLEMS[:3])
    forward = student + generated + (teacher + generated if guidance else 0)
    parameters = sum(p.numel() for p in model.parameters())
    cost = summary["cost"]
    assert (cost["rollouts"], cost["generated_tokens"], cost["forward_tokens"]) == (6, generated, forward)
    assert cost["flops"] == 2.0 * parameters * forward and cost["trained_tokens"] == 0
    assert cost["problems_without_success"] == 2 == summary["unsolved"]  # only problem 1's answer is 2


# --------------------------------------------------------------------------- (c) cache


def test_cache_reused_then_regenerated_on_any_difference(tmp_path):
    problems = write_jsonl(tmp_path / "in.jsonl", [{**p, "answer": int(p["answer"])} for p in PROBLEMS])
    out = tmp_path / "sub" / "out.jsonl"
    prompt = PromptConfig(**named_config("prompt", "testbed"))
    calls: list = []
    common = dict(model_cfg=TINY, prompt_cfg=prompt, sample_fn=fake_sampler(calls))

    def settings(**changed):
        return BootstrapSettings(**{"unsolved": "answer_hint", **changed})

    status, rows, summary = bootstrap_to_file(problems, out, settings(k=4), **common)
    assert status == "generated" and len(calls) == 2 and summary["kept"] == 4
    record = json.loads(provenance_path(out).read_text())
    assert record["key"]["k"] == 4 and record["key"]["checker"] == "builtin" and record["summary"] == summary
    assert record["summary"]["cost"]["rollouts"] == 16 and record["summary"]["cost"]["generated_tokens"] > 0
    assert record["key"]["model"]["name"] == "tiny_random" and len(record["key"]["model"]["config_sha256"]) == 64
    assert read_jsonl(out, required=("problem", "solution", "answer")) == rows
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]

    calls.clear()
    status, again, summary_again = bootstrap_to_file(problems, out, settings(k=4), **common)
    assert status == "reused" and calls == [] and again == rows and summary_again == summary

    status, _, summary = bootstrap_to_file(problems, out, settings(k=2), **common)  # k differs
    assert status == "generated" and calls and summary["samples"] == 8
    assert json.loads(provenance_path(out).read_text())["key"]["k"] == 2

    calls.clear()
    assert bootstrap_to_file(problems, out, settings(k=2), **common)[0] == "reused" and calls == []
    assert bootstrap_to_file(problems, out, settings(k=2, seed=1), **common)[0] == "generated"
    assert bootstrap_to_file(problems, out, settings(k=2, seed=1), **common)[0] == "reused"
    out.write_text(out.read_text() + "\n{}\n")  # a tampered output is not trusted
    assert bootstrap_to_file(problems, out, settings(k=2, seed=1), **common)[0] == "generated"
    write_jsonl(problems, PROBLEMS[:3])  # the input changed
    status, _, summary = bootstrap_to_file(problems, out, settings(k=2, seed=1), **common)
    assert status == "generated" and summary["problems"] == 3


def test_input_needs_problem_and_answer(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p", "answer": 3}\n\n{"problem": "q", "solution": "s"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: field\(s\) answer missing"):
        bootstrap_to_file(bad, tmp_path / "o.jsonl", BootstrapSettings(k=1), model_cfg=TINY, prompt_cfg=PromptConfig(),
                          sample_fn=fake_sampler())


def test_cli_end_to_end_with_tiny_random(tmp_path, capsys, monkeypatch):
    problems = write_jsonl(tmp_path / "in.jsonl", PROBLEMS[:2])
    out = tmp_path / "out.jsonl"
    argv = ["--model", "tiny_random", "--problems", str(problems), "--out", str(out), "--prompt", "testbed",
            "-k", "2", "--max-new-tokens", "4", "--unsolved", "answer_hint", "--guidance"]
    fake = fake_sampler()  # row 0 always right, row 1 right on sample 2 only
    monkeypatch.setattr(bs, "model_sampler", lambda *args, **kwargs: fake)
    bs.main(argv)
    first = capsys.readouterr().out
    assert "problems        2" in first and "samples         4" in first and "reused cache" not in first
    assert "solved 1 of 2 problem(s) (2 of 4 samples correct)" in first
    bs.main(argv)
    assert "reused cache" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        bs.main(argv[:-1] + ["--prompt", "nope"])
    assert exit_info.value.code == 2 and "conf/prompt" in capsys.readouterr().err


def test_no_problem_solved_exits_1_saying_so_and_the_rerun_reuses_the_empty_output(tmp_path, capsys, monkeypatch):
    problems = write_jsonl(tmp_path / "in.jsonl", PROBLEMS[2:3])  # row 0 here: the fake's never-correct row 2
    out = tmp_path / "out.jsonl"
    fake = fake_sampler()
    monkeypatch.setattr(bs, "model_sampler", lambda *args, **kwargs: lambda requests: fake(
        [{**r, "row": 2} for r in requests]))
    argv = ["--model", "tiny_random", "--problems", str(problems), "--out", str(out), "-k", "3"]
    for reused in (False, True):
        with pytest.raises(SystemExit) as exit_info:
            bs.main(argv)
        captured = capsys.readouterr()
        assert exit_info.value.code == 1 and ("reused cache" in captured.out) is reused
        assert "solved 0 of 1 problem(s) (0 of 3 samples correct)" in captured.out
        assert "sdharness-bootstrap: error: no problem was solved (0 of 3 samples checked correct)" in captured.err
    assert out.read_text() == ""
    record = json.loads(provenance_path(out).read_text())
    assert record["summary"]["solved"] == 0 and record["wall_seconds"] >= 0
    assert record["harness_version"] == importlib.metadata.version("sdharness")
    assert abs(datetime.fromisoformat(record["date"]) - datetime.now(timezone.utc)) < timedelta(minutes=5)


# --------------------------------------------------------------------------- (d) the testbed model


@pytest.mark.slow
def test_bootstrap_hard_problems_from_testbed(tmp_path):
    problems = write_jsonl(tmp_path / "hard.jsonl",
                           [{"problem": p["problem"], "answer": p["answer"]} for p in CHAIN.split(7, 8, "hard")])
    prompt = PromptConfig(**named_config("prompt", "testbed"))
    status, rows, summary = bootstrap_to_file(problems, tmp_path / "out.jsonl",
                                              BootstrapSettings(k=4, max_new_tokens=128, unsolved="drop", seed=0),
                                              model_cfg=TESTBED_CHAIN, prompt_cfg=prompt)
    assert status == "generated"
    assert summary["problems"] == 8 and summary["samples"] == 32
    assert summary["solved"] + summary["unsolved"] == 8 == summary["kept"] + summary["dropped"]
    assert summary["kept"] == summary["solved"] == len(rows)
    assert summary["correct_samples"] == sum(row["bootstrap"]["correct"] for row in rows)
    for row in rows:
        assert is_correct(row["solution"], row["answer"]) and not row["bootstrap"]["answer_only"]


def test_the_cache_key_names_the_guided_aggregations_own_parameter():
    """Guided sampling's key holds the aggregation and the value of its parameter under its name (product's
    key is what it was when every aggregation's number was called tau); plain sampling holds neither."""
    plain = {"max_new_tokens": 96, "temperature": 1.0, "top_p": 1.0}
    assert BootstrapSettings().sampling() == plain
    assert BootstrapSettings(guidance=True).sampling() == {**plain, "aggregation": "product", "tau": 2.0}
    assert BootstrapSettings(guidance=True, aggregation="trust_region").sampling() == {
        **plain, "aggregation": "trust_region", "kl_bound": 0.1}
    assert BootstrapSettings(guidance=True, aggregation="teacher", parameter=None).sampling() == {
        **plain, "aggregation": "teacher"}

