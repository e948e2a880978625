import math

import torch

from sdharness.distill.diagnostics import target_diagnostics

F64 = torch.float64


def logp(*probabilities):
    return torch.tensor(probabilities, dtype=F64).log()


def test_figures_equal_hand_computed_values():
    student, target = logp(0.5, 0.4999, 0.0001), logp(0.5, 0.3, 0.2)
    figures = target_diagnostics(target, student, eps=1e-3)
    assert math.isclose(figures.unconsidered_mass.item(), 0.2, rel_tol=1e-12)  # only the third token has p_S < eps
    assert math.isclose(figures.max_log_ratio.item(), math.log(0.2 / 0.0001), rel_tol=1e-12)
    kl = 0.5 * math.log(0.5 / 0.5) + 0.3 * math.log(0.3 / 0.4999) + 0.2 * math.log(0.2 / 0.0001)
    assert math.isclose(figures.kl_target_student.item(), kl, rel_tol=1e-12)


def test_a_token_the_target_drops_counts_as_zero_even_where_the_student_gives_it_zero():
    student = torch.tensor([-math.inf, math.log(0.5), math.log(0.5)], dtype=F64)
    target = torch.tensor([-math.inf, math.log(0.25), math.log(0.75)], dtype=F64)
    figures = target_diagnostics(target, student)
    assert figures.unconsidered_mass.item() == 0.0
    assert math.isclose(figures.max_log_ratio.item(), math.log(1.5), rel_tol=1e-12)
    assert math.isclose(figures.kl_target_student.item(), 0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel_tol=1e-12)


def test_mass_on_a_token_the_student_gives_zero_is_unbounded():
    student = torch.tensor([-math.inf, 0.0], dtype=F64)
    target = logp(0.5, 0.5)
    figures = target_diagnostics(target, student)
    assert figures.unconsidered_mass.item() == 0.5
    assert figures.max_log_ratio.item() == math.inf and figures.kl_target_student.item() == math.inf


def test_batched_shapes_are_per_position():
    student, target = torch.randn(2, 3, 7, dtype=F64).log_softmax(-1), torch.randn(2, 3, 7, dtype=F64).log_softmax(-1)
    figures = target_diagnostics(target, student)
    assert figures.unconsidered_mass.shape == figures.max_log_ratio.shape == figures.kl_target_student.shape == (2, 3)
    same = target_diagnostics(student, student)
    assert torch.equal(same.kl_target_student, torch.zeros(2, 3, dtype=F64))
    assert torch.equal(same.max_log_ratio, torch.zeros(2, 3, dtype=F64))
