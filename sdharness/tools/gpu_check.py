"""``make gpu-check``: the GPU paths of the harness, checked end to end on one CUDA device in
under 8 minutes including the start, as one table of PASS / FAIL / SKIP rows, each with its figure.
The rows are in sdharness/tools/gpu_rows.py:

* SD, SFT and GRPO training steps with SmolLM2-135M under ``bf16-mixed`` (``trainer=gpu``): s/step
  and ``torch.cuda.max_memory_allocated``; the SD loss of one batch under bf16 against float32.
* ``rollout=vllm``: engine start, one batched rollout, the weight sync after an optimiser step,
  tokens/s against HF ``generate``; SD trained through it, then greedy vLLM against HF.
* ``trainer=fsdp`` (FSDP2) and ``trainer=deepspeed`` (ZeRO-2) at world size 1; DeepSpeed also
  writes two checkpoints and resumes bit-identically.
* ``sdharness-bench`` full mode, peak memory from ``max_memory_allocated``.

The first line gives the device, NVIDIA driver, CUDA and torch versions (vLLM's CUDA 13 wheels need
driver R580 or newer). SmolLM2's one-time GGUF conversion runs first, outside the timed rows. Every
row runs in its own spawned process (not a daemon: the bench starts processes of its own) with a
time limit; the limits add up to less than the budget, so a crash, an out-of-memory kill or a hang
is a FAIL row with its reason and the table still prints; a piece that is not installed (vllm,
deepspeed) is a SKIP row saying how to install it. ``--only`` reruns what failed.
``--cpu-dry-run`` runs every row's code on CPU with stand-ins (CI runs it). Exit status: 0 when no
row failed, 1 when one did, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import multiprocessing
import os
import signal
import subprocess
import sys
import time

from sdharness.tools import gpu_rows
from sdharness.tools.gpu_rows import Row, Skip

TOTAL_S = 480  # 8 minutes on one H100, the import of torch and the table included
START_S = 30  # this process: the import, the version line, spawning
ROW_LIMITS_S = {  # each row's own time limit; with "prepare" they add up to less than TOTAL_S - START_S
    "prepare": 40, "sd": 35, "sft": 30, "grpo": 40, "precision": 20, "vllm": 60, "vllm_train": 60, "fsdp": 30,
    "deepspeed": 55, "bench": 75,
}
DRY_RUN_LIMIT_S = 600  # a row on a shared CPU: only a hang guard
CHECKS = {  # name -> (function, arguments); each also gets `dry`
    "sd": (gpu_rows.check_method, ("sd",)),
    "sft": (gpu_rows.check_method, ("sft",)),
    "grpo": (gpu_rows.check_method, ("grpo",)),
    "precision": (gpu_rows.check_precision, ()),
    "vllm": (gpu_rows.check_vllm, ()),
    "vllm_train": (gpu_rows.check_vllm_training, ()),
    "fsdp": (gpu_rows.check_fsdp, ()),
    "deepspeed": (gpu_rows.check_deepspeed, ()),
    "bench": (gpu_rows.check_bench, ()),
}


# ---------------------------------------------------------------- running a check

def _child(conn, fn, args) -> None:
    os.setsid()  # its own process group, so a kill at the limit reaches the bench's workers too
    try:
        conn.send(("rows", fn(*args)))
    except Skip as error:
        conn.send(("skip", str(error)))
    except BaseException as error:  # anything else fails the row, with the error's last line
        message = str(error).strip().splitlines()
        conn.send(("fail", f"{type(error).__name__}: {message[-1] if message else ''}".strip()))


def run_check(name: str, fn, *args, timeout: float) -> list[Row]:
    """``fn(*args) -> list[Row]`` in a fresh spawned process (CUDA starts clean in each); an
    exception, a dead process or ``timeout`` seconds without an answer is one FAIL row named ``name``."""
    if timeout <= 0:
        return [Row(name, "SKIP", detail="no time left in the check's budget")]
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, fn, args))  # a daemon may not start processes
    start = time.monotonic()
    process.start()
    send.close()
    try:
        ready = receive.poll(timeout)
        kind, value = receive.recv() if ready else ("fail", f"timed out after {timeout:.0f} s")
    except EOFError:  # it died before answering: a segfault, or killed for memory
        process.join(5)
        kind, value = "fail", f"the check's process exited with code {process.exitcode} before reporting"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the row and anything it started
        except ProcessLookupError:  # no group yet: killed before its setsid
            pass
        if process.is_alive():
            process.kill()
        process.join(5)
    seconds = time.monotonic() - start
    if kind == "rows":
        return value
    return [Row(name, "SKIP" if kind == "skip" else "FAIL", f"{seconds:.0f} s", value)]


def format_rows(rows: list[Row], header: str = "") -> str:
    width = max([len("check"), *(len(row.check) for row in rows)])
    figure = max([len("figure"), *(len(row.figure) for row in rows)])
    lines = [header] if header else []
    lines += [f"{'check':<{width}}  result  {'figure':<{figure}}  detail", "-" * (width + figure + 18)]
    lines += [f"{row.check:<{width}}  {row.status:<6}  {row.figure:<{figure}}  {row.detail}".rstrip() for row in rows]
    failed = sum(row.status == "FAIL" for row in rows)
    lines.append(f"{sum(row.status == 'PASS' for row in rows)} passed, {failed} failed, "
                 f"{sum(row.status == 'SKIP' for row in rows)} skipped")
    return "\n".join(lines)


def no_cuda_line() -> str | None:
    """The line to exit on when there is no CUDA device, else None."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"sdharness gpu-check: no CUDA device visible (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}); run it on a machine with one NVIDIA GPU and a CUDA torch")


def versions_line() -> str:
    """Device, NVIDIA driver, CUDA (torch's build) and the versions of torch, vLLM and DeepSpeed."""
    import torch

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        driver = "none (no nvidia-smi)"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    pieces = [device, f"driver {driver}", f"CUDA {torch.version.cuda or 'none'}", f"torch {torch.__version__}"]
    for name in ("vllm", "deepspeed"):
        try:
            pieces.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pieces.append(f"{name} not installed")
    return "sdharness gpu-check: " + ", ".join(pieces)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdharness-gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every row's code on CPU with stand-ins (tiny model, no vLLM or DeepSpeed)")
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in selected if name not in CHECKS]
    if unknown:
        parser.exit(2, f"sdharness: error: --only {','.join(unknown)}: unknown; choose from {','.join(CHECKS)}\n")
    dry = args.cpu_dry_run
    print(versions_line() + (" (CPU dry run: stand-ins, figures not judged)" if dry else ""), flush=True)
    line = None if dry else no_cuda_line()
    if line:
        print(line, file=sys.stderr)
        return 2
    deadline = time.monotonic() + TOTAL_S - START_S
    rows = []
    for name in ["prepare", *selected]:
        fn, fn_args = (gpu_rows.check_prepare, ()) if name == "prepare" else CHECKS[name]
        print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
        limit = DRY_RUN_LIMIT_S if dry else min(ROW_LIMITS_S[name], deadline - time.monotonic())
        rows += run_check(name, fn, *fn_args, dry, timeout=limit)
    print(format_rows(rows))
    return 1 if any(row.status == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
