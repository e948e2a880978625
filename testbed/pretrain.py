"""Pretrain a testbed base from scratch on a built-in arithmetic task (a Hydra app).

The builder of the shipped bases (``sdharness/assets/testbed*``), not part of the installed package:
run it from the repository root of a checkout (its configs are ``testbed/conf/pretrain*.yaml``)::

    python -m testbed.pretrain --config-name pretrain_columns output_dir=s1   # the default base (assets/testbed)
    python -m testbed.pretrain --config-name pretrain_columns_teacher init_from=s1 output_dir=s2  # in three stages,
    python -m testbed.pretrain --config-name pretrain_columns_practice init_from=s2 output_dir=s3 # each but the first
                                                               # stopped by stop_when
    python -m testbed.pretrain --config-name pretrain_v2       # the chained-arithmetic base (assets/testbed_chain)
    python -m testbed.pretrain                                 # the first base (sdharness/assets/testbed_v1)
    python -m testbed.pretrain early_answer_fraction=0.5 output_dir=/tmp/leaky_base

A testbed base is a small Llama (0.45M parameters: hidden 96, 4 layers) with the character-level
tokenizer, saved with ``save_pretrained`` so the harness loads it like any other Hugging Face model
(``model=testbed data.task=columns prompt=testbed``). It is trained so that it uses hints well but is weaker without
them on HARD (about 10 minutes on one CPU thread; each base's ``pretrain_report.json`` records
its command, seed, time and accuracies):

* student-format examples (student prompt -> worked solution) on EASY and HARD problems (the
  HARD share sets the no-hint HARD band: without it the base writes 2-step solutions to 4-step
  problems);
* teacher-format examples (teacher prompt with the reference solution -> worked solution) on
  EASY and HARD problems; ``foreign_hint_fraction`` of them give the reference in the foreign
  notation, and ``slip_fraction`` of those with worked steps complete with one student-like slip
  continued consistently (the task's ``slipped_solution``), the slip's wrong characters without loss.

``task`` picks the built-in task (``chain`` or ``columns``, :data:`sdharness.data.builtin.TASKS`).
``init_from`` continues a base this app made (same task and held-out problems) instead of starting
from scratch, and ``stop_when`` stops at the first quick eval where each listed eval set reaches its
accuracy: a stage can stop on the property it trains, which a fixed step count cannot promise when
a skill appears suddenly and at a seed- and machine-dependent step.

Every example is a token sequence exactly as the harness later sees it:
``encode_prompt(prompt, tokenizer, rendered) + tokenizer(completion) + [eos]``, with the loss on
the completion and EOS only. ``early_answer_fraction`` makes that fraction of teacher-format
examples complete with the answer line alone ("The answer is N."), skipping the worked steps:
a base whose teacher holds knowledge the student cannot reproduce.

At the end the model is greedily evaluated on fixed held-out sets (no-hint EASY, no-hint HARD,
hint HARD, hint EASY, foreign-notation hint HARD), and the weights, tokenizer and
``pretrain_report.json`` (command, seed, config, wall time, accuracies) are written to ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import LlamaForCausalLM

from sdharness.cli import bad_input_exits, cli_errors
from sdharness.config import ConfigError, PromptConfig
from sdharness.eval.quick import evaluate_greedy, prompt_batches
from sdharness.methods.schedule import lr_lambda
from sdharness.data.prompts import render_student, render_teacher
from sdharness.data.answers import ANSWER_MARKER
from sdharness.models import PRETRAIN_REPORT, char_llama_config, char_tokenizer, pretrained_task, resolve_path
from testbed.examples import build_examples, eval_problems, make_batches
from testbed.pretrain_config import (EVAL_SETS, KINDS, PRETRAIN_CONF_DIR, ArchConfig, PretrainConfig, register_configs,
                                     to_pretrain_config)

log = logging.getLogger(__name__)
COMMAND = ("python", "-m", "testbed.pretrain")  # how a report records this app's command line


# --------------------------------------------------------------------------------------------
# Model, training, evaluation
# --------------------------------------------------------------------------------------------


def build_model(arch: ArchConfig, tokenizer, seed: int) -> LlamaForCausalLM:
    config = char_llama_config(tokenizer, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                               num_layers=arch.num_layers, num_heads=arch.num_heads,
                               max_position_embeddings=arch.max_position_embeddings, rope_theta=arch.rope_theta)
    torch.manual_seed(seed)  # leaves the global RNG where the recorded pretraining run had it
    return LlamaForCausalLM(config)


def load_base(cfg: PretrainConfig) -> tuple[LlamaForCausalLM, dict]:
    """The base ``cfg.init_from`` to continue from, and its pretraining report.

    It must be a base made by this app on ``cfg.task`` with the same held-out problems, so
    that the eval problems stay unseen, and of ``cfg.arch``'s sizes."""
    directory = resolve_path(cfg.init_from, "init_from")
    report_path = directory / PRETRAIN_REPORT
    if not report_path.is_file():
        raise ConfigError(f"init_from={cfg.init_from!r}: {report_path} does not exist; point init_from at a base "
                          f"made by this app (its held-out problems must be known)")
    report = json.loads(report_path.read_text())
    trained = report.get("config", {})
    base_data = {"task": pretrained_task(trained), "eval_seed": trained.get("eval_seed"), "eval_size": trained.get("eval_size")}
    for name, value in base_data.items():
        if value != getattr(cfg, name):
            raise ConfigError(f"init_from={cfg.init_from!r} was pretrained with {name}={value!r}, this run has "
                              f"{name}={getattr(cfg, name)!r}; set {name}={value} (the held-out problems must be the "
                              f"ones its training excluded)")
    base_arch = trained.get("arch", {})
    for name, value in asdict(cfg.arch).items():
        if base_arch.get(name) != value:
            raise ConfigError(f"init_from={cfg.init_from!r} has arch.{name}={base_arch.get(name)}, "
                              f"this run arch.{name}={value}; set arch.{name}={base_arch.get(name)}")
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM.from_pretrained(directory), report


def train_model(model, batches, cfg: PretrainConfig, on_log=None) -> tuple[list[tuple[int, float]], int]:
    """Plain AdamW loop over ``batches`` (one per step); returns the ``(step, mean loss)`` log points
    and the number of steps trained.

    ``on_log(step)``, if given, runs at every ``eval_every`` steps (e.g. a quick eval); training
    stops there when it returns True. The schedule is always the one for all ``cfg.steps``."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, schedule="cosine",
                                          min_lr_ratio=cfg.min_lr_ratio))
    model.train()
    history, running, started = [], [], time.perf_counter()
    for step, (ids, labels) in enumerate(batches, start=1):
        # Right padding: real tokens never attend to the pads after them, so no attention mask.
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        if step % cfg.log_every == 0 or step == len(batches):
            mean = sum(running) / len(running)
            history.append((step, mean))
            log.info("step %d/%d loss %.4f lr %.2e (%.0f s)", step, len(batches), mean,
                     scheduler.get_last_lr()[0], time.perf_counter() - started)
            running = []
        if on_log is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < len(batches):
            if on_log(step):
                if not history or history[-1][0] != step:
                    history.append((step, sum(running) / len(running)))
                break
            model.train()
    model.eval()
    return history, step


def evaluate_suite(model, tokenizer, prompt: PromptConfig, problems: dict[str, list[dict]], *, task: str,
                   max_new_tokens: int, batch_size: int, sets: tuple[str, ...] = tuple(EVAL_SETS)) -> dict:
    """Greedy accuracy (and early-answer rate, mean length) on each eval set in ``sets``."""
    results = {}
    for name in sets:
        fmt, difficulty = EVAL_SETS[name]
        items = problems[difficulty]
        texts = [render_student(prompt, item["problem"]) if fmt == "student"
                 else render_teacher(prompt, item["problem"], item["solution"]) for item in items]
        result = evaluate_greedy(model, tokenizer, prompt_batches(prompt, tokenizer, texts, items, batch_size),
                                 max_new_tokens=max_new_tokens, answer_marker=ANSWER_MARKER, task=task)
        results[name] = {"accuracy": result.accuracy, "early_answer_rate": result.early_answer_rate,
                         "completion_length": result.completion_length, "size": result.size}
    return results


def format_table(results: dict) -> str:
    lines = [f"{'eval set':<16}{'accuracy':>10}{'early_answer':>14}{'length':>8}{'size':>6}"]
    for name, row in results.items():
        lines.append(f"{name:<16}{row['accuracy']:>10.3f}{row['early_answer_rate']:>14.3f}"
                     f"{row['completion_length']:>8.1f}{row['size']:>6}")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages: wall times are only comparable on an otherwise idle machine."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def pretrain(cfg: PretrainConfig, output_dir: str | Path, command: str = "") -> dict:
    """Build the data, train, evaluate, save model + tokenizer + report; returns the report."""
    output_dir = Path(output_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started, load_at_start = time.perf_counter(), _load_average()
    tokenizer = char_tokenizer()
    base = load_base(cfg) if cfg.init_from else None  # before the data, so that a wrong base fails at once
    held_out = eval_problems(cfg.eval_seed, cfg.eval_size, cfg.task)
    exclude = {item["problem"] for items in held_out.values() for item in items}
    examples = build_examples(cfg.prompt, tokenizer, size=cfg.steps * cfg.batch_size, mix=cfg.mix,
                              early_answer_fraction=cfg.early_answer_fraction, seed=cfg.seed, exclude=exclude,
                              foreign_hint_fraction=cfg.foreign_hint_fraction, slip_fraction=cfg.slip_fraction,
                              task=cfg.task)
    longest = max(len(example.ids) for example in examples)
    if longest + cfg.eval_max_new_tokens > cfg.arch.max_position_embeddings:
        raise ConfigError(f"arch.max_position_embeddings={cfg.arch.max_position_embeddings} is too small: training "
                          f"sequences reach {longest} tokens and eval adds up to {cfg.eval_max_new_tokens}")
    batches = make_batches(examples, cfg.batch_size, cfg.bucket_batches, cfg.seed, tokenizer.pad_token_id)
    model, base_report = (build_model(cfg.arch, tokenizer, cfg.seed), None) if base is None else base
    parameters = sum(p.numel() for p in model.parameters())
    log.info("%d parameters, %d examples, %d steps", parameters, len(examples), len(batches))

    quick = {difficulty: items[:cfg.eval_every_size] for difficulty, items in held_out.items()}
    quick_sets = tuple(dict.fromkeys(("no_hint_easy", "no_hint_hard", "hint_hard", "foreign_hint_hard", *cfg.stop_when)))
    quick_evals, paused = [], [0.0]

    def quick_eval(step: int) -> bool:
        eval_started = time.perf_counter()
        results = evaluate_suite(model, tokenizer, cfg.prompt, quick, task=cfg.task, max_new_tokens=cfg.eval_max_new_tokens,
                                 batch_size=cfg.eval_batch_size, sets=quick_sets)
        accuracy = {name: row["accuracy"] for name, row in results.items()}
        quick_evals.append({"step": step, "accuracy": accuracy})
        log.info("step %d quick eval: %s", step, ", ".join(f"{name} {value:.2f}" for name, value in accuracy.items()))
        paused[0] += time.perf_counter() - eval_started
        return bool(cfg.stop_when) and all(accuracy[name] >= value for name, value in cfg.stop_when.items())

    train_started = time.perf_counter()
    history, steps_trained = train_model(model, batches, cfg, on_log=quick_eval)
    train_seconds = time.perf_counter() - train_started - paused[0]
    stop_when_met = bool(cfg.stop_when) and steps_trained < len(batches)
    if cfg.stop_when and not stop_when_met:
        log.warning("stop_when %s was never met in %d steps; the base is the one after all of them",
                    dict(cfg.stop_when), steps_trained)

    eval_started = time.perf_counter()
    results = evaluate_suite(model, tokenizer, cfg.prompt, held_out, task=cfg.task, max_new_tokens=cfg.eval_max_new_tokens,
                             batch_size=cfg.eval_batch_size)
    eval_seconds = time.perf_counter() - eval_started

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)  # safetensors, config.json, generation_config.json
    tokenizer.save_pretrained(output_dir)
    report = {
        "command": command,
        "seed": cfg.seed,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "parameters": parameters,
        # The base's own provenance, recursively, so that every stage can be rebuilt from this file.
        "init_from": None if base_report is None else {
            "path": cfg.init_from, "command": base_report.get("command"), "seed": base_report.get("seed"),
            "accuracy": base_report.get("accuracy"), "init_from": base_report.get("init_from")},
        "steps_trained": steps_trained,
        "stop_when_met": stop_when_met,
        "quick_evals": quick_evals,
        # Of all the steps' examples; with stop_when met only the first steps_trained batches were trained on.
        "examples": {kind: sum(example.kind == kind for example in examples) for kind in KINDS}
        | {"early_answer": sum(example.early_answer for example in examples),
           "foreign_hint": sum(example.foreign_hint for example in examples),
           "slipped": sum(example.no_loss is not None for example in examples)},
        "wall_seconds": {"train": round(train_seconds, 1), "eval": round(eval_seconds, 1),
                         "quick_evals": round(paused[0], 1),
                         "total": round(time.perf_counter() - started, 1)},
        "threads": torch.get_num_threads(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": _cpu_name(), "cpus": os.cpu_count(),
                    "load_average_at_start": load_at_start, "load_average_at_end": _load_average(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "loss_history": history,
        "eval": {"seed": cfg.eval_seed, "size": cfg.eval_size, "max_new_tokens": cfg.eval_max_new_tokens,
                 "batch_size": cfg.eval_batch_size},
        "accuracy": {name: row["accuracy"] for name, row in results.items()},
        "results": results,
    }
    (output_dir / PRETRAIN_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(results), flush=True)
    print(f"{parameters} parameters; train {train_seconds:.0f} s, eval {eval_seconds:.0f} s "
          f"on {torch.get_num_threads()} thread(s); saved to {output_dir}", flush=True)
    return report


register_configs()


def _command() -> str:
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return shlex.join([*COMMAND, *sys.argv[1:]])
    name = hydra_cfg.job.config_name
    chosen = [] if name == "pretrain" else ["--config-name", name]
    return shlex.join([*COMMAND, *chosen, *hydra_cfg.overrides.task])


@hydra.main(version_base="1.3", config_path=str(PRETRAIN_CONF_DIR), config_name="pretrain")
@bad_input_exits
def main(dict_cfg: DictConfig) -> float:
    cfg = to_pretrain_config(dict_cfg)
    report = pretrain(cfg, cfg.output_dir or HydraConfig.get().runtime.output_dir, _command())
    return report["accuracy"]["no_hint_hard"]


main = cli_errors(main, PretrainConfig)  # composition errors (unknown option, misspelt key) as one line, exit 2


if __name__ == "__main__":
    main()
