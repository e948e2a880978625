"""``sdharness-bench --peer trl``: sdharness's SD and SFT training steps against TRL's
(``trl.experimental.sdft.SDFTTrainer`` and ``trl.SFTTrainer``), each in its own fresh process.

Both sides run their real trainers (a Lightning ``Trainer`` over ``SelfDistillModule`` /
``SFTModule``; TRL's ``Trainer`` subclasses) on the same model, the same prompt, privileged
context and SFT completion tokens, the same batch and the same divergence: the live student as
teacher, its full-vocabulary distribution as the target (sdharness ``aggregation=teacher``,
TRL ``distillation_mode=full_logits``), forward KL (TRL ``distillation_alpha=0``), AdamW at one
constant learning rate with gradient clipping at 1.0, fp32, no activation checkpointing.
Rollouts sample at temperature 1 and are forced to the full ``completion`` length on both sides
(EOS suppressed), so every step trains on the same number of tokens.

A step is timed from the trainer's batch-start hook to its batch-end hook (rollout, both
forwards, backward, optimiser step); ``generation`` is the rollout call inside it, so ``update``
(step minus generation) is the distillation update alone. Peak memory is the process's RSS
high-water mark (``ru_maxrss``, reset when training starts so loading cannot hide it), shown both
absolute and above the RSS at that start. Processes alternate sdharness, TRL, TRL, sdharness, ...
(``rounds``), so load from other jobs hits both alike; medians pool every measured step.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from sdharness.tools import bench_measure

TRL_VERSION = "1.16.0"
LEARNING_RATE = 1e-5
CLIP = 1.0
# What the two sides cannot be made to do alike; printed under the table.
UNEQUAL = (
    "TRL's SFTTrainer runs the LM head over prompt + completion (sdharness: completion only) and computes "
    "entropy and token accuracy over the logits every step for its logs",
    "TRL's SDFTTrainer scores each token with the full-vocabulary logits of both models "
    "(sdharness: the teacher's hidden states, projected chunk by chunk inside the loss)",
    "TRL SFTConfig defaults changed to match: gradient_checkpointing=False (its default True) and bf16=False",
    "sampled completions differ (each side's own sampling from the same model); lengths are forced equal",
)


class PeerError(RuntimeError):
    pass


@dataclass(frozen=True)
class PeerCase:
    """``batch`` prompts of ``prompt`` tokens, a privileged context of ``context`` tokens (the
    teacher's prompt is prompt + context) and ``completion`` tokens: generated for SD, given for SFT."""

    name: str
    model: str  # a bench_measure.load_model name
    batch: int
    prompt: int
    context: int
    completion: int


def peer_cases(mode: str) -> list[PeerCase]:
    """``tiny`` for tests; otherwise the issue-16 cases, SmolLM2 in full mode only."""
    if mode == "tiny":
        return [PeerCase("tiny_random@16", "tiny_random", 2, 16, 16, 16)]
    cases = [PeerCase("tiny_random@256", "tiny_random", 4, 64, 64, 256)]
    if mode == "full":
        cases.append(PeerCase("smollm2_135m@128", "smollm2_135m", 4, 64, 64, 128))
    return cases


def trl_status() -> str | None:
    """``None`` if the pinned TRL is importable; else the one line saying why the peer is skipped."""
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return (f"peer trl: skipped, TRL is not installed (pip install -e '.[peers]', or "
                f"pip install --no-deps trl=={TRL_VERSION})")
    if version != TRL_VERSION:
        raise PeerError(f"--peer trl was written against trl=={TRL_VERSION} (its SDFTTrainer is experimental and "
                        f"changes between releases), found trl=={version}; install trl=={TRL_VERSION}")
    return None


# ---------------------------------------------------------------- inputs (child side)

def text_of_length(tokenizer, n: int, words=("a", "the", "and", "x")) -> str:
    """A text the tokenizer encodes as exactly ``n`` tokens (a word repeated), so both trainers,
    which tokenize prompts themselves, see the same lengths."""
    for word in words:
        for text in (word + f" {word}" * (n - 1), word * n):  # word tokens, or characters
            if len(tokenizer(text)["input_ids"]) == n:
                return text
    raise PeerError(f"no text of exactly {n} tokens found for this tokenizer")


def case_inputs(case: PeerCase, tokenizer) -> dict:
    prompt = text_of_length(tokenizer, case.prompt)
    context = text_of_length(tokenizer, case.context)
    completion_ids = tokenizer(text_of_length(tokenizer, case.completion))["input_ids"]
    return {"prompt": prompt, "context": context, "teacher_prompt": f"{prompt}\n\n{context}",  # TRL's template
            "prompt_ids": tokenizer(prompt)["input_ids"], "completion_ids": completion_ids}


def force_length(model, tokens: int) -> None:
    """Every rollout runs ``tokens`` tokens: both trainers' generate calls inherit this default."""
    model.generation_config.min_new_tokens = tokens


class StepRecord:
    """Per-step wall times and generation times, and the RSS when training started."""

    def __init__(self, device):
        self.device, self.steps, self.generation = device, [], []
        self.baseline_mb, self.reset, self._start, self._in_step = 0.0, False, 0.0, 0.0

    def train_start(self) -> None:
        self.baseline_mb, self.reset = bench_measure.reset_peak(self.device)

    def step_start(self) -> None:
        self._start, self._in_step = time.perf_counter(), 0.0

    def step_end(self) -> None:
        self.steps.append(time.perf_counter() - self._start)
        self.generation.append(self._in_step)

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._in_step += time.perf_counter() - start
        return wrapper

    def result(self, model) -> dict:
        peak = bench_measure.peak_mb(self.device)
        updates = [s - g for s, g in zip(self.steps, self.generation)]
        return {"times_s": self.steps[1:], "generation_s": self.generation[1:], "update_s": updates[1:],
                "warmup_s": self.steps[0], "peak_mb": peak, "step_peak_mb": peak - self.baseline_mb,
                "baseline_mb": self.baseline_mb, "peak_reset": self.reset,
                "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- sdharness side (child)

def run_sdharness(case: PeerCase, method: str, repeats: int, threads: int | None) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from sdharness.config import (AggregationConfig, AlgoConfig, LossConfig, OptimConfig, RolloutConfig, TeacherConfig,
                                  TrainConfig)
    from sdharness.data.datamodule import PromptBatch
    from sdharness.methods import method_class

    device = bench_measure.setup_device(threads)
    model, tokenizer = bench_measure.load_model(case.model)
    inputs = case_inputs(case, tokenizer)
    force_length(model, case.completion)
    # The live teacher on both sides, as TRL's run below: no second copy of the weights on either.
    cfg = TrainConfig(algo=AlgoConfig(name=method), aggregation=AggregationConfig("teacher"),
                      loss=LossConfig("forward_kl"), optim=OptimConfig(lr=LEARNING_RATE),
                      rollout=RolloutConfig(max_new_tokens=case.completion, progress=False),
                      teacher=TeacherConfig("live"))
    cfg.trainer.gradient_clip_val = CLIP
    module = method_class(method)(model, tokenizer, cfg)
    record = StepRecord(device)
    module.rollout = record.timed(module.rollout)

    def rows(ids):
        return torch.tensor([ids] * case.batch)

    student = rows(inputs["prompt_ids"])
    teacher = rows(tokenizer(inputs["teacher_prompt"])["input_ids"])
    solution = rows(inputs["completion_ids"])
    batch = PromptBatch(student, torch.ones_like(student), teacher, torch.ones_like(teacher), solution,
                        torch.ones_like(solution, dtype=torch.bool),
                        [{"problem": inputs["prompt"], "solution": inputs["context"], "answer": "0"}] * case.batch)

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            record.train_start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            record.step_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record.step_end()

    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=repeats + 1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Clock()], default_root_dir=tempfile.mkdtemp(prefix="sdharness-peer-"))
    trainer.fit(module, DataLoader([batch] * (repeats + 1), batch_size=None, collate_fn=_same))
    return record.result(model)


def _same(batch):
    return batch


# ---------------------------------------------------------------- TRL side (child)

def run_trl(case: PeerCase, method: str, repeats: int, threads: int | None) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import TrainerCallback


    device = bench_measure.setup_device(threads)
    model, tokenizer = bench_measure.load_model(case.model)
    inputs = case_inputs(case, tokenizer)
    force_length(model, case.completion)
    record = StepRecord(device)
    common = dict(output_dir=tempfile.mkdtemp(prefix="sdharness-peer-trl-"), per_device_train_batch_size=case.batch,
                  max_steps=repeats + 1, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=CLIP, use_cpu=device.type == "cpu",
                  report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0,
                  dataloader_num_workers=0, bf16=False, gradient_checkpointing=False)
    rows = case.batch * (repeats + 1)
    if method == "sd":
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        args = SDFTConfig(**common, num_generations=1, generation_batch_size=case.batch, max_prompt_length=None,
                          max_completion_length=case.completion, temperature=1.0, teacher_model_kind="live",
                          distillation_mode="full_logits", distillation_alpha=0.0, shuffle_dataset=False,
                          generation_kwargs={"min_new_tokens": case.completion})
        data = Dataset.from_dict({"prompt": [inputs["prompt"]] * rows, "privileged_context": [inputs["context"]] * rows})
        trainer = SDFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer._generate = record.timed(trainer._generate)
    else:
        from trl import SFTConfig, SFTTrainer

        ids = inputs["prompt_ids"] + inputs["completion_ids"]
        completion_mask = [0] * len(inputs["prompt_ids"]) + [1] * len(inputs["completion_ids"])
        args = SFTConfig(**common, completion_only_loss=True, max_length=None, packing=False)
        data = Dataset.from_dict({"input_ids": [ids] * rows, "completion_mask": [completion_mask] * rows})
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record.train_start()

        def on_step_begin(self, args, state, control, **kwargs):
            record.step_start()

        def on_step_end(self, args, state, control, **kwargs):
            record.step_end()

    trainer.add_callback(Clock())
    with contextlib.redirect_stdout(sys.stderr):  # HF Trainer prints its run summary, which --json must not carry
        trainer.train()
    return record.result(model)


# ---------------------------------------------------------------- orchestration (parent side)

def _pooled(runs: list[dict]) -> dict:
    """One side's processes as one: every measured step pooled, the largest peaks."""
    pooled = {key: [t for run in runs for t in run[key]] for key in ("times_s", "generation_s", "update_s")}
    return runs[0] | pooled | {
        "median_s": statistics.median(pooled["times_s"]), "generation_median_s": statistics.median(pooled["generation_s"]),
        "update_median_s": statistics.median(pooled["update_s"]), "peak_mb": max(run["peak_mb"] for run in runs),
        "step_peak_mb": max(run["step_peak_mb"] for run in runs), "processes": len(runs)}


def run_peer_case(case: PeerCase, repeats: int, threads: int | None, rounds: int, fresh) -> dict:
    """Both methods of ``case`` on both sides; ``fresh(fn, *args)`` runs one in a new process."""
    entry = asdict(case)
    for method in ("sd", "sft"):
        runs = {"sdharness": [], "trl": []}
        for round_ in range(rounds):
            for side in ("sdharness", "trl") if round_ % 2 == 0 else ("trl", "sdharness"):
                print(f"[bench] peer {case.name} {method} {side} ...", file=sys.stderr, flush=True)
                runs[side].append(fresh(run_sdharness if side == "sdharness" else run_trl, case, method, repeats, threads))
        ours, theirs = _pooled(runs["sdharness"]), _pooled(runs["trl"])
        entry[method] = {"sdharness": ours, "trl": theirs, "ratios": {
            "step_time": ours["median_s"] / theirs["median_s"],
            "update_time": ours["update_median_s"] / theirs["update_median_s"] if method == "sd" else None,
            "peak_mb": ours["peak_mb"] / theirs["peak_mb"],
            "step_peak_mb": ours["step_peak_mb"] / theirs["step_peak_mb"] if theirs["step_peak_mb"] > 0 else None}}
    return entry


def format_peer_table(entries: list[dict], version: str = TRL_VERSION) -> str:
    def fmt(value, spec=".2f"):
        return "n/a" if value is None else format(value, spec)

    lines = [f"peer trl=={version}: sdharness / TRL, same model, batch, lengths, live teacher, full-vocabulary "
             "forward KL; each side in its own processes, alternated",
             f"{'case':<20}{'step':<10}| {'ours s':>7}{'TRL s':>7}{'ratio':>7} | {'ours MB':>8}{'TRL MB':>8}"
             f"{'ratio':>7} | {'ours +MB':>9}{'TRL +MB':>9}{'ratio':>7}"]
    for entry in entries:
        for method, label in (("sd", "SD step"), ("sd", "SD update"), ("sft", "SFT step")):
            ours, theirs, ratios = entry[method]["sdharness"], entry[method]["trl"], entry[method]["ratios"]
            key, ratio = ("update_median_s", ratios["update_time"]) if label == "SD update" else ("median_s", ratios["step_time"])
            lines.append(f"{entry['name']:<20}{label:<10}| {ours[key]:>7.3f}{theirs[key]:>7.3f}{fmt(ratio):>7} | "
                         f"{ours['peak_mb']:>8.0f}{theirs['peak_mb']:>8.0f}{fmt(ratios['peak_mb']):>7} | "
                         f"{ours['step_peak_mb']:>9.0f}{theirs['step_peak_mb']:>9.0f}{fmt(ratios['step_peak_mb']):>7}")
    lines.append("  s: median step; MB: peak RSS of the process; +MB: peak above the RSS when training started")
    lines += ["not equal:"] + [f"  - {item}" for item in UNEQUAL]
    return "\n".join(lines)
