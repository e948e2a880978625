"""sdharness-report: tokens-to-target maths, labels, report files, failed jobs, and a real tiny sweep."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sdharness.jobs import FAILED_FILE, read_failure, write_failure
from sdharness.report.build import SummaryCallback, build_report, main
from sdharness.report.curves import mean_curve, summarize, tokens_to_target, trained
from sdharness.report.runs import bootstrapped_data, find_runs
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["step", "train/loss", "eval/accuracy", "eval/early_answer_rate", "eval/leakage_rate",
           "eval/completion_length", "train/problems_seen", "train/generated_tokens", "train/flops",
           "train/wall_seconds", "lmeval/gsm8k/exact_match"]


def fake_run(path: Path, algo: str, evals, *, aggregation="clip", tau=1.0, seed=0, lr=1e-5, lmeval=None,
             more=None, cwd=None):
    """A run dir like Hydra + CSVLogger write: ``evals`` are (generated_tokens, accuracy) points,
    one eval every 2 problems and 100 FLOPs per token, the first before training (step 0); ``more``
    is merged into the config, ``cwd`` is the launch directory recorded in ``.hydra/hydra.yaml``."""
    (path / ".hydra").mkdir(parents=True)
    (path / "final_model").mkdir()
    config = {"algo": {"name": algo, "group_size": 8}, "aggregation": {"name": aggregation, "tau": tau},
              "optim": {"lr": lr}, "seed": seed, "tags": [f"algo={algo}", f"seed={seed}"], "logger": {"group": "g"},
              "data": {"name": "arithmetic", "path": None}, "rollout": {"guidance": "never"}}
    OmegaConf.save(OmegaConf.merge(config, more or {}), path / ".hydra" / "config.yaml")
    if cwd is not None:
        OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"cwd": str(cwd)}}}), path / ".hydra" / "hydra.yaml")
    OmegaConf.save(OmegaConf.create([f"seed={seed}"]), path / ".hydra" / "overrides.yaml")
    with open(path / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        for i, (tokens, accuracy) in enumerate(evals):
            counters = {"train/problems_seen": 2 * i, "train/generated_tokens": tokens, "train/flops": 100 * tokens,
                        "train/wall_seconds": 0.5 * i}
            if i:  # a training row between evals, without eval columns
                writer.writerow({"step": i, "train/loss": 0.1, **counters})
            writer.writerow({"step": i, "eval/accuracy": accuracy, "eval/early_answer_rate": 0.1,
                             "eval/leakage_rate": 0.0, "eval/completion_length": 20 + i, **counters})
        if lmeval is not None:
            writer.writerow({"step": len(evals), "lmeval/gsm8k/exact_match": lmeval})
    return path


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root / "0", "grpo", [(0, 0.1), (500, 0.3), (1000, 0.5), (1500, 0.5)], lmeval=0.2)
    fake_run(root / "1", "sd", [(0, 0.1), (200, 0.4), (400, 0.5), (600, 0.7)], seed=0)
    fake_run(root / "2", "sd", [(0, 0.1), (250, 0.45), (400, 0.55), (650, 0.6)], seed=1)
    fake_run(root / "3", "sft", [(0, 0.1), (0, 0.2), (0, 0.3), (0, 0.3)])
    return root


def test_tokens_to_target_is_the_first_point_reaching_it():
    points = [(0, 0.1), (200, 0.4), (400, 0.5), (600, 0.45), (800, 0.9)]
    assert tokens_to_target(points, 0.5) == 400
    assert tokens_to_target(points, 0.1) == 0
    assert tokens_to_target(points, 0.95) is None
    assert tokens_to_target([(0, float("nan")), (5, 0.5)], 0.5) == 5


def test_only_evals_after_training_started_count():
    assert not trained({"step": 0.0, "train/problems_seen": 0.0}) and trained({"step": 3.0})
    assert not trained({"trainer/global_step": 0, "_step": 5}) and trained({"trainer/global_step": 1})  # W&B rows
    assert not trained({"train/problems_seen": 0.0}) and trained({"train/problems_seen": 8.0})  # no step logged


def test_summarize_and_mean_curve():
    # t(0.975, 1 dof) = 12.7062047: the 95% half-width of a mean of 2 values is 12.706 |a - b| / 2
    found = summarize([1.0, 3.0, None, float("nan")])
    assert found == pytest.approx({"mean": 2.0, "std": math.sqrt(2), "ci": 12.7062047, "min": 1.0, "max": 3.0, "n": 2})
    assert summarize([])["n"] == 0 and math.isnan(summarize([])["mean"])
    one = summarize([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["std"]) and math.isnan(one["ci"])
    x, mean, low, high = mean_curve([([0, 10, 20], [0.0, 1.0, 1.0]), ([0, 20, 30], [0.0, 0.5, 0.9])])
    assert list(x) == [0, 10, 20]  # the range both cover
    half = [0.0, 12.7062047 * 0.75 / 2, 12.7062047 * 0.5 / 2]
    assert list(mean) == [0.0, 0.625, 0.75]
    assert list(low) == pytest.approx([m - h for m, h in zip(mean, half)])
    assert list(high) == pytest.approx([m + h for m, h in zip(mean, half)])


def test_tokens_to_target_against_grpo_from_metric_files(sweep, tmp_path):
    result = build_report(find_runs(sweep), tmp_path / "out", plots=False)
    assert result["reference"] == "grpo" and result["target"] == pytest.approx(0.5)
    table = result["to_target"]
    assert table["grpo"]["generated_tokens"] == 1000 and table["grpo"]["generated_tokens_ratio"] == pytest.approx(1.0)
    sd = table["sd/clip/tau=1"]
    assert (sd["generated_tokens"], sd["flops"], sd["reached"], sd["n"]) == (400, 40000, 2, 2)
    assert sd["generated_tokens_ratio"] == pytest.approx(0.4) and sd["flops_ratio"] == pytest.approx(0.4)
    assert table["sft"]["reached"] == 0 and table["sft"]["generated_tokens"] is None
    assert table["sft"]["generated_tokens_ratio"] is None and table["sft"]["flops"] is None
    scores = result["scores"]["sd/clip/tau=1"]["eval/accuracy"]
    assert (scores["mean"], scores["min"], scores["max"], scores["n"]) == pytest.approx((0.65, 0.6, 0.7, 2))
    assert result["scores"]["grpo"]["lmeval/gsm8k/exact_match"]["mean"] == pytest.approx(0.2)
    md = result["path"].read_text()
    assert "| sd/clip/tau=1 | 2/2 | 400 ± 0 | 0.400 | 4e+04 ± 0 | 0.400 |" in md
    assert "| sft | 0/1 | not reached | not reached | not reached | not reached |" in md
    # an explicit target wins over GRPO's; ratios stay relative to GRPO
    table = build_report(find_runs(sweep), tmp_path / "out2", target_accuracy=0.4, plots=False)["to_target"]
    assert table["sd/clip/tau=1"]["generated_tokens"] == 225 and table["grpo"]["generated_tokens"] == 1000


def test_the_base_models_eval_does_not_reach_the_target(sweep, tmp_path):
    """The eval before training (step 0) of a base that already beats the target is not reaching it
    (it used to count as 0 tokens): the first eval after training started that reaches it counts."""
    fake_run(sweep / "4", "sd", [(0, 0.6), (300, 0.3), (700, 0.45)], aggregation="teacher")  # never after start
    fake_run(sweep / "5", "sd", [(0, 0.9), (100, 0.2), (350, 0.55)], aggregation="product", tau=2.0)
    result = build_report(find_runs(sweep), tmp_path / "out", plots=False)
    table = result["to_target"]
    assert result["target"] == pytest.approx(0.5) and table["grpo"]["generated_tokens"] == 1000
    teacher, product = table["sd/teacher"], table["sd/product/tau=2"]
    assert (teacher["reached"], teacher["generated_tokens"], teacher["flops"], teacher["flops_ratio"]) == (0, None, None, None)
    assert (product["reached"], product["generated_tokens"], product["flops"]) == (1, 350, 35000)
    assert product["generated_tokens_ratio"] == pytest.approx(0.35)
    md = result["path"].read_text()
    assert "| sd/teacher | 0/1 | not reached | not reached | not reached | not reached |" in md
    assert "| sd/product/tau=2 | 1/1 | 350 | 0.350 | 3.5e+04 | 0.350 |" in md
    # Above the base (mean of the step-0 evals, 0.317): sd/teacher's base eval (0.6) would have given 0 tokens
    result = build_report(find_runs(sweep), tmp_path / "out2", target_accuracy=0.35, plots=False)
    table = result["to_target"]
    assert result["base"] == pytest.approx((4 * 0.1 + 0.6 + 0.9) / 6)
    assert table["sft"]["reached"] == 0 and table["grpo"]["generated_tokens"] == 1000
    assert table["sd/product/tau=2"]["generated_tokens"] == 350 and table["sd/teacher"]["generated_tokens"] == 700


def test_seeds_that_miss_the_target_are_counted_apart(tmp_path):
    fake_run(tmp_path / "s" / "0", "grpo", [(0, 0.1), (100, 0.5)])
    fake_run(tmp_path / "s" / "1", "sd", [(0, 0.6), (50, 0.5)], seed=0)
    fake_run(tmp_path / "s" / "2", "sd", [(0, 0.6), (50, 0.4)], seed=1)
    result = build_report(find_runs(tmp_path / "s"), tmp_path / "out", plots=False)
    sd = result["to_target"]["sd/clip/tau=1"]
    assert (sd["reached"], sd["n"], sd["generated_tokens"], sd["generated_tokens_ratio"]) == (1, 2, 50, 0.5)
    assert "| sd/clip/tau=1 | 1/2 | 50 | 0.500 |" in result["path"].read_text()


def test_guided_chatlog_and_bootstrapped_runs_are_labelled_as_their_own_setting(tmp_path):
    """Settings that change what a method trains on are part of its label, not only config differences."""
    launch = tmp_path / "launch"  # data paths are relative to the directory the sweep was launched from
    (launch / "data").mkdir(parents=True)
    (launch / "data" / "solved.jsonl").write_text(json.dumps({"problem": "1+1", "solution": "2", "answer": "2"}) + "\n")
    (launch / "data" / "solved.jsonl.provenance.json").write_text("{}")
    root, evals = tmp_path / "s", [(0, 0.1), (100, 0.3)]
    product = {"aggregation": "product", "tau": 2.0}
    fake_run(root / "0", "sd", evals, **product)
    fake_run(root / "1", "sd", evals, **product, more={"rollout": {"guidance": "on_failure"}})
    fake_run(root / "2", "sd", evals, **product, more={"rollout": {"guidance": "always", "importance_weighting": True}})
    fake_run(root / "3", "sd", evals, **product, more={"rollout": {"guidance": "always", "importance_weighting": False}})
    fake_run(root / "4", "sd", evals, **product, more={"data": {"name": "chatlog", "path": "pkg://sdharness/assets/chatlog/c.jsonl"}})
    fake_run(root / "5", "sd", evals, **product, more={"data": {"name": "jsonl", "path": "data/solved.jsonl"}}, cwd=launch)
    fake_run(root / "6", "grpo", evals, more={"rollout": {"guidance": "always"}})  # guidance is sd-only: ignored
    fake_run(root / "7", "sft", evals, more={"data": {"name": "chatlog", "path": "c.jsonl"}})
    fake_run(root / "8", "sd", evals, **product, more={"algo": {"name": "sd", "hint_source": "sibling"}})
    fake_run(root / "9", "sd", evals, **product, more={"algo": {"name": "sd", "hint_source": "reference"}})
    result = build_report(find_runs(root), tmp_path / "out", plots=True)
    labels = {Path(r.name).name: r.label for r in result["runs"]}
    assert labels == {"0": "sd/product/tau=2", "1": "sd/product/tau=2 guided=on_failure",
                      "2": "sd/product/tau=2 guided=always rollout.importance_weighting=True",
                      "3": "sd/product/tau=2 guided=always rollout.importance_weighting=False",
                      "4": "sd/product/tau=2 chatlog", "5": "sd/product/tau=2 bootstrapped", "6": "grpo",
                      "7": "sft chatlog", "8": "sd/product/tau=2 sibling_hints", "9": "sd/product/tau=2"}
    assert len(result["scores"]) == 9  # each its own line of the score table, not averaged together
    md = result["path"].read_text()
    assert "| sd/product/tau=2 guided=on_failure | 1 |" in md and "| sd/product/tau=2 bootstrapped | 1 |" in md
    assert "| sft chatlog | 1 |" in md and (tmp_path / "out" / "accuracy_vs_parameter.png").stat().st_size > 1000


def test_bootstrapped_data_is_recognised_by_its_provenance_or_its_rows(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"problem": "p", "solution": "s", "answer": "1", "bootstrap": {"samples": 4}}) + "\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"problem": "p", "solution": "s", "answer": "1"}) + "\n")
    (tmp_path / "sidecar.jsonl").write_text("")
    (tmp_path / "sidecar.jsonl.provenance.json").write_text("{}")
    jsonl = lambda path: {"data.name": "jsonl", "data.path": path}
    assert bootstrapped_data(jsonl("sidecar.jsonl"), cwd=tmp_path) and bootstrapped_data(jsonl(str(rows)))
    assert not bootstrapped_data(jsonl(str(plain))) and not bootstrapped_data(jsonl(str(tmp_path / "missing.jsonl")))
    assert not bootstrapped_data({"data.name": "arithmetic"}) and not bootstrapped_data(jsonl("pkg://sdharness/x.jsonl"))
    # the built-in task with its training solutions from a bootstrap (data.solutions_path)
    assert bootstrapped_data({"data.name": "arithmetic", "data.solutions_path": "sidecar.jsonl"}, cwd=tmp_path)
    assert not bootstrapped_data({"data.name": "arithmetic", "data.solutions_path": str(plain)})


def test_report_writes_markdown_pngs_table_and_config_differences(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path / "out")])
    # 0.6 and 0.7: 95% half-width t(1 dof) 12.706 * std 0.0707 / sqrt(2) = 0.635
    assert "| sd/clip/tau=1 | 2 | 0.650 ± 0.635 |" in capsys.readouterr().out
    out = tmp_path / "out"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["accuracy_vs_flops.png", "accuracy_vs_generated_tokens.png", "accuracy_vs_parameter.png",
                    "accuracy_vs_problems_seen.png", "accuracy_vs_wall_seconds.png"]
    assert all((out / p).stat().st_size > 1000 for p in pngs)
    md = (out / "report.md").read_text()
    assert all(f"]({p})" in md for p in pngs)
    assert "| run | algo.name | seed |" in md and "| 2 | sd | 1 |" in md  # only the keys that differ
    assert "lmeval/gsm8k/exact_match" in md and "4 completed, 0 failed" in md


def test_each_aggregation_is_labelled_with_its_own_parameter(tmp_path):
    """trust_region's label names its KL bound, not the unused tau; teacher and entropy_matched name none;
    a run from before aggregation.kl_bound existed carried the bound in aggregation.tau."""
    evals = [(0, 0.1), (10, 0.2)]
    fake_run(tmp_path / "s" / "0", "sd", evals, aggregation="trust_region", tau=2.0, more={"aggregation": {"kl_bound": 0.1}})
    fake_run(tmp_path / "s" / "1", "sd", evals, aggregation="trust_region", tau=2.0, more={"aggregation": {"kl_bound": 0.05}})
    fake_run(tmp_path / "s" / "2", "sd", evals, aggregation="teacher", tau=2.0, more={"aggregation": {"kl_bound": 0.1}})
    fake_run(tmp_path / "s" / "3", "sd", evals, aggregation="entropy_matched", tau=2.0)
    fake_run(tmp_path / "s" / "4", "sd", evals, aggregation="clip", tau=1.0, more={"aggregation": {"kl_bound": 0.1}})
    fake_run(tmp_path / "old" / "0", "sd", evals, aggregation="trust_region", tau=0.5)
    result = build_report(find_runs(tmp_path / "s"), tmp_path / "out", plots=True)
    assert {Path(r.name).name: r.label for r in result["runs"]} == {
        "0": "sd/trust_region/kl_bound=0.1", "1": "sd/trust_region/kl_bound=0.05", "2": "sd/teacher",
        "3": "sd/entropy_matched", "4": "sd/clip/tau=1"}
    assert (tmp_path / "out" / "accuracy_vs_parameter.png").stat().st_size > 1000
    # the config differences show only the parameter each aggregation reads: the tau that only clip
    # reads differs from no other run's, so it is no column
    differences = result["path"].read_text().split("## Config differences")[1].split("## Runs")[0]
    table = [[cell.strip() for cell in line.split("|")[1:-1]] for line in differences.splitlines()
             if line.startswith("| ")]
    assert table[0] == ["run", "aggregation.kl_bound", "aggregation.name"]
    assert {row[0]: row[1:] for row in table[1:]} == {
        "0": ["0.1", "trust_region"], "1": ["0.05", "trust_region"], "2": ["n/a", "teacher"],
        "3": ["–", "entropy_matched"], "4": ["n/a", "clip"]}
    old = build_report(find_runs(tmp_path / "old"), tmp_path / "old_out", plots=False)
    assert [r.label for r in old["runs"]] == ["sd/trust_region/kl_bound=0.5"]


def test_runs_differing_in_another_key_are_separate_lines_and_one_run_dir_works(tmp_path):
    fake_run(tmp_path / "s" / "0", "sd", [(0, 0.1), (10, 0.2)], lr=1e-5)
    fake_run(tmp_path / "s" / "1", "sd", [(0, 0.1), (10, 0.3)], lr=1e-4)
    result = build_report(find_runs(tmp_path / "s"), tmp_path / "out", target_accuracy=0.3, plots=False)
    assert sorted(result["scores"]) == ["sd/clip/tau=1 optim.lr=0.0001", "sd/clip/tau=1 optim.lr=1e-05"]
    single = find_runs(tmp_path / "s" / "1")
    assert len(single) == 1 and single[0].status == "completed"
    assert "Skipped: no GRPO run" in build_report(single, tmp_path / "one", plots=False)["path"].read_text()


def test_failed_and_incomplete_jobs_are_listed_with_their_error(sweep, tmp_path):
    failed = sweep / "4"
    (failed / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"algo": {"name": "sd"}, "aggregation": {"name": "clip", "tau": 1.0},
                                     "data": {"path": "/nonexistent.jsonl"}, "seed": 0}),
                   failed / ".hydra" / "config.yaml")
    try:
        raise FileNotFoundError("data.path: /nonexistent.jsonl does not exist")
    except FileNotFoundError as error:
        write_failure(failed, error)
    assert read_failure(failed)["error_type"] == "FileNotFoundError"
    incomplete = fake_run(sweep / "5", "sd", [(0, 0.1)], seed=2)
    (incomplete / "final_model").rmdir()
    result = build_report(find_runs(sweep), tmp_path / "out", plots=False)
    status = {Path(r.name).name: r.status for r in result["runs"]}
    assert status == {"0": "completed", "1": "completed", "2": "completed", "3": "completed", "4": "failed",
                      "5": "incomplete"}
    assert result["scores"]["sd/clip/tau=1"]["eval/accuracy"]["n"] == 2  # failed/incomplete runs not averaged
    md = result["path"].read_text()
    assert "4 completed, 1 failed, 1 incomplete of 6 runs" in md
    assert "### 4: failed" in md and "**FileNotFoundError**: data.path: /nonexistent.jsonl does not exist" in md
    assert "### 5: incomplete" in md and "| 4 | sd/clip/tau=1 | 0 | failed | – |" in md


def test_callback_records_a_raised_job_and_reports_at_the_end(sweep, capsys):
    from hydra.core.utils import JobReturn, JobStatus

    job = sweep / "6"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"algo": {"name": "sft"}, "seed": 0}), job / ".hydra" / "config.yaml")
    ret = JobReturn(status=JobStatus.FAILED)
    ret.return_value = RuntimeError("boom")
    callback = SummaryCallback()
    callback.on_job_end(OmegaConf.create({"hydra": {"runtime": {"output_dir": str(job)}}}), ret)
    assert read_failure(job)["message"] == "boom"
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    out = capsys.readouterr().out
    assert "Final scores" in out and "| grpo | 1 | 0.500 |" in out
    assert "**RuntimeError**: boom" in (sweep / "report" / "report.md").read_text()


def test_wandb_group_is_read_through_the_api(monkeypatch, tmp_path):
    """--wandb-group: W&B history rows and configs become runs (the API is faked: no network)."""
    import types

    def remote(name, algo, points, state="finished"):
        rows = [{"_step": i, "trainer/global_step": i, "eval/accuracy": acc, "train/generated_tokens": tokens,
                 "train/flops": 10 * tokens} for i, (tokens, acc) in enumerate(points)]
        return types.SimpleNamespace(name=name, state=state, url=f"https://wandb.ai/x/{name}", scan_history=lambda: rows,
                                     config={"algo": {"name": algo}, "aggregation": {"name": "clip", "tau": 1.0},
                                             "seed": 0, "_wandb": {"cli_version": "0"}})

    runs = [remote("0", "grpo", [(0, 0.1), (1000, 0.5)]), remote("1", "sd", [(0, 0.1), (400, 0.5)]),
            remote("2", "sd", [(0, 0.1)], state="crashed")]
    api = types.SimpleNamespace(runs=lambda path, filters: runs if filters == {"group": "methods"} else [])
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=lambda: api))
    main(["--wandb-group", "methods", "--wandb-project", "p", "--out", str(tmp_path / "w")])
    md = (tmp_path / "w" / "report.md").read_text()
    assert "| sd/clip/tau=1 | 1/1 | 400 | 0.400 |" in md and "### 2: failed" in md and "W&B state crashed" in md


@pytest.mark.slow
def test_tiny_sweep_reports_completed_and_failed_jobs(tmp_path):
    """tests/sweeps/tiny.yaml: sd and grpo complete; a missing data file (DataError) and a missing
    checkpoint fail inside their jobs, and the sweep goes on (and exits 1 at its end)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "sdharness.train", "-m", "--config-dir", str(REPO / "tests" / "sweeps"),
         "--config-name", "tiny", *TINY, "rollout.max_new_tokens=8", "eval.max_new_tokens=8",
         f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    # the sweep runs every job, reports, then exits 1 naming the failed ones
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"sdharness: error: 2 job(s) of the sweep failed, each recorded in its {FAILED_FILE}: {tmp_path / '2'}, " \
           f"{tmp_path / '3'}" in result.stderr
    assert "Final scores" in result.stdout and "| grpo | 1 |" in result.stdout
    assert (tmp_path / "2" / FAILED_FILE).exists() and (tmp_path / "3" / FAILED_FILE).exists()
    # each job has its own W&B run (the jobs share one process)
    assert all(len(list((tmp_path / n / "wandb").glob("offline-run-*"))) == 1 for n in ("0", "1"))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "2 completed, 2 failed, 0 incomplete of 4 runs" in md
    assert "| sd/clip/tau=1 | 1 |" in md and "| grpo | 1 |" in md
    assert "**DataError**: data.path: /nonexistent/train.jsonl does not exist" in md
    # a missing checkpoint: refused before any model loads (ConfigError), or, before that check, by Lightning's fit
    assert "**ConfigError**: ckpt_path=" in md or "**FileNotFoundError**: Checkpoint file not found" in md
    # four axes, the aggregation parameter, and the teacher's health of the SD run
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")) == [
        "accuracy_vs_flops.png", "accuracy_vs_generated_tokens.png", "accuracy_vs_parameter.png",
        "accuracy_vs_problems_seen.png", "accuracy_vs_wall_seconds.png", "teacher_health.png"]
    assert "| sd/clip/tau=1 | 0.000 |" in md.split("## The teacher's health")[1]  # its final hint accuracy


def test_accuracy_bands_are_drawn_within_0_and_1(tmp_path, monkeypatch):
    """Three seeds of which one collapses give a t-band from below 0 to above 1 (the report's
    figures showed -0.2 to 1.07); the band drawn is that band clipped to the possible range."""
    import matplotlib.axes
    from types import SimpleNamespace

    from sdharness.report.plots import plot_curves

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", lambda self, x, low, high, **kw: drawn.append((low, high)))
    runs = [SimpleNamespace(evals=[{"train/problems_seen": 0, "eval/accuracy": 0.5},
                                   {"train/problems_seen": 8, "eval/accuracy": final}]) for final in (0.6, 0.6, 0.0)]
    x, mean, low, high = mean_curve([([0, 8], [0.5, f]) for f in (0.6, 0.6, 0.0)])
    assert low[1] < 0 and high[1] > 1  # the t-interval itself
    plot_curves({"sd": runs}, "problems_seen", "problems seen", tmp_path / "curves.png")
    (band_low, band_high), = drawn
    assert list(band_low) == [0.5, 0.0] and list(band_high) == [0.5, 1.0]
    assert (tmp_path / "curves.png").is_file()


def test_best_on_validation_health_and_collapse_in_the_report(tmp_path):
    """Two seeds of a live-teacher run that collapses after its teacher's hint reading does, scored on
    validation and eval at every point; the report takes eval accuracy where validation peaked."""
    root = tmp_path / "sweep"
    accuracy = {0: [0.3, 0.8, 0.7, 0.1], 1: [0.3, 0.7, 0.9, 0.0]}
    validation = {0: [0.3, 0.7, 0.8, 0.1], 1: [0.3, 0.8, 0.6, 0.1]}
    hint = [0.96, 0.95, 0.3, 0.0]
    for seed in (0, 1):
        path = fake_run(root / str(seed), "sd", [(0, 0.0)], seed=seed, more={"teacher": {"weights": "live"}})
        with open(path / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["step", "eval/accuracy", "val/accuracy", "train/problems_seen",
                                             "train/wall_seconds", "health/teacher_hint_accuracy_native",
                                             "time/health_seconds", "time/eval_seconds"])
            writer.writeheader()
            for step in range(4):
                writer.writerow({"step": 8 * step, "eval/accuracy": accuracy[seed][step],
                                 "val/accuracy": validation[seed][step], "train/problems_seen": 64 * step,
                                 "train/wall_seconds": 10.0 * step, "health/teacher_hint_accuracy_native": hint[step],
                                 "time/health_seconds": 1.0 * step, "time/eval_seconds": 2.0 * step})
    result = build_report(find_runs(root), tmp_path / "report", target_accuracy=0.5)
    label = "sd/clip/tau=1 teacher=live"
    assert result["scores"][label]["eval/accuracy@best_val"]["mean"] == pytest.approx((0.7 + 0.7) / 2)
    assert f"| {label} | 2 | 0.050 ± 0.635 | 0.700 ± 0.000 |" in result["table"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"| {label} | 0.000 ± 0.000 |" in md  # the teacher's final hint accuracy
    assert "Health evals took 8% of a run's training, eval and health time on average (max 8%)" in md
    assert ("- 1 (sd/clip/tau=1 teacher=live, seed 1): best 0.900 at step 16, final 0.000; dropped by step 24; "
            "first moved: health/teacher_hint_accuracy_native (by step 16)") in md
    assert ("- 0 (sd/clip/tau=1 teacher=live, seed 0): best 0.800 at step 8, final 0.100; dropped by step 24; "
            "first moved: health/teacher_hint_accuracy_native (by step 16)") in md
    assert (tmp_path / "report" / "teacher_health.png").exists()
