"""sdharness-bench --peer trl: the skip line without TRL, the pinned-version error, exact
ratios and alternation from canned runs, and (TRL installed) one tiny_random case end to end."""

import importlib.metadata
import importlib.util
import json

import pytest

from sdharness.tools import bench, peer


def _canned_report():
    return {"machine": {"cpu": "cpu", "cores": 2, "usable_cores": 2, "torch_threads": 1, "torch": "2", "python": "3",
                        "gpu": None}, "repeats": 1, "rounds": 1, "ratios": dict.fromkeys(bench.RATIO_KEYS),
            "ratio_cases": dict.fromkeys(bench.RATIO_KEYS), "targets": bench.TARGETS, "cases": []}


def _fake_version(version):
    def fake(name):
        if name != "trl":
            return importlib.metadata.version(name)
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version
    return fake


def test_without_trl_one_skip_line_and_no_peer_run(monkeypatch, capsys):
    monkeypatch.setattr(peer.importlib.metadata, "version", _fake_version(None))
    monkeypatch.setattr(bench, "run_cases", lambda *args, **kwargs: _canned_report())
    monkeypatch.setattr(peer, "run_peer_case", lambda *args: pytest.fail("the peer must not run without TRL"))
    bench.main(["--tiny", "--peer", "trl"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "peer trl" in line]
    assert lines == [f"peer trl: skipped, TRL is not installed (pip install -e '.[peers]', or "
                     f"pip install --no-deps trl=={peer.TRL_VERSION})"]
    assert "headline ratios" in out  # the rest of the bench still reports


def test_another_trl_version_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(peer.importlib.metadata, "version", _fake_version("1.15.2"))
    monkeypatch.setattr(bench, "run_cases", lambda *args, **kwargs: pytest.fail("nothing may run on a wrong TRL"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--tiny", "--peer", "trl"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"sdharness: error: --peer trl was written against trl=={peer.TRL_VERSION} (its SDFTTrainer is "
                   "experimental and changes between releases), found trl==1.15.2; install trl==1.16.0")


def test_peer_sides_alternate_pool_and_give_exact_ratios():
    """rounds=2: sdharness, TRL, TRL, sdharness for SD, then the same for SFT; step medians pool
    every step, update = step - generation, peaks take each side's largest."""
    calls = []

    def fake_fresh(fn, case, method, repeats, threads):
        side = "sdharness" if fn is peer.run_sdharness else "trl"
        calls.append((method, side))
        scale = 1.0 if side == "sdharness" else 2.0
        n = len(calls)
        return {"times_s": [scale * 4, scale * 4], "generation_s": [scale, scale], "update_s": [scale * 3, scale * 3],
                "warmup_s": 9.0, "peak_mb": 100.0 * scale + n, "step_peak_mb": 10.0 * scale, "baseline_mb": 1.0,
                "peak_reset": True, "params": 5, "threads": 1}

    case = peer.PeerCase("fake", "tiny_random", 2, 4, 4, 8)
    entry = peer.run_peer_case(case, repeats=2, threads=1, rounds=2, fresh=fake_fresh)
    assert calls == [("sd", "sdharness"), ("sd", "trl"), ("sd", "trl"), ("sd", "sdharness"),
                     ("sft", "sdharness"), ("sft", "trl"), ("sft", "trl"), ("sft", "sdharness")]
    sd = entry["sd"]
    assert sd["sdharness"]["times_s"] == [4.0] * 4 and sd["sdharness"]["processes"] == 2
    assert sd["sdharness"]["peak_mb"] == 104.0 and sd["trl"]["peak_mb"] == 203.0
    assert sd["ratios"] == {"step_time": 0.5, "update_time": 0.5, "peak_mb": 104.0 / 203.0, "step_peak_mb": 0.5}
    assert entry["sft"]["ratios"]["update_time"] is None and entry["sft"]["ratios"]["peak_mb"] == 108.0 / 207.0

    table = peer.format_peer_table([entry])
    rows = {line[20:30].strip(): line for line in table.splitlines() if line.startswith("fake")}
    assert set(rows) == {"SD step", "SD update", "SFT step"}
    assert rows["SD step"].split("|")[1].split() == ["4.000", "8.000", "0.50"]
    assert rows["SD update"].split("|")[1].split() == ["3.000", "6.000", "0.50"]
    assert rows["SFT step"].split("|")[2].split() == ["108", "207", "0.52"]
    assert all(f"  - {item}" in table for item in peer.UNEQUAL)


def test_text_of_length_is_exact_for_word_and_character_tokenizers():
    from sdharness.config import ModelConfig
    from sdharness.models import load_model_and_tokenizer

    tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny_random"))[1]  # one token per character
    assert peer.text_of_length(tokenizer, 7) == "aaaaaaa"

    class Words:  # one token per space-separated word
        def __call__(self, text):
            return {"input_ids": text.split(" ")}

    assert peer.text_of_length(Words(), 3) == "a a a"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL (the peers extra) is not installed")
def test_tiny_peer_end_to_end(capsys, monkeypatch):
    bench.main(["--tiny", "--threads", "1", "--peer", "trl", "--json"])
    report = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    (entry,) = report["peer"]["cases"]
    assert entry["name"] == "tiny_random@16" and report["peer"]["version"] == "1.16.0"
    for method in ("sd", "sft"):
        ours, theirs, ratios = entry[method]["sdharness"], entry[method]["trl"], entry[method]["ratios"]
        assert len(ours["times_s"]) == len(theirs["times_s"]) == 1  # --tiny: one measured step after the warm-up
        assert ratios["step_time"] == ours["median_s"] / theirs["median_s"]
        assert ratios["peak_mb"] == ours["peak_mb"] / theirs["peak_mb"]
        assert ours["peak_reset"] and theirs["peak_reset"] and ours["params"] == theirs["params"]
    sd = entry["sd"]
    assert 0 < sd["sdharness"]["generation_median_s"] < sd["sdharness"]["median_s"]
    assert 0 < sd["trl"]["generation_median_s"] < sd["trl"]["median_s"]

    monkeypatch.setattr(bench, "run_cases", lambda *args, **kwargs: report)
    monkeypatch.setattr(peer, "run_peer_case", lambda *args: entry)
    bench.main(["--tiny", "--peer", "trl"])
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("tiny_random@16") and "SD step" in line)
    assert row.split("|")[1].split()[2] == f"{entry['sd']['ratios']['step_time']:.2f}"
