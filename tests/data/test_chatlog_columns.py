"""The testbed's chat log (data=chatlog_columns): the shipped file, its arms' targets and the
wrong-accepted rate quick eval scores."""

import json
import re

import pytest

from scripts import synthetic_chats
from scripts.synthetic_chats import columns_chats, main as chatlog_main
from sdharness.config import to_train_config
from sdharness.data.answers import extract_answer, is_correct
from sdharness.data.columns import PROBLEM, digit_pairs, add_columns, assemble, parse_line
from sdharness.data.datamodule import ProblemDataModule
from sdharness.eval.quick import EvalResult, completion_metrics
from sdharness.models import char_tokenizer, resolve_path
from sdharness.paths import config_dir
from tests.conftest import compose_config

SHIPPED = "pkg://sdharness/assets/chatlog/columns_chats.jsonl"
# The recorded command (the generator's docstring and conf/data/chatlog_columns.yaml say it).
RECORDED = ["--task", "columns", "--seed", "0", "--size", "2304", "--difficulty", "hard", "--wrong-accepted-share", "0.2"]
COLUMN_NAMES = ["units", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions"]


def shipped_rows():
    return [json.loads(line) for line in resolve_path(SHIPPED, "data.path").read_text(encoding="utf-8").splitlines()]


def one_line(text: str) -> str:
    return " ".join(text.replace("\\", " ").replace("#", " ").split())


def test_the_recorded_command_rewrites_the_shipped_file_byte_for_byte(tmp_path):
    recorded = "python -m scripts.synthetic_chats write sdharness/assets/chatlog/columns_chats.jsonl " + " ".join(RECORDED)
    assert recorded in one_line(synthetic_chats.__doc__)
    assert recorded in one_line((config_dir("conf") / "data" / "chatlog_columns.yaml").read_text())
    chatlog_main(["write", str(tmp_path / "columns_chats.jsonl"), *RECORDED])
    shipped = resolve_path(SHIPPED, "data.path")
    assert (tmp_path / "columns_chats.jsonl").read_bytes() == shipped.read_bytes()
    assert shipped.stat().st_size < 2_000_000


def test_the_wrong_accepted_share_is_exact_and_recorded_in_each_row():
    rows = shipped_rows()
    assert len(rows) == 2304 and len({row["messages"][0]["content"] for row in rows}) == 2304
    assert sum(not row["accepted_correct"] for row in rows) == 461  # round(0.2 x 2304)
    for row in rows:  # answer is the truth; the flag says whether the accepted (last) answer is it
        top, bottom = PROBLEM.search(row["messages"][0]["content"]).groups()
        assert row["answer"] == str(int(top) + int(bottom))
        assert is_correct(row["messages"][-1]["content"], row["answer"]) == row["accepted_correct"]
    assert [sum(not chat["accepted_correct"] for chat in columns_chats(5, 10, "hard", share)) for share in (0, .5, 1)] == [0, 5, 10]


def written_columns(text: str):
    return [parse_line(line) for line in text.split("\n")[:-1]]


def test_each_slipped_answer_slips_in_the_column_the_user_then_names_and_carries_it_through():
    for row in shipped_rows():
        messages = row["messages"]
        pairs = digit_pairs(*PROBLEM.search(messages[0]["content"]).groups())
        right = [column.line() for column in add_columns(pairs)]
        slipped = messages[1:-1:2] if row["accepted_correct"] else messages[1::2]
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert not is_correct(messages[1]["content"], row["answer"])  # every first answer slips
        named = None
        for index, message in enumerate(slipped):
            columns = written_columns(message["content"])
            assert None not in columns and len(columns) == len(pairs)
            first_wrong = next(i for i, column in enumerate(columns) if column.line() != right[i])
            assert first_wrong != named  # a retry fixes the column the user named
            # One slipped column; every later line adds its column's digits and the carry the line before states.
            assert [c.line() for c in columns[first_wrong + 1:]] == [c.line() for c in add_columns(
                pairs[first_wrong + 1:], columns[first_wrong].total >= 10)]
            assert extract_answer(message["content"]) == assemble(columns) != row["answer"]
            if 2 * index + 2 < len(messages) - 1:  # the user's reply names the slipped column
                named = first_wrong
                assert re.search(rf"\b{COLUMN_NAMES[named]} column\b", messages[2 * index + 2]["content"])
        assert len(messages) in (4, 6)


def arm_datamodule(tmp_path, turns):
    rows = [{"messages": [{"role": "user", "content": "Add 19 and 25. What is the sum?"},
                          {"role": "assistant", "content": "9+5=13\n1+2+1=4\nThe answer is 43."},
                          {"role": "user", "content": "Check the units column."},
                          {"role": "assistant", "content": "9+5=14\n1+2+1=4\nThe answer is 44."}],
             "answer": "44", "accepted_correct": True}] * 2
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = to_train_config(compose_config(["experiment=protocol", "data=chatlog_columns", "data.validation_size=0",
                                          f"data.path={path}", "data.eval_size=1", f"data.turns={turns}"]))
    dm = ProblemDataModule(cfg.data, cfg.prompt, char_tokenizer(), max_context=512, max_new_tokens=96)
    dm.setup()
    return dm


@pytest.mark.parametrize("turns, target", [("accepted", "9+5=14\n1+2+1=4\nThe answer is 44."),
                                           ("first", "9+5=13\n1+2+1=4\nThe answer is 43.")])
def test_sft_targets_are_the_accepted_or_the_first_logged_answer_after_the_question(tmp_path, turns, target):
    tok = char_tokenizer()
    batch = arm_datamodule(tmp_path, turns).train_dataloader().__iter__().__next__()
    assert len(batch) == 1 and batch.logged
    # SFT's cross-entropy runs over solution_ids where solution_mask holds (sdharness/methods/sft.py).
    assert batch.solution_ids[0][batch.solution_mask[0]].tolist() == tok(target, add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    assert tok.decode(batch.student_ids[0][batch.student_mask[0].bool()]) == "Q: Add 19 and 25. What is the sum?\nA:\n"
    assert tok.decode(batch.teacher_ids[0][batch.teacher_mask[0].bool()]) == (
        "Q: Add 19 and 25. What is the sum?\nReference solution:\n9+5=14\n1+2+1=4\nThe answer is 44.\nA:\n")


def test_wrong_accepted_rate_counts_greedy_answers_equal_to_a_wrongly_accepted_one(tmp_path):
    def chat(answer, accepted):
        return {"problem": "q", "answer": answer, "accepted": f"lines\nThe answer is {accepted}."}

    problems = [chat("44", "44"), chat("44", "43"), chat("50", "51"), chat("60", "61"), {"problem": "p", "answer": "7"}]
    texts = ["The answer is 43.", "The answer is 43.", "The answer is 50.", "no answer", "The answer is 7."]
    metrics = completion_metrics(texts, problems, "The answer is", task="columns")
    # Three chats accepted a wrong answer; one completion gives it (43); the right-accepted chat and the
    # problem that is no chat do not count.
    assert metrics["wrong_accepted_rate"] == pytest.approx(1 / 3) and metrics["accuracy"] == pytest.approx(2 / 5)
    assert "wrong_accepted_rate" not in completion_metrics(texts[:1], problems[:1], "The answer is", task="columns")
    assert EvalResult(.5, 0., 0., 10., 4).as_metrics() == {"eval/accuracy": .5, "eval/early_answer_rate": 0.,
                                                          "eval/leakage_rate": 0., "eval/completion_length": 10.}
    assert EvalResult(.5, 0., 0., 10., 4, .25).as_metrics("val")["val/wrong_accepted_rate"] == .25


def test_the_eval_split_keeps_the_accepted_answer_for_the_rate(tmp_path):
    dm = arm_datamodule(tmp_path, "first")
    problems = dm.collate(dm.evaluation).problems
    assert problems == [{"problem": "Add 19 and 25. What is the sum?", "solution": "9+5=13\n1+2+1=4\nThe answer is 43.",
                         "answer": "44", "accepted": "9+5=14\n1+2+1=4\nThe answer is 44."}]


def test_accepted_turns_reply_to_the_opening_and_name_the_accepted_turn():
    from sdharness.data.chatlog import chat_examples

    roles = ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    conversation = {"messages": [{"role": r, "content": f"m{i}"} for i, r in enumerate(roles)], "line": 3}
    [example] = chat_examples([conversation], turns="accepted")
    assert [m["content"] for m in example["context"]] == ["m0", "m1"] and example["completion"] == "m6"
    assert example["turn"] == 6 and example["accepted"] == "m6" and example["problem"] == "m1"
    both = chat_examples([conversation], turns="accepted", include_final=True)
    assert [len(e["context"]) for e in both] == [2, 6] and {e["completion"] for e in both} == {"m6"}
