"""lm-eval on a model: in-memory evaluation of the local and standard tasks, W&B logging, a CLI.

::

    sdharness-eval outputs/DATE/TIME/final_model --tasks sdh_arithmetic_easy,sdh_arithmetic_hard
    sdharness-eval outputs/DATE/TIME/checkpoints/last.ckpt --limit 20 --output results.json
    python -m sdharness.eval.lmeval write-tasks evals/tasks     # the task files: sdharness.eval.lmeval_tasks

The local tasks (``sdh_arithmetic_*``, ``sdh_gsm_symbolic``; no hub, no network) are the files of
``evals/tasks/``, written by :mod:`sdharness.eval.lmeval_tasks`. :func:`run_lm_eval` copies every task
YAML into a temporary directory with each data file rewritten to an absolute path
(:func:`sdharness.eval.lmeval_tasks.materialise_tasks`), so it works from any working directory and any
checkout location.

Prompts and chat templates: the task's ``doc_to_text`` is the student prompt of
``conf/prompt/cot.yaml``. :func:`run_lm_eval` reproduces the training run's student prompt
exactly, as :func:`sdharness.data.prompts.encode_prompt` builds it: with a chat template (a chat
model such as SmolLM2-135M-Instruct, ``prompt.chat_template=auto``) lm-eval applies the
tokenizer's template to a single user turn (``apply_chat_template=True``, the prompt's
``system`` as system turn) and adds no BOS of its own; without one (the character tokenizer of
``tiny_random``, ``prompt.chat_template=never``) the prompt is plain text ending in a newline.
Pass the run's ``PromptConfig`` (the CLI reads it from ``<run>/.hydra/config.yaml``) to evaluate
with a run's own templates (e.g. ``prompt=testbed``).

Standard benchmarks (:data:`STANDARD_TASKS`: GSM8K, Minerva MATH, MATH-500) are lm-eval's own
tasks; their data sets come from the Hugging Face hub, so they need network access
(``HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0``) and are never used by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from sdharness.config import resolve_wandb_mode
from sdharness.eval.lmeval_tasks import (DEFAULT_DIFFICULTIES, DEFAULT_STUDENT_TEMPLATE, TASKS_DIR, jinja_template,
                                    materialise_tasks, task_name, write_tasks_main)

# Named lm-eval tasks for online users: name here -> lm-eval task (or group) name in lm-eval
# 0.4.13. Their data sets are downloaded from the Hugging Face hub: they need network access.
STANDARD_TASKS = {
    "gsm8k": "gsm8k",                            # 5-shot, "Question: ... Answer:" format
    "gsm8k_cot_zeroshot": "gsm8k_cot_zeroshot",  # zero-shot chain of thought
    "minerva_math": "minerva_math",              # group: the 7 Minerva MATH subsets, 4-shot
    "minerva_math500": "minerva_math500",        # MATH-500 with the Minerva prompt and checker
    "math500": "hendrycks_math500",              # MATH-500 (HuggingFaceH4/MATH-500)
}


# ----------------------------------------------------------------------------- evaluation


def torch_module():
    import torch

    return torch.nn.Module


def _default_prompt():
    from sdharness.config import PromptConfig

    return PromptConfig(student=DEFAULT_STUDENT_TEMPLATE,
                        teacher=DEFAULT_STUDENT_TEMPLATE + "\n\nReference solution:\n{solution}")


def flatten_results(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results: numeric values only, ``,none`` dropped.

    Metric names keep lm-eval's ``metric,filter`` form, e.g. ``exact_match,strict-match``.
    """
    flat: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key == "sample_len" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, "N/A" stderrs, the document count (in results["n-samples"])
            row[key[: -len(",none")] if key.endswith(",none") else key] = float(value)
        flat[task] = row
    return flat


def run_lm_eval(model, tokenizer, tasks: list[str], *, include_path: str | Path | None = TASKS_DIR,
                extra_include_paths: Iterable[str | Path] = (), limit: int | float | None = None,
                batch_size: int = 16, device: str | None = "cpu", max_gen_toks: int | None = None,
                prompt=None, num_fewshot: int | None = None, bootstrap_iters: int = 1000,
                seed: int | None = None, log_samples: bool = False, return_raw: bool = False):
    """Evaluate an in-memory model with lm-eval; returns ``{task: {metric: value}}``.

    ``model``: a transformers causal LM (wrapped in lm-eval's ``HFLM`` with ``tokenizer``), or
    any ``lm_eval.api.model.LM`` (then ``tokenizer`` may be None). ``device``: the model is
    moved there for the evaluation (HFLM takes an in-memory model's device as it is) and back to
    its own device afterwards; None leaves it where it is. Its train/eval mode is restored too.
    ``prompt``: a ``PromptConfig`` whose student template, system prompt and chat-template rule
    render the local tasks' prompts exactly as training does; without one the task files' prompt
    is used with the ``cot`` rule (``chat_template=auto``). ``max_gen_toks`` overrides every
    generative task's limit. ``seed``: lm-eval's python/numpy/torch seeds; None (default) leaves
    the global RNGs alone, which greedy decoding does not need. ``return_raw``: also return
    lm-eval's full results dict (with per-document ``samples`` when ``log_samples``).

    Nothing is downloaded for the local tasks: their data are local JSONL files, and lm-eval's own
    task index (~15k YAMLs, ~20 s to scan) is only built when a task is not defined in
    ``include_path`` (a standard task, whose data set then comes from the hub).
    """
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from sdharness.data.prompts import uses_chat_template

    # A given prompt renders the local tasks' doc_to_text; without one the task files' own prompt
    # stays, with the default (cot) chat-template rule.
    doc_to_text = None if prompt is None else jinja_template(prompt.student)
    prompt = prompt or _default_prompt()
    use_chat = tokenizer is not None and not isinstance(model, LM) and uses_chat_template(prompt, tokenizer)
    if doc_to_text is not None and not use_chat and prompt.system:  # encode_prompt's "system\n\nprompt\n"
        doc_to_text = jinja_template(prompt.system.replace("{", "{{").replace("}", "}}")) + "\n\n" + doc_to_text
    extra_include_paths = [str(path) for path in extra_include_paths]
    was_training = getattr(model, "training", None)
    home = next(model.parameters()).device if isinstance(model, torch_module()) else None
    with tempfile.TemporaryDirectory(prefix="sdharness-lmeval-") as workdir:
        local: set[str] = set()
        paths: list[str] = []
        if include_path is not None:
            local = materialise_tasks(include_path, workdir, doc_to_text=doc_to_text, plain_newline=not use_chat)
            paths.append(workdir)
        paths += extra_include_paths
        # lm-eval's own index (~15k YAMLs) takes tens of seconds to scan: only when a task is not local.
        standard = [name for name in tasks if name not in local]
        task_manager = TaskManager(include_path=paths or None, include_defaults=bool(standard))
        try:
            if isinstance(model, LM):
                lm = model
            else:
                from lm_eval.models.huggingface import HFLM

                if device is not None:
                    model.to(device)
                # With a chat template the rendered prompt carries its own special tokens, so lm-eval
                # adds no BOS (as encode_prompt); plain prompts get the tokenizer's default ones.
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                          add_bos_token=False if use_chat else None)
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit, num_fewshot=num_fewshot,
                apply_chat_template=use_chat, fewshot_as_multiturn=use_chat,
                system_instruction=prompt.system if use_chat else None,
                gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
                bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed if seed is not None else 1234,
            )
        finally:
            if was_training is not None:
                model.train(was_training)
            if home is not None and device is not None:
                model.to(home)
    if results is None:  # a non-zero rank under torchrun
        return ({}, None) if return_raw else {}
    flat = flatten_results(results)
    return (flat, results) if return_raw else flat


# ----------------------------------------------------------------------------- CLI helpers


def find_run_dir(model_path: Path) -> Path | None:
    """The Hydra run directory a model came from: ``<run>/final_model`` or ``<run>/checkpoints/x.ckpt``."""
    candidates = [model_path.parent.parent] if model_path.suffix == ".ckpt" else [model_path.parent]
    candidates.append(model_path.parent)
    for candidate in candidates:
        if (candidate / ".hydra" / "config.yaml").exists():
            return candidate
    return None


def run_config(run_dir: Path | None) -> dict:
    if run_dir is None or not (run_dir / ".hydra" / "config.yaml").exists():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False) or {}


def _dataclass_from(cls, values: dict | None):
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in (values or {}).items() if key in known})


def load_for_eval(model_path: str | Path, *, run_dir: Path | None = None, dtype: str = "float32"):
    """``(model, tokenizer)`` in eval mode from a ``save_pretrained`` directory or a Lightning ``.ckpt``.

    A checkpoint needs the run's Hydra config (``<run>/.hydra/config.yaml``) to rebuild the model;
    its ``state_dict`` keys are the LightningModule's, the model's prefixed ``model.``.
    """
    import torch

    from sdharness.config import ConfigError, ModelConfig
    from sdharness.models import load_model_and_tokenizer

    model_path = Path(model_path)
    if model_path.is_dir():
        if not (model_path / "config.json").exists():
            raise ConfigError(f"{model_path}: no config.json; give a save_pretrained directory (e.g. a run's "
                              "final_model/) or a Lightning .ckpt file")
        model, tokenizer = load_model_and_tokenizer(ModelConfig(name=model_path.name, source="hf",
                                                                path=str(model_path), dtype=dtype))
    elif model_path.suffix == ".ckpt" and model_path.exists():
        config = run_config(run_dir)
        if not config.get("model"):
            raise ConfigError(f"{model_path}: a checkpoint needs its run's config; no .hydra/config.yaml in "
                              f"{run_dir or model_path.parent.parent} (pass --run-dir RUN_DIR)")
        model, tokenizer = load_model_and_tokenizer(_dataclass_from(ModelConfig, config["model"]))
        checkpoint = torch.load(model_path, map_location="cpu", weights_only=False)
        state = {key[len("model."):]: value for key, value in checkpoint["state_dict"].items()
                 if key.startswith("model.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set()
        for name in ("lm_head.weight",):  # tied to the input embeddings, so not always saved
            tied.update(key for key in missing if key.endswith(name))
        if unexpected or set(missing) - tied:
            raise ConfigError(f"{model_path}: checkpoint does not match the model of {run_dir}: "
                              f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
        if hasattr(model, "merge_and_unload"):  # LoRA: evaluate the merged weights
            model = model.merge_and_unload()
    else:
        raise ConfigError(f"{model_path}: not a model directory (config.json) nor an existing .ckpt file")
    model.eval()
    return model, tokenizer


def find_wandb_run(run_dir: Path) -> tuple[str, Path] | None:
    """``(run id, run folder)`` of the latest W&B run under ``<run_dir>/wandb`` (offline or synced)."""
    runs = sorted((path for path in (run_dir / "wandb").glob("*run-*-*")
                   if path.is_dir() and not path.is_symlink() and path.name.split("-")[0] in ("offline", "run")),
                  key=lambda path: path.name.split("-")[-2])  # offline-run-<YYYYmmdd_HHMMSS>-<id>
    if not runs:
        return None
    latest = runs[-1]
    return latest.name.rsplit("-", 1)[-1], latest


def log_to_wandb(flat: dict[str, dict[str, float]], *, mode: str, run_dir: Path | None = None,
                 run_id: str | None = None, project: str | None = None, entity: str | None = None,
                 save_dir: Path | None = None, name: str | None = None, config: dict | None = None,
                 results_file: Path | None = None) -> Path | None:
    """Log results to W&B: a ``wandb.Table`` (task, metric, value) and ``lmeval/<task>/<metric>`` summaries.

    With ``run_dir`` (or ``run_id``) the training run is resumed (``resume="allow"``); offline,
    wandb writes a new ``offline-run-*`` folder with the same id, which ``wandb sync`` merges into
    the run. Returns the run's local folder. Meant for a standalone process (the CLI): it starts
    and finishes its own run, so call it when no other W&B run of this process is active.
    """
    import wandb

    if mode == "disabled":
        return None
    init: dict[str, Any] = {"mode": mode, "project": project or "sdharness", "entity": entity,
                            "job_type": "lmeval", "config": config}
    if run_dir is not None and run_id is None:
        found = find_wandb_run(run_dir)
        if found is not None:
            run_id = found[0]
    if run_id is not None:
        init.update(id=run_id, resume="allow")
        init.pop("config")  # the run's config is the training config; results go to the summary
        init.pop("job_type")
    else:
        init["name"] = name
    directory = save_dir or run_dir or Path.cwd()
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(dir=str(directory), **init)
    rows = [[task, metric, value] for task, metrics in flat.items() for metric, value in metrics.items()]
    # Logged as a history row: online it lands after the training steps; an offline resume starts
    # its step count at 0 again, so the summary entries below are the authoritative record.
    run.log({"lmeval/results": wandb.Table(columns=["task", "metric", "value"], data=rows)})
    for task, metric, value in rows:
        run.summary[f"lmeval/{task}/{metric}"] = value
    if results_file is not None and results_file.exists():
        (Path(run.dir) / "lmeval_results.json").write_text(results_file.read_text(encoding="utf-8"), encoding="utf-8")
    folder = Path(run.dir).parent
    run.finish()
    return folder


def format_table(flat: dict[str, dict[str, float]]) -> str:
    rows = [(task, metric, value) for task, metrics in flat.items() for metric, value in metrics.items()]
    width_task = max([4] + [len(task) for task, _, _ in rows])
    width_metric = max([6] + [len(metric) for _, metric, _ in rows])
    lines = [f"{'task':<{width_task}}  {'metric':<{width_metric}}  {'value':>8}"]
    lines += [f"{task:<{width_task}}  {metric:<{width_metric}}  {value:>8.4f}" for task, metric, value in rows]
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    return value


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdharness-eval",
        description="Run lm-eval tasks on a trained model (a save_pretrained directory or a Lightning .ckpt). "
                    "Also: `sdharness-eval write-tasks DIR` regenerates the local task files.")
    parser.add_argument("model", help="save_pretrained directory (e.g. RUN/final_model) or RUN/checkpoints/*.ckpt")
    parser.add_argument("--tasks", default=",".join(task_name(d) for d in DEFAULT_DIFFICULTIES),
                        help="comma-separated lm-eval task names; local: sdh_arithmetic_easy, sdh_arithmetic_hard, "
                             f"sdh_arithmetic (both); standard (need the hub): {', '.join(STANDARD_TASKS)}")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (< 1: a fraction)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-gen-toks", type=int, default=None, help="override the tasks' generation limit")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--include-path", default=str(TASKS_DIR), help="directory of local task YAML + JSONL files")
    parser.add_argument("--run-dir", default=None, help="the Hydra run directory (default: found from MODEL)")
    parser.add_argument("--output", default=None, help="results JSON (default: RUN/lmeval_results.json, "
                                                       "else ./lmeval_results.json)")
    wandb_group = parser.add_argument_group("W&B (offline unless WANDB_API_KEY is set)")
    wandb_group.add_argument("--wandb-dir", default=None,
                             help="run directory whose W&B run to resume (default: the model's run, if any)")
    wandb_group.add_argument("--wandb-run-id", default=None, help="resume this W&B run id instead")
    wandb_group.add_argument("--wandb-project", default=None, help="W&B project (default: the run's, else sdharness)")
    wandb_group.add_argument("--wandb-entity", default=None)
    wandb_group.add_argument("--wandb-mode", default="auto", choices=["auto", "online", "offline", "disabled"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "write-tasks":
        return write_tasks_main(argv[1:])
    args = _eval_parser().parse_args(argv)
    # Nothing is downloaded unless the user asks for it (standard tasks need HF_*_OFFLINE=0).
    # Set before transformers / datasets / huggingface_hub are imported: they read these at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sdharness.config import ConfigError, PromptConfig

    model_path = Path(args.model).resolve()
    run_dir = Path(args.run_dir).resolve() if args.run_dir else find_run_dir(model_path)
    config = run_config(run_dir)
    tasks = [STANDARD_TASKS.get(name, name) for name in args.tasks.split(",") if name]
    try:
        model, tokenizer = load_for_eval(model_path, run_dir=run_dir, dtype=args.dtype)
        prompt = _dataclass_from(PromptConfig, config["prompt"]) if config.get("prompt") else None
    except (ConfigError, FileNotFoundError) as error:
        print(f"sdharness-eval: error: {error}", file=sys.stderr)
        return 2
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    flat, raw = run_lm_eval(model, tokenizer, tasks, include_path=args.include_path, limit=limit,
                            batch_size=args.batch_size, device=args.device, max_gen_toks=args.max_gen_toks,
                            prompt=prompt, num_fewshot=args.num_fewshot, return_raw=True)
    print(format_table(flat), flush=True)

    output = Path(args.output) if args.output else (run_dir or Path.cwd()) / "lmeval_results.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": str(model_path), "run_dir": str(run_dir) if run_dir else None, "tasks": tasks,
              "limit": limit, "max_gen_toks": args.max_gen_toks, "results": flat,
              "n_samples": (raw or {}).get("n-samples", {}), "prompt_from_run": prompt is not None}
    output.write_text(json.dumps(_json_safe(record), indent=2) + "\n", encoding="utf-8")
    print(f"results: {output}", flush=True)

    wandb_run_dir = Path(args.wandb_dir).resolve() if args.wandb_dir else run_dir
    logger = config.get("logger") or {}
    folder = log_to_wandb(flat, mode=resolve_wandb_mode(args.wandb_mode), run_dir=wandb_run_dir, run_id=args.wandb_run_id,
                          project=args.wandb_project or logger.get("project"),
                          entity=args.wandb_entity or logger.get("entity"),
                          save_dir=wandb_run_dir or output.parent, name=f"lmeval-{model_path.name}",
                          config={"model": str(model_path), "tasks": tasks, "limit": limit}, results_file=output)
    if folder is not None:
        import wandb

        # finish() can return before wandb's service has written the run file; shutting the service
        # down waits for it, so the folder is complete when main returns (a later init restarts it).
        wandb.teardown()
        print(f"wandb: {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
