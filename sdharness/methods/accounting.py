"""Cumulative cost counters, identical for every method, so runs compare on any x-axis.

``forward_tokens`` counts every real (non-padding) token pushed through the model: rollout
prefill and decoding, teacher scoring and the student's scoring pass. ``trained_tokens`` counts
the tokens of passes that also run backward. FLOPs follow the usual estimate: 2N per token of a
forward-only pass and 6N per token of a forward+backward pass, N = parameter count.

With several ranks each rank counts its own work for a step and the step's counts are summed
over ranks (``SUMMED``), so every rank holds the run's totals; ``wall_seconds`` is each rank's own
wall clock and ``skipped_steps`` is decided jointly by all ranks, so neither is summed.

``problems_without_success`` counts problems none of whose sampled completions' answers checked, where
a method checks them before its loss: SD with ``algo.hint_source=sibling`` (such a problem has no
hint and no loss); 0 under every other method, which does not count them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields

import lightning as L

from sdharness.config import BudgetConfig

log = logging.getLogger(__name__)

# The x-axes every method shares; W&B plots eval curves against any of them.
X_AXES = ("problems_seen", "rollouts", "generated_tokens", "forward_tokens", "trained_tokens", "flops",
          "wall_seconds")
SUMMED = ("problems_seen", "rollouts", "generated_tokens", "forward_tokens", "trained_tokens", "flops",
          "problems_without_success")


def rollout_cost(prompt_mask, rollout) -> dict[str, int]:
    """A plain rollout's cost as :meth:`Counters.add` keywords: its samples, generated tokens and the
    forward-only tokens of prefill and decoding."""
    generated = int(rollout.lengths.sum())
    return {"rollouts": len(rollout.texts), "generated": generated, "forward_only": int(prompt_mask.sum()) + generated}


def guided_rollout_cost(student_mask, teacher_mask, lengths) -> dict[str, int]:
    """A guided rollout's cost (:func:`sdharness.rollout.guided.guided_generate`) as :meth:`Counters.add`
    keywords: one sample per row of ``lengths`` (its generated tokens), both contexts' prefill, and every
    drawn token forwarded through both contexts."""
    generated = int(lengths.sum())
    return {"rollouts": int(lengths.numel()), "generated": generated,
            "forward_only": int(student_mask.sum()) + int(teacher_mask.sum()) + 2 * generated}


@dataclass
class Counters:
    problems_seen: int = 0
    rollouts: int = 0
    generated_tokens: int = 0
    forward_tokens: int = 0
    trained_tokens: int = 0
    flops: float = 0.0
    wall_seconds: float = 0.0
    skipped_steps: int = 0
    problems_without_success: int = 0

    def add(self, *, parameters: int, problems: int = 0, rollouts: int = 0, generated: int = 0,
            forward_only: int = 0, trained: int = 0, problems_without_success: int = 0) -> None:
        """Record one step's work; ``forward_only`` and ``trained`` tokens are disjoint."""
        self.problems_seen += problems
        self.rollouts += rollouts
        self.generated_tokens += generated
        self.forward_tokens += forward_only + trained
        self.trained_tokens += trained
        self.problems_without_success += problems_without_success
        self.flops += 2.0 * parameters * forward_only + 6.0 * parameters * trained

    def summed(self) -> list[float]:
        return [float(getattr(self, name)) for name in SUMMED]

    def add_summed(self, values) -> None:
        """Add a step's ``summed()`` values (after reduction over ranks)."""
        for name, value in zip(SUMMED, values):
            setattr(self, name, getattr(self, name) + (int(round(value)) if name != "flops" else float(value)))

    def as_metrics(self, prefix: str = "train") -> dict[str, float]:
        return {f"{prefix}/{name}": float(value) for name, value in asdict(self).items()}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for item in fields(self):
            setattr(self, item.name, state.get(item.name, item.default))


class WallClock:
    """Seconds spent training (not loading or evaluating), added to ``counters.wall_seconds``."""

    def __init__(self, counters: Counters):
        self.counters = counters
        self.last: float | None = None  # None while paused

    def restart(self) -> None:
        self.last = time.perf_counter()

    def tick(self) -> None:
        if self.last is not None:
            now = time.perf_counter()
            self.counters.wall_seconds += now - self.last
            self.last = now

    def pause(self) -> None:
        self.tick()
        self.last = None


class Stopwatch:
    """Seconds spent inside ``with`` blocks, cumulative over the run (checkpointed with the eval history)."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self._started = None

    def __enter__(self):
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._started


class BudgetStop(L.Callback):
    """Stops training at the first budget reached: problems, generated tokens or seconds."""

    def __init__(self, budget: BudgetConfig):
        self.budget = budget

    def reached(self, counters: Counters) -> str | None:
        limits = (("problems", counters.problems_seen), ("generated_tokens", counters.generated_tokens),
                  ("seconds", counters.wall_seconds))
        for name, value in limits:
            limit = getattr(self.budget, name)
            if limit and value >= limit:
                return f"budget.{name}={limit} reached ({value:g})"
        return None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        reason = self.reached(module.counters)
        # Every rank must stop at the same step (wall_seconds differ per rank), or the others hang.
        if trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            log.info("stopping: %s", reason or "another rank reached its budget")
            trainer.should_stop = True
