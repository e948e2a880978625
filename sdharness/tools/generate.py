"""``sdharness-generate``: sample completions for a JSONL file of problems, with or without guidance.

    sdharness-generate --model tiny_random --problems problems.jsonl --out samples.jsonl
    sdharness-generate --model-dir runs/x/final_model --problems p.jsonl --out s.jsonl \\
        --guidance always --aggregation clip --tau 1.0 --prompt testbed

Each input line is ``{"problem", "solution", "answer"?}``; each output line holds the problem,
the completion, whether it was guided (:mod:`sdharness.rollout.guided`) and ``is_correct`` (null without
an answer). ``--guidance on_failure`` samples plainly and resamples failures with guidance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sdharness.distill.aggregation import AGGREGATIONS, PARAMETER_NAMES, aggregations_using
from sdharness.config import CONF_DIR, ConfigError, ModelConfig, PromptConfig
from sdharness.schema.checks import positive
from sdharness.data.jsonl import read_jsonl
from sdharness.errors import DataError
from sdharness.rollout import GUIDANCE_MODES
from sdharness.rollout.guided import answer_checks, guided_generate, sample_with_guidance
from sdharness.models import load_model_and_tokenizer
from sdharness.data.prompts import encode_prompts, render_student, render_teacher, teacher_context
from sdharness.rollout.hf import generate
from sdharness.data.answers import ANSWER_MARKER, answer_checker



def named_config(group: str, name: str) -> dict:
    """``conf/<group>/<name>.yaml`` (or a path to a .yaml file) as a plain dict."""
    path = Path(name) if name.endswith(".yaml") else CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"--{group} {name}: no {path}; choose one of {', '.join(known)} or give a .yaml file")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def model_config(args) -> ModelConfig:
    if args.model_dir:
        return ModelConfig(name=Path(args.model_dir).name, source="hf", path=args.model_dir)
    return ModelConfig(**named_config("model", args.model))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model-dir DIR`` or ``--model NAME``, read back by :func:`model_config`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", help="a local Hugging Face model directory (e.g. a run's final_model)")
    source.add_argument("--model", help="a config in conf/model (tiny_random, smollm2_135m, ...)")


def flag(parameter: str) -> str:
    return "--" + parameter.replace("_", "-")


def add_aggregation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--aggregation`` and the flag of each aggregation parameter (``--tau``, ``--kl-bound``), read
    back by :func:`aggregation_parameter`."""
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default="product", help="with guidance")
    meanings = {a.parameter.name: a.parameter.meaning for a in AGGREGATIONS.values() if a.parameter}
    for name in PARAMETER_NAMES:
        parser.add_argument(flag(name), type=float, dest=name, help=f"{', '.join(aggregations_using(name))}: "
                            f"{meanings[name]} (default: the aggregation's, as aggregation=<name> sets it in training)")


def aggregation_parameter(args: argparse.Namespace) -> float | None:
    """The value of ``--aggregation``'s parameter: its flag, else the registry's default (None where the
    aggregation has none); a ConfigError for another aggregation's parameter flag."""
    own = AGGREGATIONS[args.aggregation].parameter
    for name in PARAMETER_NAMES:
        given = getattr(args, name)
        if given is not None and (own is None or own.name != name):
            fix = f"whose parameter is {flag(own.name)} ({own.meaning})" if own else "which has no parameter"
            raise ConfigError(f"{flag(name)} {given:g} does not apply to --aggregation {args.aggregation}, {fix}; "
                              f"drop {flag(name)}")
    if own is None:
        return None
    value = own.default if getattr(args, own.name) is None else getattr(args, own.name)
    positive(flag(own.name), value)
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdharness-generate", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--problems", required=True, help="JSONL with problem, solution and optional answer")
    parser.add_argument("--out", required=True, help="output JSONL, one line per problem")
    parser.add_argument("--guidance", choices=GUIDANCE_MODES, default="never")
    parser.add_argument("--guidance-samples", type=int, default=1,
                        help="on_failure: plain samples per problem; guided when all fail (rollout.guidance_samples)")
    add_aggregation_arguments(parser)
    parser.add_argument("--prompt", default="cot", help="a config in conf/prompt (cot, testbed) or a .yaml file")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--answer-marker", default=ANSWER_MARKER)
    return parser.parse_args(argv)


def run(args) -> list[dict]:
    prompt = PromptConfig(**named_config("prompt", args.prompt))
    model, tokenizer = load_model_and_tokenizer(model_config(args))
    model.eval()
    problems = read_jsonl(args.problems)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # plain sampling goes through HF generate and torch's global generator
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    greedy=args.greedy)
    check = answer_checker("builtin", args.answer_marker)
    parameter = aggregation_parameter(args)
    rows = []
    for start in range(0, len(problems), args.batch_size):
        chunk = problems[start:start + args.batch_size]
        student = encode_prompts(prompt, tokenizer, [render_student(prompt, p["problem"]) for p in chunk])
        teacher = encode_prompts(prompt, tokenizer, [render_teacher(prompt, p["problem"], teacher_context(p)) for p in chunk])
        if args.guidance == "never":
            texts, guided = generate(model, tokenizer, *student, **sampling).texts, []
        else:
            def guide(rows, student=student, teacher=teacher):
                index = torch.tensor(rows)
                return guided_generate(model, tokenizer, student[0][index], student[1][index], teacher[0][index],
                                       teacher[1][index], aggregation=args.aggregation, parameter=parameter,
                                       generator=generator, **sampling)

            rollout, guided, _ = sample_with_guidance(
                args.guidance, len(chunk), plain_samples=args.guidance_samples,
                sample_plain=lambda student=student: generate(model, tokenizer, *student, **sampling), guide=guide,
                check=lambda texts, chunk=chunk: answer_checks(texts, chunk, check),
                pad_id=tokenizer.pad_token_id)
            texts = rollout.texts
        guided = [row in guided for row in range(len(chunk))]
        for item, text, flag in zip(chunk, texts, guided):
            answer = item.get("answer")
            rows.append({"problem": item["problem"], "answer": answer, "completion": text, "guided": flag,
                         "is_correct": check(text, answer) if answer else None})
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        rows = run(args)
    except (ConfigError, DataError) as error:
        print(f"sdharness-generate: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    checked = [row["is_correct"] for row in rows if row["is_correct"] is not None]
    accuracy = f", accuracy {sum(checked) / len(checked):.3f}" if checked else ""
    print(f"{len(rows)} completions ({sum(row['guided'] for row in rows)} guided){accuracy} -> {args.out}")


if __name__ == "__main__":
    main()
