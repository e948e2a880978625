"""The testbed base: the shipped model, the pretrain command that made it, and its data knobs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sdharness.config import ConfigError, ModelConfig, PromptConfig
from sdharness.models import PRETRAIN_REPORT, char_tokenizer, load_model_and_tokenizer, resolve_path
from testbed.examples import build_examples, eval_problems, make_batches, split_counts
from testbed.pretrain import COMMAND, evaluate_suite
from testbed.pretrain_config import MixConfig, compose_pretrain_config, to_pretrain_config
from tests.conftest import TESTBED, TESTBED_CHAIN, compose_config

pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or sweeps

REPO = Path(__file__).resolve().parents[2]  # the builder runs from a checkout (python -m testbed.pretrain)

TOLERANCE = 0.05  # accuracy points, as a fraction
ANSWER_LINE = re.compile(r"^The answer is -?\d+\.$")


TESTBED_V1 = ModelConfig(name="testbed_v1", source="hf", path="pkg://sdharness/assets/testbed_v1")
# Only reproduces a past result, so it stays out of the wheel: in the checkout, under testbed/bases.
TESTBED_COLUMNS_V1 = ModelConfig(name="testbed_columns_v1", source="hf",
                                 path="checkout://testbed/bases/testbed_columns_v1")
BASES = {"testbed": (TESTBED, "pretrain_columns_practice"),  # model -> the config of its (last) pretraining stage
         "testbed_columns_v1": (TESTBED_COLUMNS_V1, "pretrain_columns"),
         "testbed_chain": (TESTBED_CHAIN, "pretrain_v2"), "testbed_v1": (TESTBED_V1, "pretrain")}


def recorded_arguments(command: str) -> list[str]:
    """The arguments of a recorded pretraining command: after ``python -m testbed.pretrain``, or after
    ``sdharness-pretrain``, the console script that ran the same app before it left the package."""
    words = shlex.split(command)
    for program in (list(COMMAND), ["sdharness-pretrain"]):
        if words[:len(program)] == program:
            return words[len(program):]
    raise AssertionError(f"{command!r} is not a pretraining command")


def recorded_config_name(command: str) -> str:
    """The ``--config-name`` of a recorded pretraining command (``pretrain`` without one)."""
    words = recorded_arguments(command)
    return words[words.index("--config-name") + 1] if "--config-name" in words else "pretrain"


def shipped_report(base: ModelConfig = TESTBED) -> dict:
    return json.loads((resolve_path(base.path) / PRETRAIN_REPORT).read_text())


def prompt_from(report: dict) -> PromptConfig:
    return PromptConfig(**report["config"]["prompt"])


def test_pretrain_config_composes_and_validates():
    cfg = to_pretrain_config(compose_pretrain_config(config_name="pretrain"))
    assert cfg.prompt.name == "testbed" and cfg.prompt.chat_template == "never"
    assert "Reference solution" in cfg.prompt.teacher and "Reference solution" not in cfg.prompt.student
    assert cfg.early_answer_fraction == 0.0
    with pytest.raises(ConfigError, match="early_answer_fraction"):
        to_pretrain_config(compose_pretrain_config(["early_answer_fraction=1.5"], config_name="pretrain"))
    with pytest.raises(ConfigError, match="sum to 1"):
        to_pretrain_config(compose_pretrain_config(["mix.student_easy=0.9"], config_name="pretrain"))


@pytest.mark.parametrize("name", BASES)
def test_model_group_points_at_the_shipped_base(name):
    group = OmegaConf.to_container(compose_config([f"model={name}"]).model)
    assert ModelConfig(**group) == BASES[name][0]


@pytest.mark.parametrize("name", BASES)
def test_shipped_report_records_the_command_and_the_target_band(name):
    base, config_name = BASES[name]
    report = shipped_report(base)
    assert report["command"].startswith(("sdharness-pretrain ", shlex.join(COMMAND)))
    assert recorded_config_name(report["command"]) == config_name
    assert report["seed"] == report["config"]["seed"]
    assert report["wall_seconds"]["total"] > 0
    accuracy = report["accuracy"]
    assert accuracy["hint_hard"] >= 0.9
    assert accuracy["no_hint_hard"] < accuracy["hint_hard"]


def test_default_base_records_its_three_stages_each_stopped_on_what_it_trains():
    report = shipped_report(TESTBED)
    stages, stage = [], report
    while stage is not None:
        stages.append(stage)
        stage = stage.get("init_from")
    assert [recorded_config_name(stage["command"]) for stage in reversed(stages)] == [
        "pretrain_columns", "pretrain_columns_teacher", "pretrain_columns_practice"]
    config = report["config"]
    assert config["stop_when"] == {"no_hint_hard": 0.2, "hint_hard": 0.95, "foreign_hint_hard": 0.95}
    assert report["stop_when_met"] and report["steps_trained"] == report["quick_evals"][-1]["step"] == 150
    last = report["quick_evals"][-1]["accuracy"]
    assert all(last[name] >= value for name, value in config["stop_when"].items())
    assert all(not all(row["accuracy"][name] >= value for name, value in config["stop_when"].items())
               for row in report["quick_evals"][:-1])  # it stopped at the first quick eval that met it
    teacher_stage = stages[1]["accuracy"]  # the hint-reading base before the no-hint practice
    assert teacher_stage["no_hint_hard"] == 0.0 and teacher_stage["hint_hard"] >= 0.95


@pytest.mark.parametrize("name", BASES)
def test_shipped_base_reaches_its_recorded_accuracies(name):
    """Loads through the harness's own loader and re-runs the recorded held-out eval."""
    torch.set_num_threads(1)
    base = BASES[name][0]
    report = shipped_report(base)
    model, tokenizer = load_model_and_tokenizer(base)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]
    task = report["config"].get("task", "chain")
    problems = eval_problems(report["eval"]["seed"], report["eval"]["size"], task)
    results = evaluate_suite(model, tokenizer, prompt_from(report), problems, task=task,
                             max_new_tokens=report["eval"]["max_new_tokens"],
                             batch_size=report["eval"]["batch_size"],
                             sets=tuple(name for name in ("no_hint_hard", "hint_hard", "foreign_hint_hard")
                                        if name in report["accuracy"]))
    for eval_set, row in results.items():
        assert row["size"] == report["eval"]["size"]
        assert abs(row["accuracy"] - report["accuracy"][eval_set]) <= TOLERANCE, (eval_set, row, report["accuracy"][eval_set])


def _teacher_split(examples):
    teacher = [example for example in examples if example.kind.startswith("teacher")]
    return teacher, [example for example in teacher if example.early_answer]


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_early_answer_fraction_is_exact(fraction):
    prompt = PromptConfig(**OmegaConf.to_container(compose_pretrain_config(config_name="pretrain").prompt))
    tokenizer = char_tokenizer()
    mix = MixConfig(student_easy=0.4, student_hard=0.1, teacher_easy=0.2, teacher_hard=0.3)
    examples = build_examples(prompt, tokenizer, size=200, mix=mix, early_answer_fraction=fraction, seed=3)
    counts = {kind: sum(example.kind == kind for example in examples) for kind in mix.__dict__}
    assert counts == {"student_easy": 80, "student_hard": 20, "teacher_easy": 40, "teacher_hard": 60}
    teacher, early = _teacher_split(examples)
    assert len(early) == round(fraction * len(teacher))
    for example in examples:
        completion = tokenizer.decode(example.ids[example.prompt_length:], skip_special_tokens=True)
        assert completion == example.completion
        assert example.ids[-1] == tokenizer.eos_token_id
        if example.early_answer:
            assert example.kind.startswith("teacher")
            assert ANSWER_LINE.match(example.completion), example.completion
        else:  # the worked steps, then the answer line
            assert " = " in example.completion and ANSWER_LINE.match(example.completion.splitlines()[-1])
    # The student never sees the solution; the teacher prompt holds it.
    for example in examples:
        prompt_text = tokenizer.decode(example.ids[:example.prompt_length], skip_special_tokens=True)
        assert ("Reference solution" in prompt_text) == example.kind.startswith("teacher")


def test_examples_are_deterministic_and_exclude_the_eval_sets():
    prompt = PromptConfig(**OmegaConf.to_container(compose_pretrain_config(config_name="pretrain").prompt))
    tokenizer = char_tokenizer()
    held_out = eval_problems(20240, 50)
    exclude = {item["problem"] for items in held_out.values() for item in items}
    kwargs = dict(size=300, mix=MixConfig(), early_answer_fraction=0.3, seed=7, exclude=exclude)
    first = build_examples(prompt, tokenizer, **kwargs)
    assert first == build_examples(prompt, tokenizer, **kwargs)
    assert not {example.problem for example in first} & exclude
    batches = make_batches(first, batch_size=32, bucket_batches=4, seed=7, pad_id=tokenizer.pad_token_id)
    assert sum(len(ids) for ids, _ in batches) == 300
    for ids, labels in batches:
        supervised = labels != -100
        assert torch.equal(ids[supervised], labels[supervised])
        assert (labels[:, 0] == -100).all()  # the prompt is never a target


def test_split_counts_sum_exactly():
    assert split_counts(7, {"a": 0.5, "b": 0.5}) == {"a": 4, "b": 3}
    assert sum(split_counts(1001, {"a": 0.33, "b": 0.33, "c": 0.34}).values()) == 1001


def _recorded_part(fresh, recorded):
    """``fresh`` restricted to the keys ``recorded`` has, recursively."""
    if isinstance(recorded, dict) and isinstance(fresh, dict):
        return {key: _recorded_part(fresh.get(key), value) for key, value in recorded.items()}
    return fresh


def test_recorded_part_ignores_settings_added_later():
    fresh = {"prompt": {"name": "testbed", "chat_roles": {"user": "Q: "}}, "slip_fraction": 0.0, "seed": 0}
    assert _recorded_part(fresh, {"prompt": {"name": "testbed"}, "seed": 0}) == {"prompt": {"name": "testbed"}, "seed": 0}
    assert _recorded_part(fresh, {"prompt": {"name": "other"}, "seed": 1}) == {"prompt": {"name": "testbed"}, "seed": 0}


def rebuild_stage(stage: dict, directory: Path) -> dict:
    """Re-runs a recorded pretraining stage into ``directory``, first the stages it continued from
    (``init_from``, recorded recursively), and returns the fresh report."""
    recorded = recorded_arguments(stage["command"])
    overrides = [arg for arg in recorded if not arg.startswith(("output_dir=", "hydra.", "init_from="))]
    if stage.get("init_from"):
        base = directory.with_name(directory.name + "_from")
        rebuild_stage(stage["init_from"], base)
        overrides.append(f"init_from={base}")
    run = subprocess.run(
        [sys.executable, *COMMAND[1:], *overrides, f"output_dir={directory}", f"hydra.run.dir={directory}_hydra"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((directory / PRETRAIN_REPORT).read_text())


@pytest.mark.reproduce
@pytest.mark.parametrize("name", BASES)
def test_pretrain_command_reproduces_the_shipped_base(tmp_path, name):
    """Re-runs the recorded pretraining commands (about 10 minutes a stage on one CPU thread)."""
    report = shipped_report(BASES[name][0])
    assert recorded_config_name(report["command"]) == BASES[name][1]
    fresh = rebuild_stage(report, tmp_path / "base")
    # Every recorded setting is the same; of the settings added since, the data knobs keep their
    # neutral defaults (prompt fields added for chats play no part in pretraining).
    ignored = {"output_dir": None, "init_from": None}
    assert _recorded_part(fresh["config"], report["config"]) | ignored == report["config"] | ignored
    for name, neutral in {"foreign_hint_fraction": 0.0, "slip_fraction": 0.0, "task": "chain"}.items():
        assert report["config"].get(name, neutral) == fresh["config"][name]
    assert fresh.get("stop_when_met", False) == report.get("stop_when_met", False)
    for name in ("no_hint_easy", "no_hint_hard", "hint_hard"):
        assert abs(fresh["accuracy"][name] - report["accuracy"][name]) <= TOLERANCE, (name, fresh["accuracy"])
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "base" / name).exists()


@pytest.mark.slow
@pytest.mark.parametrize("teacher, after", [("live", 0.22), ("initial", 0.26)])
def test_short_self_distillation_run_gives_its_measured_accuracies(tmp_path, teacher, after):
    """8 steps of experiment=testbed (product, lr 3e-4) on the chain base, 1 thread, seeded: the base's 0.46 on
    these 50 HARD problems and after them 0.22 with the live teacher (measured at 78bb8cb, when it was the
    default), 0.26 with the frozen initial one (at 03734f5's successor). Any change to sampling, scoring,
    the loss or the step moves them."""
    from sdharness.train import train
    from tests.conftest import compose_config

    train(compose_config(["experiment=testbed", "model=testbed_chain", "data.task=chain", "optim.lr=3e-4",
                          "budget.problems=64", "data.eval_size=50", "eval.every_n_steps=0", f"teacher={teacher}",
                          "logger.mode=disabled", "rollout.progress=false"]), tmp_path)
    import csv

    with open(tmp_path / "metrics.csv") as handle:
        accuracies = [float(r["eval/accuracy"]) for r in csv.DictReader(handle) if r.get("eval/accuracy")]
    assert accuracies == [0.46, after]


def test_foreign_hints_and_slips_are_exact_and_the_slip_carries_no_loss():
    prompt = PromptConfig(**OmegaConf.to_container(compose_pretrain_config(config_name="pretrain").prompt))
    tokenizer = char_tokenizer()
    mix = MixConfig(student_easy=0.2, student_hard=0.2, teacher_easy=0.2, teacher_hard=0.4)
    examples = build_examples(prompt, tokenizer, size=200, mix=mix, early_answer_fraction=0.25, seed=5,
                              foreign_hint_fraction=0.5, slip_fraction=0.5)
    teacher, early = _teacher_split(examples)
    assert len(teacher) == 120 and len(early) == 30
    assert sum(example.foreign_hint for example in teacher) == 60
    slipped = [example for example in examples if example.no_loss is not None]
    assert len(slipped) == 45 and not any(example.early_answer for example in slipped)  # half of the 90 worked
    assert all(not example.foreign_hint and example.no_loss is None for example in examples
               if example.kind.startswith("student"))
    for example in teacher:
        prompt_text = tokenizer.decode(example.ids[:example.prompt_length], skip_special_tokens=True)
        hint = prompt_text.split("Reference solution:\n")[1]
        assert (" -> " in hint and ". So: " in hint) == example.foreign_hint
        assert ("The answer is" in hint) != example.foreign_hint
    gaps = unsupervised_completion_spans(slipped, batch_size=8, seed=5, pad_id=tokenizer.pad_token_id)
    assert len(gaps) == len(slipped)
    for example, gap in gaps:
        begin, end = example.no_loss
        assert gap == list(range(begin, end))  # exactly the slipped digits, nothing else
        assert example.completion[begin:end].isdigit()


def unsupervised_completion_spans(examples, *, batch_size: int, seed: int, pad_id: int) -> list:
    """``(example, completion positions without a label)`` for each example, read back from the
    batches :func:`make_batches` builds (what training sees)."""
    found = []
    for ids, labels in make_batches(examples, batch_size=batch_size, bucket_batches=2, seed=seed, pad_id=pad_id):
        for row in range(ids.shape[0]):
            example = next(e for e in examples if torch.equal(ids[row, :len(e.ids)], torch.tensor(e.ids))
                           and (len(e.ids) == ids.shape[1] or ids[row, len(e.ids)] == pad_id))
            unsupervised = (labels[row] == -100).nonzero().flatten().tolist()
            found.append((example, [i - example.prompt_length for i in unsupervised
                                    if example.prompt_length <= i < len(example.ids)]))
    return found
