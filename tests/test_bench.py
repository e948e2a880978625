"""sdharness-bench in its --tiny form: every case runs in a fresh process, the JSON carries every
headline ratio (a positive float) and the table prints."""

import json

from sdharness import bench


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
