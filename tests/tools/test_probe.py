"""sdharness-probe: its pure figures on hand-checked cases, and the table on the shipped testbed base."""

from __future__ import annotations

import json

import pytest
import torch

from sdharness.distill.aggregation import AGGREGATIONS
from sdharness.distill.diagnostics import target_diagnostics
from sdharness.data.chain import CHAIN, chain_operations
from sdharness.tools.probe_figures import first_deviation, first_difference

consistent_continuation = CHAIN.consistent_continuation

PROBLEM = "Start with 7. Add 5. Multiply by 3. Subtract 4. What is the result?"
REFERENCE = "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 32\nThe answer is 32."


def test_first_deviation():
    assert first_deviation([1, 2, 3], [1, 2, 3]) is None
    assert first_deviation([1, 2], [1, 2, 3]) is None  # stopped inside the reference
    assert first_deviation([1, 5, 3], [1, 2, 3]) == 1
    assert first_deviation([1, 2, 3, 4], [1, 2, 3]) == 3  # went on past its end


def test_chain_operations_reads_the_problem():
    assert chain_operations(PROBLEM) == [("+", 5), ("*", 3), ("-", 4)]


def test_consistent_continuation_after_a_slipped_result():
    completion = "7 + 5 = 12\n12 * 3 = 35\n35 - 4 = 30\nThe answer is 30."
    slip_at = completion.index("35") + 1  # "3" agrees with the reference's 36, "5" does not
    got = consistent_continuation(PROBLEM, completion, REFERENCE, slip_at)
    assert got == {"consistent": "7 + 5 = 12\n12 * 3 = 35\n35 - 4 = 31\n", "copied": "7 + 5 = 12\n12 * 3 = 35\n35 - 4 = 32\n"}


def test_consistent_continuation_after_a_slip_in_the_last_step_is_the_answer_line():
    completion = "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 33\nThe answer is 33."
    got = consistent_continuation(PROBLEM, completion, REFERENCE, completion.index("33") + 1)
    assert got == {"consistent": "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 33\nThe answer is 33.",
                   "copied": "7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 33\nThe answer is 32."}


def test_a_next_result_that_extends_the_copied_one_still_differs_at_its_end():
    """12 * 3 written 27: the consistent next result 1 is a prefix of the reference's 10, so the
    texts differ only at the line end, which is part of each result."""
    problem = "Start with 7. Add 5. Multiply by 3. Subtract 26. What is the result?"
    reference = "7 + 5 = 12\n12 * 3 = 36\n36 - 26 = 10\nThe answer is 10."
    completion = "7 + 5 = 12\n12 * 3 = 27\n27 - 26 = 1\nThe answer is 1."
    got = consistent_continuation(problem, completion, reference, completion.index("27"))
    assert got == {"consistent": "7 + 5 = 12\n12 * 3 = 27\n27 - 26 = 1\n", "copied": "7 + 5 = 12\n12 * 3 = 27\n27 - 26 = 10\n"}
    assert first_difference(got["consistent"], got["copied"]) == len("7 + 5 = 12\n12 * 3 = 27\n27 - 26 = 1")


@pytest.mark.parametrize("completion,slip_at", [
    ("7 + 6 = 13\n", 4),                   # a misread operand, not a slipped result
    ("7 + 5 = 12\nThe answer is 12.", 11),  # stopped early
    ("7 * 5 = 35\n", 2),                   # the wrong operation
])
def test_consistent_continuation_is_none_for_other_deviations(completion, slip_at):
    assert consistent_continuation(PROBLEM, completion, REFERENCE, slip_at) is None


def test_probe_kl_per_position_matches_float64():
    """The probe's KL(teacher || student) before and after the first deviation is target_diagnostics'."""
    torch.manual_seed(0)
    t = torch.log_softmax(torch.randn(3, 5, 11), -1)
    s = torch.log_softmax(torch.randn(3, 5, 11), -1)
    t64, s64 = t.double(), s.double()
    expected = (t64.exp() * (t64 - s64)).sum(-1)
    assert torch.allclose(target_diagnostics(t, s).kl_target_student.double(), expected, atol=1e-6)
    assert torch.allclose(target_diagnostics(t, t).kl_target_student, torch.zeros(3, 5), atol=1e-6)


def run_probe(tmp_path, overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    from sdharness.tools.probe import RESULT_NAME, probe
    from tests.conftest import TINY, compose_config

    cfg = OmegaConf.to_object(compose_config(overrides + ["logger.mode=disabled"], config_name="probe"))
    result = probe(cfg, tmp_path)
    assert json.loads((tmp_path / RESULT_NAME).read_text()) == result
    return result


def test_probe_on_the_stress_case_base_shows_the_copying_teacher(tmp_path):
    """The first base (model=testbed_v1), 16 HARD problems. Measured (seed 0, 1 thread): no hint
    0.250, native hint 1.000, foreign hint 0.000; 14/16 samples leave the reference, all 14 with a
    slipped result; at the first deviation the teacher's argmax is the reference token 14/14
    (mean p_T 0.999, p_S 0.297); KL per token 0.018 before, 0.293 after; on the next result
    it copies the reference 14/14 and follows the student 0/14."""
    result = run_probe(tmp_path, ["model=testbed_v1", "data.task=chain", "data.eval_size=16"])
    greedy, deviation, slip = result["greedy"], result["deviation"], result["after_slip"]
    assert greedy["hint_native"]["accuracy"] >= 0.95 and greedy["hint_foreign"]["accuracy"] <= 0.1
    assert greedy["no_hint"]["accuracy"] <= 0.4
    assert deviation["teacher_argmax_is_reference"] >= 0.95 and deviation["p_teacher_reference"] >= 0.95
    assert deviation["kl_after"] > 5 * deviation["kl_before"]
    assert slip["slips"] >= 10 and slip["copies_reference"] >= 0.9 and slip["follows_student"] <= 0.1
    assert set(result["aggregation"]) == set(AGGREGATIONS)  # every registered aggregation, none named here
    assert result["aggregation"]["clip"]["parameter"] == "tau=1" and result["aggregation"]["teacher"]["parameter"] is None


TOLERANCE = 0.05


def test_probe_on_the_chain_base(tmp_path):
    """The chained-arithmetic base (model=testbed_chain data.task=chain), 32 HARD problems, seed 0, 1 thread. Measured: no hint
    0.438, native hint 0.938, foreign hint 0.875; 25/32 samples leave the reference, all at a
    slipped result; at the first deviation the teacher's argmax is the reference token 25/25
    (mean p_T 0.989, p_S 0.477); KL 0.024 before, 0.224 after; on the next result the teacher
    follows the student 0.200 and copies the reference 0.760.

    Against issue 13's targets (within 5 points): no hint .15-.40, native hint >= .95 and
    argmax = reference >= .90 are met; foreign hint >= .95 is not (0.875 here, 0.898 on 128
    problems) and neither is following the student after a slip (>= .90; 0.26 on 128 problems,
    copying 0.71 against <= .10): those two are asserted at their measured values, so a better
    base shows up here as a failure to update, a worse one as a regression."""
    result = run_probe(tmp_path, ["model=testbed_chain", "data.task=chain", "data.eval_size=32"])
    greedy, deviation, slip = result["greedy"], result["deviation"], result["after_slip"]
    assert 0.15 - TOLERANCE <= greedy["no_hint"]["accuracy"] <= 0.40 + TOLERANCE
    assert greedy["hint_native"]["accuracy"] >= 0.95 - TOLERANCE
    assert greedy["hint_native"]["early_answer_rate"] == 0.0
    assert deviation["teacher_argmax_is_reference"] >= 0.90 - TOLERANCE
    assert deviation["p_teacher_reference"] >= deviation["p_student_reference"] + 0.3
    # not yet at the targets: asserted at the measured values
    assert abs(greedy["hint_foreign"]["accuracy"] - 0.875) <= TOLERANCE
    assert slip["slips"] >= 20
    assert abs(slip["follows_student"] - 0.200) <= TOLERANCE and abs(slip["copies_reference"] - 0.760) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("override,named", [
    ("data=chatlog", "data=chatlog has no problems"),
    ("data.eval_sise=3", "data.eval_sise is not a config key (did you mean data.eval_size?)"),
    ("data=jsonl data.path=/no/such.jsonl", "data.path: /no/such.jsonl does not exist"),
    ("model=testbed data.task=chain", "data.task='chain', but model.path='pkg://sdharness/assets/testbed'"),
])
def test_command_line_bad_input_is_one_error_line(tmp_path, override, named):
    """Was a traceback (ConfigError from the schema check); a bad data file now fails before the model loads."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, "-m", "sdharness.tools.probe", *override.split(),
                             f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdharness: error: ") and named in lines[0], result.stderr


def _tiny_model():
    from sdharness.models import char_tokenizer
    from testbed.pretrain import build_model
    from testbed.pretrain_config import ArchConfig

    tokenizer = char_tokenizer()
    return build_model(ArchConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16), tokenizer, 0).eval(), tokenizer


@pytest.mark.parametrize("completion,slip_at,counted", [
    # a wrong total: the continuations differ at the answer's tens digit, so the slip counts
    ("1+7=8\n8+3=10\n5+6+1=12\n9+4+1=14\nThe answer is 14208.", 7, 1),
    # digits swapped with the right total: nothing after it differs, so it is no slip to score
    ("7+1=8\n8+3=11\n5+6+1=12\n9+4+1=14\nThe answer is 14218.", 0, 0),
])
def test_a_slip_counts_only_where_following_and_copying_differ(completion, slip_at, counted):
    """Counted before, a slip after which the two continuations agree scored as neither, pulling
    both rates down; the chained task's next result always differs, so its figures are unchanged."""
    from sdharness.config import PromptConfig
    from sdharness.data.columns import COLUMNS
    from sdharness.tools.probe import _follow_or_copy
    from sdharness.tools.probe_figures import Accumulator

    model, tokenizer = _tiny_model()
    cfg = type("Cfg", (), {"prompt": PromptConfig(name="testbed", chat_template="never")})()
    problem = {"problem": "Add 9581 and 4637. What is the sum?",
               "solution": "1+7=8\n8+3=11\n5+6+1=12\n9+4+1=14\nThe answer is 14218."}
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    acc = Accumulator()
    _follow_or_copy(cfg, model, tokenizer, acc, COLUMNS, problem, ids, slip_at, "Q: x\nA:")
    assert acc.slips == counted and acc.follows + acc.copies <= counted


@pytest.mark.slow
def test_probe_on_the_default_base(tmp_path):
    """``sdharness-probe`` as it comes (model=testbed, data.task=columns), 128 HARD problems, seed 0,
    1 thread. Measured on the shipped base: no hint 0.312, native hint 0.961, foreign hint 0.961,
    early answers 0; 97/128 samples leave the reference; at the first deviation the teacher's argmax
    is the reference token on all of them (p_T 0.998, p_S 0.402); KL 0.010 before, 0.096 after; 94
    slips after which following and copying differ: the teacher follows the student on all 94 and
    copies the reference on none. Every one of issue 13's probe targets is met."""
    result = run_probe(tmp_path, [])
    greedy, deviation, slip = result["greedy"], result["deviation"], result["after_slip"]
    assert 0.15 <= greedy["no_hint"]["accuracy"] <= 0.40 and abs(greedy["no_hint"]["accuracy"] - 0.312) <= TOLERANCE
    assert greedy["hint_native"]["accuracy"] >= 0.95 and greedy["hint_foreign"]["accuracy"] >= 0.95
    assert greedy["hint_native"]["early_answer_rate"] == 0.0 and greedy["hint_foreign"]["early_answer_rate"] == 0.0
    assert deviation["teacher_argmax_is_reference"] >= 0.90
    assert slip["slips"] >= 80 and slip["follows_student"] >= 0.90 and slip["copies_reference"] <= 0.10


@pytest.mark.slow
def test_sft_on_native_references_learns_the_default_base_task(tmp_path):
    """Issue 13's learnability target, under its stable regime (lr 1e-4, batch 32, 2048 HARD problems
    with native references), on the shipped base: 0.316 -> 0.887 on 256 eval problems (README). Here
    on 128 of them, to keep the suite short: 0.312 -> 0.883. It says the task can be learnt in the
    budget, nothing about SD."""
    import csv

    from sdharness.train import train
    from tests.conftest import TINY, compose_config

    train(compose_config(["experiment=testbed", "method=sft", "optim.lr=1e-4", "data.batch_size=32", "budget.problems=2048",
                          "data.eval_size=128", "eval.every_n_steps=0", "logger.mode=disabled", "threads=1"]), tmp_path)
    with open(tmp_path / "metrics.csv") as handle:
        accuracies = [float(r["eval/accuracy"]) for r in csv.DictReader(handle) if r.get("eval/accuracy")]
    before, after = accuracies[0], accuracies[-1]
    assert after - before >= 0.15
    assert abs(before - 0.312) <= TOLERANCE and abs(after - 0.883) <= TOLERANCE, (before, after)


def test_probe_table_lists_the_loss_knobs_that_change_the_target():
    """loss.support=topk merges the target's mass outside the teacher's top-k into one bucket and
    loss.entry_clip caps single KL terms: the table shows both per aggregation."""
    from sdharness.tools.probe_figures import Accumulator, figures, format_table

    acc = Accumulator(aggregation={"clip": {"mass": [0.1], "log_ratio": [0.0], "kl": [0.2], "tail": [0.25, 0.75],
                                            "entry": [0.5, 1.5]}})
    result = figures({"no_hint": {"accuracy": 0.5, "early_answer_rate": None}}, acc, {"clip": 1.0}, 1e-3, top_k=64)
    assert result["aggregation"]["clip"]["topk_tail_mass"] == 0.5 and result["aggregation"]["clip"]["max_entry_term"] == 1.0
    header, row = format_table(result).splitlines()[-2:]
    assert header.split()[-6:] == ["q", "outside", "top-64", "max", "KL", "term"]
    assert row.split()[-2:] == ["0.5000", "1.000"]


def test_probe_defaults_are_the_registrys_and_what_each_aggregation_option_composes():
    """The probe asks the registry for each aggregation's parameter, not conf/; ``aggregation=<name>``
    sets the same value, so the probe measures what a training run would use."""
    from sdharness.config import to_train_config
    from sdharness.tools.probe import default_parameters
    from tests.conftest import TINY, compose_config

    assert default_parameters() == {"teacher": None, "product": 2.0, "clip": 1.0, "entropy_matched": None,
                                    "trust_region": 0.1}
    for name, value in default_parameters().items():
        assert to_train_config(compose_config(TINY + [f"aggregation={name}"])).aggregation.parameter == value, name


def test_probe_table_names_each_aggregations_parameter():
    from sdharness.tools.probe_figures import Accumulator, figures, format_table

    rows = {"mass": [0.1], "log_ratio": [0.0], "kl": [0.2], "tail": [0.25], "entry": [0.5]}
    acc = Accumulator(aggregation={name: dict(rows) for name in ("clip", "trust_region", "teacher")})
    result = figures({"no_hint": {"accuracy": 0.5, "early_answer_rate": None}}, acc,
                     {"clip": 1.0, "trust_region": 0.1, "teacher": None}, 1e-3)
    assert {name: row["parameter"] for name, row in result["aggregation"].items()} == {
        "clip": "tau=1", "trust_region": "kl_bound=0.1", "teacher": None}
    table = format_table(result).splitlines()
    assert [line.split()[:2] for line in table[-3:]] == [["clip", "tau=1"], ["trust_region", "kl_bound=0.1"],
                                                         ["teacher", "–"]]
