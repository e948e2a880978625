"""Bad input (issue #7): every case gives a clear error naming the file:line or the field and the
fix, or a skip that is counted and logged; never a deep traceback or a silent wrong number.

One place for the whole list. Most cases run in-process (the composed config through
``to_train_config``, a ``ProblemDataModule`` with the char tokenizer, or ``train()`` on a tiny
model); two run the real command line to prove the exit status 2 and the one ``sdharness:
error:`` line. Chat-log specific cases (a conversation that ends with a user message, has no
assistant turn, uses an unknown role, or does not fit, each skipped and counted or rejected under
``data.strict``) are in ``tests/data/test_chatlog.py::test_unusable_conversations_are_skipped_and_counted_or_rejected_under_strict``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException

from sdharness.cli import composition_error_message
from sdharness.config import ConfigError, DataConfig, PromptConfig, to_train_config
from sdharness.data.datamodule import DataError, ProblemDataModule
from tests.conftest import TINY, compose_config

PROMPT = PromptConfig(student="Q: {problem}\nA:", teacher="Q: {problem}\nHint: {solution}\nA:", chat_template="never")
ROW = {"problem": "Start with 2. Add 3.", "solution": "2 + 3 = 5\nThe answer is 5.", "answer": "5"}
CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
                     {"role": "user", "content": "no"}, {"role": "assistant", "content": "a2"}]}


def line(row: dict) -> bytes:
    return json.dumps(row).encode()


def datamodule(path, *, name="jsonl", max_context=1024, prompt=PROMPT, algo="sd", **data):
    from sdharness.models import char_tokenizer

    data = {"eval_size": 1, "batch_size": 2, **data}
    return ProblemDataModule(DataConfig(name=name, path=str(path), **data), prompt, char_tokenizer(),
                             max_context=max_context, max_new_tokens=16, algo=algo)


def read_metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- malformed data files

# (file content, data set, error message as a regex); the file is called train.jsonl.
MALFORMED = {
    "bad_json": (line(ROW) + b'\n{"problem": "p",\n', "jsonl",
                 r"train.jsonl:2: not valid JSON \(.*\); each line must be one JSON object"),
    "not_an_object": (line(ROW) + b'\n["problem", "solution"]\n', "jsonl",
                      r"train.jsonl:2: expected a JSON object, got list; each line must be one JSON object"),
    "missing_field": (line(ROW) + b'\n{"problem": "p"}\n', "jsonl",
                      r"train.jsonl:2: field\(s\) solution missing or not a non-empty string; every row needs "
                      r"problem, solution \(answer is optional\)"),
    "empty_field": (b'{"problem": " ", "solution": "s"}\n', "jsonl", r"train.jsonl:1: field\(s\) problem missing"),
    "empty_file": (b"", "jsonl", r"train.jsonl: no rows; the file is empty or holds only blank lines. Write one "
                                 r"JSON object per line with fields problem, solution"),
    "only_blank_lines": (b"\n  \r\n\n", "jsonl", r"train.jsonl: no rows; the file is empty or holds only blank"),
    "empty_chat_log": (b"\r\n", "chatlog", r"train.jsonl: no rows; .* Write one conversation per line"),
    "non_utf8": (line(ROW) + b'\n{"problem": "caf\xe9", "solution": "s"}\n', "jsonl",
                 r"train.jsonl:2: not valid UTF-8 \(invalid continuation byte at byte \d+\); re-encode the file as UTF-8"),
    "non_utf8_chat_log": (b'{"messages": [{"role": "user", "content": "\xff"}]}\n', "chatlog",
                          r"train.jsonl:1: not valid UTF-8 .*; re-encode the file as UTF-8"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_data_file_names_file_line_and_fix(tmp_path, case):
    content, name, message = MALFORMED[case]
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        datamodule(path, name=name).setup()


@pytest.mark.parametrize("field", ["path", "eval_path"])
def test_missing_data_file_names_the_field(tmp_path, field):
    (tmp_path / "train.jsonl").write_bytes(line(ROW))
    paths = {"path": str(tmp_path / "train.jsonl"), field: str(tmp_path / "nope.jsonl")}
    with pytest.raises(DataError, match=rf"data.{field}: .*nope.jsonl does not exist; point data.{field} at an "
                                        "existing JSONL file"):
        datamodule(**paths).setup()


@pytest.mark.parametrize("name", ["jsonl", "chatlog"])
def test_windows_crlf_line_endings_and_byte_order_mark_just_work(tmp_path, name):
    rows = [ROW, {**ROW, "problem": "Start with 4. Add 1."}, {**ROW, "problem": "Start with 1. Add 1."}]
    if name == "chatlog":
        rows = [CHAT, CHAT, CHAT]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(line(row) for row in rows) + b"\r\n\r\n")
    dm = datamodule(path, name=name)
    dm.setup()
    assert len(dm.train) == 2 and len(dm.evaluation) == 1 and not dm.skipped
    assert not any("\r" in item["problem"] + item["solution"] for item in dm.train + dm.evaluation)


def test_data_path_that_is_a_directory_names_the_field(tmp_path):
    with pytest.raises(DataError, match=rf"data.path: {tmp_path} is a directory; point data.path at a JSONL file in "
                                        r"it \(one JSON object per line\)"):
        datamodule(tmp_path).setup()


# --------------------------------------------------------------- fields each method needs

ANSWER_ONLY = {"problem": "Start with 2. Add 3.", "answer": "5"}
SOLUTION_ONLY = {"problem": "Start with 2. Add 3.", "solution": "2 + 3 = 5\nThe answer is 5."}


def test_grpo_trains_on_answer_only_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(line({**ANSWER_ONLY, "problem": f"Start with {i}. Add 3."}) for i in range(4)))
    dm = datamodule(path, algo="grpo")
    dm.setup()
    assert len(dm.train) == 3 and len(dm.evaluation) == 1
    batch = dm.collate(dm.train[:2])
    assert [p["answer"] for p in batch.problems] == ["5", "5"] and "solution" not in batch.problems[0]


@pytest.mark.parametrize("algo", ["sd", "sft"])
def test_answer_only_rows_under_sd_or_sft_point_to_bootstrap(tmp_path, algo):
    path = tmp_path / "train.jsonl"
    path.write_bytes(line(ROW) + b"\n" + line(ANSWER_ONLY))
    with pytest.raises(DataError, match=r"train.jsonl:2: field\(s\) solution missing or not a non-empty string; "
                       r"every row needs problem, solution \(answer is optional\); rows with only problem and answer "
                       r"get worked solutions from `sdharness-bootstrap --problems .*train.jsonl --out solved.jsonl`, "
                       r"or train on them with algo=grpo"):
        datamodule(path, algo=algo).setup()


def test_a_grpo_row_without_an_answer_is_refused_by_file_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(line(ROW) + b"\n" + line(SOLUTION_ONLY))
    with pytest.raises(DataError, match=r"train.jsonl:2: field\(s\) answer missing or not a non-empty string; every "
                                        r"row needs problem, answer$"):
        datamodule(path, algo="grpo").setup()


def test_a_grpo_chat_log_without_answers_is_refused_by_file_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(line({**CHAT, "answer": "4"}) + b"\n" + line(CHAT) + b"\n" + line({**CHAT, "answer": "4"}))
    with pytest.raises(DataError, match=r"train.jsonl:2: algo=grpo rewards the answer, but this conversation has no "
                                        r"\"answer\" field; give every conversation one, or use algo=sd"):
        datamodule(path, name="chatlog", algo="grpo").setup()


def test_eval_file_needs_the_answer_not_the_solution(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(line(ROW) + b"\n" + line(ROW))
    (tmp_path / "eval.jsonl").write_bytes(line(ANSWER_ONLY))
    dm = datamodule(tmp_path / "train.jsonl", eval_path=str(tmp_path / "eval.jsonl"))
    dm.setup()
    assert [item["answer"] for item in dm.evaluation] == ["5"]
    (tmp_path / "eval.jsonl").write_bytes(line(SOLUTION_ONLY))
    with pytest.raises(DataError, match=r"eval.jsonl:1: field\(s\) answer missing .*; every row needs problem, answer"):
        datamodule(tmp_path / "train.jsonl", eval_path=str(tmp_path / "eval.jsonl")).setup()


@pytest.mark.slow
def test_grpo_trains_end_to_end_on_an_answer_only_file(tmp_path):
    from sdharness.train import train

    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(line({"problem": f"Start with {i}. Add 3.", "answer": str(i + 3)}) for i in range(5)))
    train(compose_config(TINY + ["data=jsonl", f"data.path={path}", "data.eval_size=1", "algo=grpo",
                                 "algo.group_size=2", "trainer.max_steps=1", "logger.mode=disabled",
                                 "eval.at_start=false"]), tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if r.get("train/reward")]
    assert len(rows) == 1 and float(rows[0]["train/problems_seen"]) == 2.0


# ----------------------------------------------------------------------------- small data sets


def test_data_smaller_than_a_batch_trains_every_step_on_a_smaller_batch(tmp_path, caplog):
    from sdharness.train import train

    rows = [{**ROW, "problem": f"Start with {i}. Add 3."} for i in range(3)]
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(line(row) for row in rows))
    (tmp_path / "eval.jsonl").write_bytes(line(ROW))
    cfg = compose_config(TINY + ["data=jsonl", f"data.path={tmp_path / 'train.jsonl'}",
                                 f"data.eval_path={tmp_path / 'eval.jsonl'}", "data.batch_size=4", "algo=sft",
                                 "trainer.max_steps=3", "logger.mode=disabled", "eval.at_start=false"])
    with caplog.at_level(logging.WARNING, logger="sdharness"):
        train(cfg, tmp_path / "run")
    assert "only 3 training problem(s), fewer than data.batch_size=4" in caplog.text
    rows = read_metrics(tmp_path / "run")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)  # max_steps steps, not zero
    assert float([r for r in rows if r.get("train/problems_seen")][-1]["train/problems_seen"]) == 9.0


def test_one_row_file_trains_and_warns_that_nothing_is_held_out(tmp_path, caplog):
    (tmp_path / "train.jsonl").write_bytes(line(ROW) + b"\n")
    dm = datamodule(tmp_path / "train.jsonl", eval_size=32)
    with caplog.at_level(logging.WARNING, logger="sdharness"):
        dm.setup()
    assert len(dm.train) == 1 and dm.evaluation == []
    assert "has 1 row(s): holding out 0 for eval (data.eval_size=32) leaves 1 to train on" in caplog.text
    assert "no held-out problem to evaluate (data.eval_size=32): eval metrics will be NaN" in caplog.text


def test_eval_size_holding_out_most_of_the_file_warns_naming_the_field(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(line({**ROW, "problem": f"Start with {i}. Add 3."}) for i in range(40)))
    dm = datamodule(path, eval_size=32)
    with caplog.at_level(logging.WARNING, logger="sdharness"):
        dm.setup()
    assert len(dm.train) == 8 and len(dm.evaluation) == 32
    assert "has 40 row(s): holding out 32 for eval (data.eval_size=32) leaves 8 to train on; add rows, lower " \
           "data.eval_size or give data.eval_path" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdharness"):
        datamodule(path, eval_size=20).setup()  # as many held out as trained on: no warning
    assert "holding out" not in caplog.text


# ------------------------------------------------------------------- prompts longer than the context


def _long_file(tmp_path, length=200):
    rows = [ROW, {**ROW, "problem": "x" * length}, {**ROW, "problem": "Start with 4. Add 1."}, ROW]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(line(row) for row in rows))
    return path


def test_prompt_longer_than_the_context_is_skipped_counted_and_logged(tmp_path, caplog):
    dm = datamodule(_long_file(tmp_path), max_context=120)
    with caplog.at_level(logging.WARNING, logger="sdharness"):
        dm.setup()
    assert dm.skipped == {"exceeds context": 1} and len(dm.train) + len(dm.evaluation) == 3
    assert "skipped 1 " in caplog.text and "(exceeds context): prompt + 16 new tokens exceeds the model context of " \
                                            "120" in caplog.text


def test_prompt_longer_than_the_context_is_an_error_naming_file_line_under_strict(tmp_path):
    with pytest.raises(DataError, match=r"train.jsonl:2: the teacher prompt takes \d+ tokens, \+ 16 new tokens .* "
                                        r"more than the model context of 120; shorten .* or set data.strict=false"):
        datamodule(_long_file(tmp_path), max_context=120, strict=True).setup()


def test_strict_is_a_key_of_the_jsonl_data_config():
    cfg = to_train_config(compose_config(TINY + ["data=jsonl", "data.path=x.jsonl", "data.strict=true"]))
    assert cfg.data.strict is True


def test_no_problem_fitting_the_context_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no training problem fits the model context of 20 tokens with 16 new "
                                          r"tokens \(max of rollout.max_new_tokens and eval.max_new_tokens\)"):
        datamodule(_long_file(tmp_path), max_context=20).setup()


def test_skipped_problems_reach_the_run_metrics(tmp_path):
    from sdharness.train import train

    cfg = compose_config(TINY + ["data=jsonl", f"data.path={_long_file(tmp_path, 1100)}", "data.eval_size=1",
                                 "algo=sft", "trainer.max_steps=1",  # tiny_random's context: 1024
                                 "logger.mode=disabled", "eval.at_start=false"])
    train(cfg, tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if r.get("data/skipped")]
    assert rows and float(rows[0]["data/skipped"]) == 1.0 and float(rows[0]["data/skipped_exceeds_context"]) == 1.0


# ------------------------------------------------------------------------- config values and names

# (overrides, ConfigError message as a regex)
BAD_VALUES = {
    "tau_zero": (["aggregation.tau=0"], r"aggregation.tau must be a finite positive number, got 0.0; e.g. "
                 r"aggregation.tau=2.0"),
    "tau_negative": (["aggregation.tau=-1"], r"aggregation.tau must be a finite positive number, got -1.0"),
    "tau_infinite": (["aggregation.tau=inf"], r"aggregation.tau must be a finite positive number, got inf"),
    "kl_bound_zero": (["aggregation=trust_region", "aggregation.kl_bound=0"], r"aggregation.kl_bound must be a finite "
                      r"positive number, got 0.0; e.g. aggregation.kl_bound=0.1 \(trust_region\)"),
    "tau_on_trust_region": (["aggregation=trust_region", "aggregation.tau=0.05"], r"^aggregation.tau=0.05 does not "
                            r"apply to aggregation=trust_region, whose parameter is aggregation.kl_bound \(bound on "
                            r"KL\(target\|\|student\) per token, nats\); drop aggregation.tau \(set "
                            r"aggregation.kl_bound\) or choose aggregation=product or clip$"),
    "tau_on_teacher": (["aggregation=teacher", "aggregation.tau=1.0"], r"^aggregation.tau=1 does not apply to "
                       r"aggregation=teacher, which has no parameter; drop aggregation.tau or choose "
                       r"aggregation=product or clip$"),
    "tau_on_entropy_matched": (["method=sd_entropy_matched", "aggregation.tau=0.5"], r"^aggregation.tau=0.5 does not "
                               r"apply to aggregation=entropy_matched, which has no parameter"),
    "kl_bound_on_clip": (["aggregation=clip", "aggregation.kl_bound=0.2"], r"^aggregation.kl_bound=0.2 does not "
                         r"apply to aggregation=clip, whose parameter is aggregation.tau \(temperature\); drop "
                         r"aggregation.kl_bound \(set aggregation.tau\) or choose aggregation=trust_region$"),
    "rollout_temperature_zero": (["rollout.temperature=0"], r"rollout.temperature must be a finite positive number, "
                                 r"got 0.0; rollouts sample, so set e.g. rollout.temperature=1.0"),
    "negative_problem_budget": (["budget.problems=-5"], r"budget.problems must be >= 0 \(0: no limit\), got -5"),
    "negative_token_budget": (["budget.generated_tokens=-1"], r"budget.generated_tokens must be >= 0 \(0: no limit\)"),
    "negative_time_budget": (["budget.seconds=-0.5"], r"budget.seconds must be >= 0 \(0: no limit\), got -0.5"),
    "eval_max_new_tokens_zero": (["eval.max_new_tokens=0"], r"eval.max_new_tokens must be >= 1, got 0; the eval "
                                 r"decodes the answer, e.g. eval.max_new_tokens=96"),
    "eval_batch_size_zero": (["eval.batch_size=0"], r"eval.batch_size must be >= 1, got 0; e.g. eval.batch_size=16"),
    "unknown_checker": (["data.checker=sympy"], r"data.checker='sympy' is unknown; choose one of: builtin, math_verify"),
    "grpo_group_size_1": (["algo=grpo", "algo.group_size=1"], r"algo.group_size=1: GRPO needs at least 2 samples per "
                          r"problem.*; set algo.group_size=8"),
    "student_template_without_problem": (["prompt.student='Solve it.'"], r"prompt.student must use exactly the "
                                         r"placeholder \{problem\}; the student never sees the solution; missing "
                                         r"\{problem\}"),
    "student_template_with_solution": (["prompt.student='{problem} {solution}'"], r"prompt.student must use exactly "
                                       r"the placeholder \{problem\}.*; unknown \{solution\}"),
    "teacher_template_without_solution": (["prompt.teacher='Solve: {problem}'"], r"prompt.teacher must use exactly "
                                          r"the placeholders \{problem\} and \{solution\}; missing \{solution\}"),
    "teacher_template_unknown_placeholder": (["prompt.teacher='{problem} {solution} {hint}'"], r"prompt.teacher .*; "
                                             r"unknown \{hint\} \(write a literal brace as \{\{ or \}\}\)"),
    "teacher_template_unmatched_brace": (["prompt.teacher='{problem} {solution'"], r"prompt.teacher='\{problem\} "
                                         r"\{solution' is not a valid template \(expected '\}' before end of string\)"),
    "chat_hint_without_accepted": (["data=chatlog", "prompt.chat_hint='Use the reply.'"], r"prompt.chat_hint must use "
                                   r"exactly the placeholder \{accepted\} \(the accepted reply\); missing \{accepted\}"),
    "unknown_aggregation_name": (["aggregation.name=geometric"], r"aggregation.name='geometric' is unknown; choose "
                                 r"one of: teacher, product, clip, entropy_matched"),
    "unknown_loss_support": (["loss.support=top"], r"loss.support='top' is unknown; choose one of: full, topk, "
                             r"sampled"),
    "top_k_zero": (["loss.support=topk", "loss.top_k=0"], r"loss.top_k must be >= 1, got 0"),
    "unknown_topk_from": (["loss.topk_from=target"], r"loss.topk_from='target' is unknown; choose one of: teacher, "
                          r"student"),
    "sampled_forward_kl": (["loss.support=sampled"], r"loss.support=sampled estimates the reverse KL's gradient, not "
                           r"forward_kl's; set loss.divergence=reverse_kl"),
    "entry_clip_zero": (["loss.entry_clip=0"], r"loss.entry_clip must be a finite positive number, got 0.0; or null"),
    "entry_clip_reverse_kl": (["loss=reverse_kl", "loss.entry_clip=0.1"], r"loss.entry_clip caps forward-KL terms "
                              r"over the full vocabulary; set loss.divergence=forward_kl and loss.support=full"),
    "sampled_on_logged_chats": (["data=chatlog", "loss=sampled"], r"loss.support=sampled estimates the reverse KL "
                                r"from tokens the student sampled; data=chatlog completions are logged, not sampled"),
    "is_clip_negative": (["loss.is_clip=-1"], r"loss.is_clip must be a finite positive number, got -1.0; or null"),
    "forced_unknown_key": (["+aggregation.temperature=2"], r"unknown config key\(s\): aggregation.temperature "
                           r"\(known: kl_bound, name, tau\)"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_config_value_names_the_field_and_fix(case):
    overrides, message = BAD_VALUES[case]
    with pytest.raises(ConfigError, match=message):
        to_train_config(compose_config(TINY + overrides))


def test_generate_and_bootstrap_take_each_aggregations_parameter_by_its_own_flag():
    """``--tau`` (product, clip) and ``--kl-bound`` (trust_region) default to what ``aggregation=<name>``
    sets; another aggregation's flag is one line naming the flag and its fix."""
    from sdharness.tools.generate import aggregation_parameter, parse_args

    def parameter(*flags):
        return aggregation_parameter(parse_args(["--model", "tiny_random", "--problems", "p", "--out", "o", *flags]))

    assert parameter() == 2.0 and parameter("--aggregation", "clip") == 1.0 and parameter("--tau", "0.5") == 0.5
    assert parameter("--aggregation", "trust_region") == 0.1
    assert parameter("--aggregation", "trust_region", "--kl-bound", "0.05") == 0.05
    assert parameter("--aggregation", "teacher") is None
    with pytest.raises(ConfigError, match=r"^--tau 0.05 does not apply to --aggregation trust_region, whose "
                       r"parameter is --kl-bound \(bound on KL\(target\|\|student\) per token, nats\); drop --tau$"):
        parameter("--aggregation", "trust_region", "--tau", "0.05")
    with pytest.raises(ConfigError, match=r"^--kl-bound 0.1 does not apply to --aggregation entropy_matched, which "
                       r"has no parameter; drop --kl-bound$"):
        parameter("--aggregation", "entropy_matched", "--kl-bound", "0.1")
    with pytest.raises(ConfigError, match=r"^--kl-bound must be a finite positive number, got 0.0$"):
        parameter("--aggregation", "trust_region", "--kl-bound", "0")


def test_integer_tau_is_accepted_as_a_float():
    cfg = to_train_config(compose_config(TINY + ["aggregation.tau=2"]))
    assert isinstance(cfg.aggregation.tau, float) and cfg.aggregation.tau == 2.0


# (override, message of composition_error_message, exactly); Hydra itself fails to compose these.
UNCOMPOSABLE = {
    "misspelt_group_option": ("aggregation=prodct", "aggregation=prodct is unknown; choose one of: clip, "
                              "entropy_matched, product, teacher, trust_region (did you mean aggregation=product?)"),
    "misspelt_key": ("aggregation.taux=1", "aggregation.taux is not a config key (did you mean aggregation.tau?); "
                     "aggregation has: name, tau, kl_bound"),
    "misspelt_top_level_key": ("sed=1", "sed is not a config key (did you mean seed?); the config has: algo, model"),
    "misspelt_group": ("aggregatio=clip", "aggregatio is not a config key (did you mean aggregation?)"),
    "ill_typed_value": ("aggregation.tau=hot", "aggregation.tau=hot: Value 'hot' of type 'str' could not be "
                        "converted to Float"),
}


@pytest.mark.parametrize("case", list(UNCOMPOSABLE))
def test_uncomposable_config_names_the_valid_choices(case):
    override, message = UNCOMPOSABLE[case]
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(TINY + [override])
    assert composition_error_message(error.value).startswith(message)
    assert "Config search path" not in composition_error_message(error.value)


# ---------------------------------------------------------------------------- models and tokenizers


def test_nonexistent_model_path_names_the_field():
    from sdharness.models import load_model_and_tokenizer

    cfg = to_train_config(compose_config(TINY + ["model=local", "model.path=/nope"]))  # validates: path is set
    with pytest.raises(ConfigError, match=r"model.path='/nope': /nope does not exist; point model.path at a local "
                                          r"model directory \(config.json \+ weights\)"):
        load_model_and_tokenizer(cfg.model)


def test_a_base_pretrained_on_another_task_is_refused_before_it_loads(tmp_path, monkeypatch):
    """Was silent: a base on a task it was not pretrained on trained, and scored near zero."""
    from sdharness.models import PRETRAIN_REPORT, check_pretrained_task
    from sdharness.train import train

    monkeypatch.setattr("sdharness.train.load_model_and_tokenizer", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"^data.task='chain', but model.path='pkg://sdharness/assets/testbed' "
                                          r"was pretrained on data.task='columns' \(.*pretrain_report.json\); set "
                                          r"data.task=columns, or choose a base pretrained on chain$"):
        train(compose_config(["experiment=testbed", "model=testbed", "data.task=chain"]), tmp_path)
    columns = to_train_config(compose_config(["model=testbed", "data.task=columns"]))
    check_pretrained_task(columns.model, columns.data)
    (tmp_path / "base").mkdir()  # a base without a pretraining report (not made by testbed/pretrain.py)
    other = to_train_config(compose_config(["model=local", f"model.path={tmp_path / 'base'}", "data.task=columns"]))
    check_pretrained_task(other.model, other.data)
    (tmp_path / "base" / PRETRAIN_REPORT).write_text(json.dumps({"config": {"seed": 0}}))  # before tasks: chain
    with pytest.raises(ConfigError, match="was pretrained on data.task='chain'"):
        check_pretrained_task(other.model, other.data)


def test_model_directory_without_config_json_is_named(tmp_path):
    from sdharness.models import load_model_and_tokenizer

    cfg = to_train_config(compose_config(TINY + ["model=local", f"model.path={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"no config.json in .*; for a .gguf file use model.source=gguf"):
        load_model_and_tokenizer(cfg.model)


def test_model_directory_with_weights_but_no_tokenizer_is_named(tmp_path):
    from sdharness.models import char_tokenizer, load_model_and_tokenizer, tiny_random_model

    tiny_random_model(to_train_config(compose_config(TINY)).model, char_tokenizer()).save_pretrained(tmp_path)
    cfg = to_train_config(compose_config(TINY + ["model=local", f"model.path={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"model.path='.*': .* has no tokenizer \(none of tokenizer.json, "
                                          r"tokenizer.model, vocab.json, spiece.model\); save it beside the weights"):
        load_model_and_tokenizer(cfg.model)


def test_corrupt_gguf_file_is_one_error_naming_the_field(tmp_path):
    from sdharness.models import load_model_and_tokenizer

    (tmp_path / "B.gguf").write_bytes(bytes(range(256)) * 16)
    cfg = to_train_config(compose_config(TINY + ["model=local", "model.source=gguf", f"model.path={tmp_path}",
                                                 "model.gguf_file=B.gguf", f"model.cache_dir={tmp_path / 'cache'}"]))
    with pytest.raises(ConfigError, match=r"model.gguf_file='B.gguf': .*B.gguf cannot be read as a GGUF model \(.*does "
                                          r"not start with the GGUF magic bytes.*\); point model.gguf_file at a GGUF"):
        load_model_and_tokenizer(cfg.model)


def test_gguf_conversion_cache_is_keyed_by_the_file_not_the_model_name(tmp_path, monkeypatch, caplog):
    """Two GGUF files under one model.name: each run gets its own file's weights, and the log
    names the file converted (the conversion itself is replaced by saving a seeded tiny model)."""
    import sdharness.models as models

    converted = []

    def convert(cfg, source, target):
        seed = {"A.gguf": 1, "B.gguf": 2}[cfg.gguf_file]
        tokenizer = models.char_tokenizer()
        models.tiny_random_model(models.ModelConfig(seed=seed), tokenizer).save_pretrained(target)
        tokenizer.save_pretrained(target)
        converted.append(cfg.gguf_file)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    weights = {}
    for name in ("A", "B", "A"):
        directory = tmp_path / f"dir_{name}"
        if not directory.exists():
            directory.mkdir()
            (directory / f"{name}.gguf").write_bytes(name.encode() * 100)
        cfg = to_train_config(compose_config(TINY + ["model=local", "model.source=gguf", f"model.path={directory}",
                                                     f"model.gguf_file={name}.gguf",
                                                     f"model.cache_dir={tmp_path / 'cache'}"]))
        with caplog.at_level(logging.INFO, logger="sdharness"):
            model, _ = models.load_model_and_tokenizer(cfg.model)
        assert f"{directory / (name + '.gguf')}" in caplog.text
        weights.setdefault(name, []).append(model.model.embed_tokens.weight.detach().clone())
    expected = [models.tiny_random_model(models.ModelConfig(seed=seed), models.char_tokenizer()).model.embed_tokens.weight
                for seed in (1, 2)]
    assert torch.equal(weights["A"][0], expected[0]) and torch.equal(weights["B"][0], expected[1])
    assert torch.equal(weights["A"][1], expected[0]) and converted == ["A.gguf", "B.gguf"]  # A's cache reused


@pytest.mark.parametrize("name", ["jsonl", "chatlog"])
def test_required_chat_template_missing_from_the_tokenizer(tmp_path, name):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(line(CHAT if name == "chatlog" else ROW) for _ in range(3)))
    prompt = PromptConfig(chat_template="always")
    with pytest.raises(ConfigError, match=r"prompt.chat_template=always, but this tokenizer has no chat template; "
                                          r"set prompt.chat_template=never"):
        datamodule(path, name=name, prompt=prompt).setup()


# ---------------------------------------------------------------------- rollouts with no tokens


@pytest.fixture
def eos_first_model(monkeypatch):
    """tiny_random whose every next-token distribution puts all but e^-100 of its mass on EOS."""
    import sdharness.models as models

    build = models.tiny_random_model

    def eos_first(cfg, tokenizer):
        model = build(cfg, tokenizer)
        bias = torch.zeros(len(tokenizer))
        bias[tokenizer.eos_token_id] = 100.0
        model.get_output_embeddings().register_forward_hook(lambda module, inputs, out: out + bias.to(out.dtype))
        return model

    monkeypatch.setattr(models, "tiny_random_model", eos_first)


@pytest.mark.parametrize("overrides", [["algo=sd"], ["algo=sft"], ["algo=grpo", "algo.group_size=2"]],
                         ids=["sd", "sft", "grpo"])
def test_rollouts_that_stop_at_once_give_a_finite_logged_step(tmp_path, eos_first_model, overrides):
    from sdharness.train import train

    train(compose_config(TINY + overrides + ["logger.mode=disabled", "eval.at_start=false"]), tmp_path)
    rows = [r for r in read_metrics(tmp_path) if r.get("train/loss")]
    assert len(rows) == 2 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert all(float(r["train/skipped_steps"]) == 0 for r in rows)
    if overrides[0] != "algo=sft":  # g is EOS alone
        assert all(float(r["train/completion_length"]) == 1.0 for r in rows)


def test_rollouts_with_no_loss_tokens_skip_the_update_then_stop(tmp_path, eos_first_model):
    """Under loss.positions=reasoning an EOS-only g has no loss token: zero loss, logged as such,
    and no update (AdamW would move the weights on momentum alone); K such steps in a row stop
    the run with a message saying why."""
    from sdharness.methods.policy import SkippedUpdatesError
    from sdharness.train import train

    overrides = ["loss.positions=reasoning", "trainer.max_consecutive_skipped=3", "logger.mode=disabled",
                 "eval.at_start=false"]
    with pytest.raises(SkippedUpdatesError, match=r"3 consecutive updates were skipped \(the last for no loss "
                       r"tokens\); stopping. No checkpoint was written yet \(trainer.checkpoint_every_n_steps=50\); "
                       r"lower optim.lr or check the data and rollouts \(are completions empty\?\)$"):
        train(compose_config(TINY + overrides), tmp_path)
    rows = [r for r in read_metrics(tmp_path) if r.get("train/loss")]
    # (the third skip raises inside its step, before it logs)
    assert [float(r["train/loss_tokens"]) for r in rows] == [0.0, 0.0]
    assert [float(r["train/loss"]) for r in rows] == [0.0, 0.0]
    assert [float(r["train/skipped_steps"]) for r in rows] == [1.0, 2.0]


# ------------------------------------------------------------------------------ the command line


def test_uncomposable_config_through_the_wrapped_hydra_entry_point(tmp_path, monkeypatch, capsys):
    from sdharness.cli import cli_errors
    from sdharness.train import main

    monkeypatch.setattr(sys, "argv", ["sdharness-train", *TINY, f"hydra.run.dir={tmp_path}", "aggregation=prodct"])
    with pytest.raises(SystemExit) as exit_:
        cli_errors(main)()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("sdharness: error: aggregation=prodct is unknown; choose one of: clip, "
                                       "entropy_matched, product, teacher, trust_region (did you mean aggregation=product?)\n")
    assert "HYDRA_FULL_ERROR" not in os.environ


@pytest.mark.parametrize("app, argv, message", [
    # A misspelt key is matched against the app's own schema (was: sdharness-train's keys, no suggestion).
    ("sdharness.tools.probe", ["max_new_tokenz=5"],
     "sdharness: error: max_new_tokenz is not a config key (did you mean max_new_tokens?); the config has: "),
    ("testbed.pretrain", ["stepz=5"], "sdharness: error: stepz is not a config key (did you mean steps?); "),
    # The pretraining app's own errors are one line, not a traceback.
    ("testbed.pretrain", ["init_from=/nonexistent/base"],
     "sdharness: error: init_from='/nonexistent/base': /nonexistent/base does not exist; point init_from at a base "
     "directory written by python -m testbed.pretrain\n"),
    ("testbed.pretrain", ["eval_every=0", "+stop_when.no_hint_hard=0.3"],
     "sdharness: error: stop_when needs the quick evals it is checked on; set eval_every > 0 (e.g. eval_every=100)\n"),
    # Was silent: a stage config without init_from trained from scratch with the stage's settings.
    ("testbed.pretrain", ["--config-name", "pretrain_columns_practice"],
     "sdharness: error: init_from must be set on the command line, e.g. init_from=DIR: this config is a stage "
     "that continues a base\n"),
])
def test_each_app_answers_bad_input_with_one_line(tmp_path, monkeypatch, capsys, app, argv, message):
    import importlib

    main = importlib.import_module(app).main
    monkeypatch.setattr(sys, "argv", [app, *argv, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    written = {path.name for path in tmp_path.rglob("*")}  # Hydra's own .hydra/ and job log aside, nothing
    assert not written & {"model.safetensors", "pretrain_report.json", "probe.json", "metrics.csv"}, written


def test_unquoted_template_override_suggests_quoting():
    from hydra.errors import OverrideParseException

    with pytest.raises(OverrideParseException) as error:
        compose_config(TINY + ["prompt.student=Q: {problem} A:"])
    assert composition_error_message(error.value).endswith(
        "must be quoted for Hydra inside the shell's quotes: 'prompt.student=\"Q: {problem} A:\"'")
    cfg = to_train_config(compose_config(TINY + ['prompt.student="Q: {problem} A:"']))  # the suggested form works
    assert cfg.prompt.student == "Q: {problem} A:"


def test_failure_record_carries_the_whole_error_line():
    from sdharness.jobs import failure_record

    try:
        {}["answer"]
    except KeyError as error:
        record = failure_record(error)
    assert record["message"] == "'answer'" and record["error_line"] == "KeyError: 'answer'"


@pytest.mark.slow
def test_multirun_with_a_failed_job_finishes_the_others_and_exits_1(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(line({**ROW, "problem": f"Start with {i}. Add 3."}) for i in range(3)))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sdharness.train", "-m", *TINY, "logger.mode=disabled", "threads=1",
                             "data=jsonl", f"data.path={tmp_path / 'missing.jsonl'},{good}", "data.eval_size=1",
                             "algo=sft", "trainer.max_steps=1", "eval.at_start=false",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert (tmp_path / "sweep" / "1" / "final_model").is_dir()  # the job after the failed one ran
    record = json.loads((tmp_path / "sweep" / "0" / "FAILED.json").read_text())
    assert record["error_line"].startswith("DataError: data.path: ") and "missing.jsonl does not exist" in \
        record["error_line"]
    assert f"sdharness: error: 1 job(s) of the sweep failed, each recorded in its FAILED.json: {tmp_path / 'sweep' / '0'}" \
        in result.stderr


CLI = {
    "misspelt_group_option": (["aggregation=prodct"], "sdharness: error: aggregation=prodct is unknown; choose one "
                              "of: clip, entropy_matched, product, teacher"),
    "nonexistent_model_path": (["model=local", "model.path=/nope"], "sdharness: error: model.path='/nope': /nope "
                               "does not exist; point model.path at a local model directory"),
    "data_path_a_directory": (["data=jsonl", "data.path=tests"], "sdharness: error: data.path: tests is a directory; "
                              "point data.path at a JSONL file in it"),
    "eval_batch_size_zero": (["eval.batch_size=0"], "sdharness: error: eval.batch_size must be >= 1, got 0"),
    "eval_max_new_tokens_zero": (["eval.max_new_tokens=0"], "sdharness: error: eval.max_new_tokens must be >= 1"),
    "unquoted_template": (["prompt.student=Q: {problem} A:"], "must be quoted for Hydra inside the shell's quotes: "
                          "'prompt.student=\"Q: {problem} A:\"'"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CLI))
def test_command_line_exits_2_with_one_error_line(tmp_path, case):
    overrides, message = CLI[case]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sdharness.train", *TINY, "logger.mode=disabled",
                             f"hydra.run.dir={tmp_path}", *overrides], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
@pytest.mark.parametrize("trainer", ["gpu", "ddp", "fsdp"])
def test_gpu_trainer_without_a_gpu_says_what_to_use(tmp_path, trainer):
    from sdharness.train import train

    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu .*no CUDA GPU is visible here; on CPU use "
                       r"trainer=cpu, or trainer=ddp \(or fsdp\) trainer.accelerator=cpu"):
        train(compose_config(TINY + [f"trainer={trainer}"]), tmp_path)
