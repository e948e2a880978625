import json

import pytest
import torch

from sdharness.config import DataConfig, PromptConfig
from sdharness.data.datamodule import ProblemDataModule
from sdharness.data.loading import load_problems
from sdharness.data.jsonl import read_jsonl
from sdharness.models import char_tokenizer


def write(tmp_path, content: bytes, name="train.jsonl"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_numeric_answers_are_read_as_strings(tmp_path):
    rows = [{"problem": "p1", "solution": "s1", "answer": 3}, {"problem": "p2", "solution": "s2", "answer": 0.5},
            {"problem": "p3", "solution": "s3"}]
    path = write(tmp_path, b"\n".join(json.dumps(r).encode() for r in rows))
    assert [row.get("answer") for row in read_jsonl(path)] == ["3", "0.5", None]


# Malformed, empty and non-UTF-8 files, CRLF, too-long prompts: tests/test_bad_input.py.


def test_jsonl_holds_out_eval_rows_deterministically(tmp_path):
    path = write(tmp_path, b"\n".join(json.dumps({"problem": f"p{i}", "solution": "s"}).encode() for i in range(10)))
    train, held_out = load_problems(DataConfig(name="jsonl", path=str(path), eval_size=3))
    assert len(train) == 7 and len(held_out) == 3
    assert {r["problem"] for r in train} | {r["problem"] for r in held_out} == {f"p{i}" for i in range(10)}
    assert load_problems(DataConfig(name="jsonl", path=str(path), eval_size=3)) == (train, held_out)


def make_datamodule(max_context=1024, run_seed=0, **data):
    prompt = PromptConfig(student="Q: {problem}\nA:", teacher="Q: {problem}\nHint: {solution}\nA:", chat_template="never")
    return ProblemDataModule(DataConfig(train_size=6, eval_size=2, batch_size=3, **data), prompt, char_tokenizer(),
                             max_context=max_context, max_new_tokens=16, run_seed=run_seed)


def training_order(dm) -> list[str]:
    dm.setup()
    return [problem["problem"] for batch in dm.train_dataloader() for problem in batch.problems]


def test_the_run_seed_moves_the_training_order_and_not_the_splits():
    orders = {seed: training_order(make_datamodule(run_seed=seed)) for seed in (0, 1, 2)}
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2])  # the same problems
    assert len({tuple(order) for order in orders.values()}) == 3  # three orders
    # seed 0 keeps data.seed's own order; another data.seed with run seed 0 is that seed's order
    dm = make_datamodule()
    dm.setup()
    expected = torch.randperm(6, generator=torch.Generator().manual_seed(DataConfig().seed)).tolist()
    assert orders[0] == [dm.train[i]["problem"] for i in expected]
    other = make_datamodule(run_seed=2)
    other.setup()
    assert [p["problem"] for p in other.evaluation] == [p["problem"] for p in dm.evaluation]


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
