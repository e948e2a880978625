"""The teacher's health: its maths against float64 references, the figures of a run with a known answer,
the LoRA teacher without a copy, and the report's best-on-validation and collapse marks."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch

from sdharness.config import ModelConfig
from sdharness.distill.logits import completion_hidden
from sdharness.eval.teacher_health import TokenSums, add_token_figures, entropy_and_kl, token_metrics
from sdharness.methods.policy import AdapterFreeView, ShadowWeights
from sdharness.models import char_tokenizer, tiny_random_model
from sdharness.report.curves import best_on_validation, collapse
from sdharness.rollout.hf import generate
from sdharness.train import train
from tests.conftest import compose_config


def test_entropy_and_kl_match_a_float64_reference_with_ruled_out_tokens():
    logits = torch.tensor([[2.0, 0.5, -1.0, float("-inf")], [0.0, 0.0, 0.0, 0.0]])
    reference = torch.tensor([[1.0, 1.0, -2.0, 0.5], [3.0, -1.0, 0.0, float("-inf")]])
    entropy, kl = entropy_and_kl(logits, reference)
    for row in range(2):
        p = torch.softmax(logits[row].double(), -1)
        q = torch.softmax(reference[row].double(), -1)
        support = p > 0
        expected_entropy = -(p[support] * p[support].log()).sum()
        expected_kl = (p[support] * (p[support].log() - q[support].log())).sum()
        assert entropy[row].item() == pytest.approx(expected_entropy.item(), abs=1e-6)
        assert kl[row].item() == pytest.approx(expected_kl.item(), abs=1e-6)
    assert entropy[1].item() == pytest.approx(math.log(4), abs=1e-6)  # uniform over 4 tokens
    assert torch.equal(entropy_and_kl(logits)[1], torch.zeros(2))  # no reference, no KL


def tiny_model(seed: int = 0):
    tokenizer = char_tokenizer()
    return tiny_random_model(ModelConfig(seed=seed), tokenizer).eval(), tokenizer


def prompts(tokenizer, texts):
    from sdharness.data.prompts import left_pad

    return left_pad([tokenizer(text)["input_ids"] for text in texts], tokenizer.pad_token_id)


def test_a_teacher_that_is_the_student_has_its_entropy_and_no_drift():
    model, tokenizer = tiny_model()
    ids, mask = prompts(tokenizer, ["Add 12 and 34.", "Add 5 and 6."])
    rollout = generate(model, tokenizer, ids, mask, max_new_tokens=6, greedy=True)
    sums = TokenSums()
    add_token_figures(sums, policy=model, teacher=model, initial=model, student_ids=ids, student_mask=mask,
                      teacher_ids=ids, teacher_mask=mask, rollout=rollout)
    metrics = token_metrics(sums.as_tensor("cpu").tolist(), teacher_is_policy=True, with_drift=True)
    assert metrics["health/teacher_entropy"] == metrics["health/student_entropy"] > 0
    assert metrics["health/teacher_drift_kl"] == 0.0 and "health/policy_drift_kl" not in metrics
    assert sums.tokens == float(rollout.completion_mask.sum())


def test_drift_is_the_per_token_kl_from_the_initial_weights_and_stand_ins_count_nothing():
    model, tokenizer = tiny_model(0)
    other, _ = tiny_model(1)
    student_ids, student_mask = prompts(tokenizer, ["Add 12 and 34."])
    teacher_ids, teacher_mask = prompts(tokenizer, ["Add 12 and 34. 12+34=46"])
    rollout = generate(model, tokenizer, student_ids, student_mask, max_new_tokens=5, greedy=True)
    figures = dict(student_ids=student_ids, student_mask=student_mask, teacher_ids=teacher_ids,
                   teacher_mask=teacher_mask, rollout=rollout)
    sums = TokenSums()
    add_token_figures(sums, policy=model, teacher=other, initial=other, **figures)  # a frozen teacher
    add_token_figures(sums, policy=model, teacher=other, initial=other, weight=0.0, **figures)  # a stand-in
    metrics = token_metrics(sums.as_tensor("cpu").tolist(), teacher_is_policy=False, with_drift=True)
    with torch.no_grad():
        g, g_mask = rollout.completion_ids, rollout.completion_mask
        p = completion_hidden(model, teacher_ids, teacher_mask, g, g_mask).materialize()[g_mask].double()
        q = completion_hidden(other, teacher_ids, teacher_mask, g, g_mask).materialize()[g_mask].double()
    expected = (p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1).mean()
    assert metrics["health/teacher_drift_kl"] == 0.0
    assert metrics["health/policy_drift_kl"] == pytest.approx(expected.item(), rel=1e-5) and expected > 0


def read_rows(path):
    with open(path / "metrics.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]


TESTBED_RUN = ["model=testbed", "prompt=testbed", "data.task=columns", "data.difficulty=hard", "data.train_size=16",
               "data.eval_size=8", "data.batch_size=4", "rollout.max_new_tokens=32", "rollout.progress=false",
               "eval.max_new_tokens=96", "eval.batch_size=8", "eval.health_size=8", "trainer.max_steps=2",
               "optim.lr=3e-3", "logger.mode=disabled", "threads=1"]


def health_rows(tmp_path, teacher):
    train(compose_config(TESTBED_RUN + [f"teacher={teacher}"]), tmp_path)
    return [row for row in read_rows(tmp_path) if "health/teacher_entropy" in row]


def test_a_frozen_teacher_keeps_its_hint_reading_and_no_drift_while_the_policy_moves(tmp_path):
    start, end = health_rows(tmp_path, "initial")
    assert (start["step"], end["step"]) == (0, 2)
    for style in ("native", "foreign"):  # the frozen teacher reads both notations, before and after alike
        assert end[f"health/teacher_hint_accuracy_{style}"] == start[f"health/teacher_hint_accuracy_{style}"] >= 0.75
        assert start[f"health/policy_hint_accuracy_{style}"] == start[f"health/teacher_hint_accuracy_{style}"]
    assert start["health/teacher_drift_kl"] == end["health/teacher_drift_kl"] == 0.0
    assert start["health/policy_drift_kl"] == 0.0 < end["health/policy_drift_kl"]


def test_a_live_teacher_is_the_policy_and_drifts_with_it(tmp_path):
    start, end = health_rows(tmp_path, "live")
    assert not any(key.startswith("health/policy_") for key in start)
    assert start["health/teacher_drift_kl"] == 0.0 < end["health/teacher_drift_kl"]
    assert end["time/health_seconds"] > start["time/health_seconds"] > 0
    assert end["time/eval_seconds"] > start["time/eval_seconds"] > 0


def test_a_run_without_health_logs_none(tmp_path):
    train(compose_config(TESTBED_RUN + ["eval.teacher_health=false", "teacher=live"]), tmp_path)
    assert not any(key.startswith("health/") for row in read_rows(tmp_path) for key in row)


def lora_model():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_model()
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM")), tokenizer


def test_the_lora_initial_teacher_is_the_base_without_a_copy_and_scores_as_one():
    model, tokenizer = lora_model()
    frozen = copy.deepcopy(model)
    shadow = ShadowWeights(model, "initial")
    assert shadow.copy is None and isinstance(shadow.model, AdapterFreeView)
    with torch.no_grad():  # trained adapters: the live model now differs from its initial weights
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    ids, mask = prompts(tokenizer, ["Add 12 and 34.", "Add 5 and 6."])
    rollout = generate(model, tokenizer, ids, mask, max_new_tokens=6, greedy=True)
    g, g_mask = rollout.completion_ids, rollout.completion_mask
    with torch.no_grad():
        view = completion_hidden(shadow.model, ids, mask, g, g_mask).materialize()
        copied = completion_hidden(frozen, ids, mask, g, g_mask).materialize()
        live = completion_hidden(model, ids, mask, g, g_mask).materialize()
        called = shadow.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(view, copied, rtol=0, atol=0)
    torch.testing.assert_close(called, frozen(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert not torch.allclose(view, live)
    greedy = generate(shadow.model, tokenizer, ids, mask, max_new_tokens=6, greedy=True)
    assert greedy.texts == generate(frozen, tokenizer, ids, mask, max_new_tokens=6, greedy=True).texts
    assert model.active_adapters == ["default"]  # the adapters are back on after every teacher pass


def test_best_on_validation_reads_eval_where_validation_peaked_first():
    evals = [{"step": 0, "val/accuracy": 0.3, "eval/accuracy": 0.31}, {"step": 8, "val/accuracy": 0.7,
             "eval/accuracy": 0.66}, {"step": 16, "val/accuracy": 0.7, "eval/accuracy": 0.9},
             {"step": 24, "val/accuracy": 0.2, "eval/accuracy": 0.95}]
    assert best_on_validation(evals) == 0.66  # never the eval split's own best (0.95)
    assert best_on_validation([{"step": 0, "eval/accuracy": 0.5}]) is None


def test_collapse_names_the_first_health_figure_to_move_before_the_drop():
    accuracy = [0.3, 0.7, 0.8, 0.75, 0.3, 0.0]
    hint = [0.96, 0.96, 0.95, 0.40, 0.10, 0.0]  # a quarter of its fall (0.96 -> 0) by step 3
    entropy = [0.5, 0.5, 0.5, 0.5, 0.9, 1.0]  # a quarter of its rise by step 4
    evals = [{"step": step, "eval/accuracy": a, "health/teacher_hint_accuracy_native": h,
              "health/student_entropy": e} for step, (a, h, e) in enumerate(zip(accuracy, hint, entropy))]
    found = collapse(evals, [("health/student_entropy", 1), ("health/teacher_hint_accuracy_native", -1)])
    assert found == {"best": 0.8, "best_step": 2, "final": 0.0, "dropped_step": 4,
                     "first_moved": "health/teacher_hint_accuracy_native", "moved_step": 3}
    steady = [{"step": s, "eval/accuracy": a} for s, a in enumerate([0.3, 0.8, 0.7, 0.65])]
    assert collapse(steady, []) is None  # 0.15 below the best: no collapse
    sharpening = [{**row, "health/student_entropy": 1.0 - 0.1 * row["step"]} for row in evals]  # it learns
    found = collapse(sharpening, [("health/student_entropy", 1), ("health/teacher_hint_accuracy_native", -1)])
    assert found["first_moved"] == "health/teacher_hint_accuracy_native"  # an entropy that falls never moves


def test_hint_accuracy_is_counted_per_reference_style_of_shared_batches():
    from types import SimpleNamespace

    from sdharness.eval.quick import accuracy_by_style

    rows = [{"reference_style": "native", "answer": "5"}, {"reference_style": "foreign", "answer": "5"},
            {"reference_style": "native", "answer": "7"}, {"reference_style": "foreign", "answer": "7"}]
    texts = ["The answer is 5.", "The answer is 4.", "The answer is 7.", "The answer is 7."]
    decoded = [(SimpleNamespace(problems=rows[:2]), SimpleNamespace(texts=texts[:2]), 1.0),
               (SimpleNamespace(problems=rows[2:]), SimpleNamespace(texts=texts[2:]), 1.0),
               (SimpleNamespace(problems=rows[:2]), SimpleNamespace(texts=["x", "x"]), 0.0)]  # a stand-in
    assert accuracy_by_style(decoded, answer_marker="The answer is", checker="builtin") == {"native": 1.0,
                                                                                          "foreign": 0.5}
