"""The CPU-testable parts of `make gpu-check`: the table, a check's failure modes (exception, a
missing piece, a dead process, a hang) becoming rows, the budget, the no-CUDA exit, and the dry run
that runs every row's code on CPU with stand-ins. The rows themselves need a CUDA GPU."""

import os
import time

import pytest
import torch

from sdharness.tools import gpu_check, gpu_rows
from sdharness.tools.gpu_rows import Row, Skip


def passing(figure):
    return [Row("fine", "PASS", figure, "detail")]


def raising():
    raise ValueError("first line\nthe reason is here")


def missing_piece():
    raise Skip("vllm is not installed: pip install -e '.[vllm]'")


def dying():
    os._exit(3)


def hanging():
    time.sleep(60)


def test_rows_format_as_one_aligned_table():
    rows = [Row("sd step, bf16-mixed", "PASS", "0.21 s/step, 2.1 GiB peak", "4 steps"),
            Row("vllm", "SKIP", "0 s", "vllm is not installed"), Row("bench", "FAIL", "", "timed out after 9 s")]
    assert gpu_check.format_rows(rows, "head").splitlines() == [
        "head",
        "check                result  figure                     detail",
        "-" * (19 + 25 + 18),
        "sd step, bf16-mixed  PASS    0.21 s/step, 2.1 GiB peak  4 steps",
        "vllm                 SKIP    0 s                        vllm is not installed",
        "bench                FAIL                               timed out after 9 s",
        "1 passed, 1 failed, 1 skipped",
    ]


@pytest.mark.slow  # spawns a process
def test_a_check_that_works_returns_its_rows():
    assert gpu_check.run_check("fine", passing, "1.0 s", timeout=60) == [Row("fine", "PASS", "1.0 s", "detail")]


@pytest.mark.slow
@pytest.mark.parametrize("fn, status, detail", [
    (raising, "FAIL", "ValueError: the reason is here"),
    (missing_piece, "SKIP", "vllm is not installed: pip install -e '.[vllm]'"),
    (dying, "FAIL", "the check's process exited with code 3 before reporting"),
])
def test_a_failing_check_is_one_row_with_its_reason(fn, status, detail):
    (row,) = gpu_check.run_check("named", fn, timeout=60)
    assert (row.check, row.status, row.detail) == ("named", status, detail)


@pytest.mark.slow
def test_a_hanging_check_is_killed_at_its_limit():
    start = time.monotonic()
    (row,) = gpu_check.run_check("slow", hanging, timeout=2)
    assert (row.status, row.detail) == ("FAIL", "timed out after 2 s")
    assert time.monotonic() - start < 20


def test_no_budget_left_skips_without_starting():
    assert gpu_check.run_check("late", dying, timeout=0) == [
        Row("late", "SKIP", detail="no time left in the check's budget")]


def test_without_cuda_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run_check", lambda *a, **k: pytest.fail("no check may start without CUDA"))
    assert gpu_check.main([]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("sdharness gpu-check: no CUDA device, driver ") and f"torch {torch.__version__}" in out
    assert err.strip() == (f"sdharness gpu-check: no CUDA device visible (torch {torch.__version__}, CUDA build "
                   f"{torch.version.cuda or 'none'}); run it on a machine with one NVIDIA GPU and a CUDA torch")


def test_an_unknown_check_name_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--only", "sd,warp"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("sdharness: error: --only warp: unknown; choose from sd,sft,grpo,")


def test_rows_of_every_check_fail_the_exit_status(monkeypatch, capsys):
    """With CUDA (faked), each selected check runs in order and one FAIL row makes the exit 1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    ran = []

    def fake_run(name, fn, *args, timeout):
        ran.append((name, args, timeout))
        return [Row(name, "FAIL" if name == "fsdp" else "PASS", "1 s")]

    monkeypatch.setattr(gpu_check, "run_check", fake_run)
    assert gpu_check.main(["--only", "sd,fsdp"]) == 1
    # The one-time conversion first, then the selected rows, each under its own limit.
    assert ran == [("prepare", (False,), 40), ("sd", ("sd", False), 35), ("fsdp", (False,), 30)]
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("sdharness gpu-check: Fake GPU, driver ")
    assert out.splitlines()[-1] == "2 passed, 1 failed, 0 skipped"


def test_row_limits_add_up_to_less_than_eight_minutes():
    assert gpu_check.TOTAL_S <= 8 * 60
    assert set(gpu_check.ROW_LIMITS_S) == {"prepare", *gpu_check.CHECKS}
    assert sum(gpu_check.ROW_LIMITS_S.values()) <= gpu_check.TOTAL_S - gpu_check.START_S


def spawns_a_pool():
    """What the bench does inside its row: a process pool (refused in a daemonic process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [Row("pool", "PASS", str(pool.submit(abs, -3).result()))]


@pytest.mark.slow
def test_a_row_may_start_processes_of_its_own():
    assert gpu_check.run_check("pool", spawns_a_pool, timeout=120) == [Row("pool", "PASS", "3")]


@pytest.mark.parametrize("overrides, strategy", [
    (gpu_rows.method_overrides("sd"), "auto"), (gpu_rows.method_overrides("sft"), "auto"),
    (gpu_rows.method_overrides("grpo"), "auto"), (gpu_rows.strategy_overrides("fsdp"), "fsdp"),
    (gpu_rows.strategy_overrides("deepspeed"), "deepspeed_stage_2"),
    (gpu_rows.method_overrides("sd") + ["rollout=vllm", "rollout.vllm_enforce_eager=true"], "auto")])
def test_training_checks_compose_valid_configs(overrides, strategy):
    """A misspelt override would fail every training row on the GPU: each composes and validates here."""
    from sdharness.config import to_train_config

    cfg = to_train_config(gpu_rows.compose_check(overrides))
    assert (cfg.model.name, cfg.trainer.accelerator, cfg.trainer.precision) == ("smollm2_135m", "gpu", "bf16-mixed")
    assert (cfg.trainer.max_steps, cfg.trainer.devices, cfg.trainer.strategy) == (4, 1, strategy)
    assert cfg.logger.mode == "disabled" and cfg.rollout.progress is False


def test_make_gpu_check_runs_the_check_without_reinstalling(tmp_path):
    """On a GPU machine the venv holds the torch vllm brought; `install` would put torch 2.13.0 back."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    plan = subprocess.run(["make", "-n", "gpu-check", f"VENV={tmp_path / 'venv'}"], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert "pip install" not in plan.stdout and "-m sdharness.tools.gpu_check" in plan.stdout


def test_the_vllm_extra_is_the_range_trl_tests():
    import tomllib
    from pathlib import Path

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    (requirement,) = pyproject["project"]["optional-dependencies"]["vllm"]
    allowed = SpecifierSet(requirement.removeprefix("vllm"))
    assert [v for v in ("0.21.0", "0.22.0", "0.31.0", "0.33.0", "0.34.0") if Version(v) in allowed] == ["0.22.0",
                                                                                                          "0.31.0"]


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_row(capsys):
    """Every row's code on CPU with stand-ins, each in its own process as on the GPU."""
    assert gpu_check.main(["--cpu-dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sdharness gpu-check: ") and lines[0].endswith(
        "(CPU dry run: stand-ins, figures not judged)")
    checks = [line.split("  ")[0] for line in lines[3:-1]]
    assert checks == ["prepare: SmolLM2 converted", "sd step, bf16-mixed", "sft step, bf16-mixed",
                      "grpo step, bf16-mixed", "SD loss bf16 vs fp32", "rollout=vllm start", "rollout=vllm one rollout",
                      "rollout=vllm vs HF generate", "rollout=vllm weight sync", "sd step, rollout=vllm",
                      "rollout=vllm after training", "trainer=fsdp (FSDP2), 1 GPU", "trainer=deepspeed (ZeRO-2), 1 GPU",
                      "trainer=deepspeed resume", "sdharness-bench full"]
    assert lines[-1] == "15 passed, 0 failed, 0 skipped"
