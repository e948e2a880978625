"""The regimes' runner: the regime files, selection of lr then variant on validation only, the final commands."""

import json
import re
import subprocess
import sys

import pytest

from sdharness.report.runs import find_runs
from sdharness.tools.regimes import (REGIME_CHOICES, REGIMES_DIR, Regime, RegimeError, check_arms, choose,
                                     final_commands, load_regime, main as regime_main, selection_markdown)
from tests.tools.test_protocol import selection_run



def test_every_shipped_regime_loads_and_its_arms_compose(tmp_path):
    assert set(REGIME_CHOICES) >= {"impossible_knowledge"}
    for name in REGIME_CHOICES:
        regime = load_regime(REGIMES_DIR / f"{name}.yaml")
        assert set(regime.with_variants()) >= set(regime.arms)
        check_arms(regime, tmp_path, [])  # every arm and variant composes into a valid final job


@pytest.mark.parametrize("text, message", [
    ("arms: {a: [method=sft]}\n", "missing description"),
    ("description: x\narms: {a: [method=sft]}\nlr: 1e-4\n", r"unknown field\(s\) lr; a regime has"),
    ("description: x\narms: {a: method=sft}\n", "arms.a must be a list of strings"),
    ("description: x\narms: {a: [method=sft]}\nvariants: {b: {v: [x=1]}}\n", "variants.b names no arm; arms are a"),
    ("description: x\narms: {a@b: [method=sft]}\n", "'a@b': arm and variant names may not hold '@'"),
    ("description: x\narms: {a: [method=sft], b: [method=sft]}\nlr_from: {a: c}\n", "lr_from.a: c: both must be arms"),
])
def test_a_bad_regime_file_is_one_error_naming_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RegimeError, match=message) as caught:
        load_regime(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_the_lr_then_the_variant_are_chosen_on_validation_and_a_variant_must_beat_the_arm(tmp_path):
    select = tmp_path / "select"
    # lr: 1e-4 by validation (eval prefers 3e-5); variant: tau2 beats the arm, tau0.5 does not.
    selection_run(select / "sd_clip", "0", "sd_clip", 3e-5, [0.2, 0.30], eval_=[0.2, 0.9])
    selection_run(select / "sd_clip", "1", "sd_clip", 1e-4, [0.2, 0.40], eval_=[0.2, 0.1])
    selection_run(select / "sd_clip@tau2", "0", "sd_clip", 1e-4, [0.2, 0.45], eval_=[0.2, 0.0])
    selection_run(select / "sd_clip@tau0.5", "0", "sd_clip", 1e-4, [0.2, 0.40], eval_=[0.2, 1.0])
    selection_run(select / "sft", "0", "sft", 1e-4, [0.2, 0.5])
    regime = Regime(description="x", arms={"sd_clip": ["method=sd_clip"], "sft": ["method=sft"],
                                           "guided": ["method=sd_clip", "rollout.guidance=always"]},
                    variants={"sd_clip": {"tau2": ["aggregation.tau=2"], "tau0.5": ["aggregation.tau=0.5"]}},
                    final=["budget.problems=64"], seeds="0,1", lr_from={"guided": "sd_clip"})
    assert list(regime.swept()) == ["sd_clip", "sft"]
    chosen = choose(find_runs(select), regime)
    assert {arm: (entry["lr"], entry["variant"]) for arm, entry in chosen.items()} == {
        "sd_clip": (1e-4, "tau2"), "sft": (1e-4, None), "guided": (1e-4, None)}
    assert "| guided | 0.0001 (that of sd_clip) | – | – | – | – | – |" in selection_markdown(chosen)
    assert chosen["sd_clip"]["variant_scores"] == {"tau0.5": 0.40, "tau2": 0.45}
    assert "| sd_clip | 0.0001 (highest of the grid) | 0.400 | 0.200 | 3e-05: 0.300, 0.0001: 0.400 | tau2 | tau0.5: 0.400, tau2: 0.450 |" \
        in selection_markdown(chosen)
    commands = final_commands(tmp_path, regime, chosen, ["model=tiny_random"])
    dirs = [next(w for w in c if w.startswith("hydra.sweep.dir=")).split("/final/")[1] for c in commands]
    assert dirs == ["sd_clip/seed0", "sd_clip/seed1", "sd_clip@tau2/seed0", "sd_clip@tau2/seed1",
                    "sft/seed0", "sft/seed1", "guided/seed0", "guided/seed1"]
    assert "rollout.guidance=always" in commands[-1] and "optim.lr=0.0001" in commands[-1]
    tau2 = commands[2]
    assert tau2[tau2.index("--config-name") + 1] == "protocol_final"
    assert tau2[-6:] == ["aggregation.tau=2", "optim.lr=0.0001", "seed=0", "data.solution_style=native",
                         "budget.problems=64", "model=tiny_random"]


@pytest.mark.slow
def test_a_regime_runs_end_to_end_and_records_its_stages(tmp_path):
    regime = tmp_path / "tiny.yaml"
    regime.write_text(
        "description: tiny\n"
        "setting: [model=tiny_random, data.train_size=24, data.validation_size=8, data.eval_size=4, "
        "data.batch_size=2, rollout.max_new_tokens=8, eval.max_new_tokens=8, eval.batch_size=8, "
        "budget.problems=4, trainer.max_steps=2]\n"
        "prepare: [[sdharness.tools.probe, --help]]\n"
        "arms: {sd_clip: [method=sd_clip], sft: [method=sft]}\n"
        "variants: {sd_clip: {tau2: [aggregation.tau=2.0]}}\n"
        "lrs: 1e-3\nseeds: '0'\nfinal: [eval.every_n_steps=1]\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "sdharness.tools.regimes", str(regime), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (out / "select").iterdir()) == ["sd_clip", "sd_clip@tau2", "sft"]
    chosen = json.loads((out / "selection.json").read_text())
    assert set(chosen) == {"sd_clip", "sft"} and chosen["sd_clip"]["lr"] == 1e-3
    assert set(chosen["sd_clip"]["variant_scores"]) == {"tau2"}
    assert (out / "final" / "report" / "report.md").is_file()
    assert len(list((out / "final" / "sft" / "seed0").glob("*/metrics.csv"))) == 1  # native references only
    record = json.loads((out / "regime.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["commit"].removesuffix("+dirty") == head
    assert record["regime"] == "tiny" and set(record["seconds"]) == {"prepare", "select", "select_variants",
                                                                       "final", "report"}


def test_an_unknown_regime_names_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        regime_main(["nope", "--out", str(tmp_path)])
    assert f"no regime 'nope': choose from {', '.join(REGIME_CHOICES)} or give a .yaml path" in capsys.readouterr().err
    assert set(REGIME_CHOICES) >= {"chatlog", "hard", "impossible_knowledge"}


@pytest.mark.parametrize("arm, message", [
    ("[method=sd_clip, aggregation.taux=2]", r"arm a: .*aggregation\.taux"),
    ("[method=sd_clipp]", r"arm a: method=sd_clipp is unknown; choose one of: .*did you mean method=sd_clip"),
    ("[method=sd_trust_region, aggregation.tau=0.5]", r"arm a: aggregation.tau=0.5 does not apply to "
                                                       r"aggregation=trust_region"),
])
def test_a_bad_arm_fails_before_any_job_with_one_line_naming_it(tmp_path, capsys, arm, message):
    regime = tmp_path / "bad.yaml"
    regime.write_text(f"description: x\nsetting: [model=tiny_random]\narms: {{a: {arm}}}\n")
    with pytest.raises(SystemExit):
        regime_main([str(regime), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, error), error
    assert not (tmp_path / "out" / "select").exists()
