import json

import pytest

from sdharness.config import ConfigError, DataConfig, PromptConfig
from sdharness.data import DataError, ProblemDataModule, load_problems, read_jsonl
from sdharness.models import char_tokenizer


def write(tmp_path, content: bytes, name="train.jsonl"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_reads_rows_with_windows_line_endings_and_blank_lines(tmp_path):
    rows = [{"problem": "p1", "solution": "s1", "answer": 3}, {"problem": "p2", "solution": "s2"}]
    path = write(tmp_path, b"\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n\r\n")
    assert read_jsonl(path) == [{"problem": "p1", "solution": "s1", "answer": "3"}, {"problem": "p2", "solution": "s2"}]


@pytest.mark.parametrize("content,message", [
    (b'{"problem": "p", "solution": "s"}\n{"problem": "p",\n', r"train.jsonl:2: not valid JSON"),
    (b'{"problem": "p", "solution": "s"}\n{"problem": "p"}\n', r"train.jsonl:2: field\(s\) solution missing"),
    (b'{"problem": "", "solution": "s"}\n', r"train.jsonl:1: field\(s\) problem missing"),
    (b'["problem", "solution"]\n', r"train.jsonl:1: expected a JSON object, got list"),
    (b'{"problem": "caf\xe9", "solution": "s"}\n', r"train.jsonl:1: not valid UTF-8"),
    (b"\n\n", r"train.jsonl: no rows; the file is empty"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        read_jsonl(write(tmp_path, content))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_jsonl_holds_out_eval_rows_deterministically(tmp_path):
    path = write(tmp_path, b"\n".join(json.dumps({"problem": f"p{i}", "solution": "s"}).encode() for i in range(10)))
    train, held_out = load_problems(DataConfig(name="jsonl", path=str(path), eval_size=3))
    assert len(train) == 7 and len(held_out) == 3
    assert {r["problem"] for r in train} | {r["problem"] for r in held_out} == {f"p{i}" for i in range(10)}
    assert load_problems(DataConfig(name="jsonl", path=str(path), eval_size=3)) == (train, held_out)


def make_datamodule(max_context=1024, **data):
    prompt = PromptConfig(student="Q: {problem}\nA:", teacher="Q: {problem}\nHint: {solution}\nA:", chat_template="never")
    return ProblemDataModule(DataConfig(train_size=6, eval_size=2, batch_size=3, **data), prompt, char_tokenizer(),
                             max_context=max_context, max_new_tokens=16)


def test_batches_are_left_padded_with_prompts_ending_in_the_same_column():
    dm = make_datamodule()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 3 and batch.student_ids.shape[0] == 3
    assert (batch.student_mask[:, -1] == 1).all() and (batch.teacher_mask[:, -1] == 1).all()
    assert batch.teacher_ids.shape[1] > batch.student_ids.shape[1]
    tok = char_tokenizer()
    first = tok.decode(batch.teacher_ids[0][batch.teacher_mask[0].bool()], skip_special_tokens=True)
    assert first == f"Q: {batch.problems[0]['problem']}\nHint: {batch.problems[0]['solution']}\nA:\n"


def test_prompts_longer_than_the_context_are_skipped_and_counted():
    dm = make_datamodule(max_context=130)  # student prompts fit, teacher prompts with solutions mostly do not
    dm.setup()
    assert dm.skipped_too_long > 0 and len(dm.train) + len(dm.evaluation) + dm.skipped_too_long == 8


def test_no_problem_fitting_the_context_is_a_clear_error():
    with pytest.raises(ConfigError, match="no training problem fits the model context of 20 tokens"):
        make_datamodule(max_context=20).setup()
