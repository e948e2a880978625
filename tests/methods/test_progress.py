"""The training progress bar counts towards the limit that ends the run, not Lightning's epochs."""

import lightning as L

from sdharness.config import BudgetConfig
from sdharness.methods.accounting import Counters
from sdharness.methods.progress import BudgetProgressBar, budget_progress
from sdharness.train import train
from tests.conftest import TINY, compose_config


def test_without_a_budget_the_bar_counts_steps():
    assert budget_progress(BudgetConfig(), Counters(problems_seen=40), step=5, max_steps=20) == ("steps", 5, 20)


def test_with_nothing_but_the_data_to_end_the_run_the_total_is_open():
    assert budget_progress(BudgetConfig(), Counters(), step=5, max_steps=-1) == ("steps", 5, None)


def test_the_limit_furthest_along_is_shown():
    counters = Counters(problems_seen=48, generated_tokens=1000, wall_seconds=12.7)
    assert budget_progress(BudgetConfig(problems=64), counters, step=6, max_steps=250) == ("problems", 48, 64)
    assert budget_progress(BudgetConfig(problems=640, generated_tokens=2000), counters, step=6,
                           max_steps=250) == ("generated_tokens", 1000, 2000)
    assert budget_progress(BudgetConfig(problems=640, seconds=20.0), counters, step=6,
                           max_steps=250) == ("seconds", 12, 20)


def test_a_run_with_a_problem_budget_shows_problems_up_to_the_budget(tmp_path):
    class Shown(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            bar = trainer.progress_bar_callback
            assert isinstance(bar, BudgetProgressBar)
            self.rows.append((bar.train_progress_bar.desc, bar.train_progress_bar.n, bar.train_progress_bar.total))

    shown = Shown()
    # Two problems a step: the budget of 6 ends the run at step 3 of the 10 allowed.
    train(compose_config(TINY + ["trainer.max_steps=10", "budget.problems=6", "logger.mode=disabled"]), tmp_path,
          callbacks=(shown,))
    assert shown.rows == [("problems: ", 2, 6), ("problems: ", 4, 6), ("problems: ", 6, 6)]  # tqdm adds the colon
