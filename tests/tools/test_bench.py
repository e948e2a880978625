"""sdharness-bench in its --tiny form: every case runs in a fresh process, the JSON carries every
headline ratio (a positive float) and the table prints."""

import json

import pytest

from sdharness.tools import bench

pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or sweeps


def test_tiny_bench_json_and_table(capsys, monkeypatch):
    bench.main(["--tiny", "--threads", "1", "--json"])
    report = json.loads(capsys.readouterr().out)

    assert set(report["ratios"]) == set(bench.RATIO_KEYS)
    for key, value in report["ratios"].items():
        assert value is None or isinstance(value, float), (key, value)
    for key in bench.RATIO_KEYS:
        assert report["ratios"][key] > 0, key
    step = next(case for case in report["cases"] if case["kind"] == "step")
    assert step["sd"]["peak_mb"] > 0 and step["sft"]["median_s"] > 0
    assert report["machine"]["torch"] and report["machine"]["cores"] >= 1

    monkeypatch.setattr(bench, "run_cases", lambda *args, **kwargs: report)
    bench.main(["--tiny"])
    table = capsys.readouterr().out
    for text in ("machine:", "tiny_random@32", "rollout tiny_random", "guided", "sd_sft_peak_memory", "chatlog_sft_tokens_per_s"):
        assert text in table


def test_sd_and_sft_processes_alternate_and_pool(monkeypatch):
    """rounds=2 runs SD, SFT, SFT, SD; medians pool every measured step, peaks take the largest."""
    calls = []

    def fake_fresh(fn, case, method, repeats, threads):
        calls.append(method)
        n = len(calls)
        return {"median_s": float(n), "times_s": [float(n), float(n)], "warmup_s": 9.0, "peak_mb": 10.0 * n,
                "baseline_mb": 1.0, "peak_reset": True, "params": 5, "vocab": 7, "threads": 1, "device": "cpu"}

    monkeypatch.setattr(bench, "_fresh", fake_fresh)
    case = bench.Case("fake@8", "tiny_random", 2, 4, 8)
    entry = bench.run_case(case, repeats=2, threads=1, rounds=2)
    assert calls == ["sd", "sft", "sft", "sd"]
    assert entry["sd"]["times_s"] == [1.0, 1.0, 4.0, 4.0] and entry["sd"]["median_s"] == 2.5
    assert entry["sft"]["median_s"] == 2.5 and entry["sft"]["peak_mb"] == 30.0 and entry["sd"]["peak_mb"] == 40.0
    assert entry["sd"]["processes"] == 2
    assert entry["ratios"]["sd_sft_step_time"] == 1.0
    assert entry["sd"]["tokens_per_s"] == 2 * 8 / 2.5
    assert entry["ratios"]["chatlog_sft_tokens_per_s"] == 1.0


def test_logged_chat_throughput_is_reported_against_its_flop_bound():
    """0.76 of SFT's tokens/s is at the physical limit (one extra forward: 3/4), not a missed target."""
    report = {"machine": {"cpu": "c", "cores": 2, "usable_cores": 2, "torch_threads": 1, "torch": "t", "python": "p",
                          "gpu": None}, "repeats": 1, "cases": [], "targets": bench.TARGETS,
              "ratios": dict.fromkeys(bench.RATIO_KEYS) | {"chatlog_sft_tokens_per_s": 0.76},
              "ratio_cases": dict.fromkeys(bench.RATIO_KEYS) | {"chatlog_sft_tokens_per_s": "smollm2_135m@256"}}
    (line,) = [line for line in bench.format_table(report).splitlines() if "chatlog_sft_tokens_per_s" in line]
    assert line.split() == ["chatlog_sft_tokens_per_s", "0.76", "[smollm2_135m@256]", "FLOP", "bound", "0.75:",
                            "101%", "of", "it"]


def test_loss_support_bench_times_topk_against_full(capsys, monkeypatch):
    from sdharness.tools import bench_loss

    entries = bench_loss.run_loss_cases(lambda fn, *args: fn(*args), rows=4, repeats=1, threads=1, vocabs=(1000,))
    (entry,) = entries
    assert entry["vocab"] == 1000 and entry["top_k"] == bench_loss.TOP_K
    assert entry["full"]["median_s"] > 0 and entry["topk"]["median_s"] > 0
    assert entry["time_ratio"] == entry["topk"]["median_s"] / entry["full"]["median_s"]
    monkeypatch.setattr(bench_loss, "run_loss_cases", lambda *args, **kwargs: entries)
    bench.main(["--loss-support"])
    table = capsys.readouterr().out
    assert "top_k 100 vs full vocabulary" in table and table.splitlines()[-1].split()[:2] == ["1000", "4"]


def test_lora_teacher_bench_scores_with_the_copys_states_and_prints_the_saving(capsys):
    bench.main(["--lora-teacher", "--tiny", "--threads", "1", "--json"])
    entry = json.loads(capsys.readouterr().out)
    assert entry["model"] == "tiny_random" and entry["lora_rank"] == 16
    assert entry["same_teacher"] is True  # the adapter-free base computes exactly the copy's hidden states
    assert entry["adapter_free"]["parameters_mb"] == entry["copy"]["parameters_mb"] > 0
    assert entry["saved_mb"] == entry["copy"]["teacher_mb"] - entry["adapter_free"]["teacher_mb"]
    bench.main(["--lora-teacher", "--tiny", "--threads", "1"])
    assert "adapter-free base" in capsys.readouterr().out


@pytest.mark.parametrize("part", ["--loss-support", "--lora-teacher"])
def test_json_parts_print_only_json_on_stdout(capfd, monkeypatch, part):
    """What the measuring prints (a library announcing itself on import) goes to stderr, in every part."""
    from sdharness.tools import bench_lora, bench_loss

    def noisy(*args, **kwargs):
        print("[INFO] Running in WANDB offline mode")
        return {"printed": "around"}

    monkeypatch.setattr(bench_loss, "run_loss_cases", noisy)
    monkeypatch.setattr(bench_lora, "run_lora_teacher", noisy)
    bench.main([part, "--tiny", "--json"])
    out, err = capfd.readouterr()
    assert json.loads(out) == {"printed": "around"} and "Running in WANDB offline mode" in err


def test_guided_bench_times_plain_and_both_guided_ways_on_the_protocol_prompts(capsys):
    bench.main(["--guided", "--tiny", "--threads", "1", "--repeats", "2", "--json"])
    entry = json.loads(capsys.readouterr().out)
    assert (entry["model"], entry["batch"], entry["new_tokens"]) == ("tiny_random", 8, 96)
    assert entry["teacher_prompt"] > entry["student_prompt"]  # the reference solution is in the teacher's prompt
    for way in ("guided_initial", "guided_shared"):
        assert entry[way]["batch_ratio"] == entry[way]["median_s"] / entry["plain"]["median_s"]
        assert entry[way]["step_ratio"] == entry[way]["s_per_step"] / entry["plain"]["s_per_step"]
        assert len(entry[way]["steps"]) == 2 and all(1 <= steps <= 96 for steps in entry[way]["steps"])
    bench.main(["--guided", "--tiny", "--threads", "1", "--repeats", "1"])
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:]] == ["plain", "guided_initial", "guided_shared"]
