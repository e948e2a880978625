"""Per-example teacher prompts: a JSONL row's ``hint`` replaces the reference solution in the teacher
template for that row; rows without one use the template as before."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sdharness.config import DataConfig, PromptConfig
from sdharness.data.datamodule import ProblemDataModule
from sdharness.data.jsonl import read_jsonl
from sdharness.data.prompts import encode_prompt
from sdharness.data.jsonl import DataError
from sdharness.models import char_tokenizer
from sdharness.train import train
from tests.conftest import TINY, compose_config

ROWS = [{"problem": f"Start with {i}. Add 1.", "solution": f"{i} + 1 = {i + 1}\nThe answer is {i + 1}.",
         "answer": str(i + 1)} for i in range(8)]
HINTS = {1: "Count one up.", 4: "The answer is 5."}


def write_rows(path, hints=HINTS):
    rows = [{**row, "hint": hints[i]} if i in hints else row for i, row in enumerate(ROWS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_rows_hint_fills_its_teacher_prompt_and_the_others_keep_the_solution(tmp_path):
    prompt = PromptConfig(student="Q: {problem}\nA:", teacher="Q: {problem}\nRef: {solution}\nA:", chat_template="never")
    tokenizer = char_tokenizer()
    dm = ProblemDataModule(DataConfig(name="jsonl", path=str(write_rows(tmp_path / "train.jsonl")), eval_size=1,
                                      batch_size=8), prompt, tokenizer, max_context=1024, max_new_tokens=8)
    dm.setup()
    hinted = 0
    for item in dm.train:
        index = int(item["problem"].split()[2].rstrip("."))
        context = HINTS.get(index, item["solution"])
        hinted += index in HINTS
        expected = encode_prompt(prompt, tokenizer, f"Q: {item['problem']}\nRef: {context}\nA:")
        assert item["teacher_ids"] == expected
        assert item["solution_ids"][:-1] == tokenizer(item["solution"], add_special_tokens=False)["input_ids"]
    assert hinted >= 1  # at least one hinted row is in the training split


@pytest.mark.parametrize("hint", ["", "   ", 3, None])
def test_a_hint_that_is_not_text_is_an_error_naming_file_and_line(tmp_path, hint):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[1], "hint": hint}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: field hint must be a non-empty string \(it replaces the "
                                        r"solution in the teacher prompt\); remove it to use the solution$"):
        read_jsonl(path)


@pytest.mark.slow
def test_training_on_hinted_rows_runs_and_the_hints_change_the_update(tmp_path):
    def run(name, hints):
        data = write_rows(tmp_path / f"{name}.jsonl", hints)
        overrides = ["data=jsonl", f"data.path={data}", "data.eval_size=2", "trainer.max_steps=1", "eval.at_start=false",
                     "logger.mode=disabled"]
        metrics = train(compose_config(TINY + overrides), tmp_path / name)
        return metrics, load_file(tmp_path / name / "final_model" / "model.safetensors")

    _, plain = run("plain", {})
    _, plain_again = run("plain_again", {})
    _, hinted = run("hinted", {i: f"Think of {i} and one more." for i in range(8)})
    assert all(torch.equal(plain[name], plain_again[name]) for name in plain)  # the run itself is deterministic
    assert any(not torch.equal(plain[name], hinted[name]) for name in plain)
