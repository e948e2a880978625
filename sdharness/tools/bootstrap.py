"""``sdharness-bootstrap``: answer-only problems in, worked solutions out (rejection sampling).

Many data sets give only a verifiable final answer, while self-distillation's teacher wants a
worked solution in its prompt. Bootstrapping samples ``k`` solutions per problem from a model,
keeps those whose answer checks, picks one (``shortest`` or ``first``) and writes
``{problem, solution, answer, bootstrap}`` JSONL::

    sdharness-bootstrap --model-dir runs/x/final_model --problems answers.jsonl --out solved.jsonl \\
        --prompt testbed -k 8 --guidance --unsolved answer_hint

``--guidance`` samples from the aggregate of the student prompt and a teacher prompt whose
``{solution}`` is the answer alone (``The answer is N.``; :mod:`sdharness.rollout.guided`). Problems with
no correct sample are reported and dropped (``--unsolved drop``) or kept with the answer alone as
their solution and ``bootstrap.answer_only = true`` (``--unsolved answer_hint``).

Answers are checked by :func:`sdharness.data.answers.answer_checker`, the checker training's eval and
GRPO reward use: ``builtin`` (the number after the answer marker; integers, decimals and fractions
compared exactly) or ``math_verify`` (the ``math-verify`` package, for free-form math answers such
as ``\\frac{1}{2}``). A solution is trimmed after the line holding its answer marker (``--no-trim`` keeps
the whole completion).

The output is cached: ``<out>.provenance.json`` records the input's sha256, the model identity,
prompt, sampling parameters, ``k``, guidance, rule, checker, unsolved policy, seed and the
summary. A run whose provenance key matches the sidecar (and whose output still hashes to what
the sidecar recorded) reuses the output without loading the model; any difference regenerates.
Both files are written atomically (temporary file + rename).

The summary's ``cost`` is the sampling's cost counted as training counts its own
(:class:`sdharness.methods.accounting.Counters`, by the same ``rollout_cost`` / ``guided_rollout_cost``):
samples, generated and forward tokens, FLOPs at 2N per forwarded token, seconds spent sampling (not
loading), and the unsolved problems as ``problems_without_success``. A run trained on the output starts
its counters there (:func:`sdharness.tools.provenance.bootstrap_offset`), so its x-axes include the
sampling that found the solutions; ``problems_seen`` stays 0, since the budget's problems are training's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from sdharness.distill.aggregation import AGGREGATIONS
from sdharness.config import ConfigError, ModelConfig, PromptConfig
from sdharness.data.loading import data_path
from sdharness.data.jsonl import read_jsonl
from sdharness.errors import DataError
from sdharness.methods.accounting import Counters, guided_rollout_cost, rollout_cost
from sdharness.tools.generate import (add_aggregation_arguments, add_model_arguments, aggregation_parameter,
                                      model_config, named_config)
from sdharness.tools.provenance import (atomic_write, cached, canonical, harness_version, model_identity,
                                       provenance_path, sha256_file)
from sdharness.rollout.guided import guided_generate
from sdharness.data.prompts import encode_prompts, render_student, render_teacher
from sdharness.rollout.hf import generate
from sdharness.data.answers import ANSWER_MARKER, CHECKERS, Checker, answer_checker, trim_solution

log = logging.getLogger(__name__)

RULES = ("shortest", "first")
UNSOLVED_POLICIES = ("drop", "answer_hint")
CACHE_VERSION = 2  # 2: the summary records the sampling's cost


@dataclass(frozen=True)
class BootstrapSettings:
    """Everything that decides what a bootstrap writes (the cache key holds all of it but
    ``batch_size``); the command line's flags, checked once here."""

    k: int = 4  # samples per problem
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    guidance: bool = False  # sample from the aggregate with a teacher prompt holding the answer alone
    aggregation: str = "product"
    parameter: float | None = None  # the value of the aggregation's parameter (tau, kl_bound); None: its default
    rule: str = "shortest"  # which correct sample to keep
    unsolved: str = "drop"  # problems without a correct sample: drop, or keep with the answer alone
    checker: str = "builtin"
    batch_size: int = 8
    seed: int = 0
    marker: str = ANSWER_MARKER
    trim: bool = True  # cut each sample after its answer line

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"-k {self.k}: must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        for flag, value, choices in (("--rule", self.rule, RULES), ("--unsolved", self.unsolved, UNSOLVED_POLICIES)):
            if value not in choices:
                raise ConfigError(f"{flag} {value}: unknown; choose one of {', '.join(choices)}")

    def sampling(self) -> dict:
        """The sampling settings (the aggregation and its parameter, by name, only where guidance uses them)."""
        sampling = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}
        if not self.guidance:
            return sampling
        own = AGGREGATIONS[self.aggregation].parameter
        return {**sampling, "aggregation": self.aggregation, **({own.name: self.aggregation_parameter} if own else {})}

    @property
    def aggregation_parameter(self) -> float | None:
        own = AGGREGATIONS[self.aggregation].parameter
        return None if own is None else own.default if self.parameter is None else self.parameter
SUMMARY_FIELDS = ("problems", "solved", "unsolved", "samples", "correct_samples", "pass_rate", "kept", "dropped")

# One completion per request, and their cost as Counters.add keywords (rollouts, generated, forward_only).
SampleFn = Callable[[list[dict]], tuple[list[str], dict[str, int]]]


# --------------------------------------------------------------------------- pure helpers


def answer_hint(answer: str, marker: str = ANSWER_MARKER) -> str:
    """The answer alone, as a solution: ``The answer is N.``"""
    return f"{marker} {str(answer).strip().rstrip('.')}."


def pick_index(candidates: list[str], answer: str, *, checker: Checker, rule: str = "shortest") -> int | None:
    """Index of the chosen correct candidate (``shortest``: fewest characters, first on ties), or None."""
    if rule not in RULES:
        raise ConfigError(f"--rule {rule}: unknown; choose one of {', '.join(RULES)}")
    return _choose(candidates, [checker(text, answer) for text in candidates], rule)


def _choose(candidates: list[str], flags: list[bool], rule: str) -> int | None:
    correct = [i for i, flag in enumerate(flags) if flag]
    if not correct:
        return None
    return correct[0] if rule == "first" else min(correct, key=lambda i: len(candidates[i]))


def pick_solution(candidates: list[str], answer: str, *, checker: Checker, rule: str = "shortest") -> str | None:
    """The chosen candidate whose answer checks, or None when none does."""
    index = pick_index(candidates, answer, checker=checker, rule=rule)
    return None if index is None else candidates[index]


# --------------------------------------------------------------------------- sampling


def model_sampler(model, tokenizer, prompt_cfg: PromptConfig, settings: BootstrapSettings) -> SampleFn:
    """A :data:`SampleFn` that samples from ``model``: plainly from the student prompt, or (``guidance``)
    from the aggregate of the student prompt and the teacher prompt holding each request's ``hint``."""
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)  # plain sampling goes through HF generate and torch's global generator
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    sampling = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p)

    def encode(texts):
        ids, mask = encode_prompts(prompt_cfg, tokenizer, texts)
        return ids.to(device), mask.to(device)

    def sample(requests: list[dict]) -> tuple[list[str], dict[str, int]]:
        student = encode([render_student(prompt_cfg, r["problem"]) for r in requests])
        if not settings.guidance:
            rollout = generate(model, tokenizer, *student, **sampling)
            return rollout.texts, rollout_cost(student[1], rollout)
        teacher = encode([render_teacher(prompt_cfg, r["problem"], r["hint"]) for r in requests])
        rollout = guided_generate(model, tokenizer, *student, *teacher, aggregation=settings.aggregation,
                                  parameter=settings.aggregation_parameter, generator=generator, **sampling)
        return rollout.texts, guided_rollout_cost(student[1], teacher[1], rollout.lengths)

    return sample


def bootstrap(model, tokenizer, rows: list[dict], settings: BootstrapSettings = BootstrapSettings(), *,
              prompt_cfg: PromptConfig | None = None, sample_fn: SampleFn | None = None) -> tuple[list[dict], dict]:
    """Sample ``k`` solutions per row, keep a correct one; ``(rows_out, summary)``.

    ``rows`` need ``problem`` and ``answer``. Requests (``k`` per row, row-major) go to the sampler
    ``batch_size`` at a time; each is ``{"problem", "answer", "hint", "row", "sample"}`` where
    ``hint`` is :func:`answer_hint` (the teacher's ``{solution}`` under ``guidance``). ``sample_fn``
    replaces sampling from ``model`` (which may then be None), e.g. with a deterministic fake.
    Each output row is ``{problem, solution, answer, bootstrap}`` (other input fields are kept);
    ``bootstrap`` holds ``row`` (input index), ``samples``, ``correct``, ``pass_rate``, ``picked``
    (candidate index or None), ``guided`` and ``answer_only``. ``summary`` counts are exact ints;
    ``unsolved_rows`` lists the input indices of problems without a correct sample; ``cost`` is the
    sampling's :class:`~sdharness.methods.accounting.Counters` (FLOPs with ``model``'s parameter count,
    0 without a model).
    """
    k, marker = settings.k, settings.marker
    check = answer_checker(settings.checker, marker)
    if sample_fn is None:
        if prompt_cfg is None:
            raise ConfigError("bootstrap: prompt_cfg is required to sample from a model")
        sample_fn = model_sampler(model, tokenizer, prompt_cfg, settings)
    requests = [{"problem": row["problem"], "answer": str(row["answer"]), "hint": answer_hint(row["answer"], marker),
                 "row": i, "sample": j} for i, row in enumerate(rows) for j in range(k)]
    candidates: list[list[str]] = [[] for _ in rows]
    cost = Counters()
    parameters = sum(p.numel() for p in model.parameters()) if model is not None else 0
    started = time.perf_counter()
    for start in range(0, len(requests), settings.batch_size):
        chunk = requests[start:start + settings.batch_size]
        texts, chunk_cost = sample_fn(chunk)
        if len(texts) != len(chunk):
            raise RuntimeError(f"sampler returned {len(texts)} completions for {len(chunk)} requests")
        cost.add(parameters=parameters, **chunk_cost)
        for request, text in zip(chunk, texts):
            candidates[request["row"]].append(trim_solution(text, marker) if settings.trim else text)
    cost.wall_seconds = time.perf_counter() - started

    rows_out, unsolved_rows, correct_samples = [], [], 0
    for i, (row, texts) in enumerate(zip(rows, candidates)):
        answer = str(row["answer"])
        flags = [check(text, answer) for text in texts]
        correct = sum(flags)
        correct_samples += correct
        picked = _choose(texts, flags, settings.rule)
        info = {"row": i, "samples": len(texts), "correct": correct, "pass_rate": correct / len(texts),
                "picked": picked, "guided": settings.guidance, "answer_only": picked is None}
        if picked is None:
            unsolved_rows.append(i)
            if settings.unsolved == "drop":
                continue
            solution = answer_hint(answer, marker)
        else:
            solution = texts[picked]
        extra = {key: value for key, value in row.items() if key not in ("problem", "solution", "answer", "bootstrap")}
        rows_out.append({"problem": row["problem"], "solution": solution, "answer": answer, **extra,
                         "bootstrap": info})
    samples = len(requests)
    solved = len(rows) - len(unsolved_rows)
    summary = {"problems": len(rows), "solved": solved, "unsolved": len(unsolved_rows), "samples": samples,
               "correct_samples": correct_samples, "pass_rate": correct_samples / samples if samples else 0.0,
               "kept": len(rows_out), "dropped": len(rows) - len(rows_out), "unsolved_rows": unsolved_rows}
    cost.problems_without_success = len(unsolved_rows)
    return rows_out, {**summary, "cost": cost.state_dict()}


# --------------------------------------------------------------------------- cache and provenance


def bootstrap_to_file(problems: str | Path, out: str | Path, settings: BootstrapSettings = BootstrapSettings(), *,
                      model_cfg: ModelConfig, prompt_cfg: PromptConfig, sample_fn: SampleFn | None = None,
                      loader=None) -> tuple[str, list[dict], dict]:
    """Bootstrap ``problems`` (JSONL) into ``out`` with a provenance sidecar, or reuse the cache.

    Returns ``(status, rows, summary)``, ``status`` being ``"reused"`` (nothing loaded or sampled) or
    ``"generated"``. ``loader(model_cfg) -> (model, tokenizer)`` defaults to
    :func:`sdharness.models.load_model_and_tokenizer`; with ``sample_fn`` no model is loaded.
    """
    problems = data_path(str(problems), "--problems")  # pkg://sdharness/assets/... works too
    rows = read_jsonl(problems, required=("problem", "answer"))
    answer_checker(settings.checker, settings.marker)  # an unknown checker fails before anything loads
    key = {"version": CACHE_VERSION, "input_sha256": sha256_file(problems), "model": model_identity(model_cfg),
           "prompt": asdict(prompt_cfg), "sampling": settings.sampling(), "k": settings.k,
           "guidance": settings.guidance, "rule": settings.rule, "checker": settings.checker,
           "unsolved": settings.unsolved, "seed": settings.seed, "answer_marker": settings.marker,
           "trim": settings.trim}
    key = json.loads(canonical(key))
    record = cached(out, key)
    if record is not None:  # an output that kept nothing (every problem dropped) is a valid cache too
        rows_out = read_jsonl(out, required=("problem", "solution", "answer")) if record["summary"]["kept"] else []
        return "reused", rows_out, record["summary"]

    started = time.monotonic()
    model = tokenizer = None
    if sample_fn is None:
        if loader is None:
            from sdharness.models import load_model_and_tokenizer as loader
        model, tokenizer = loader(model_cfg)
        model.eval()
    rows_out, summary = bootstrap(model, tokenizer, rows, settings, prompt_cfg=prompt_cfg, sample_fn=sample_fn)
    out = Path(out)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows_out)
    atomic_write(out, text)
    record = {"key": key, "summary": summary, "problems_path": str(problems),
              "output_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
              "harness_version": harness_version(), "wall_seconds": round(time.monotonic() - started, 3),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write(provenance_path(out), json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return "generated", rows_out, summary


# --------------------------------------------------------------------------- command line


def format_summary(summary: dict) -> str:
    lines = [f"{name:<16}{summary[name]:.3f}" if name == "pass_rate" else f"{name:<16}{summary[name]}"
             for name in SUMMARY_FIELDS]
    cost = summary["cost"]
    lines.append(f"cost            {cost['generated_tokens']} generated tokens, {cost['forward_tokens']} forward "
                 f"tokens, {cost['flops']:.3g} FLOPs, {cost['wall_seconds']:.1f} s sampling")
    unsolved = summary.get("unsolved_rows") or []
    if unsolved:
        shown = ", ".join(str(i) for i in unsolved[:20]) + (", ..." if len(unsolved) > 20 else "")
        lines.append(f"unsolved rows (0-based): {shown}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdharness-bootstrap", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--problems", required=True, help="JSONL with problem and answer (solution is ignored)")
    parser.add_argument("--out", required=True, help="output JSONL of {problem, solution, answer, bootstrap}")
    parser.add_argument("--prompt", default="cot", help="a config in conf/prompt (cot, testbed) or a .yaml file")
    parser.add_argument("-k", type=int, default=4, help="samples per problem")
    parser.add_argument("--guidance", action="store_true",
                        help="sample guided by a teacher prompt whose solution is the answer alone")
    add_aggregation_arguments(parser)  # with --guidance
    parser.add_argument("--rule", choices=RULES, default="shortest", help="which correct sample to keep")
    parser.add_argument("--unsolved", choices=UNSOLVED_POLICIES, default="drop",
                        help="problems without a correct sample: drop, or keep with the answer alone")
    parser.add_argument("--checker", choices=CHECKERS, default="builtin",
                        help="answer checker, as data.checker in training (sdharness.data.answers.answer_checker)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--answer-marker", default=ANSWER_MARKER)
    parser.add_argument("--no-trim", action="store_true", help="keep text after the answer line")
    return parser.parse_args(argv)


def run(args) -> tuple[str, list[dict], dict]:
    prompt = PromptConfig(**named_config("prompt", args.prompt))
    settings = BootstrapSettings(k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, guidance=args.guidance, aggregation=args.aggregation,
                                 parameter=aggregation_parameter(args),
                                 rule=args.rule, unsolved=args.unsolved, checker=args.checker,
                                 batch_size=args.batch_size, seed=args.seed, marker=args.answer_marker,
                                 trim=not args.no_trim)
    return bootstrap_to_file(args.problems, args.out, settings, model_cfg=model_config(args), prompt_cfg=prompt)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        status, _, summary = run(args)
    except (ConfigError, DataError) as error:
        print(f"sdharness-bootstrap: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    if status == "reused":
        print(f"reused cache: {args.out} (provenance {provenance_path(args.out)} matches)")
    print(format_summary(summary))
    print(f"-> {args.out}")
    print(f"solved {summary['solved']} of {summary['problems']} problem(s) ({summary['correct_samples']} of "
          f"{summary['samples']} samples correct)", flush=True)
    if not summary["solved"]:
        print(f"sdharness-bootstrap: error: no problem was solved (0 of {summary['samples']} samples checked "
              f"correct), so {args.out} has no worked solution; try a stronger --model-dir, more samples (-k), "
              "--guidance, or check the answers and --answer-marker", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
