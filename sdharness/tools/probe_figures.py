"""The probe's figures from its running sums, and the teacher-quality table as printed: pure
functions of token lists and counts (:mod:`sdharness.tools.probe` samples and scores)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sdharness.distill.aggregation import AGGREGATIONS


def first_deviation(completion: list[int], reference: list[int]) -> int | None:
    """The first index where ``completion`` leaves ``reference``; None when it never does
    (equal, or ``completion`` stops inside it)."""
    for index, (token, expected) in enumerate(zip(completion, reference)):
        if token != expected:
            return index
    return len(reference) if len(completion) > len(reference) else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None



@dataclass
class Accumulator:
    """Running sums over problems, turned into the figures by :meth:`figures`."""

    problems: int = 0
    deviating: int = 0
    argmax_is_reference: int = 0
    p_teacher_reference: list[float] = field(default_factory=list)
    p_student_reference: list[float] = field(default_factory=list)
    kl_before: list[float] = field(default_factory=list)
    kl_after: list[float] = field(default_factory=list)
    slips: int = 0
    follows: int = 0
    copies: int = 0
    # name -> {"mass", "log_ratio", "kl", "tail" (outside the teacher's top-k), "entry" (largest KL term)}: [...]
    aggregation: dict = field(default_factory=dict)



def first_difference(consistent: list[int], copied: list[int]) -> int | None:
    """The first position where both continuations have a token and the tokens differ; None when
    one is a prefix of the other (no next token tells following from copying)."""
    return next((i for i, (a, b) in enumerate(zip(consistent, copied)) if a != b), None)



def parameter_label(name: str, value: float | None) -> str | None:
    """``tau=1``, ``kl_bound=0.1``: the aggregation's parameter by name at ``value``; None where it has none."""
    own = AGGREGATIONS[name].parameter
    return None if own is None else f"{own.name}={value:g}"


def figures(greedy: dict, acc: Accumulator, parameters: dict[str, float | None], eps: float, top_k: int = 100,
            comparable: bool = True) -> dict:
    """The probe's result: every figure, with the counts behind it. ``comparable``: the references
    are in the student's format; otherwise the deviation figures are None (a free-text reference is
    left by every sample at once, and its tokens are no target for the teacher's argmax)."""
    aggregations = {}
    for name, rows in acc.aggregation.items():
        ratios = sorted(rows["log_ratio"])
        aggregations[name] = {
            "parameter": parameter_label(name, parameters[name]),
            "unconsidered_mass": _mean(rows["mass"]),
            "max_ratio_median": math.exp(ratios[len(ratios) // 2]) if ratios else None,
            "max_ratio_max": math.exp(ratios[-1]) if ratios else None,
            "kl_target_student": _mean(rows["kl"]),
            "topk_tail_mass": _mean(rows["tail"]),
            "max_entry_term": _mean(rows["entry"]),
            "tokens": len(ratios),
        }
    return {
        "greedy": greedy,
        "problems": acc.problems,
        "deviation": {"references_in_student_format": False} if not comparable else {
            "references_in_student_format": True,
            "deviating": acc.deviating,
            "teacher_argmax_is_reference": _rate(acc.argmax_is_reference, len(acc.p_teacher_reference)),
            "p_teacher_reference": _mean(acc.p_teacher_reference),
            "p_student_reference": _mean(acc.p_student_reference),
            "kl_before": _mean(acc.kl_before),
            "kl_after": _mean(acc.kl_after),
        },
        "after_slip": {"slips": acc.slips, "follows_student": _rate(acc.follows, acc.slips),
                       "copies_reference": _rate(acc.copies, acc.slips)},
        "aggregation": aggregations,
        "eps": eps,
        "top_k": top_k,
    }


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value >= 1e4:
        return f"{value:.2e}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(result: dict) -> str:
    """The teacher-quality table as printed (and stored in probe.json as ``table``)."""
    rows = []
    for name, row in result["greedy"].items():
        label = "no hint" if name == "no_hint" else f"hint ({name.removeprefix('hint_')})"
        rows.append((f"greedy accuracy, {label}", _cell(row["accuracy"])))
        if name != "no_hint":
            rows.append((f"early-answer rate, teacher with hint ({name.removeprefix('hint_')})",
                         _cell(row["early_answer_rate"])))
    deviation = result["deviation"]
    if not deviation["references_in_student_format"]:
        rows.append(("first deviation from the reference", "n/a: the references are not in the student's format "
                     "(references_in_student_format=true if they are)"))
    else:
        rows += [
            ("samples leaving the reference", f"{deviation['deviating']}/{result['problems']}"),
            ("at the first deviation: teacher argmax = reference", _cell(deviation["teacher_argmax_is_reference"])),
            ("at the first deviation: mean p_T(reference)", _cell(deviation["p_teacher_reference"])),
            ("at the first deviation: mean p_S(reference)", _cell(deviation["p_student_reference"])),
            ("KL(teacher||student) per token, before it", _cell(deviation["kl_before"])),
            ("KL(teacher||student) per token, after it", _cell(deviation["kl_after"])),
        ]
    slip = result["after_slip"]
    if slip["slips"]:
        rows += [("samples whose first deviation is a slipped result", str(slip["slips"])),
                 ("next result: teacher follows the student's value", _cell(slip["follows_student"])),
                 ("next result: teacher copies the reference", _cell(slip["copies_reference"]))]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'figure':<{width}}  value"] + [f"{label:<{width}}  {value}" for label, value in rows]
    lines += ["", f"{'aggregation':<16}{'parameter':>13}{'mass p_S<' + format(result['eps'], 'g'):>16}"
                  f"{'max q/p_S median':>18}{'max q/p_S max':>15}{'KL(q||p_S)':>12}"
                  f"{'q outside top-' + str(result.get('top_k', 100)):>19}{'max KL term':>13}"]
    for name, row in result["aggregation"].items():
        lines.append(f"{name:<16}{row['parameter'] or '–':>13}{_cell(row['unconsidered_mass'], 4):>16}"
                     f"{_cell(row['max_ratio_median'], 2):>18}{_cell(row['max_ratio_max'], 2):>15}"
                     f"{_cell(row['kl_target_student']):>12}{_cell(row.get('topk_tail_mass'), 4):>19}"
                     f"{_cell(row.get('max_entry_term')):>13}")
    return "\n".join(lines)
