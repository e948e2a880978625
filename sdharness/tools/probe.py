"""Can this model be its own teacher? ``sdharness-probe`` measures it before any training.

    sdharness-probe                                              # the testbed base, 128 HARD problems
    sdharness-probe model=smollm2_135m prompt=cot data.eval_size=32
    sdharness-probe model=local model.path=DIR data=jsonl data.path=FILE

A Hydra app on the training configs (model, data, prompt, logger). On the held-out split it
samples one student completion ``g`` per problem (``temperature``), scores ``g`` after the student
and after the teacher prompt, and prints the teacher-quality table, also written to
``<run dir>/probe.json`` and logged to W&B (the training logger's settings, offline without a key):

* greedy accuracy without and with the hint, and the hinted teacher's early-answer rate;
* when the reference is in the student's own format: the first token where ``g`` leaves the
  reference; there, how often the teacher's argmax is the reference token, and the mean
  probability the teacher and the student give it; KL(teacher||student) per token before and
  after that position;
* per aggregation of the registry, at its parameter's default (``tau``, ``kl_bound``; the registry's): the
  target's mass on tokens the student gives less than ``eps``, and max q/p_S; the target's mass
  outside the teacher's ``top_k`` tokens (what ``loss.support=topk`` merges into one bucket) and
  the largest single term of KL(q || p_S) (what ``loss.entry_clip`` caps), token means;
* for the built-in tasks (``data.task``), where ``g`` first slips (chain: in a step's result;
  columns: in a column line): the student-consistent continuation (``g`` to the end of that
  line, then correct work on what the student wrote: chain, the next step on the student's
  result; columns, the later columns with the student's carry and the answer assembled from the
  lines written) is scored after the teacher prompt, and at the first token where it differs
  from the reference's own continuation, the teacher's argmax is the consistent one (follows),
  the reference's (copies) or neither. Slips after which the two never differ are not counted.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sdharness.cli import bad_input_exits, cli_errors
from sdharness.config import (CONF_DIR, DataConfig, LoggerConfig, ModelConfig, PromptConfig, check_threads, require,
                              resolve_wandb_mode)
from sdharness.data import SOURCES
from sdharness.data.loading import load_problems, reference_styles
from sdharness.data.jsonl import DataError
from sdharness.data.prompts import encode_prompts, render_student, render_teacher, teacher_context
from sdharness.data.builtin import builtin_task
from sdharness.distill.aggregation import AGGREGATIONS, aggregate
from sdharness.distill.diagnostics import target_diagnostics
from sdharness.distill.logits import completion_logits
from sdharness.distill.variants import largest_entry_term, topk_buckets
from sdharness.eval.quick import evaluate_greedy, prompt_batches
from sdharness.models import check_pretrained_task, load_model_and_tokenizer, set_threads_for
from sdharness.rollout.hf import eos_token_ids, generate
from sdharness.tools.probe_figures import Accumulator, figures, first_deviation, first_difference, format_table

log = logging.getLogger(__name__)
RESULT_NAME = "probe.json"


@dataclass
class ProbeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    max_new_tokens: int = 96
    temperature: float = 1.0  # of the student samples g; the greedy accuracies decode greedily
    batch_size: int = 32
    eps: float = 1e-3  # "tokens the student does not consider": p_S < eps
    top_k: int = 100  # the target's mass outside the teacher's top_k tokens: what loss.support=topk merges
    seed: int = 0
    threads: str = "auto"  # as sdharness-train's: auto, 0 (torch's default) or N
    output_dir: Optional[str] = None  # null: the Hydra run directory
    # Whether the references are written as the student writes (its format, not its errors): the
    # deviation figures compare g with them token by token. null: true for a built-in task's native
    # style, false for its foreign style and for a data file (set true when its solutions are).
    references_in_student_format: Optional[bool] = None

    def __post_init__(self):
        require(not SOURCES[self.data.name].logged_completions, f"sdharness-probe samples g from problems; "
                f"data={self.data.name} has no problems to sample for. Use data=arithmetic, data=jsonl or "
                "data=gsm_symbolic")
        for name in ("max_new_tokens", "batch_size"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        require(0 < self.eps < 1, f"eps must be in (0, 1), got {self.eps}")
        require(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        check_threads(self.threads)
        require(self.data.eval_size >= 1, "data.eval_size is the number of problems probed; set it >= 1")


def register_configs() -> None:
    ConfigStore.instance().store(name="probe_schema", node=ProbeConfig)


def _hinted_texts(cfg: ProbeConfig, problems: list[dict]) -> dict[str, list[str]]:
    """Teacher prompts per reference style (:func:`sdharness.data.datamodule.reference_styles`); a row's own
    ``hint`` stands in for its reference (:func:`sdharness.data.prompts.teacher_context`)."""
    return {style: [render_teacher(cfg.prompt, row["problem"], teacher_context(row)) for row in rows]
            for style, rows in reference_styles(cfg.data, problems).items()}


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def greedy_figures(cfg: ProbeConfig, model, tokenizer, problems: list[dict]) -> dict:
    """Greedy accuracy without and with each hint style; early-answer rate of the hinted teacher."""
    prompts = {"no_hint": [render_student(cfg.prompt, row["problem"]) for row in problems]}
    prompts |= {f"hint_{style}": texts for style, texts in _hinted_texts(cfg, problems).items()}
    figures = {}
    for name, texts in prompts.items():
        # Scored as the quick eval scores (data.checker); problems without an answer give None, not NaN.
        result = evaluate_greedy(model, tokenizer, prompt_batches(cfg.prompt, tokenizer, texts, problems, cfg.batch_size),
                                 max_new_tokens=cfg.max_new_tokens, answer_marker=cfg.data.answer_marker,
                                 checker=cfg.data.checker, task=cfg.data.task)
        figures[name] = {key: None if math.isnan(value) else value for key, value in
                         (("accuracy", result.accuracy), ("early_answer_rate", result.early_answer_rate))}
    return figures


def default_parameters() -> dict[str, float | None]:
    """Each registered aggregation's parameter value as ``aggregation=<name>`` sets it: its
    :class:`~sdharness.distill.aggregation.Parameter`'s default (None where it has none)."""
    return {name: None if a.parameter is None else a.parameter.default for name, a in AGGREGATIONS.items()}


def references_in_student_format(cfg: ProbeConfig) -> bool:
    if cfg.references_in_student_format is not None:
        return cfg.references_in_student_format
    return SOURCES[cfg.data.name].built_in_task and cfg.data.solution_style == "native"


def sample_figures(cfg: ProbeConfig, model, tokenizer, problems: list[dict],
                   parameters: dict[str, float | None]) -> Accumulator:
    """Sample g per problem and accumulate the deviation, KL, aggregation and slip figures."""
    acc = Accumulator(aggregation={name: {"mass": [], "log_ratio": [], "kl": [], "tail": [], "entry": []}
                                   for name in parameters})
    built_in = SOURCES[cfg.data.name].built_in_task
    native = references_in_student_format(cfg)
    task = builtin_task(cfg.data.task) if built_in and native else None
    eos = eos_token_ids(model, tokenizer)
    torch.manual_seed(cfg.seed)
    for _, rows in _batches(problems, cfg.batch_size):
        student_ids, student_mask = encode_prompts(cfg.prompt, tokenizer, [render_student(cfg.prompt, r["problem"]) for r in rows])
        teacher_texts = [render_teacher(cfg.prompt, r["problem"], teacher_context(r)) for r in rows]
        teacher_ids, teacher_mask = encode_prompts(cfg.prompt, tokenizer, teacher_texts)
        rollout = generate(model, tokenizer, student_ids, student_mask, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature)
        g, g_mask = rollout.completion_ids, rollout.completion_mask
        with torch.no_grad():
            t_logp = torch.log_softmax(completion_logits(model, teacher_ids, teacher_mask, g, g_mask).float(), -1)
            s_logits = completion_logits(model, student_ids, student_mask, g, g_mask).float()
        s_logp = torch.log_softmax(s_logits, -1)
        valid = g_mask.bool()
        top = t_logp.topk(min(cfg.top_k, t_logp.shape[-1]), dim=-1).indices
        for name, parameter in parameters.items():
            target = aggregate(t_logp, s_logp, name=name, parameter=parameter)
            diagnostics = target_diagnostics(target, s_logp, eps=cfg.eps)
            acc.aggregation[name]["mass"] += diagnostics.unconsidered_mass[valid].tolist()
            acc.aggregation[name]["log_ratio"] += diagnostics.max_log_ratio[valid].tolist()
            acc.aggregation[name]["kl"] += diagnostics.kl_target_student[valid].tolist()
            acc.aggregation[name]["tail"] += topk_buckets(target, top)[..., -1].exp()[valid].tolist()
            acc.aggregation[name]["entry"] += largest_entry_term(target, s_logp)[valid].tolist()
        kl = target_diagnostics(t_logp, s_logp, eps=cfg.eps).kl_target_student  # KL(teacher || student)
        for row, problem in enumerate(rows):
            acc.problems += 1
            length = int(valid[row].sum())
            completion = g[row, :length].tolist()
            if not native:
                continue
            # Ending where the reference ends is no deviation; the EOS closes the reference.
            reference = tokenizer(problem["solution"], add_special_tokens=False)["input_ids"] + [eos[0]]
            at = first_deviation(completion, reference)
            if at is None or at >= length or (at == len(reference) - 1 and completion[at] in eos):
                continue
            acc.deviating += 1
            expected = reference[at] if at < len(reference) else None
            if expected is not None:
                acc.argmax_is_reference += int(t_logp[row, at].argmax()) == expected
                acc.p_teacher_reference.append(t_logp[row, at, expected].exp().item())
                acc.p_student_reference.append(s_logp[row, at, expected].exp().item())
            acc.kl_before += kl[row, :at].tolist()
            acc.kl_after += kl[row, at + 1:length].tolist()
            if task is not None:
                _follow_or_copy(cfg, model, tokenizer, acc, task, problem, completion, at, teacher_texts[row])
    return acc


def _follow_or_copy(cfg, model, tokenizer, acc: Accumulator, task, problem: dict, completion: list[int], at: int,
                    teacher_text: str) -> None:
    """Score the student-consistent continuation after the teacher prompt; count follows/copies
    where it and the reference's copy differ (a slip they agree after says nothing about either)."""
    prefix_text = tokenizer.decode(completion[:at], skip_special_tokens=True)
    text = tokenizer.decode(completion, skip_special_tokens=True)
    continuation = task.consistent_continuation(problem["problem"], text, problem["solution"], len(prefix_text))
    if continuation is None:
        return
    ids = tokenizer(continuation["consistent"], add_special_tokens=False)["input_ids"]
    copied = tokenizer(continuation["copied"], add_special_tokens=False)["input_ids"]
    differ = first_difference(ids, copied)
    if differ is None:
        return
    acc.slips += 1
    teacher_ids, teacher_mask = encode_prompts(cfg.prompt, tokenizer, [teacher_text])
    completion_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = completion_logits(model, teacher_ids, teacher_mask, completion_ids, torch.ones_like(completion_ids))
    choice = int(logits[0, differ].argmax())
    acc.follows += choice == ids[differ]
    acc.copies += choice == copied[differ]


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        return {key: item for name, inner in value.items() for key, item in _flatten(f"{prefix}/{name}", inner).items()}
    return {prefix: value} if isinstance(value, (int, float)) and value is not None else {}


def log_to_wandb(cfg: ProbeConfig, result: dict, output_dir: Path, config_dict: dict) -> None:
    mode = resolve_wandb_mode(cfg.logger.mode)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group, mode=mode,
                     dir=str(output_dir), job_type="probe", config=config_dict)
    run.summary.update(_flatten("probe", {key: result[key] for key in ("greedy", "deviation", "after_slip")}))
    columns = ["aggregation", "parameter", "unconsidered_mass", "max_ratio_median", "max_ratio_max", "kl_target_student",
               "topk_tail_mass", "max_entry_term"]
    table = wandb.Table(columns=columns, data=[[name] + [row[key] for key in columns[1:]]
                                               for name, row in result["aggregation"].items()])
    run.log({"probe/aggregation": table} | _flatten("probe/aggregation", result["aggregation"]))
    run.finish()


def probe(cfg: ProbeConfig, output_dir: str | Path, config_dict: dict | None = None) -> dict:
    """Run every figure on the held-out split; print, write ``probe.json``, log; return the result."""
    output_dir = Path(output_dir)
    _, problems = load_problems(cfg.data)  # a bad data file fails now, not after a model load
    unsolved = next((row for row in problems if "solution" not in row), None)
    if unsolved is not None:  # a separate eval file needs only problem and answer; the teacher prompt needs more
        raise DataError(f"{unsolved.get('where', 'data.eval_path')}: sdharness-probe puts each problem's solution in "
                        "the teacher prompt, and this row has none; give data.eval_path rows with a solution, or "
                        "leave data.eval_path out to probe rows held out of data.path")
    check_pretrained_task(cfg.model, cfg.data)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    set_threads_for(model, cfg.threads)
    model.eval()
    parameters = default_parameters()
    greedy = greedy_figures(cfg, model, tokenizer, problems)
    acc = sample_figures(cfg, model, tokenizer, problems, parameters)
    result = figures(greedy, acc, parameters, cfg.eps, cfg.top_k, comparable=references_in_student_format(cfg))
    result["table"] = format_table(result)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULT_NAME).write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"], flush=True)
    print(f"{acc.problems} problems; written to {output_dir / RESULT_NAME}", flush=True)
    log_to_wandb(cfg, result, output_dir, config_dict or OmegaConf.to_container(OmegaConf.structured(cfg)))
    return result


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="probe")
@bad_input_exits
def main(dict_cfg: DictConfig) -> None:
    cfg = OmegaConf.to_object(dict_cfg)
    probe(cfg, cfg.output_dir or HydraConfig.get().runtime.output_dir, OmegaConf.to_container(dict_cfg, resolve=True))


main = cli_errors(main, ProbeConfig)  # composition errors (unknown option, misspelt key) as one line, exit 2


if __name__ == "__main__":
    main()
