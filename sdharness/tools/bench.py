"""``sdharness-bench``: cost of a self-distillation step against an SFT step, of batched rollouts,
of guided sampling and of logged-chat distillation.

* SD step: the training step's ``score_and_distil`` (teacher hidden states without gradient,
  student logits, chunked loss: product, tau 2, forward_kl, with the monitoring figures) + backward
  + AdamW step, on a FIXED random completion (generation excluded). SFT step:
  ``completion_logits`` + token-mean cross-entropy (as ``SFTModule``) + backward + AdamW step on
  the same batch: same prompt and completion tokens.
* Logged-chat distillation (``data=chatlog``) is exactly that SD step: ``g`` is the logged turn,
  nothing is generated. ``chatlog_sft_tokens_per_s`` is its tokens/s over SFT's on the same
  tokens and batch, i.e. the inverse of ``sd_sft_step_time``. By FLOPs it cannot exceed ~0.75:
  SFT is one forward and one backward (~3 forward-equivalents), a logged-chat step adds the
  teacher's forward (~4); on the vocabulary-heavy case the teacher's LM-head projection alone
  is a quarter of an SFT step.
* Rollout: tokens/s of one batched, left-padded HF ``generate`` with KV cache against a loop of
  per-sample ``generate`` calls over the same prompts; greedy, exactly ``new`` tokens per row.
  Guided sampling (``sdharness.rollout.guided``, student and teacher rows in one forward per token) is
  timed per generated token against the batched plain rollout (models with a tokenizer only).

``--peer trl`` adds TRL's SDFT and SFT trainers against sdharness's (``sdharness/tools/peer.py``);
``--loss-support`` times the chunked loss alone, top-k against full (``sdharness/tools/bench_loss.py``);
``--lora-teacher`` measures the frozen teacher's memory under LoRA, without and with a copy
(``sdharness/tools/bench_lora.py``);
``--guided`` times one training batch's rollout, plain against guided with ``teacher=initial`` and with the
live model as teacher, at the comparison protocol's shape (``sdharness/tools/bench_rollout.py``);
``--cases`` runs the named cases only.

Every (case, method) runs in a fresh process (forkserver with this module preloaded, so a case
pays no re-import): medians over ``repeats`` steps after one warm-up. SD and SFT each run in
``rounds`` processes, alternating SD, SFT, SFT, SD, ... so that load from other jobs on a shared
machine hits both alike; their medians pool every measured step. Peak memory is the step's
(the largest over a method's processes): on CPU ``ru_maxrss`` minus the RSS after model load,
read right before the first step (the process's high-water mark is reset there via
``/proc/self/clear_refs`` so the load's own peak cannot hide it); on GPU
``max_memory_allocated`` minus ``memory_allocated`` after a reset. A ratio is the SD (batched,
guided) median over the SFT (naive, plain) median; the headline ``ratios`` take the largest case
measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdharness.config import AggregationConfig, LossConfig
from sdharness.paths import PACKAGE_DIR
from sdharness.distill.logits import completion_logits
from sdharness.methods.policy import fused_adamw_supported
from sdharness.methods.self_distill import score_and_distil
from sdharness.methods.sft import token_cross_entropy
from sdharness.tools import bench_lora, bench_loss, peer
from sdharness.tools.bench_rollout import format_guided_table, measure_guided_batch, measure_rollout
from sdharness.tools.bench_measure import load_model, peak_mb, reset_peak, setup_device, timed

TESTBED = PACKAGE_DIR / "assets" / "testbed"
TARGETS = {"sd_sft_step_time": 1.4, "sd_sft_peak_memory": 1.25, "guided_plain_time": 1.3}
# Physical limits rather than targets: a logged-chat step is an SFT step plus a teacher forward, so by
# FLOPs its tokens/s is at most 3/4 of SFT's; the ratio is reported as a share of that bound.
FLOP_BOUNDS = {"chatlog_sft_tokens_per_s": 0.75}
RATIO_KEYS = ("sd_sft_step_time", "sd_sft_peak_memory", "guided_plain_time", "chatlog_sft_tokens_per_s",
              "batched_naive_rollout_tokens_per_s")


@dataclass(frozen=True)
class Case:
    """``model`` at ``batch`` x (``prompt`` + ``completion``) tokens; for rollouts, ``completion``
    is the number of new tokens and prompts are ``prompt // 2 .. prompt`` tokens, left-padded."""

    name: str
    model: str  # tiny_random | vocab49k | testbed | smollm2_135m
    batch: int
    prompt: int
    completion: int
    kind: str = "step"  # step | rollout


def cases(mode: str) -> list[Case]:
    """``tiny`` (tests, seconds), ``quick`` (minutes on 2 CPU cores) or ``full``."""
    if mode == "tiny":
        return [Case("tiny_random@32", "tiny_random", 2, 8, 32),
                Case("rollout tiny_random", "tiny_random", 4, 8, 8, "rollout")]
    quick = [Case("tiny_random@256", "tiny_random", 4, 32, 256), Case("vocab49k_2l@1024", "vocab49k", 1, 64, 1024),
             Case("rollout tiny_random", "tiny_random", 8, 16, 32, "rollout")]
    if mode == "quick":
        return quick
    testbed = [Case("testbed@256", "testbed", 2, 32, 256)] if (TESTBED / "config.json").exists() else []
    return [*quick, *testbed, Case("smollm2_135m@256", "smollm2_135m", 2, 64, 256),
            Case("smollm2_135m@1024", "smollm2_135m", 1, 64, 1024),
            Case("rollout smollm2_135m", "smollm2_135m", 8, 32, 64, "rollout")]


# ---------------------------------------------------------------- models and data (child side)

def step_batch(case: Case, vocab: int, device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def ids(length):
        return torch.randint(vocab, (case.batch, length), generator=generator).to(device)

    data = {"student_ids": ids(case.prompt), "teacher_ids": ids(case.prompt), "g": ids(case.completion)}
    data |= {"student_mask": torch.ones_like(data["student_ids"]),
             "teacher_mask": torch.ones_like(data["teacher_ids"]), "g_mask": torch.ones_like(data["g"], dtype=bool)}
    return data


def sd_step(model, optimizer, d) -> None:
    result = score_and_distil(model, model, d["student_ids"], d["student_mask"], d["teacher_ids"], d["teacher_mask"],
                              d["g"], d["g_mask"], d["g_mask"], AggregationConfig("product", 2.0), LossConfig())
    _update(optimizer, result.loss)


def sft_step(model, optimizer, d) -> None:
    logits = completion_logits(model, d["student_ids"], d["student_mask"], d["g"], d["g_mask"])
    _update(optimizer, token_cross_entropy(logits, d["g"], d["g_mask"]))


def _update(optimizer, loss) -> None:
    optimizer.zero_grad()  # after the forward, as PolicyModule.training_step does
    loss.backward()
    optimizer.step()


# ---------------------------------------------------------------- measuring (child side)

def measure_step(case: Case, method: str, repeats: int, threads: int | None) -> dict:
    device = setup_device(threads)
    model = load_model(case.model)[0].to(device)
    data = step_batch(case, model.config.vocab_size, device)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused_adamw_supported(params))  # as PolicyModule's
    step = {"sd": sd_step, "sft": sft_step}[method]
    baseline, reset = reset_peak(device)
    times = [timed(lambda: step(model, optimizer, data), device) for _ in range(repeats + 1)]
    return {"median_s": statistics.median(times[1:]), "times_s": times[1:], "warmup_s": times[0],
            "peak_mb": peak_mb(device) - baseline, "baseline_mb": baseline, "peak_reset": reset,
            "params": sum(p.numel() for p in model.parameters()), "vocab": model.config.vocab_size,
            "threads": torch.get_num_threads(), "device": device.type}


# ---------------------------------------------------------------- orchestration (parent side)

def _fresh(fn, *args):
    """``fn(*args)`` in a new process forked from a server that has only imported this module."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["sdharness.tools.bench"])
    with ProcessPoolExecutor(1, mp_context=context) as pool:  # a dead worker raises, never respawns
        return pool.submit(fn, *args).result()


def case_size(entry: dict) -> int:
    return entry["params"] * entry["batch"] * (entry["prompt"] + entry["completion"])


def run_case(case: Case, repeats: int, threads: int | None, rounds: int = 1) -> dict:
    print(f"[bench] {case.name} ...", file=sys.stderr, flush=True)
    entry = asdict(case)
    if case.kind == "rollout":
        result = _fresh(measure_rollout, case, repeats, threads)
        ratios = {"batched_naive_rollout_tokens_per_s": result["batched"]["tokens_per_s"] / result["naive"]["tokens_per_s"]}
        if "guided" in result:  # time for the same number of tokens: guided over plain batched sampling
            ratios["guided_plain_time"] = result["batched"]["tokens_per_s"] / result["guided"]["tokens_per_s"]
        return entry | result | {"ratios": ratios}
    runs = {"sd": [], "sft": []}
    for round_ in range(rounds):  # SD, SFT, SFT, SD, ...: drifting load from other jobs hits both alike
        for method in ("sd", "sft") if round_ % 2 == 0 else ("sft", "sd"):
            runs[method].append(_fresh(measure_step, case, method, repeats, threads))
    sd, sft = _pooled(runs["sd"]), _pooled(runs["sft"])
    tokens = case.batch * case.completion  # loss-carrying tokens per step, the same for both
    sd["tokens_per_s"], sft["tokens_per_s"] = tokens / sd["median_s"], tokens / sft["median_s"]
    return entry | {"params": sd["params"], "vocab": sd["vocab"], "sd": sd, "sft": sft, "ratios": {
        "sd_sft_step_time": sd["median_s"] / sft["median_s"],
        # A logged-chat step is the SD step on a given completion (no rollout), on the same tokens.
        "chatlog_sft_tokens_per_s": sd["tokens_per_s"] / sft["tokens_per_s"],
        "sd_sft_peak_memory": sd["peak_mb"] / sft["peak_mb"] if sft["peak_mb"] > 0 else None}}


def _pooled(runs: list[dict]) -> dict:
    """One method's processes as one: every measured step pooled, the largest peak."""
    times = [t for run in runs for t in run["times_s"]]
    return runs[0] | {"median_s": statistics.median(times), "times_s": times,
                      "warmup_s": [run["warmup_s"] for run in runs], "peak_mb": max(run["peak_mb"] for run in runs),
                      "peak_reset": all(run["peak_reset"] for run in runs), "processes": len(runs)}


def headline(entries: list[dict]) -> tuple[dict, dict]:
    """Each ratio at the largest case that measured it: ``(ratios, case name per ratio)``."""
    ratios, where = dict.fromkeys(RATIO_KEYS), dict.fromkeys(RATIO_KEYS)
    for entry in sorted(entries, key=case_size):
        for key, value in entry["ratios"].items():
            ratios[key], where[key] = value, entry["name"]
    return ratios, where


def machine(threads: int | None) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "torch_threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_cases(selected: list[Case], repeats: int = 3, threads: int | None = None, rounds: int = 2) -> dict:
    entries = [run_case(case, repeats, threads, rounds) for case in selected]
    ratios, where = headline(entries)
    return {"machine": machine(threads), "repeats": repeats, "rounds": rounds, "ratios": ratios, "ratio_cases": where,
            "targets": TARGETS, "cases": entries}


# ---------------------------------------------------------------- reporting

def format_ratio(value, spec=".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch {m['torch']} "
             f"({m['torch_threads']} threads), GPU: {m['gpu'] or 'none'}; medians of {report['repeats']} steps"
             f" x {report.get('rounds', 1)} processes per method",
             "", f"{'case':<22}{'params':>9}{'vocab':>7}{'batch':>6}{'prompt':>7}{'compl':>6} | "
             f"{'SD s':>7}{'SFT s':>7}{'ratio':>7} | {'SD MB':>8}{'SFT MB':>8}{'ratio':>7}"]
    for e in (e for e in report["cases"] if e["kind"] == "step"):
        lines.append(f"{e['name']:<22}{e['params'] / 1e6:>8.1f}M{e['vocab']:>7}{e['batch']:>6}{e['prompt']:>7}"
                     f"{e['completion']:>6} | {e['sd']['median_s']:>7.3f}{e['sft']['median_s']:>7.3f}"
                     f"{format_ratio(e['ratios']['sd_sft_step_time']):>7} | {e['sd']['peak_mb']:>8.1f}"
                     f"{e['sft']['peak_mb']:>8.1f}{format_ratio(e['ratios']['sd_sft_peak_memory']):>7}")
    lines += ["", f"{'rollout':<22}{'batch':>6}{'prompt':>7}{'new':>5} | {'batched tok/s':>14}"
                  f"{'naive tok/s':>12}{'ratio':>7}"]
    for e in (e for e in report["cases"] if e["kind"] == "rollout"):
        lines.append(f"{e['name']:<22}{e['batch']:>6}{e['prompt']:>7}{e['completion']:>5} | "
                     f"{e['batched']['tokens_per_s']:>14.1f}{e['naive']['tokens_per_s']:>12.1f}"
                     f"{format_ratio(e['ratios']['batched_naive_rollout_tokens_per_s']):>7}")
    guided = [e for e in report["cases"] if e.get("guided")]
    lines += [f"{e['name'] + ' guided':<22}{e['batch']:>6}{e['prompt']:>7}{e['completion']:>5} | "
              f"{e['guided']['tokens_per_s']:>14.1f}{'':>12}{format_ratio(e['ratios'].get('guided_plain_time')):>7}"
              "  (time ratio guided/plain per token)" for e in guided]
    lines += ["", "headline ratios (largest case measured):"]
    for key, value in report["ratios"].items():
        target, bound = report["targets"].get(key), FLOP_BOUNDS.get(key)
        verdict = "" if value is None else (
            f"  target <= {target}: {'met' if value <= target else 'MISSED'}" if target is not None else
            f"  FLOP bound {bound}: {value / bound:.0%} of it" if bound is not None else "")
        where = report["ratio_cases"][key]
        note = f"[{where}]" if where else "not measured"
        lines.append(f"  {key:<36}{format_ratio(value):>7}  {note}{verdict}")
    if "peer" in report:
        lines += ["", report["peer"].get("skipped") or peer.format_peer_table(report["peer"]["cases"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdharness-bench", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes on a small CPU")
    size.add_argument("--tiny", action="store_true", help="seconds; for tests and CI")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="measured steps after the warm-up")
    parser.add_argument("--rounds", type=int, default=None,
                        help="processes per method for SD/SFT steps, alternated (default: 1 with --tiny, else 2)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--loss-support", action="store_true",
                        help="only the chunked loss: loss.support=topk against full at vocabularies 49152 and 151936")
    parser.add_argument("--lora-teacher", action="store_true",
                        help="only the memory of teacher=initial under LoRA: the adapter-free base against a frozen copy "
                        "(SmolLM2-135M; tiny_random with --tiny)")
    parser.add_argument("--guided", action="store_true",
                        help="only a training batch's rollout, plain against guided (8 problems, 96 new tokens; the "
                        "testbed base, tiny_random with --tiny): seconds per batch and per decoding step")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names to run (bench and peer cases of the mode), e.g. smollm2_135m@128")
    parser.add_argument("--peer", choices=["trl"], default=None,
                        help=f"also run TRL's SDFT and SFT trainers against sdharness's (trl=={peer.TRL_VERSION}, "
                        "the `peers` extra) and print sdharness/TRL ratios")
    args = parser.parse_args(argv)
    skip = None
    if args.peer:
        try:
            skip = peer.trl_status()
        except peer.PeerError as error:
            parser.exit(2, f"sdharness: error: {error}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    def only_json_on_stdout():  # `--json | jq` reads the JSON alone: what the work prints goes to stderr
        return stdout_to_stderr() if args.json else contextlib.nullcontext()

    if args.loss_support:
        with only_json_on_stdout():
            entries = bench_loss.run_loss_cases(_fresh, repeats=args.repeats or 3, threads=args.threads)
        print(json.dumps(entries, indent=2) if args.json else bench_loss.format_loss_table(entries))
        return
    if args.lora_teacher:
        with only_json_on_stdout():
            entry = bench_lora.run_lora_teacher(_fresh, "tiny_random" if args.tiny else "smollm2_135m", args.threads)
        print(json.dumps(entry, indent=2) if args.json else bench_lora.format_lora_table(entry))
        return
    if args.guided:
        with only_json_on_stdout():
            entry = _fresh(measure_guided_batch, "tiny_random" if args.tiny else "testbed", args.repeats or 3,
                           args.threads)
        print(json.dumps(entry, indent=2) if args.json else format_guided_table(entry))
        return
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    repeats = args.repeats or {"tiny": 1, "quick": 3, "full": 5}[mode]
    rounds = args.rounds or (1 if mode == "tiny" else 2)
    bench_cases, peer_cases = cases(mode), peer.peer_cases(mode) if args.peer and skip is None else []
    if args.cases:
        wanted = {name.strip() for name in args.cases.split(",")}
        known = {case.name for case in bench_cases + peer.peer_cases(mode)}
        if wanted - known:
            parser.exit(2, f"sdharness: error: --cases {','.join(sorted(wanted - known))}: no such case in this mode; "
                        f"choose from {', '.join(sorted(known))}\n")
        bench_cases = [case for case in bench_cases if case.name in wanted]
        peer_cases = [case for case in peer_cases if case.name in wanted]
    with only_json_on_stdout():
        report = run_cases(bench_cases, repeats, args.threads, rounds)
        if peer_cases:
            report["peer"] = {"name": args.peer, "version": peer.TRL_VERSION, "unequal": list(peer.UNEQUAL),
                              "cases": [peer.run_peer_case(case, repeats, args.threads, rounds, _fresh)
                                        for case in peer_cases]}
        elif skip:
            report["peer"] = {"name": args.peer, "skipped": skip}
    print(json.dumps(report, indent=2) if args.json else format_table(report))


@contextlib.contextmanager
def stdout_to_stderr():
    """File descriptor 1 pointed at stderr, for this process and the workers it starts: libraries print
    on import (transformers: ``[INFO] Running in WANDB offline mode``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


if __name__ == "__main__":
    # Workers must unpickle sdharness.tools.bench, not re-run it as a module (runpy warns about that).
    sys.modules["__main__"].__spec__ = None
    from sdharness.tools.bench import main as _main

    _main()
