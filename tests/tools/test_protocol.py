"""The comparison protocol: the validation split, lr selection by validation only, the final commands."""

import csv
import json

import pytest
from omegaconf import OmegaConf

from sdharness.config import ConfigError, DataConfig, PromptConfig
from sdharness.data.datamodule import ProblemDataModule
from sdharness.data.loading import load_data
from sdharness.data.jsonl import DataError
from sdharness.models import char_tokenizer
from sdharness.tools.protocol import (first_arms, final_commands, main as protocol_main, select_commands,
                                      select_learning_rates, selection_markdown, teacher_arms)
from sdharness.report.runs import find_runs


# ---------------------------------------------------------------- the validation split

def test_validation_rows_come_from_the_training_pool_and_never_from_eval():
    plain = load_data(DataConfig(train_size=40, eval_size=10))
    split = load_data(DataConfig(train_size=40, eval_size=10, validation_size=8))
    problems = lambda rows: [r["problem"] for r in rows]
    assert problems(split.validation) == problems(plain.train)[:8]
    assert problems(split.train) == problems(plain.train)[8:] and len(split.train) == 32
    assert problems(split.evaluation) == problems(plain.evaluation)  # the eval split does not move
    assert not set(problems(split.validation)) & set(problems(split.evaluation))
    assert not set(problems(split.validation)) & set(problems(split.train))


def test_jsonl_validation_rows_are_held_out_after_the_eval_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"p{i}", "solution": "s"}) for i in range(20)))
    split = load_data(DataConfig(name="jsonl", path=str(path), eval_size=5, validation_size=4))
    names = [{r["problem"] for r in rows} for rows in (split.train, split.validation, split.evaluation)]
    assert [len(n) for n in names] == [11, 4, 5] and set().union(*names) == {f"p{i}" for i in range(20)}


def test_evaluate_on_validation_scores_the_validation_rows():
    cfg = DataConfig(train_size=30, eval_size=6, validation_size=5, evaluate_on="validation", batch_size=2)
    dm = ProblemDataModule(cfg, PromptConfig(student="Q: {problem}\nA:\n", teacher="{problem}\n{solution}\n"),
                           char_tokenizer(), max_context=512, max_new_tokens=8, eval_batch_size=4)
    dm.setup()
    scored = [p["problem"] for batch in dm.eval_dataloader() for p in batch.problems]
    assert scored == [r["problem"] for r in load_data(cfg).validation] and len(dm.train) == 25


@pytest.mark.slow
def test_a_run_on_the_validation_split_logs_and_returns_val_only(tmp_path):
    import subprocess
    import sys

    from tests.conftest import TINY

    done = subprocess.run([sys.executable, "-m", "sdharness.train", *TINY, "trainer.max_steps=1", "logger.mode=disabled",
                           "data.validation_size=3", "data.evaluate_on=validation", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("val/accuracy") for row in rows) and "eval/accuracy" not in rows[0]


@pytest.mark.parametrize("fields, message", [
    ({"evaluate_on": "validation"}, "data.evaluate_on=validation needs a validation split"),
    ({"validation_size": -1}, "data.validation_size must be >= 0"),
    ({"evaluate_on": "test"}, "data.evaluate_on"),
])
def test_bad_validation_settings_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**fields)


def test_a_validation_split_as_large_as_the_training_pool_fails_before_any_model_loads():
    with pytest.raises(DataError, match=r"data.validation_size=256 leaves no training problem of the 256"):
        load_data(DataConfig(train_size=256, validation_size=256))


# ---------------------------------------------------------------- selection

def selection_run(root, name, method, lr, val, eval_=None, seed=0, teacher=None):
    """A stage-1 job dir: val/accuracy per eval (and, to tempt a wrong selection, eval/accuracy)."""
    path = root / name
    (path / ".hydra").mkdir(parents=True)
    config = {"algo": {"name": method.split("_")[0]}, "optim": {"lr": lr}, "seed": seed}
    if teacher:
        config["teacher"] = teacher
    OmegaConf.save(OmegaConf.create(config), path / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"method={method}", f"optim.lr={lr}", f"seed={seed}"]),
                   path / ".hydra" / "overrides.yaml")
    with open(path / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["step", "val/accuracy", "eval/accuracy"])
        writer.writeheader()
        for step, value in enumerate(val):
            writer.writerow({"step": step, "val/accuracy": value,
                             "eval/accuracy": None if eval_ is None else eval_[step]})


def test_selection_reads_the_validation_split_only(tmp_path):
    # Validation prefers 1e-4 for sd_product and 3e-4 for sft; eval says the opposite.
    selection_run(tmp_path, "0", "sd_product", 3e-5, [0.2, 0.25], eval_=[0.2, 0.6])
    selection_run(tmp_path, "1", "sd_product", 1e-4, [0.2, 0.40], eval_=[0.2, 0.1])
    selection_run(tmp_path, "2", "sd_product", 3e-4, [0.2, 0.30], eval_=[0.2, 0.5])
    selection_run(tmp_path, "3", "sft", 1e-4, [0.2, 0.30], eval_=[0.2, 0.9])
    selection_run(tmp_path, "4", "sft", 3e-4, [0.2, 0.35], eval_=[0.2, 0.1])
    selection = select_learning_rates(find_runs(tmp_path))
    assert {m: e["lr"] for m, e in selection.items()} == {"sd_product+initial": 1e-4, "sft": 3e-4}
    assert selection["sd_product+initial"]["validation_accuracy"] == 0.4
    assert [c["lr"] for c in selection["sd_product+initial"]["candidates"]] == [3e-5, 1e-4, 3e-4]
    assert selection["sd_product+initial"]["start"] == 0.2 and selection["sd_product+initial"]["edge"] is None
    assert selection["sft"]["edge"] == "highest"
    table = selection_markdown(selection)
    assert "| sd_product+initial | 0.0001 | 0.400 | 0.200 | 3e-05: 0.250, 0.0001: 0.400, 0.0003: 0.300 |" in table
    assert "| sft | 0.0003 (highest of the grid) | 0.350 | 0.200 | 0.0001: 0.300, 0.0003: 0.350 |" in table
    assert "An lr at the highest end of the grid may not be the best one" in table


def test_ties_go_to_the_higher_mean_then_the_smaller_lr(tmp_path):
    selection_run(tmp_path, "0", "grpo", 3e-5, [0.2, 0.1, 0.3])
    selection_run(tmp_path, "1", "grpo", 1e-4, [0.2, 0.2, 0.3])  # same final, higher mean
    selection_run(tmp_path, "2", "sft", 1e-4, [0.2, 0.3])
    selection_run(tmp_path, "3", "sft", 3e-5, [0.2, 0.3])  # same final and mean: the smaller lr
    selection = select_learning_rates(find_runs(tmp_path))
    assert selection["grpo"]["lr"] == 1e-4 and selection["sft"]["lr"] == 3e-5


def test_runs_scored_on_the_eval_split_are_not_candidates(tmp_path):
    selection_run(tmp_path, "0", "sd_clip", 1e-4, [0.2, 0.3])
    path = tmp_path / "1"
    selection_run(tmp_path, "1", "sd_clip", 3e-4, [])  # logged eval/* only
    with open(path / "metrics.csv", "w", newline="") as handle:
        handle.write("step,eval/accuracy\n0,0.2\n1,0.9\n")
    assert select_learning_rates(find_runs(tmp_path))["sd_clip+initial"]["lr"] == 1e-4


def test_select_commands_sweep_the_lr_grid_per_method_on_the_validation_sweep(tmp_path):
    commands = select_commands(tmp_path, ["sd_clip", "grpo"], "3e-5,1e-4", ["budget.problems=16"])
    assert [c[c.index("--config-name") + 1] for c in commands] == ["protocol_select"] * 2
    assert [next(a for a in c if a.startswith("method=")) for c in commands] == ["method=grpo", "method=sd_clip"]
    assert "optim.lr=3e-5,1e-4" in commands[1] and f"hydra.sweep.dir={tmp_path / 'select' / 'sd_clip'}" in commands[1]


def test_final_commands_give_each_method_its_lr_and_grpo_native_references_only(tmp_path):
    selection = {"sd_trust_region": {"lr": 1e-4}, "grpo": {"lr": 3e-5}, "sft": {"lr": 3e-4}}
    commands = final_commands(tmp_path, selection, ["native", "foreign"], "0,1,2", ["model=tiny_random"])
    assert len(commands) == 9  # a multirun per method and seed, grpo's first (the longest jobs)
    jobs = [(next(a for a in c if a.startswith("method=")), next(a for a in c if a.startswith("seed="))) for c in commands]
    assert jobs[:3] == [("method=grpo", f"seed={k}") for k in range(3)]
    tr = commands[jobs.index(("method=sd_trust_region", "seed=1"))]
    assert "optim.lr=0.0001" in tr and "data.solution_style=native,foreign" in tr
    assert f"hydra.sweep.dir={tmp_path / 'final' / 'sd_trust_region' / 'seed1'}" in tr and tr[-1] == "model=tiny_random"
    assert "data.solution_style=native" in commands[0] and "optim.lr=3e-05" in commands[0]
    assert "--config-name" in tr and tr[tr.index("--config-name") + 1] == "protocol_final"


def test_one_registry_flag_says_what_reads_a_reference_for_the_data_and_the_protocol(tmp_path, monkeypatch):
    """``reads_reference`` in the methods registry decides both which fields a training row needs and
    which reference styles the protocol's final stage runs; nothing else names grpo."""
    from sdharness.data.loading import required_fields
    from sdharness.methods import METHODS, Method

    assert [name for name, method in METHODS.items() if not method.reads_reference] == ["grpo"]
    assert required_fields("grpo") == ("problem", "answer") and required_fields("sft") == ("problem", "solution")
    monkeypatch.setitem(METHODS, "sft", Method(METHODS["sft"].module_class, reads_reference=False))
    assert required_fields("sft") == ("problem", "answer")
    commands = final_commands(tmp_path, {"sft": {"lr": 1e-4}, "sd_clip": {"lr": 1e-4}}, ["native", "foreign"], "0", [])
    assert ["data.solution_style=native" in c for c in commands] == [False, True]  # sd_clip, then sft
    assert "data.solution_style=native,foreign" in commands[0]


def test_the_teacher_factor_goes_to_the_sd_method_validation_ranks_first(tmp_path):
    assert first_arms(["sd_clip", "sft", "grpo"]) == ["sd_clip+initial", "sft", "grpo"]
    selection_run(tmp_path, "0", "sd_clip", 1e-4, [0.2, 0.5], eval_=[0.2, 0.1])
    selection_run(tmp_path, "1", "sd_product", 1e-4, [0.2, 0.6], eval_=[0.2, 0.0])
    selection_run(tmp_path, "2", "sft", 1e-4, [0.2, 0.9])  # no teacher: never a candidate for the factor
    selection_run(tmp_path, "3", "sd_product", 3e-4, [0.2, 0.4], teacher={"weights": "ema", "ema_decay": 0.95})
    selection = select_learning_rates(find_runs(tmp_path))
    assert set(selection) == {"sd_clip+initial", "sd_product+initial", "sft", "sd_product+ema0.95"}
    assert teacher_arms({k: v for k, v in selection.items() if k.endswith("initial") or k == "sft"},
                        ["live", "ema0.99"], top=1) == ["sd_product+live", "sd_product+ema0.99"]
    commands = final_commands(tmp_path, selection, ["native"], "0", [])
    ema = next(c for c in commands if "teacher.ema_decay=0.95" in c)
    assert "teacher=ema" in ema and "optim.lr=0.0003" in ema and "method=sd_product" in ema
    assert f"hydra.sweep.dir={tmp_path / 'final' / 'sd_product+ema0.95' / 'seed0'}" in ema
    assert "teacher=initial" in next(c for c in commands if "method=sd_clip" in c)


def test_the_dry_run_lists_the_sd_jobs_per_teacher(tmp_path, capsys):
    protocol_main(["--out", str(tmp_path), "--dry-run", "--methods", "sd_clip,sft"])
    printed = capsys.readouterr().out
    assert "method=sd_clip teacher=initial optim.lr=" in printed and "method=sft optim.lr=" in printed
    for teacher in ("teacher=live", "teacher=ema teacher.ema_decay=0.99", "teacher=ema teacher.ema_decay=0.95"):
        assert f"method=TOP {teacher} optim.lr=" in printed
    assert not (tmp_path / "select").exists()


def test_evaluate_on_both_scores_validation_beside_eval():
    cfg = DataConfig(train_size=30, eval_size=6, validation_size=5, evaluate_on="both", batch_size=2)
    dm = ProblemDataModule(cfg, PromptConfig(student="Q: {problem}\nA:\n", teacher="{problem}\n{solution}\n"),
                           char_tokenizer(), max_context=512, max_new_tokens=8, eval_batch_size=4)
    dm.setup()
    splits = dm.scored_splits()
    assert list(splits) == ["eval", "val"]
    scored = {prefix: [p["problem"] for batch in loader() for p in batch.problems] for prefix, loader in splits.items()}
    loaded = load_data(cfg)
    assert scored == {"eval": [r["problem"] for r in loaded.evaluation],
                      "val": [r["problem"] for r in loaded.validation]}
