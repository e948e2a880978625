"""-inf logits (masked vocabulary entries) on every aggregation x divergence x chunk path: 0 log 0 = 0."""

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sdharness.distill import losses
from sdharness.distill.aggregation import AGGREGATIONS, aggregate, entropy, entropy_matched_tau
from sdharness.distill.diagnostics import target_diagnostics
from sdharness.distill.divergences import DIVERGENCES
from sdharness.distill.losses import distillation_loss

F64 = torch.float64
INF = math.inf
# The issue's repro: the student masks token 0, the teacher does not.
STUDENT = [-INF, 0.0, 1.0, 2.0]
TEACHER = [0.0, 0.5, 1.0, 1.5]
TAU = {"product": 2.0, "clip": 1.0, "trust_region": 0.1}


def py_log_softmax(z):
    top = max(z)
    total = sum(math.exp(v - top) for v in z)
    return [v - top - math.log(total) for v in z]


def py_kl(p_logp, q_logp):
    return sum(math.exp(a) * (a - b) for a, b in zip(p_logp, q_logp) if a > -INF)


def py_divergence(target, student, name, beta=0.5):
    if name == "forward_kl":
        return py_kl(target, student)
    if name == "reverse_kl":
        return py_kl(student, target)
    mix = [math.log(beta * math.exp(a) + (1 - beta) * math.exp(b)) if max(a, b) > -INF else -INF
           for a, b in zip(target, student)]
    return beta * py_kl(target, mix) + (1 - beta) * py_kl(student, mix)


def test_the_issues_repro_is_0151():
    student = torch.tensor([[STUDENT]]).requires_grad_()
    result = distillation_loss(student, torch.tensor([[TEACHER]]), torch.ones(1, 1, dtype=torch.bool),
                               aggregation="product", parameter=2.0, divergence_name="forward_kl")
    assert result.loss.item() == pytest.approx(0.015081216, abs=1e-7)
    result.loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 0, 0].item() == 0.0


def matrix():
    return list(itertools.product(AGGREGATIONS, DIVERGENCES, ["fused", "generic"]))


@pytest.mark.parametrize("aggregation,divergence_name,path", matrix())
def test_every_aggregation_and_divergence_matches_the_plain_reference_with_minus_inf(
        aggregation, divergence_name, path, monkeypatch):
    if path == "generic":  # every pair through aggregate_logprobs + value_and_grad_fn
        real = losses.aggregation_named
        monkeypatch.setattr(losses, "aggregation_named", lambda name: dataclasses.replace(real(name), fused=None))
    tau = TAU.get(aggregation, 1.0)
    s64, t64 = torch.tensor(STUDENT, dtype=F64), torch.tensor(TEACHER, dtype=F64)
    target = aggregate(t64, s64, name=aggregation, parameter=tau).tolist()
    expected = py_divergence(target, py_log_softmax(STUDENT), divergence_name)
    student = torch.tensor([[STUDENT, [0.0, 1.0, -1.0, 0.5]]]).requires_grad_()
    teacher = torch.tensor([[TEACHER, [1.0, 0.0, 0.0, 2.0]]])
    mask = torch.tensor([[True, False]])
    result = distillation_loss(student, teacher, mask, aggregation=aggregation, parameter=tau,
                               divergence_name=divergence_name)
    result.loss.backward()
    if aggregation == "teacher" and divergence_name == "forward_kl":
        # The teacher puts mass on the token the student masks: KL(T || S) is infinite by definition.
        assert expected == INF and result.loss.item() == INF
        return
    assert math.isfinite(expected)
    assert result.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert torch.isfinite(student.grad).all()
    assert student.grad[0, 0, 0].item() == 0.0 and (student.grad[0, 1] == 0).all()
    assert result.teacher_student_kl.item() == INF  # KL(T || S), infinite here, not NaN
    for name, value in result.diagnostics.items():
        assert not math.isnan(value.item()), name


def test_masked_entries_in_both_models_change_nothing():
    """A padded vocabulary: both models mask the same entries; every loss equals the unpadded one."""
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    pad = torch.full((2, 3, 2), -INF)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for aggregation, divergence_name in itertools.product(AGGREGATIONS, DIVERGENCES):
        tau = TAU.get(aggregation, 1.0)
        plain = distillation_loss(z_s, z_t, mask, aggregation=aggregation, parameter=tau, divergence_name=divergence_name)
        padded = distillation_loss(torch.cat([z_s, pad], -1), torch.cat([z_t, pad], -1), mask,
                                   aggregation=aggregation, parameter=tau, divergence_name=divergence_name)
        torch.testing.assert_close(padded.loss, plain.loss, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(padded.teacher_student_kl, plain.teacher_student_kl, rtol=2e-5, atol=1e-6)
        for name in plain.diagnostics:
            torch.testing.assert_close(padded.diagnostics[name], plain.diagnostics[name], rtol=2e-5, atol=1e-6)


def test_entropy_of_a_masked_entry_is_finite():
    logp = F.log_softmax(torch.tensor(STUDENT, dtype=F64), -1)
    p = logp.exp().tolist()
    assert entropy(logp).item() == pytest.approx(-sum(v * math.log(v) for v in p if v > 0), rel=1e-12)


def test_entropy_matched_tau_is_fitted_not_the_bracket_edge_with_minus_inf():
    student, teacher = torch.tensor([STUDENT], dtype=F64), torch.tensor([TEACHER], dtype=F64)
    tau = entropy_matched_tau(teacher, student).item()
    assert 0.02 < tau < 50
    target = F.log_softmax((student + teacher) / tau, -1)
    assert entropy(target).item() == pytest.approx(entropy(F.log_softmax(student, -1)).item(), abs=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_every_aggregation_gives_a_normalised_target_with_minus_inf(aggregation):
    target = aggregate(torch.tensor(TEACHER, dtype=F64), torch.tensor(STUDENT, dtype=F64), name=aggregation,
                       parameter=TAU.get(aggregation, 1.0))
    assert not torch.isnan(target).any()
    assert torch.logsumexp(target, -1).item() == pytest.approx(0.0, abs=1e-12)
    if aggregation != "teacher":  # the student's masked token stays masked
        assert target[0].item() == -INF


def test_diagnostics_reference_with_minus_inf():
    s = F.log_softmax(torch.tensor(STUDENT, dtype=F64), -1)
    t = F.log_softmax(torch.tensor(TEACHER, dtype=F64), -1)
    found = target_diagnostics(t, s)
    assert found.max_log_ratio.item() == INF and found.kl_target_student.item() == INF
    assert found.unconsidered_mass.item() == pytest.approx(t[0].exp().item(), rel=1e-12)  # p_S = 0 < eps
    found = target_diagnostics(s, s)
    assert found.max_log_ratio.item() == 0.0 and found.kl_target_student.item() == 0.0
    assert found.unconsidered_mass.item() == 0.0
