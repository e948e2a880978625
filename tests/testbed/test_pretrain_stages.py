"""The testbed's pretraining in stages: continuing from a base (init_from) and stopping on a quick eval (stop_when)."""

from __future__ import annotations

import json

import pytest
import torch

from sdharness.config import ConfigError
from sdharness.models import PRETRAIN_REPORT
from testbed import pretrain as pretrain_module
from testbed.pretrain import pretrain
from testbed.pretrain_config import EVAL_SETS, compose_pretrain_config, to_pretrain_config

TINY = ["arch.hidden_size=16", "arch.num_layers=1", "arch.num_heads=2", "arch.intermediate_size=32",
        "batch_size=2", "warmup_steps=1", "eval_size=2", "eval_every_size=2", "eval_batch_size=2",
        "eval_max_new_tokens=4", "log_every=5"]


def tiny_config(*overrides: str):
    return to_pretrain_config(compose_pretrain_config([*TINY, *overrides], config_name="pretrain_columns"))


def scripted_evals(monkeypatch, no_hint_hard: list[float]) -> list[tuple[str, ...]]:
    """Every evaluate_suite call returns the next ``no_hint_hard`` accuracy (1.0 for the other sets)."""
    calls = []

    def evaluate(model, tokenizer, prompt, problems, *, task, max_new_tokens, batch_size,
                 sets=tuple(EVAL_SETS)):
        value = no_hint_hard[min(len(calls), len(no_hint_hard) - 1)]
        calls.append(sets)
        return {name: {"accuracy": value if name == "no_hint_hard" else 1.0, "early_answer_rate": 0.0,
                       "completion_length": 1.0, "size": 2} for name in sets}

    monkeypatch.setattr(pretrain_module, "evaluate_suite", evaluate)
    return calls


def test_stop_when_stops_at_the_first_quick_eval_that_meets_it(tmp_path, monkeypatch):
    calls = scripted_evals(monkeypatch, [0.0, 0.2, 0.5, 0.9])
    report = pretrain(tiny_config("steps=40", "eval_every=5", "+stop_when.no_hint_hard=0.5"), tmp_path)
    assert report["steps_trained"] == 15 and report["stop_when_met"] is True
    assert [(row["step"], row["accuracy"]["no_hint_hard"]) for row in report["quick_evals"]] == [(5, 0.0), (10, 0.2), (15, 0.5)]
    assert report["loss_history"][-1][0] == 15  # the last log point is the step it stopped at
    assert len(calls) == 4  # three quick evals, then the held-out eval of the saved base
    assert json.loads((tmp_path / PRETRAIN_REPORT).read_text())["steps_trained"] == 15


def test_stop_when_never_met_trains_every_step_and_says_so(tmp_path, monkeypatch):
    scripted_evals(monkeypatch, [0.0])
    report = pretrain(tiny_config("steps=12", "eval_every=5", "+stop_when.no_hint_hard=0.5"), tmp_path)
    assert report["steps_trained"] == 12 and report["stop_when_met"] is False
    assert [row["step"] for row in report["quick_evals"]] == [5, 10]


def test_init_from_continues_from_the_base_and_records_it(tmp_path, monkeypatch):
    scripted_evals(monkeypatch, [0.0])
    base = pretrain(tiny_config("steps=3"), tmp_path / "base")
    started_from = {}
    train_model = pretrain_module.train_model

    def capture(model, batches, cfg, on_log=None):
        started_from.update({name: value.clone() for name, value in model.state_dict().items()})
        return train_model(model, batches, cfg, on_log)

    monkeypatch.setattr(pretrain_module, "train_model", capture)
    report = pretrain(tiny_config("steps=3", "seed=1", f"init_from={tmp_path / 'base'}"), tmp_path / "stage2")
    saved = pretrain_module.LlamaForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert all(torch.equal(started_from[name], value) for name, value in saved.items())
    fresh = pretrain_module.build_model(tiny_config().arch, pretrain_module.char_tokenizer(), 1).state_dict()
    assert not torch.equal(started_from["model.embed_tokens.weight"], fresh["model.embed_tokens.weight"])
    assert report["init_from"] == {"path": str(tmp_path / "base"), "command": base["command"], "seed": 0,
                                   "accuracy": base["accuracy"], "init_from": None}
    third = pretrain(tiny_config("steps=3", f"init_from={tmp_path / 'stage2'}"), tmp_path / "stage3")
    assert third["init_from"]["init_from"] == report["init_from"]
    assert base["init_from"] is None


def test_init_from_refuses_a_base_whose_held_out_problems_or_sizes_differ(tmp_path, monkeypatch):
    scripted_evals(monkeypatch, [0.0])
    pretrain(tiny_config("steps=3"), tmp_path / "base")
    with pytest.raises(ConfigError, match=r"^init_from=.* was pretrained with eval_seed=20240, this run has "
                                          r"eval_seed=7; set eval_seed=20240"):
        pretrain(tiny_config("steps=3", "eval_seed=7", f"init_from={tmp_path / 'base'}"), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"was pretrained with task='columns', this run has task='chain'; set task=columns"):
        pretrain(tiny_config("steps=3", "task=chain", f"init_from={tmp_path / 'base'}"), tmp_path / "b")
    with pytest.raises(ConfigError, match=r"has arch.hidden_size=16, this run arch.hidden_size=32; set arch.hidden_size=16"):
        pretrain(tiny_config("steps=3", "arch.hidden_size=32", f"init_from={tmp_path / 'base'}"), tmp_path / "c")
    (tmp_path / "bare").mkdir()
    with pytest.raises(ConfigError, match=r"pretrain_report.json does not exist; point init_from at a base made by"):
        pretrain(tiny_config("steps=3", f"init_from={tmp_path / 'bare'}"), tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_stop_when_is_validated():
    with pytest.raises(ConfigError, match=r"stop_when.no_hint_hardd: unknown eval set; choose from no_hint_easy"):
        tiny_config("eval_every=5", "+stop_when.no_hint_hardd=0.5")
    with pytest.raises(ConfigError, match=r"stop_when.no_hint_hard must be in \(0, 1\], got 25"):
        tiny_config("eval_every=5", "+stop_when.no_hint_hard=25")
    with pytest.raises(ConfigError, match=r"stop_when needs the quick evals it is checked on; set eval_every > 0"):
        tiny_config("eval_every=0", "+stop_when.no_hint_hard=0.5")
