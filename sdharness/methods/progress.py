"""The training progress bar, counting towards the limit that ends the run.

A run stops at ``trainer.max_steps`` or at the first budget reached (``budget.problems``,
``budget.generated_tokens``, ``budget.seconds``: :class:`~sdharness.methods.accounting.BudgetStop`), and it
is one pass of a resumable sampler rather than epochs, so Lightning's ``Epoch 0/-2 ... 64/250`` (the
epoch count of a run with no epoch limit, the batches of one epoch) measures neither. This bar shows
the limit nearest to ending the run, as the same counters the budget reads.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar

from sdharness.config import BudgetConfig
from sdharness.methods.accounting import Counters

UNITS = {"steps": "step", "problems": "problem", "generated_tokens": "token", "seconds": "s"}


def budget_progress(budget: BudgetConfig, counters: Counters, step: int, max_steps: int) -> tuple[str, int, int | None]:
    """``(limit, done, total)`` of the limit set that is furthest along (the first listed on a tie):
    steps (``max_steps``; -1 is no limit), problems, generated tokens or seconds; ``total`` is None when
    nothing but the data ends the run."""
    limits = [("steps", step, max(max_steps, 0)), ("problems", counters.problems_seen, budget.problems),
              ("generated_tokens", counters.generated_tokens, budget.generated_tokens),
              ("seconds", int(counters.wall_seconds), int(budget.seconds))]
    limits = [limit for limit in limits if limit[2] > 0]
    if not limits:
        return "steps", step, None
    return max(limits, key=lambda limit: limit[1] / limit[2])


class BudgetProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with its total, count and description from :func:`budget_progress`."""

    def __init__(self, budget: BudgetConfig, max_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.budget, self.max_steps = budget, max_steps

    def show(self, trainer, module) -> None:
        limit, done, total = budget_progress(self.budget, module.counters, trainer.global_step, self.max_steps)
        bar = self.train_progress_bar
        bar.set_description(limit.replace("_", " "), refresh=False)
        bar.total, bar.unit = total, UNITS[limit]
        if not bar.disable:
            bar.n = done
            bar.refresh()

    def on_train_epoch_start(self, trainer, module) -> None:  # no per-epoch reset: the counters run on
        self.show(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._should_update(trainer.global_step, self.max_steps):
            self.show(trainer, module)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, module))
