"""Report bands and interval arithmetic against hand-built metric files of 3 seeds, exact numbers."""

import csv
import math

import pytest
from omegaconf import OmegaConf

from sdharness.report.build import build_report, find_runs
from sdharness.report.curves import mean_curve, t_halfwidth

T2 = 4.302652729749464  # Student t, 97.5% quantile, 2 degrees of freedom (3 seeds)


def write_run(path, algo, rows, *, aggregation="product", tau=2.0, seed=0, lr=1e-4):
    """A run dir: ``rows`` are metrics.csv dicts, the first eval at step 0 (the base model)."""
    (path / ".hydra").mkdir(parents=True)
    (path / "final_model").mkdir()
    config = {"algo": {"name": algo}, "aggregation": {"name": aggregation, "tau": tau}, "optim": {"lr": lr},
              "seed": seed, "data": {"name": "arithmetic"}, "rollout": {"guidance": "never"}}
    OmegaConf.save(OmegaConf.create(config), path / ".hydra" / "config.yaml")
    columns = sorted({k for row in rows for k in row})
    with open(path / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


def evals(points, early=0.1):
    """(step, generated tokens, accuracy) -> eval rows."""
    return [{"step": step, "train/generated_tokens": tokens, "train/flops": 10 * tokens, "train/problems_seen": 8 * step,
             "train/wall_seconds": step, "eval/accuracy": acc, "eval/early_answer_rate": early} for step, tokens, acc in points]


@pytest.fixture
def three_seeds(tmp_path):
    root = tmp_path / "sweep"
    # sd/product: base 0.2; reaches 0.45 at 300, 400, 500 tokens; final 0.4, 0.5, 0.6 (seed order 0, 1, 2)
    for seed, (hit, final, mass) in enumerate([(300, 0.4, 0.1), (400, 0.5, 0.2), (500, 0.6, 0.3)]):
        train = [{"step": s, "train/unconsidered_mass": mass + d, "train/kl_target_student": 0.05,
                  "train/max_log_ratio_mean": 1.0 + seed, "train/max_log_ratio_max": 4.0 + seed} for s, d in
                 [(1, -0.05), (2, 0.05)]]
        write_run(root / f"sd{seed}", "sd", train + evals([(0, 0, 0.2), (1, hit - 100, 0.3), (2, hit, 0.45),
                                                            (3, hit + 100, final)], early=0.1 * seed), seed=seed)
    # grpo: reaches 0.45 in 2 of 3 seeds (at 1000 and 1200 tokens); final 0.45, 0.5, 0.3
    for seed, points in enumerate([[(0, 0, 0.2), (1, 1000, 0.45)], [(0, 0, 0.2), (1, 1200, 0.5)],
                                   [(0, 0, 0.2), (1, 800, 0.3)]]):
        write_run(root / f"grpo{seed}", "grpo", evals(points), seed=seed, aggregation="clip", tau=1.0)
    # sft never reaches 0.45; launched with another aggregation, which it ignores
    for seed in range(3):
        write_run(root / f"sft{seed}", "sft", evals([(0, 0, 0.2), (1, 0, 0.25)]), seed=seed, aggregation="teacher")
    return root


def test_final_scores_are_mean_and_95_percent_t_interval(three_seeds, tmp_path):
    result = build_report(find_runs(three_seeds), tmp_path / "out", target_accuracy=0.45, plots=False)
    accuracy = result["scores"]["sd/product/tau=2"]["eval/accuracy"]
    assert accuracy["mean"] == pytest.approx(0.5) and accuracy["std"] == pytest.approx(0.1)
    assert accuracy["ci"] == pytest.approx(T2 * 0.1 / math.sqrt(3))  # 0.2484
    grpo = result["scores"]["grpo"]["eval/accuracy"]
    std = math.sqrt(((0.45 - 5 / 12) ** 2 + (0.5 - 5 / 12) ** 2 + (0.3 - 5 / 12) ** 2) / 2)
    assert grpo["mean"] == pytest.approx(5 / 12) and grpo["ci"] == pytest.approx(T2 * std / math.sqrt(3))
    assert "| sd/product/tau=2 | 3 | 0.500 ± 0.248 |" in result["table"]


def test_tokens_to_target_with_intervals_and_not_reached(three_seeds, tmp_path):
    result = build_report(find_runs(three_seeds), tmp_path / "out", target_accuracy=0.45, plots=False)
    table, reference = result["to_target"], result["reference"]
    sd = table["sd/product/tau=2"]
    assert (sd["reached"], sd["n"], sd["generated_tokens"]) == (3, 3, 400)
    assert sd["generated_tokens_ci"] == pytest.approx(T2 * 100 / math.sqrt(3))  # 248.4
    assert sd["flops"] == 4000 and sd["flops_ci"] == pytest.approx(T2 * 1000 / math.sqrt(3))
    grpo = table["grpo"]
    assert reference == "grpo" and (grpo["reached"], grpo["generated_tokens"]) == (2, 1100)
    assert grpo["generated_tokens_ci"] == pytest.approx(12.706204736174694 * math.sqrt(2 * 100 ** 2) / math.sqrt(2))
    assert sd["generated_tokens_ratio"] == pytest.approx(400 / 1100)
    assert table["sft"]["reached"] == 0 and table["sft"]["generated_tokens"] is None
    md = result["to_target_md"]
    assert "| sd/product/tau=2 | 3/3 | 400 ± 248 | 0.364 | 4e+03 ± 2.48e+03 | 0.364 |" in md
    assert "| grpo | 2/3 | 1,100 ± 1,271 | 1.000 |" in md
    assert "| sft | 0/3 | not reached | not reached | not reached | not reached |" in md


def test_a_target_at_or_below_the_base_gives_no_ratio(three_seeds, tmp_path):
    result = build_report(find_runs(three_seeds), tmp_path / "out", target_accuracy=0.18, plots=False)
    assert result["base"] == pytest.approx(0.2) and result["to_target"] is None
    md = result["path"].read_text()
    assert "Target accuracy 0.180 is at or below the base model's accuracy 0.200" in md and "× GRPO" not in md
    assert build_report(find_runs(three_seeds), tmp_path / "o2", target_accuracy=0.2, plots=False)["to_target"] is None
    # GRPO's own final mean (0.417) is above the base: the default target gives ratios
    assert build_report(find_runs(three_seeds), tmp_path / "o3", plots=False)["to_target"] is not None


def test_early_answer_and_unconsidered_mass_per_method(three_seeds, tmp_path):
    result = build_report(find_runs(three_seeds), tmp_path / "out", target_accuracy=0.45, plots=False)
    sd = result["scores"]["sd/product/tau=2"]
    mass = sd["train/unconsidered_mass"]  # run means 0.1, 0.2, 0.3
    assert mass["mean"] == pytest.approx(0.2) and mass["ci"] == pytest.approx(T2 * 0.1 / math.sqrt(3))
    assert sd["train/max_log_ratio_max"]["mean"] == pytest.approx(5.0)
    assert sd["eval/early_answer_rate"]["mean"] == pytest.approx(0.1)  # final early answers 0, 0.1, 0.2
    assert "train/unconsidered_mass" not in result["scores"]["sft"]
    md = result["path"].read_text()
    assert "| sd/product/tau=2 | 0.100 ± 0.248 | 0.2000 ± 0.2484 | 0.050 ± 0.000 | 2.00 ± 2.48 | 5.00 ± 2.48 |" in md
    assert "| sft | 0.100 ± 0.000 | – | – | – | – |" in md


def test_config_differences_do_not_list_aggregation_keys_for_sft_and_grpo(three_seeds, tmp_path):
    # The sd runs share one aggregation; sft and grpo were launched with others, which they ignore
    md = build_report(find_runs(three_seeds), tmp_path / "o1", target_accuracy=0.45, plots=False)["path"].read_text()
    assert "| run | algo.name | seed |" in md.split("## Config differences")[1]
    write_run(three_seeds / "sd_clip", "sd", evals([(0, 0, 0.2), (1, 100, 0.3)]), aggregation="clip", tau=1.0)
    md = build_report(find_runs(three_seeds), tmp_path / "o2", target_accuracy=0.45, plots=False)["path"].read_text()
    section = md.split("## Config differences")[1].split("## Runs")[0]
    assert "| run | aggregation.name | aggregation.tau | algo.name | seed |" in section
    assert "| sft0 | n/a | n/a | sft | 0 |" in section and "| grpo1 | n/a | n/a | grpo | 1 |" in section
    assert "| sd2 | product | 2.0 | sd | 2 |" in section and "| sd_clip | clip | 1.0 | sd | 0 |" in section


def test_bands_are_the_95_percent_interval_over_three_curves():
    curves = [([0, 100, 200], [0.2, 0.3, 0.4]), ([0, 100, 200], [0.2, 0.4, 0.5]), ([0, 100, 200], [0.2, 0.5, 0.6])]
    x, mean, low, high = mean_curve(curves)
    assert list(x) == [0, 100, 200] and list(mean) == pytest.approx([0.2, 0.4, 0.5])
    half = T2 * 0.1 / math.sqrt(3)
    assert list(low) == pytest.approx([0.2, 0.4 - half, 0.5 - half]) and list(high) == pytest.approx([0.2, 0.4 + half, 0.5 + half])
    assert t_halfwidth(1.0, 1) != t_halfwidth(1.0, 1)  # NaN for one value


def test_grpo_zero_variance_share_is_each_runs_mean_over_training(tmp_path):
    root = tmp_path / "sweep"
    # Two GRPO seeds: shares 1.0, 0.5, 0.75 (mean 0.75) and 0.25, 0.25, 0.25 (mean 0.25) over logged steps.
    for seed, shares in enumerate([(1.0, 0.5, 0.75), (0.25, 0.25, 0.25)]):
        train = [{"step": step, "train/zero_variance_share": share} for step, share in enumerate(shares, start=1)]
        write_run(root / f"grpo{seed}", "grpo", train + evals([(0, 0, 0.2), (3, 300, 0.3)]), seed=seed,
                  aggregation="clip", tau=1.0)
        write_run(root / f"sft{seed}", "sft", evals([(0, 0, 0.2), (3, 0, 0.25)]), seed=seed, aggregation="clip",
                  tau=1.0)
    result = build_report(find_runs(root), tmp_path / "out", target_accuracy=0.25, plots=False)
    share = result["scores"]["grpo"]["train/zero_variance_share"]
    assert share["mean"] == pytest.approx(0.5) and share["ci"] == pytest.approx(12.706204736174694 * 0.25)
    assert "train/zero_variance_share" not in result["scores"]["sft"]
    md = result["path"].read_text()
    assert "| run | early answer | unconsidered mass | KL(target‖student) | max log q/p_S (mean) | max log q/p_S (max) " \
           "| zero-variance groups |" in md
    assert "| grpo | 0.100 ± 0.000 | – | – | – | – | 0.500 ± 3.177 |" in md
    assert "| sft | 0.100 ± 0.000 | – | – | – | – | – |" in md


def test_the_wrong_accepted_rate_gets_a_column_only_where_a_run_logs_it(tmp_path):
    for seed, rate in enumerate([0.1, 0.2, 0.3]):
        rows = [{**row, "eval/wrong_accepted_rate": rate, "wrongly_accepted/wrong_accepted_rate": 2 * rate}
                for row in evals([(0, 0, 0.2), (1, 0, 0.5)])]
        write_run(tmp_path / "chat" / f"sft{seed}", "sft", rows, seed=seed)
    md = build_report(find_runs(tmp_path / "chat"), tmp_path / "out", plots=False)["path"].read_text()
    assert "| run | seeds | accuracy | wrong accepted (eval) | wrong accepted (trained on) | early answer |" in md
    assert (f"| sft | 3 | 0.500 ± 0.000 | 0.200 ± {T2 * 0.1 / math.sqrt(3):.3f} | 0.400 ± {T2 * 0.2 / math.sqrt(3):.3f} "
            "| 0.100 ± 0.000 |") in md
    write_run(tmp_path / "plain" / "sft0", "sft", evals([(0, 0, 0.2), (1, 0, 0.5)]))
    assert "wrong accepted" not in build_report(find_runs(tmp_path / "plain"), tmp_path / "o2",
                                                plots=False)["path"].read_text()
