"""lm-eval integration: local task files, offline evaluation of an in-memory model, the CLI."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

pytest.importorskip("lm_eval")

from sdharness.eval import lmeval, lmeval_tasks  # noqa: E402
from sdharness.config import ModelConfig, PromptConfig  # noqa: E402
from sdharness.data.jsonl import read_jsonl  # noqa: E402
from sdharness.models import load_model_and_tokenizer, save_for_inference  # noqa: E402
from sdharness.data.answers import extract_answer, is_correct  # noqa: E402
from tests.conftest import oracle_lm  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or sweeps

REPO = Path(__file__).resolve().parents[2]
TASKS = ["sdh_arithmetic_easy", "sdh_arithmetic_hard"]
METRIC = "exact_match,strict-match"
TINY_CONFIG = {"name": "t", "source": "tiny_random"}


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer(ModelConfig(**TINY_CONFIG))


def test_written_task_files_verify(tmp_path):
    written = lmeval_tasks.write_local_tasks(tmp_path / "tasks", size=12, max_gen_toks=64)
    assert sorted(written) == TASKS
    for name, yaml_path in written.items():
        config = yaml.safe_load(yaml_path.read_text())
        data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert config["task"] == name and config["dataset_path"] == "json" and data_file.is_absolute()
        assert config["output_type"] == "generate_until" and config["doc_to_target"] == "answer"
        assert config["generation_kwargs"]["max_gen_toks"] == 64 and config["metadata"]["version"] == 1.0
        rows = read_jsonl(data_file, required=("problem", "solution", "answer"))
        assert len(rows) == 12 and len({row["problem"] for row in rows}) == 12
        assert all(is_correct(row["solution"], row["answer"]) for row in rows)
        # The YAML's regex reads what sdharness.data.answers.extract_answer reads.
        pattern = config["filter_list"][0]["filter"][0]["regex_pattern"]
        assert all(re.findall(pattern, row["solution"])[0] == extract_answer(row["solution"]) for row in rows)

def test_write_tasks_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert lmeval.main(["write-tasks", "evals/tasks", "--size", "3", "--difficulties", "single"]) == 0
    config = yaml.safe_load((tmp_path / "evals" / "tasks" / "sdh_arithmetic_single.yaml").read_text())
    # Inside the current directory: relative to it, as `lm_eval --include_path evals/tasks` run there needs.
    assert config["dataset_kwargs"]["data_files"]["test"] == "evals/tasks/sdh_arithmetic_single.jsonl"
    assert len(read_jsonl(tmp_path / config["dataset_kwargs"]["data_files"]["test"])) == 3


def test_shipped_task_files():
    # The shipped files: 100 problems per difficulty, data named relative to the repo root.
    for name in TASKS:
        config = yaml.safe_load((REPO / "evals" / "tasks" / f"{name}.yaml").read_text())
        assert config["dataset_kwargs"]["data_files"]["test"] == f"evals/tasks/{name}.jsonl"
        rows = read_jsonl(REPO / "evals" / "tasks" / f"{name}.jsonl", required=("problem", "solution", "answer"))
        assert len(rows) == lmeval_tasks.HELDOUT_SIZE and all(is_correct(r["solution"], r["answer"]) for r in rows)
        assert rows == [dict(problem=p["problem"], solution=p["solution"], answer=p["answer"])
                        for p in lmeval_tasks.heldout_problems(name.rsplit("_", 1)[1])]  # regenerated identically

    # The tasks' prompt is the training student prompt.
    cot = yaml.safe_load((REPO / "conf" / "prompt" / "cot.yaml").read_text())
    assert cot["student"] == lmeval_tasks.DEFAULT_STUDENT_TEMPLATE


def test_standard_task_names_exist_in_lm_eval():
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    defined = set()
    for sub in ("gsm8k", "minerva_math", "hendrycks_math", "benchmarks"):
        for path in (tasks_dir / sub).glob("*.yaml"):
            text = path.read_text()
            defined.update(line.split(":", 1)[1].strip() for line in text.splitlines()
                           if line.startswith(("task:", "group:")))
    assert set(lmeval.STANDARD_TASKS.values()) <= defined


def test_lm_eval_runs_local_tasks_offline_on_tiny_model(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    model.train()
    monkeypatch.chdir(tmp_path)  # the shipped YAMLs name their data relative to the repo root
    flat, raw = lmeval.run_lm_eval(model, tokenizer, TASKS, limit=4, max_gen_toks=8, batch_size=4,
                                   log_samples=True, return_raw=True)
    for name in TASKS:
        assert 0.0 <= flat[name][METRIC] <= 1.0
        assert raw["n-samples"][name]["effective"] == 4
    assert model.training  # restored after lm-eval's model.eval()
    # No chat template (character tokenizer): the plain student prompt + newline, as in training.
    sample = raw["samples"]["sdh_arithmetic_easy"][0]
    context, gen_kwargs = sample["arguments"][0]
    assert context == lmeval_tasks.DEFAULT_STUDENT_TEMPLATE.format(problem=sample["doc"]["problem"]) + "\n"
    assert gen_kwargs["max_gen_toks"] == 8 and gen_kwargs["do_sample"] is False


def test_chat_template_and_run_prompt_are_used(tiny, tmp_path):
    model, _ = tiny
    from sdharness.models import char_tokenizer
    from sdharness.data.prompts import encode_prompt

    tokenizer = char_tokenizer()
    tokenizer.padding_side = "left"
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    prompt = PromptConfig(student="Q {{x}}: {problem}", teacher="{problem} {solution}", system="Be brief.")
    flat, raw = lmeval.run_lm_eval(model, tokenizer, ["sdh_arithmetic_easy"], limit=1, max_gen_toks=2,
                                   prompt=prompt, log_samples=True, return_raw=True)
    assert 0.0 <= flat["sdh_arithmetic_easy"][METRIC] <= 1.0
    sample = raw["samples"]["sdh_arithmetic_easy"][0]
    text = prompt.student.format(problem=sample["doc"]["problem"])
    # Exactly the training student prompt: encode_prompt's chat rendering of the same text.
    assert sample["arguments"][0][0] == tokenizer.decode(encode_prompt(prompt, tokenizer, text))
    assert sample["arguments"][0][0].startswith("[system] Be brief.\n[user] Q {x}: Start with")


def test_reference_solutions_score_exact_match_one():
    flat = lmeval.run_lm_eval(oracle_lm(), None, ["sdh_arithmetic"], limit=10)  # the tag: both tasks
    assert {name: flat[name][METRIC] for name in TASKS} == {name: 1.0 for name in TASKS}


def _fake_run(run_dir: Path, model, tokenizer, *, wandb_run: bool) -> str | None:
    (run_dir / ".hydra").mkdir(parents=True)
    config = {"model": TINY_CONFIG, "prompt": {"name": "cot", "student": lmeval_tasks.DEFAULT_STUDENT_TEMPLATE,
                                              "teacher": "{problem}\n{solution}", "chat_template": "auto"},
              "logger": {"project": "sdh-test"}}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    save_for_inference(model, tokenizer, run_dir / "final_model")
    if not wandb_run:
        return None
    import wandb

    run = wandb.init(project="sdh-test", dir=str(run_dir), mode="offline", name="train")
    run.log({"train/loss": 1.0})
    run_id = run.id
    run.finish()
    return run_id


def test_cli_on_saved_model_writes_json_and_resumes_offline_wandb_run(tiny, tmp_path):
    model, tokenizer = tiny
    run_dir = tmp_path / "run"
    run_id = _fake_run(run_dir, model, tokenizer, wandb_run=True)
    output = tmp_path / "results.json"
    code = lmeval.main([str(run_dir / "final_model"), "--tasks", ",".join(TASKS), "--limit", "4",
                        "--max-gen-toks", "8", "--batch-size", "4", "--output", str(output),
                        "--wandb-dir", str(run_dir), "--wandb-mode", "offline"])
    assert code == 0
    record = json.loads(output.read_text())
    assert record["prompt_from_run"] and record["limit"] == 4
    for name in TASKS:
        assert 0.0 <= record["results"][name][METRIC] <= 1.0
    # The evaluation resumed the training run: a second offline folder with the same run id.
    # W&B names a folder by its start second; a resume within the same second gets a "-1" suffix.
    folders = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(folders) == 2
    evaluated = next(folder for folder in folders if (folder / "files" / "lmeval_results.json").exists())
    assert json.loads((evaluated / "files" / "lmeval_results.json").read_text())["results"] == record["results"]
    log = (evaluated / f"run-{run_id}.wandb").read_bytes()
    for name in TASKS:
        assert f"lmeval/{name}/{METRIC}".encode() in log  # the summary entries
    assert b"lmeval/results" in log  # the table


def test_cli_on_lightning_checkpoint(tiny, tmp_path):
    model, tokenizer = tiny
    run_dir = tmp_path / "run"
    _fake_run(run_dir, model, tokenizer, wandb_run=False)
    # A LightningModule's state dict: the model's weights under "model.", others (a teacher copy) beside.
    state = {f"model.{key}": value.clone() + 0.5 for key, value in model.state_dict().items()}
    state.update({f"teacher_model.{key}": value for key, value in model.state_dict().items()})
    (run_dir / "checkpoints").mkdir()
    torch.save({"state_dict": state, "global_step": 2}, run_dir / "checkpoints" / "last.ckpt")

    loaded, _ = lmeval.load_for_eval(run_dir / "checkpoints" / "last.ckpt", run_dir=run_dir)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[f"model.{key}"])
    assert not loaded.training

    code = lmeval.main([str(run_dir / "checkpoints" / "last.ckpt"), "--tasks", "sdh_arithmetic_easy",
                        "--limit", "2", "--max-gen-toks", "4", "--wandb-mode", "disabled"])
    assert code == 0
    record = json.loads((run_dir / "lmeval_results.json").read_text())  # default: next to the run
    assert record["run_dir"] == str(run_dir.resolve())
    assert 0.0 <= record["results"]["sdh_arithmetic_easy"][METRIC] <= 1.0


def test_cli_reports_a_checkpoint_without_its_run_config(tmp_path, capsys):
    (tmp_path / "x.ckpt").write_bytes(b"")
    assert lmeval.main([str(tmp_path / "x.ckpt"), "--wandb-mode", "disabled"]) == 2
    assert "needs its run's config" in capsys.readouterr().err
