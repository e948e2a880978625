"""Bad input, part two (issue #27): runs that share a directory, are stopped by SIGTERM, resume
past their end, fill the disk or lose the network, convert one GGUF together, or leave a
truncated metrics.csv. Each case is one clear line or a counted, logged fallback; never a silent
wrong number or exit status. Data cases (contamination, answer notations, answer markers) are in
``tests/data/test_bad_input_data.py``; the first part is ``tests/test_bad_input.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import TINY, compose_config

LOCK_FILE = ".sdharness.lock"
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
RUN = [*TINY, "logger.mode=disabled", "threads=1", "eval.at_start=false"]


def hold_lock(run_dir) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock, as a running ``sdharness-train`` does."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sdharness.run_lock import acquire; "
                               "acquire(sys.argv[1]); print('held', flush=True); time.sleep(300)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline() == "held\n"
    return holder


def wait_for(path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


# ------------------------------------------------------------------------ one run per directory

@pytest.mark.slow
def test_second_run_on_a_directory_in_use_is_refused_in_one_line_before_it_writes(tmp_path):
    run_dir = tmp_path / "D"
    holder = hold_lock(run_dir)
    try:
        result = subprocess.run([sys.executable, "-m", "sdharness.train", *RUN, f"hydra.run.dir={run_dir}"],
                                capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.fullmatch(rf"sdharness: error: {run_dir} is in use by pid {holder.pid} \(since \d{{4}}-\d\d-\d\d "
                        r"\d\d:\d\d:\d\d\); choose another hydra.run.dir, or wait for that run to end\n",
                        result.stderr), result.stderr
    assert sorted(path.name for path in run_dir.iterdir()) == [LOCK_FILE]  # no .hydra/, log or metrics.csv


@pytest.mark.parametrize("overrides", [[], ["ckpt_path=last"]], ids=["fresh", "resume"])
def test_train_and_resume_take_the_directory_lock(tmp_path, overrides):
    from sdharness.run_lock import RunDirectoryInUse
    from sdharness.train import train

    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(RunDirectoryInUse, match=rf"{tmp_path} is in use by pid {holder.pid} "):
            train(compose_config(RUN + overrides), tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(path.name for path in tmp_path.iterdir()) == [LOCK_FILE]


def test_lock_of_a_killed_run_is_taken_over_with_a_log_line(tmp_path, caplog):
    from sdharness.run_lock import LOCK_FILE, acquire, release

    holder = hold_lock(tmp_path)
    holder.kill()  # as SIGKILL or the OOM killer ends a run: its record stays, its flock goes
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="sdharness"):
        acquire(tmp_path)
    try:
        assert f"{tmp_path}: taking over the lock of pid {holder.pid} (since " in caplog.text
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid={os.getpid()} ")
        acquire(tmp_path)  # re-entrant within one process (the Hydra callback, then train)
        release(tmp_path)
    finally:
        release(tmp_path)
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean end leaves nothing to take over
    after = hold_lock(tmp_path)  # and the directory is free for another process
    after.kill()
    after.wait()


# ------------------------------------------------------------------------------------- SIGTERM

@pytest.mark.slow
def test_sigterm_exits_143_naming_the_checkpoint_and_the_resume_command(tmp_path):
    run_dir = tmp_path / "D"
    overrides = [*RUN, "trainer.max_steps=100000", "trainer.checkpoint_every_n_steps=1", "rollout.progress=false"]
    process = subprocess.Popen([sys.executable, "-m", "sdharness.train", *overrides, f"hydra.run.dir={run_dir}"],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
    wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert stderr.splitlines()[-1] == (
        f"sdharness: stopped by SIGTERM; the last checkpoint is {run_dir}/checkpoints/last.ckpt; resume with: "
        f"sdharness-train {' '.join(overrides)} hydra.run.dir={run_dir} ckpt_path=last")
    assert not (run_dir / "final_model").exists() and (run_dir / LOCK_FILE).read_text() == ""


@pytest.mark.slow
def test_sigterm_in_a_sweep_is_recorded_as_interrupted(tmp_path):
    sweep = tmp_path / "sweep"
    process = subprocess.Popen([sys.executable, "-m", "sdharness.train", "-m", *RUN, "trainer.max_steps=100000",
                                "trainer.checkpoint_every_n_steps=1", "seed=0,1", f"hydra.sweep.dir={sweep}"],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
    wait_for(sweep / "0" / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    record = json.loads((sweep / "0" / "FAILED.json").read_text())
    assert record["interrupted"] is True and record["error_type"] == "RunInterrupted"
    assert record["message"] == f"stopped by SIGTERM; the last checkpoint is {sweep}/0/checkpoints/last.ckpt"
    assert not (sweep / "1").exists()  # the sweep stops: the whole process was asked to end


# ----------------------------------------------------------------------- truncated metrics.csv

def cut_last_line(path, keep: str) -> None:
    """The file as a copy taken mid-write has it: its last line cut just after ``keep``."""
    text = path.read_text()
    last = text.rstrip("\r\n").rsplit("\n", 1)[1]
    path.write_text(text[:text.rindex(last)] + last[:last.index(keep) + len(keep)])


@pytest.mark.parametrize("keep", [",0.7", ",700"], ids=["accuracy", "flops"])
def test_report_drops_a_truncated_last_line_with_a_warning(tmp_path, caplog, keep):
    from sdharness.report.runs import find_runs
    from tests.report.test_report import fake_run

    run_dir = fake_run(tmp_path / "run", "sd", [(0, 0.1), (200, 0.4), (700, 0.7)])
    cut_last_line(run_dir / "metrics.csv", keep)  # the last eval row: ...,0.7,... flops 70000
    with caplog.at_level(logging.WARNING, logger="sdharness"):
        [run] = find_runs(tmp_path)
    assert f"{run_dir / 'metrics.csv'}: dropped its last line, which has no newline" in caplog.text
    final = run.final()  # the training row before the cut eval holds the run's last complete figures
    assert (final["eval/accuracy"], final["train/flops"]) == (0.4, 20000) and run.status == "completed"
    assert max(row["train/flops"] for row in run.rows) == 70000  # that training row, whole


def test_report_drops_a_row_with_the_wrong_field_count(tmp_path, caplog):
    from sdharness.report.runs import find_runs
    from tests.report.test_report import fake_run

    run_dir = fake_run(tmp_path / "run", "sd", [(0, 0.1), (200, 0.4)])
    lines = (run_dir / "metrics.csv").read_text().splitlines(keepends=True)
    lines.insert(2, "1,0.1,0.3\r\n")
    (run_dir / "metrics.csv").write_text("".join(lines))
    with caplog.at_level(logging.WARNING, logger="sdharness"):
        [run] = find_runs(tmp_path)
    assert f"{run_dir / 'metrics.csv'}:3: dropped, 3 fields where the header has 11" in caplog.text
    assert [row["eval/accuracy"] for row in run.evals] == [0.1, 0.4]


@pytest.mark.parametrize("column, value", [("eval/accuracy", "4.0"), ("train/flops", "-39")])
def test_a_value_outside_its_range_marks_the_run_corrupt_not_a_number(tmp_path, column, value):
    from sdharness.report.build import build_report
    from sdharness.report.runs import find_runs
    from tests.report.test_report import COLUMNS, fake_run

    fake_run(tmp_path / "sweep" / "0", "sd", [(0, 0.1), (200, 0.4)])
    bad = fake_run(tmp_path / "sweep" / "1", "sd", [(0, 0.1), (200, 0.4)], seed=1)
    with open(bad / "metrics.csv", "a") as handle:
        handle.write(",".join(value if name == column else "" for name in COLUMNS) + "\r\n")
    runs = find_runs(tmp_path / "sweep")
    assert [run.status for run in runs] == ["completed", "corrupt"]
    result = build_report(runs, tmp_path / "report")
    text = result["path"].read_text()
    assert "1 completed, 0 failed, 1 corrupt, 0 incomplete of 2 runs." in text
    assert (f"**corrupt metrics.csv**: {bad / 'metrics.csv'}: {column}={float(value):g} in row 4 (after the header), outside "
            "its range") in text
    assert "4.000" not in text


# ------------------------------------------------------------------- one line where one is due

def test_disk_full_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    import errno

    import torch

    import sdharness.scale.checkpoints as checkpoints

    writer, path = checkpoints.AtomicCheckpointIO(), tmp_path / "last.ckpt"
    writer.save_checkpoint({"weights": torch.ones(1024)}, path)
    previous = path.read_bytes()

    def save_on_a_full_disk(obj, handle):  # as torch.save reports it: a RuntimeError raised over the OSError
        handle.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoints.torch, "save", save_on_a_full_disk)
    with pytest.raises(checkpoints.DiskFullError) as error:
        writer.save_checkpoint({"weights": torch.ones(2**18)}, path)
    assert re.fullmatch(rf"no space left in {tmp_path} for a checkpoint of about 1.0 MiB \(\d+\.\d MiB free\); free "
                        r"that much there, or set hydra.run.dir on a larger disk; any previous checkpoint is intact",
                        error.value.strerror)
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained tracebacks
    assert path.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_disk_full_reaches_the_command_line_as_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import sdharness.scale.checkpoints as checkpoints
    from sdharness.train import main

    def full(obj, handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full)
    monkeypatch.setattr(sys, "argv", ["sdharness-train", *RUN, f"hydra.run.dir={tmp_path}",
                                      "trainer.checkpoint_every_n_steps=1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sdharness: error: no space left in {tmp_path / 'checkpoints'} for a checkpoint of about ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_wandb_online_failure_is_one_line_or_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    from sdharness.config import ConfigError, to_train_config
    from sdharness.jobs import end_wandb_run
    from sdharness.report.loggers import make_loggers

    monkeypatch.setenv("WANDB_API_KEY", "abcde")  # refused by W&B without the network
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = to_train_config(compose_config(TINY + ["logger.mode=auto"]))
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^W&B online logging failed: .*API key must have 40\+ characters, has 5\.?; "
                                          r"set logger.mode=offline or WANDB_MODE=offline, or "
                                          r"logger.if_online_fails=offline to fall back$"):
        make_loggers(cfg, tmp_path / "a", {}, None)
    cfg = to_train_config(compose_config(TINY + ["logger.mode=auto", "logger.if_online_fails=offline"]))
    with caplog.at_level(logging.WARNING, logger="sdharness"):
        loggers = make_loggers(cfg, tmp_path / "b", {}, None)
    try:
        assert loggers[1].experiment.settings.mode == "offline"
        assert f"logging offline under {tmp_path / 'b' / 'wandb'} instead" in caplog.text
    finally:
        end_wandb_run()
    assert time.monotonic() - started < 30


def test_bench_json_stdout_is_the_json_alone(monkeypatch, capfd):
    from sdharness.tools import bench

    def noisy_cases(*args, **kwargs):  # as transformers prints on import in the bench's worker processes
        subprocess.run([sys.executable, "-c", "print('[INFO] Running in WANDB offline mode')"], check=True)
        print("[INFO] Running in WANDB offline mode")
        return {"cases": []}

    monkeypatch.setattr(bench, "run_cases", noisy_cases)
    bench.main(["--tiny", "--json"])
    out, err = capfd.readouterr()
    assert json.loads(out) == {"cases": []}
    assert err.count("[INFO] Running in WANDB offline mode") == 2


@pytest.mark.slow
def test_resume_past_max_steps_is_refused_in_one_line(tmp_path):
    from sdharness.config import ConfigError
    from sdharness.train import train

    train(compose_config(RUN + ["trainer.max_steps=3", "trainer.checkpoint_every_n_steps=1"]), tmp_path)
    saved = (tmp_path / "final_model" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"^trainer.max_steps=2, but the checkpoint resumed is already at step 3; "
                                          r"raise trainer.max_steps above 3 to train on, or use its final_model/ as it "
                                          r"is$"):
        train(compose_config(RUN + ["trainer.max_steps=2", "ckpt_path=last"]), tmp_path)
    assert (tmp_path / "final_model" / "model.safetensors").stat().st_mtime_ns == saved


# -------------------------------------------------------------------- one GGUF, two conversions

def _gguf_reader(real, both_writing, make):
    """``real.from_pretrained``, but a GGUF file reads as ``make()``, whose ``save_pretrained`` waits
    until the other process has written its weights too."""

    class Reader:
        @staticmethod
        def from_pretrained(path, *args, gguf_file=None, **kwargs):
            if gguf_file is None:
                return real.from_pretrained(path, *args, **kwargs)
            loaded = make()
            save = loaded.save_pretrained

            def save_then_wait(target, *args, **kwargs):
                save(target, *args, **kwargs)
                both_writing.wait()

            loaded.save_pretrained = save_then_wait
            return loaded

    return Reader


def _load_weights(model_cfg) -> dict:
    from sdharness.models import load_model_and_tokenizer

    return load_model_and_tokenizer(model_cfg)[0].state_dict()


def test_two_runs_converting_one_gguf_at_once_both_load_identical_weights(tmp_path, monkeypatch):
    """Two processes convert the same file at once (each waits mid-write until the other has written
    its weights): the first complete copy becomes the cache, the other is discarded, and both load
    the same weights. The GGUF file reads as a seeded tiny model."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    import sdharness.models as models
    from sdharness.config import to_train_config

    context = multiprocessing.get_context("fork")  # the workers inherit the patched readers
    both_writing = context.Barrier(2, timeout=120)
    tiny = lambda: models.tiny_random_model(models.ModelConfig(seed=7), models.char_tokenizer())
    monkeypatch.setattr(models, "AutoModelForCausalLM", _gguf_reader(models.AutoModelForCausalLM, both_writing, tiny))
    monkeypatch.setattr(models, "AutoTokenizer", _gguf_reader(models.AutoTokenizer, context.Barrier(1),
                                                              models.char_tokenizer))
    (tmp_path / "A.gguf").write_bytes(b"A" * 100)
    cfg = to_train_config(compose_config(TINY + ["model=local", "model.source=gguf", f"model.path={tmp_path}",
                                                 "model.gguf_file=A.gguf", f"model.cache_dir={tmp_path / 'cache'}"]))
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        loaded = [future.result(timeout=300) for future in [pool.submit(_load_weights, cfg.model) for _ in range(2)]]
    expected = tiny().state_dict()
    for weights in loaded:
        assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [models.gguf_cache_dir(
        cfg.model, tmp_path / "A.gguf").name]  # no partial copy left behind
