"""Logged chats -> self-distillation with no generation (data=chatlog)."""

import csv
import json
import math

import pytest

from sdharness.data.chatlog import chat_examples, encode_chat, load_chats, read_chats
from scripts.synthetic_chats import main as chatlog_main, synthetic_chats
from sdharness.config import ConfigError, DataConfig, PromptConfig
from sdharness.data.datamodule import DataError, ProblemDataModule
from sdharness.models import char_tokenizer, resolve_path
from sdharness.data.answers import is_correct
from tests.conftest import TINY, compose_config

PLAIN = PromptConfig(chat_template="never")
SHIPPED = "pkg://sdharness/assets/chatlog/arithmetic_chats.jsonl"


def chat(*turns, **extra):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": role, "content": text} for role, text in zip(roles, turns)], **extra}


GOOD = chat("Start with 2. Add 3.", "2 + 3 = 6", "Wrong.", "2 + 3 = 5\nThe answer is 5.", answer=5)


def write_lines(tmp_path, lines, name="chats.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines))
    return path


def datamodule(path, *, strict=False, max_context=1024, **data):
    return ProblemDataModule(DataConfig(name="chatlog", path=str(path), eval_size=1, batch_size=2, strict=strict,
                                        **data), PLAIN, char_tokenizer(), max_context=max_context, max_new_tokens=16)


# (bad line 3, skip reason or None when it is always an error, message under strict)
CASES = {
    "ends_with_user": (chat("q", "a", "are you sure?"), "ends with a user message", r"chats.jsonl:3: unusable "
                       r"conversation \(ends with a user message\); the last message must be the accepted assistant"),
    "no_assistant_turn": ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
                          "no assistant turn", r"chats.jsonl:3: unusable conversation \(no assistant turn\)"),
    "unknown_role": ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": None},
                                   {"role": "assistant", "content": "a"}]}, "unknown role",
                     r"chats.jsonl:3: unusable conversation \(unknown role\); roles must be system, user or assistant"),
    "too_long": (chat("x" * 600, "a", "no", "b"), "exceeds context",
                 r"chats.jsonl:3: the assistant turn at messages\[1\] needs \d+ tokens .* model context is 400"),
    "malformed_json": (b'{"messages": [', None, r"chats.jsonl:3: not valid JSON"),
    "not_an_object": (b'[{"role": "user", "content": "q"}]', None, r"chats.jsonl:3: expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unusable_conversations_are_skipped_and_counted_or_rejected_under_strict(tmp_path, case):
    bad, reason, message = CASES[case]
    path = write_lines(tmp_path, [GOOD, GOOD, bad, GOOD])
    if reason is None:  # malformed lines are errors whether or not data.strict is set
        for strict in (False, True):
            with pytest.raises(DataError, match=message):
                datamodule(path, strict=strict, max_context=400).setup()
        return
    dm = datamodule(path, max_context=400)
    dm.setup()
    assert dm.skipped == {reason: 1}
    assert len(dm.train) + len(dm.evaluation) == 3  # GOOD gives one earlier turn; one conversation held out
    with pytest.raises(DataError, match=message):
        datamodule(path, strict=True, max_context=400).setup()


def test_skip_reasons_are_counted_by_read_chats(tmp_path):
    lines = [GOOD, chat("q"), {"messages": [{"role": "user", "content": "q"}]}, chat("q", "a"), b"", GOOD]
    conversations, skipped = read_chats(write_lines(tmp_path, lines), strict=False)
    assert [c["line"] for c in conversations] == [1, 4, 6] and skipped == {"no assistant turn": 2}
    assert conversations[0]["answer"] == "5"  # stringified like read_jsonl does


def test_examples_for_all_first_and_final_turns():
    conversation = chat("q", "a1", "no", "a2", "still no", "a3")
    examples = chat_examples([conversation], turns="all", include_final=False)
    assert [e["completion"] for e in examples] == ["a1", "a2"]
    assert [len(e["context"]) for e in examples] == [1, 3] and {e["accepted"] for e in examples} == {"a3"}
    assert [e["completion"] for e in chat_examples([conversation], turns="first")] == ["a1"]
    assert [e["completion"] for e in chat_examples([conversation], turns="all", include_final=True)] == ["a1", "a2", "a3"]
    assert [e["completion"] for e in chat_examples([conversation], turns="first", include_final=True)] == ["a1", "a3"]
    assert chat_examples([chat("q", "only")], turns="all") == []
    assert [e["completion"] for e in chat_examples([chat("q", "only")], include_final=True)] == ["only"]


def test_teacher_context_holds_the_accepted_answer_and_the_student_context_does_not():
    tok = char_tokenizer()
    context = [{"role": "system", "content": "Be brief."}] + GOOD["messages"][:1]
    accepted = GOOD["messages"][-1]["content"]
    student = tok.decode(encode_chat(PLAIN, tok, context), skip_special_tokens=True)
    teacher = tok.decode(encode_chat(PLAIN, tok, context, hint=accepted), skip_special_tokens=True)
    assert student == "System: Be brief.\nUser: Start with 2. Add 3.\nAssistant:"
    assert accepted in teacher and accepted not in student and "accepted" not in student
    assert teacher.startswith("System: A reply the user later accepted") and teacher.count("System:") == 1
    assert teacher.endswith("Be brief.\nUser: Start with 2. Add 3.\nAssistant:")


def test_chat_template_gets_the_hint_as_the_first_system_message():
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    text = tok.decode(encode_chat(PromptConfig(), tok, GOOD["messages"][:1], hint="42"), skip_special_tokens=True)
    assert text.startswith("<system>A reply the user later accepted") and text.endswith("<user>Start with 2. Add 3.\n<assistant>")


def test_unknown_turns_option_is_rejected():  # prompt.chat_hint placeholders: tests/test_bad_input.py
    with pytest.raises(ConfigError, match="data.turns='last' is unknown"):
        DataConfig(name="chatlog", path="x.jsonl", turns="last")


def test_missing_data_path_names_the_field():
    with pytest.raises(ConfigError, match=r"data.path='pkg://sdharness/assets/nope.jsonl': .* does not exist"):
        load_chats(DataConfig(name="chatlog", path="pkg://sdharness/assets/nope.jsonl"))


def test_shipped_chat_log_loads_with_zero_skips_and_refines_wrong_answers():
    conversations, skipped = read_chats(resolve_path(SHIPPED, "data.path"), strict=True)
    assert not skipped and 200 <= len(conversations) <= 1000
    assert resolve_path(SHIPPED, "data.path").stat().st_size < 500_000
    for conversation in conversations:
        answers = [m["content"] for m in conversation["messages"] if m["role"] == "assistant"]
        assert is_correct(answers[-1], conversation["answer"])
        assert not any(is_correct(text, conversation["answer"]) for text in answers[:-1])
    dm = ProblemDataModule(DataConfig(name="chatlog", path=SHIPPED, eval_size=32, strict=True), PromptConfig(), char_tokenizer(),
                           max_context=1024, max_new_tokens=96)
    dm.setup()
    assert not dm.skipped and len(dm.evaluation) == 32 and all("answer" in item for item in dm.evaluation)


def test_write_command_is_deterministic(tmp_path):
    chatlog_main(["write", str(tmp_path / "a.jsonl"), "--seed", "3", "--size", "20", "--difficulty", "hard"])
    conversations, skipped = read_chats(tmp_path / "a.jsonl", strict=True)
    assert len(conversations) == 20 and not skipped
    assert [c["messages"] for c in conversations] == [c["messages"] for c in synthetic_chats(3, 20, "hard")]


# The shipped arithmetic log, and the chat regime's three arms on the testbed's columns log.
ARMS = {"arithmetic": ["data=chatlog"],
        "sd_first_turns": ["data=chatlog_columns", "data.eval_size=32", "data.turns=first", "method=sd_product"],
        "sft_accepted": ["data=chatlog_columns", "data.eval_size=32", "data.turns=accepted", "method=sft"],
        "sft_first_turns": ["data=chatlog_columns", "data.eval_size=32", "data.turns=first", "method=sft"]}


@pytest.mark.parametrize("arm", [arm if arm == "arithmetic" else pytest.param(arm, marks=pytest.mark.slow)
                                 for arm in ARMS])
def test_two_steps_on_logged_chats_generate_nothing(tmp_path, arm):
    train = pytest.importorskip("sdharness.train").train
    metrics = train(compose_config(TINY + ["logger.mode=disabled", *ARMS[arm]]), tmp_path)
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    counted = [r for r in rows if r.get("train/generated_tokens")]
    assert counted and all(float(r["train/generated_tokens"]) == 0.0 for r in counted)
    assert float(counted[-1]["train/rollouts"]) == 0.0 and float(counted[-1]["train/forward_tokens"]) > 0
    assert float(counted[-1]["train/problems_seen"]) == 4.0
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    # the columns log holds out wrongly accepted conversations; the arithmetic one accepts only right answers
    assert ("eval/wrong_accepted_rate" in metrics) == (arm != "arithmetic")


def test_guided_sampling_cannot_apply_to_logged_chats():
    from sdharness.config import to_train_config

    # Rejected while validating the config, before any model loads.
    with pytest.raises(ConfigError, match="rollout.guidance=always cannot apply to data=chatlog"):
        to_train_config(compose_config(TINY + ["data=chatlog", "rollout.guidance=always"]))


def test_a_validation_split_of_a_chat_log_is_held_out_of_the_training_conversations(tmp_path):
    lines = [chat(f"Q{i}", f"wrong {i}", "No.", f"The answer is {i}.", answer=i) for i in range(20)]
    path = write_lines(tmp_path, lines)
    plain = load_chats(DataConfig(name="chatlog", path=str(path), eval_size=5))
    train, evaluation, validation, _, _ = load_chats(DataConfig(name="chatlog", path=str(path), eval_size=5,
                                                             validation_size=4))
    first_questions = lambda examples: [e["context"][0]["content"] for e in examples]
    assert first_questions(evaluation) == first_questions(plain[1])  # the eval split does not move
    assert first_questions(validation) == first_questions(plain[0])[:4]
    assert first_questions(train) == first_questions(plain[0])[4:] and len(train) == 11
    assert [e["completion"] for e in validation] == [f"wrong {q[1:]}" for q in first_questions(validation)]
    with pytest.raises(DataError, match=r"data.validation_size=15 leaves no conversation to train on of the 15"):
        load_chats(DataConfig(name="chatlog", path=str(path), eval_size=5, validation_size=15))


def test_the_trained_on_conversations_whose_accepted_answer_is_wrong_are_a_scored_split(tmp_path):
    # conversation i accepts "i + 1" where the answer is i for odd i: wrongly accepted
    lines = [chat(f"Q{i}", f"try {i}", "No.", f"The answer is {i + i % 2}.", answer=i) for i in range(30)]
    path = write_lines(tmp_path, lines)
    cfg = DataConfig(name="chatlog", path=str(path), eval_size=4, validation_size=3, batch_size=2)
    train, evaluation, validation, wrong, _ = load_chats(cfg)
    held_out = {e["context"][0]["content"] for e in evaluation + validation}
    trained = [e["context"][0]["content"] for e in train]
    assert len(wrong) == 4  # capped at data.eval_size
    assert all(int(e["context"][0]["content"][1:]) % 2 == 1 for e in wrong)
    assert [e["context"][0]["content"] for e in wrong] == [q for q in trained if int(q[1:]) % 2][:4]
    assert not held_out & {e["context"][0]["content"] for e in wrong}
    dm = ProblemDataModule(cfg, PLAIN, char_tokenizer(), max_context=512, max_new_tokens=8)
    dm.setup()
    assert list(dm.scored_splits()) == ["eval", "wrongly_accepted"]
    scored = [p["accepted"] for batch in dm.scored_splits()["wrongly_accepted"]() for p in batch.problems]
    assert scored == [f"The answer is {int(e['context'][0]['content'][1:]) + 1}." for e in wrong]
    selecting = ProblemDataModule(DataConfig(name="chatlog", path=str(path), eval_size=4, validation_size=3,
                                             evaluate_on="validation"), PLAIN, char_tokenizer(), max_context=512,
                                  max_new_tokens=8)
    selecting.setup()
    assert list(selecting.scored_splits()) == ["val"]
