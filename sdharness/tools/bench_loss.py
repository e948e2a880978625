"""``sdharness-bench --loss-support``: the chunked loss alone with ``loss.support=topk`` against
the full vocabulary, at SmolLM2's (49152) and Qwen's (151936) vocabulary sizes.

One case is ``rows`` loss positions of one sequence: student logits with gradient, the teacher as
hidden states and an LM head (as the training step scores it, :class:`LazyLogits`), the product
aggregation at tau 2 and forward KL, monitoring off (the training step's setting on steps that do
not log). Timed: the loss and its backward into the student logits. Peak memory: as the step
bench's, above the RSS with the inputs allocated (on CPU). Each (vocabulary, support) runs in a
fresh process; the ratio is topk over full.
"""

from __future__ import annotations

import statistics

import torch

from sdharness.distill.logits import LazyLogits
from sdharness.tools.bench_measure import peak_mb, reset_peak, setup_device, timed
from sdharness.distill.losses import distillation_loss

VOCABS = (49152, 151936)
HIDDEN = 576  # SmolLM2-135M's
TOP_K = 100


def measure_loss(vocab: int, support: str, rows: int, repeats: int, threads: int | None) -> dict:
    device = setup_device(threads)
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(1, rows, vocab, generator=generator) * 2).to(device).requires_grad_()
    head = torch.nn.Linear(HIDDEN, vocab, bias=False).to(device).requires_grad_(False)
    teacher = LazyLogits(torch.randn(1, rows, HIDDEN, generator=generator).to(device), head)
    mask = torch.ones(1, rows, dtype=torch.bool, device=device)

    def step():
        student.grad = None
        distillation_loss(student, teacher, mask, aggregation="product", parameter=2.0, divergence_name="forward_kl",
                          monitor_kl=False, support=support, top_k=TOP_K).loss.backward()

    baseline, reset = reset_peak(device)
    times = [timed(step, device) for _ in range(repeats + 1)]
    return {"median_s": statistics.median(times[1:]), "peak_mb": peak_mb(device) - baseline, "peak_reset": reset}


def run_loss_cases(fresh, rows: int = 128, repeats: int = 3, threads: int | None = None,
                   vocabs: tuple[int, ...] = VOCABS) -> list[dict]:
    """Per vocabulary: full and topk (``fresh(fn, *args)`` runs each in a new process) and topk/full ratios."""
    entries = []
    for vocab in vocabs:
        full, topk = (fresh(measure_loss, vocab, support, rows, repeats, threads) for support in ("full", "topk"))
        entries.append({"vocab": vocab, "rows": rows, "top_k": TOP_K, "full": full, "topk": topk,
                        "time_ratio": topk["median_s"] / full["median_s"],
                        "memory_ratio": topk["peak_mb"] / full["peak_mb"] if full["peak_mb"] > 0 else None})
    return entries


def format_loss_table(entries: list[dict]) -> str:
    lines = [f"chunked loss, product tau 2, forward KL, top_k {TOP_K} vs full vocabulary (loss + backward)",
             f"{'vocab':>7}{'rows':>6} | {'full s':>8}{'topk s':>8}{'ratio':>7} | {'full MB':>8}{'topk MB':>8}{'ratio':>7}"]
    for e in entries:
        memory = "n/a" if e["memory_ratio"] is None else f"{e['memory_ratio']:.2f}"
        lines.append(f"{e['vocab']:>7}{e['rows']:>6} | {e['full']['median_s']:>8.3f}{e['topk']['median_s']:>8.3f}"
                     f"{e['time_ratio']:>7.2f} | {e['full']['peak_mb']:>8.1f}{e['topk']['peak_mb']:>8.1f}{memory:>7}")
    return "\n".join(lines)
