"""Online sibling hints (``algo.hint_source=sibling``): a successful sibling's text as the teacher's
reference, checked against plain SD with that text as the reference, its empty groups, its cost
accounting and its config checks."""

import csv
import json

import pytest
import torch

from sdharness.config import ConfigError, DataConfig, to_train_config
from sdharness.data.datamodule import DataError, ProblemDataModule, PromptBatch
from sdharness.data.loading import load_data
from sdharness.data.prompts import encode_prompts, render_teacher, right_pad
from sdharness.methods.self_distill import SelfDistillModule
from sdharness.methods.sibling_hints import check_fits_context, problems_without_success, sibling_hints
from sdharness.models import load_model_and_tokenizer
from sdharness.rollout.hf import Rollout
from tests.conftest import TINY, compose_config

SIBLING = ["algo=sd", "algo.hint_source=sibling", "algo.group_size=4"]
# The shipped testbed reads its teacher prompt's reference, so that targets with and without the right one
# differ by far more than rounding (a random model's teacher and student agree to ~1e-5 nats).
TESTBED = ["model=testbed", "data.task=columns", "prompt=testbed"]


def setup(overrides, problems=1):
    cfg = to_train_config(compose_config(TINY + overrides))
    model, tok = load_model_and_tokenizer(cfg.model)
    dm = ProblemDataModule(cfg.data, cfg.prompt, tok, max_context=1024, max_new_tokens=cfg.rollout.max_new_tokens)
    dm.setup()
    return cfg, model, tok, dm.collate(dm.train[:problems])


def completions(tok, texts) -> Rollout:
    ids, mask = right_pad([tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for text in texts],
                          tok.pad_token_id)
    return Rollout(ids, mask.bool(), list(texts))


def right_and_wrong(answer: str) -> tuple[str, list[str]]:
    """A completion whose answer checks (with a line after it, which the hint trims) and three that do not."""
    wrong = [f"{n} it is\nThe answer is {int(answer) + n}." for n in (1, 2, 13)]
    return f"so\nThe answer is {answer}.\nand more", wrong


def sampled(module, rollout: Rollout):
    """``module`` with its rollout fixed to ``rollout``, the prompts it was asked to sample from recorded."""
    asked = []
    module.rollout = lambda ids, mask: asked.append((ids, mask)) or rollout
    return asked


def gradients(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_hints_are_the_first_other_successful_sibling():
    assert sibling_hints([False, False, True, False], 4) == [2, 2, None, 2]
    assert sibling_hints([True, False, True, False, False, False], 3) == [2, 0, 0, None, None, None]
    assert sibling_hints([True, True], 2) == [1, 0]
    assert problems_without_success([True, False, True, False, False, False], 3) == 1
    assert problems_without_success([False] * 4 + [True] + [False] * 3, 4) == 1


def test_one_success_gives_its_siblings_exactly_plain_sd_with_its_text_as_the_reference():
    cfg, model, tok, batch = setup(TESTBED + SIBLING)
    problem = batch.problems[0]
    right, wrong = right_and_wrong(problem["answer"])
    texts = [wrong[0], wrong[1], right, wrong[2]]  # the success third: the hint is not simply the first row
    rollout = completions(tok, texts)
    module = SelfDistillModule(model, tok, cfg)
    asked = sampled(module, rollout)
    (loss, metrics), = list(module.losses(batch))
    (prompt_ids, _), = asked
    assert torch.equal(prompt_ids, batch.student_ids.repeat(4, 1))  # group_size samples of the student prompt
    assert metrics["train/sibling_hint_rows"] == 3.0  # the only success gets no hint: never its own text
    model.zero_grad()
    loss.backward()
    sibling_grads = gradients(model)

    # Plain SD, the reference written by hand: the success's text up to its answer line.
    plain_cfg = to_train_config(compose_config(TINY + TESTBED + ["algo=sd"]))
    others = [texts[row] for row in (0, 1, 3)]
    teacher_ids, teacher_mask = encode_prompts(cfg.prompt, tok, [render_teacher(
        cfg.prompt, problem["problem"], "so\nThe answer is " + problem["answer"] + ".")] * 3)
    reference_batch = PromptBatch(batch.student_ids.repeat(3, 1), batch.student_mask.repeat(3, 1), teacher_ids,
                                  teacher_mask, batch.solution_ids.repeat(3, 1), batch.solution_mask.repeat(3, 1),
                                  [problem] * 3)
    plain = SelfDistillModule(model, tok, plain_cfg)
    rows = torch.tensor([0, 1, 3])
    sampled(plain, Rollout(rollout.completion_ids[rows], rollout.completion_mask[rows], others))
    (plain_loss, plain_metrics), = list(plain.losses(reference_batch))
    model.zero_grad()
    plain_loss.backward()
    assert metrics["train/loss_tokens"] == plain_metrics["train/loss_tokens"] == sum(len(t) + 1 for t in others)
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-6) and loss.item() > 0.01
    assert metrics["train/teacher_student_kl"].item() == pytest.approx(plain_metrics["train/teacher_student_kl"].item(),
                                                                       rel=1e-6)
    for got, expected in zip(sibling_grads, gradients(model), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-5)


def test_a_group_without_success_gives_no_loss_and_is_counted():
    cfg, model, tok, batch = setup(SIBLING)
    _, wrong = right_and_wrong(batch.problems[0]["answer"])
    module = SelfDistillModule(model, tok, cfg)
    sampled(module, completions(tok, wrong + wrong[:1]))
    (loss, metrics), = list(module.losses(batch))
    # No loss tokens: the harness skips the update (PolicyModule.training_step); no gradient either.
    assert metrics["train/loss_tokens"] == 0.0 and metrics["train/sibling_hint_rows"] == 0.0
    assert loss.item() == 0.0
    model.zero_grad()
    loss.backward()
    assert all(bool(g.eq(0).all()) for g in gradients(model))
    assert module.step_counts.problems_without_success == 1 and module.step_counts.problems_seen == 1
    assert metrics["train/rollout_accuracy"] == 0.0


def test_every_sampled_token_is_counted_once():
    cfg, model, tok, batch = setup(SIBLING, problems=2)
    right, wrong = right_and_wrong(batch.problems[0]["answer"])
    _, wrong_b = right_and_wrong(batch.problems[1]["answer"])
    texts = [right, wrong[0], wrong[1], wrong[2]] + wrong_b + wrong_b[:1]  # problem 2: no success
    rollout = completions(tok, texts)
    module = SelfDistillModule(model, tok, cfg)
    asked = sampled(module, rollout)
    (_, metrics), = list(module.losses(batch))
    (_, prompt_mask), = asked
    c = module.step_counts
    generated = sum(len(text) + 1 for text in texts)  # characters + EOS, every row of both groups
    assert c.generated_tokens == int(rollout.completion_mask.sum()) == generated
    assert c.problems_seen == 2 and c.rollouts == 8 and c.problems_without_success == 1
    assert metrics["train/sibling_hint_rows"] == 3.0 and metrics["train/rollout_accuracy"] == 1 / 8
    # Scored: rows 1-3 (problem 1), each with the student prompt and the teacher prompt holding row 0's text.
    scored_g = sum(len(text) + 1 for text in texts[1:4])
    teacher_ids, teacher_mask = encode_prompts(cfg.prompt, tok, [render_teacher(
        cfg.prompt, batch.problems[0]["problem"], "so\nThe answer is " + batch.problems[0]["answer"] + ".")])
    student = int(batch.student_mask[0].sum())
    teacher = int(teacher_mask.sum())
    rollout_pass = int(prompt_mask.sum()) + generated
    assert c.trained_tokens == 3 * student + scored_g
    assert c.forward_tokens == rollout_pass + (3 * teacher + scored_g) + (3 * student + scored_g)
    n = module.parameter_count
    assert c.flops == 2 * n * (c.forward_tokens - c.trained_tokens) + 6 * n * c.trained_tokens


def test_a_teacher_prompt_that_a_sibling_makes_too_long_is_refused_in_one_line():
    teacher_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    g_mask = torch.tensor([[True, True, False], [True, False, False]])
    check_fits_context(teacher_mask, g_mask, 5)  # 3 + 2 and 4 + 1: the longest row, not the padded widths
    with pytest.raises(ConfigError, match=r"^algo.hint_source=sibling: a teacher prompt holding a sibling's "
                       r"completion, plus the completion it scores, takes 5 tokens, more than the model context of 4; "
                       r"lower rollout.max_new_tokens or shorten prompt.teacher$"):
        check_fits_context(teacher_mask, g_mask, 4)


@pytest.mark.parametrize("overrides,message", [
    (["algo.hint_source=solution"], r"^algo.hint_source='solution' is unknown; choose one of: reference, sibling$"),
    (SIBLING[:2] + ["algo.group_size=1"], r"^algo.hint_source=sibling needs algo.group_size >= 2 \(a completion's "
     r"hint is a sibling's\), got 1; e.g. algo.group_size=8$"),
    (SIBLING + ["algo.distillation_weight=0.5"], r"^algo.hint_source=sibling is pure self-distillation; set "
     r"algo.distillation_weight=1 \(got 0.5\) or algo.hint_source=reference$"),
    (["algo=grpo", "algo.hint_source=sibling"], r"^algo.hint_source=sibling chooses SD's teacher hint, not "
     r"algo=grpo's; set algo=sd or algo.hint_source=reference$"),
    (SIBLING + ["rollout.guidance=on_failure"], r"^algo.hint_source=sibling samples plain groups from the student "
     r"prompt; set rollout.guidance=never \(got on_failure\)$"),
    (SIBLING + ["data=chatlog"], r"^algo.hint_source=sibling samples and checks completions; data=chatlog has "
     r"logged ones: use problem data with answers \(arithmetic, jsonl\) or algo.hint_source=reference$"),
])
def test_bad_combinations_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_train_config(compose_config(TINY + overrides))


def test_answer_only_rows_train_under_sibling_hints_and_point_there_otherwise(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"problem": f"Start with {i}. Add 3.", "answer": str(i + 3)}) + "\n"
                            for i in range(4)))
    data = DataConfig(name="jsonl", path=str(path), eval_size=1)
    loaded = load_data(data, "sd", "sibling")
    assert len(loaded.train) == 3 and all("solution" not in row for row in loaded.train)
    with pytest.raises(DataError, match=r"train.jsonl:1: field\(s\) solution missing .* or train on them with "
                                        r"algo=grpo or algo.hint_source=sibling$"):
        load_data(data, "sd")


def answer_only_columns(path, size: int) -> None:
    from sdharness.data.builtin import builtin_task

    rows = builtin_task("columns").split(7, size, "hard", "native")
    path.write_text("".join(json.dumps({"problem": row["problem"], "answer": row["answer"]}) + "\n" for row in rows))


@pytest.mark.slow
def test_sibling_hint_run_on_answer_only_data_logs_hints_and_problems_without_success(tmp_path):
    """The shipped testbed on hard column additions: some groups have a success and some none, so some
    steps distil and some are skipped updates, until 2 updates were made."""
    from sdharness.train import train

    answer_only_columns(tmp_path / "train.jsonl", 12)
    train(compose_config(TINY + TESTBED + SIBLING + [
        "data=jsonl", f"data.path={tmp_path / 'train.jsonl'}", "data.eval_size=2", "rollout.max_new_tokens=96",
        "eval.max_new_tokens=96", "optim.lr=1e-4", "eval.at_start=false", "logger.mode=disabled",
        "trainer.max_consecutive_skipped=4"]), tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/sibling_hint_rows")]
    hinted = [float(row["train/sibling_hint_rows"]) for row in rows]
    assert [float(row["train/loss_tokens"]) > 0 for row in rows] == [n > 0 for n in hinted]
    assert sum(n > 0 for n in hinted) == 2 and 0 in hinted  # trainer.max_steps=2 updates, and skipped steps
    last = rows[-1]
    assert float(last["train/skipped_steps"]) == hinted.count(0)
    assert float(last["train/problems_seen"]) == 2.0 * len(rows)  # batches of 2 problems
    assert float(last["train/rollouts"]) == 4 * float(last["train/problems_seen"])  # group_size 4 each
    without = [float(row["train/problems_without_success"]) for row in rows]
    assert without == sorted(without) and 0 < without[-1] < float(last["train/problems_seen"])


@pytest.mark.slow
def test_batches_without_any_success_are_not_a_failing_run(tmp_path):
    """tiny_random never solves a problem: every batch is skipped for want of a sibling hint, which is the
    data, not a fault, so trainer.max_consecutive_skipped does not stop the run; the budget ends it."""
    from sdharness.train import train

    answer_only_columns(tmp_path / "train.jsonl", 12)
    train(compose_config(TINY + SIBLING + [
        "data=jsonl", f"data.path={tmp_path / 'train.jsonl'}", "data.eval_size=2", "data.batch_size=2",
        "budget.problems=6", "eval.at_start=false", "logger.mode=disabled", "trainer.max_consecutive_skipped=1"]),
        tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/sibling_hint_rows")]
    last = rows[-1]
    assert [float(row["train/sibling_hint_rows"]) for row in rows] == [0.0, 0.0, 0.0]
    assert float(last["train/skipped_steps"]) == 3.0
    assert float(last["train/problems_without_success"]) == float(last["train/problems_seen"]) == 6.0
