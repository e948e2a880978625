"""``sdharness-bench``'s rollout cases: tokens/s of one batched, left-padded HF ``generate`` with KV
cache against a loop of per-sample ``generate`` calls over the same prompts (greedy, exactly ``new``
tokens per row), and guided sampling (student and teacher rows in one forward per token) per
generated token, for models with a tokenizer; and (``sdharness-bench --guided``) a training batch's rollout, plain
against guided, at the comparison protocol's shape."""

from __future__ import annotations

import copy
import random
import statistics
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig

from sdharness.config import PromptConfig
from sdharness.data.columns import ColumnsTask
from sdharness.data.prompts import encode_prompts, render_student, render_teacher
from sdharness.rollout.guided import guided_generate
from sdharness.rollout.hf import generate
from sdharness.tools.bench_measure import load_model, setup_device, timed
from sdharness.tools.generate import named_config

if TYPE_CHECKING:
    from sdharness.tools.bench import Case


def _generate(model, ids, mask, new_tokens: int, pad: int, eos: int) -> int:
    """Greedy ``new_tokens`` tokens per row (EOS suppressed); returns the tokens generated."""
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad, use_cache=True)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


def rollout_prompts(case: Case, vocab: int, pad: int, device):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.linspace(max(1, case.prompt // 2), case.prompt, case.batch).long()
    ids = torch.randint(3, vocab, (case.batch, case.prompt), generator=generator)
    mask = torch.arange(case.prompt).unsqueeze(0) >= (case.prompt - lengths).unsqueeze(1)
    return ids.masked_fill(~mask, pad).to(device), mask.long().to(device)


@torch.no_grad()
def measure_rollout(case: Case, repeats: int, threads: int | None) -> dict:
    device = setup_device(threads)
    model, tokenizer = load_model(case.model)
    model.to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    eos = tokenizer.eos_token_id if tokenizer is not None else 2
    ids, mask = rollout_prompts(case, model.config.vocab_size, pad, device)

    def batched(new=case.completion):
        return _generate(model, ids, mask, new, pad, eos)

    def naive(new=case.completion):  # one call per sample, its padding stripped
        return sum(_generate(model, row[keep.bool()][None], keep[keep.bool()][None], new, pad, eos)
                   for row, keep in zip(ids, mask))

    result = {"tokens": case.batch * case.completion, "params": sum(p.numel() for p in model.parameters()),
              "threads": torch.get_num_threads(), "device": device.type}
    for name, fn in (("batched", batched), ("naive", naive)):
        fn(2)  # warm-up
        assert fn() == result["tokens"], "batched and naive must generate the same number of tokens"
        median = statistics.median(timed(fn, device) for _ in range(repeats))
        result[name] = {"median_s": median, "tokens_per_s": result["tokens"] / median}
    if tokenizer is not None:
        result["guided"] = measure_guided(model, tokenizer, ids, mask, case.completion, repeats, device)
    return result


def measure_guided(model, tokenizer, ids, mask, new_tokens: int, repeats: int, device) -> dict:
    """Guided sampling (student and teacher rows in one batched forward per token) in tokens/s.

    The teacher context is the prompt with its first half repeated, so it is longer, as a real
    teacher prompt is. Guided decoding stops rows at EOS, so it is compared per generated token.
    """
    teacher_ids, teacher_mask = torch.cat([ids[:, : ids.shape[1] // 2], ids], 1), torch.cat(
        [mask[:, : mask.shape[1] // 2], mask], 1)

    def guided():
        out = guided_generate(model, tokenizer, ids, mask, teacher_ids, teacher_mask, aggregation="product",
                              parameter=2.0, max_new_tokens=new_tokens, greedy=True)
        return int(out.completion_mask.sum())

    guided()  # warm-up
    runs = [(timed(guided, device), guided()) for _ in range(repeats)]
    seconds = statistics.median(t for t, _ in runs)
    tokens = statistics.median(n for _, n in runs)
    return {"median_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


# The comparison protocol's rollout (conf/experiment/protocol.yaml with data.difficulty=seven): 8 problems,
# at most 96 new tokens, temperature 1, aggregation product at tau 2, the testbed prompts.
PROTOCOL_BATCH, PROTOCOL_NEW_TOKENS, PROTOCOL_DIFFICULTY = 8, 96, "seven"
GUIDED_WAYS = ("plain", "guided_initial", "guided_shared")


def protocol_prompts(tokenizer, device, batch: int = PROTOCOL_BATCH):
    """Student and teacher prompts ``(ids, mask)`` of ``batch`` column-addition problems, prompt=testbed."""
    prompt = PromptConfig(**named_config("prompt", "testbed"))
    rng, task = random.Random(0), ColumnsTask()
    problems = [task.problem(rng, PROTOCOL_DIFFICULTY) for _ in range(batch)]
    student = encode_prompts(prompt, tokenizer, [render_student(prompt, p["problem"]) for p in problems])
    teacher = encode_prompts(prompt, tokenizer, [render_teacher(prompt, p["problem"], p["solution"]) for p in problems])
    return [t.to(device) for t in (*student, *teacher)]


def measure_guided_batch(model_name: str, repeats: int, threads: int | None) -> dict:
    """Seconds per batch of a training rollout: ``plain`` (what ``rollout.guidance=never`` samples), guided
    with ``teacher=initial`` (a frozen copy: a second forward and cache) and guided with the live model as
    teacher (one forward over both contexts). Repeat ``i`` of every way samples with seed ``i``, so the
    same code draws the same tokens in every run; the ways alternate in each repeat, so that load from
    other jobs hits them alike."""
    device = setup_device(threads)
    model, tokenizer = load_model(model_name)
    model.to(device)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    student_ids, student_mask, teacher_ids, teacher_mask = protocol_prompts(tokenizer, device)

    def sample(way: str, seed: int):
        if way == "plain":
            torch.manual_seed(seed)  # HF generate draws from torch's global generator
            return generate(model, tokenizer, student_ids, student_mask, max_new_tokens=PROTOCOL_NEW_TOKENS)
        return guided_generate(model, tokenizer, student_ids, student_mask, teacher_ids, teacher_mask,
                               aggregation="product", parameter=2.0, max_new_tokens=PROTOCOL_NEW_TOKENS,
                               generator=torch.Generator(device=device).manual_seed(seed),
                               teacher_model=teacher if way == "guided_initial" else None)

    runs = {way: [] for way in GUIDED_WAYS}
    for repeat in range(repeats + 1):  # repeat 0 warms up
        for way in GUIDED_WAYS if repeat % 2 else GUIDED_WAYS[::-1]:
            rollouts = []
            seconds = timed(lambda: rollouts.append(sample(way, repeat)), device)
            if repeat:
                ids = rollouts[0].completion_ids
                runs[way].append({"seconds": seconds, "steps": ids.shape[1], "tokens": int(rollouts[0].lengths.sum())})
    result = {"model": model_name, "batch": PROTOCOL_BATCH, "new_tokens": PROTOCOL_NEW_TOKENS,
              "student_prompt": student_ids.shape[1], "teacher_prompt": teacher_ids.shape[1],
              "threads": torch.get_num_threads(), "device": device.type, "repeats": repeats}
    for way, measured in runs.items():
        seconds = statistics.median(run["seconds"] for run in measured)
        steps = sum(run["steps"] for run in measured)
        result[way] = {"median_s": seconds, "s_per_step": sum(run["seconds"] for run in measured) / steps,
                       "steps": [run["steps"] for run in measured], "tokens": [run["tokens"] for run in measured]}
    for way in GUIDED_WAYS[1:]:
        result[way]["batch_ratio"] = result[way]["median_s"] / result["plain"]["median_s"]
        result[way]["step_ratio"] = result[way]["s_per_step"] / result["plain"]["s_per_step"]
    return result


def format_guided_table(entry: dict) -> str:
    lines = [f"rollout of one training batch, {entry['model']}: {entry['batch']} problems ({PROTOCOL_DIFFICULTY} digits, "
             f"prompts {entry['student_prompt']}/{entry['teacher_prompt']} tokens student/teacher), at most "
             f"{entry['new_tokens']} new tokens, {entry['device']} ({entry['threads']} threads), medians of "
             f"{entry['repeats']}",
             f"{'way':<16}{'s/batch':>9}{'ms/step':>9}{'steps':>7} | {'batch ratio':>11}{'step ratio':>11}"]
    for way in GUIDED_WAYS:
        e = entry[way]
        ratios = f"{e['batch_ratio']:>11.2f}{e['step_ratio']:>11.2f}" if way != "plain" else f"{'1.00':>11}{'1.00':>11}"
        lines.append(f"{way:<16}{e['median_s']:>9.3f}{1000 * e['s_per_step']:>9.1f}"
                     f"{statistics.median(e['steps']):>7.0f} | {ratios}")
    return "\n".join(lines)
