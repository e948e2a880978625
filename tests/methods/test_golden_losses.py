"""Golden losses: four training steps of each method on ``tiny_random`` give the losses recorded from
the code at 6a0fe55, before the module splits (CPU, one thread, seed 0). A change to the maths, the
data order, the sampling or the optimiser moves them; a refactor must not. Re-record only for a
change meant to alter training, and say so in the commit."""

import csv
import math

import pytest

from sdharness.train import train
from tests.conftest import TINY, compose_config

GOLDEN = {
    # SD at step 1: the live teacher is the student plus the hint, so the first KL is tiny.
    "sd": [5.700912879547104e-06, 0.0022610630840063095, 0.002891744486987591, 0.003771225456148386],
    "sft": [4.59612512588501, 4.302249431610107, 3.9673874378204346, 3.792175054550171],
    "grpo": [-0.03441678732633591, -4.967053612858763e-08, -0.040816593915224075, -0.04155591130256653],
}
OVERRIDES = {
    "sd": ["algo=sd"],
    "sft": ["algo=sft"],
    # tiny_random never writes a right answer, so answer_match would give every group zero advantage
    # and a loss of exactly 0; a reward that varies within a group makes the policy gradient real.
    "grpo": ["algo=grpo", "algo.reward=tests.methods.test_golden_losses:digit_share"],
}


def digit_share(completion: str, problem: dict, answer_marker: str = "") -> float:
    """The share of a completion's characters that are digits."""
    return sum(character.isdigit() for character in completion) / max(1, len(completion))


@pytest.mark.parametrize("method", list(GOLDEN))
def test_four_steps_give_the_recorded_losses(tmp_path, method):
    train(compose_config(TINY + ["trainer.max_steps=4", "logger.mode=disabled", *OVERRIDES[method]]), tmp_path)
    with open(tmp_path / "metrics.csv") as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert all(math.isfinite(loss) for loss in losses)
    # rel: float32 sums in another order (another CPU's vector width) move the 7th digit at most;
    # abs: the near-zero losses (a first KL, a step whose advantages almost cancel) are rounding noise below 1e-8.
    assert losses == pytest.approx(GOLDEN[method], rel=1e-5, abs=1e-8)
