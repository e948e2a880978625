"""The loss's logged diagnostics equal the float64 reference target_diagnostics, fused and generic."""

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sdharness.distill import losses
from sdharness.distill.aggregation import AGGREGATIONS, aggregate
from sdharness.distill.diagnostics import target_diagnostics
from sdharness.distill.divergences import DIVERGENCES
from sdharness.distill.losses import distillation_loss

F64 = torch.float64
TAU = {"product": 2.0, "clip": 1.0, "trust_region": 0.1}

# The Z -> 0 case (tokens 0, 7, 5, the rest): the student says 0, the teacher 7.
P_S = [0.61, 1e-4, 4e-4, 1 - 0.61 - 1e-4 - 4e-4]
P_T = [1e-4, 0.999, 8e-4, 1 - 1e-4 - 0.999 - 8e-4]


def py_diagnostics(q, p, eps):
    """Plain python: (mass on p < eps, max log(q / p) over q > 0, KL(q || p))."""
    return (sum(a for a, b in zip(q, p) if b < eps), max(math.log(a / b) for a, b in zip(q, p) if a > 0),
            sum(a * math.log(a / b) for a, b in zip(q, p) if a > 0))


def test_reference_on_the_z_to_zero_case_by_hand():
    # clip at tau = 1: q ~ min(p_S, p_T) = [1e-4, 1e-4, 4e-4, P_T[3]]
    weights = [min(a, b) for a, b in zip(P_S, P_T)]
    q = [w / sum(weights) for w in weights]
    mass, top, kl = py_diagnostics(q, P_S, 1e-3)
    assert mass > 0.5 and top == pytest.approx(math.log(q[2] / 4e-4))
    found = target_diagnostics(torch.tensor(q, dtype=F64).log(), torch.tensor(P_S, dtype=F64).log(), eps=1e-3)
    assert found.unconsidered_mass.item() == pytest.approx(mass, rel=1e-12)
    assert found.max_log_ratio.item() == pytest.approx(top, rel=1e-12)
    assert found.kl_target_student.item() == pytest.approx(kl, rel=1e-12)


def inputs():
    """[2, 4, 4]: the Z -> 0 case, a tie, a masked token, and random rows; the last row is masked out."""
    z_s = torch.tensor([[P_S, [0.25] * 4, [0.7, 0.1, 0.1, 0.1], [0.5, 0.2, 0.2, 0.1]],
                        [[0.1, 0.2, 0.3, 0.4], [0.97, 0.01, 0.01, 0.01], [0.4, 0.3, 0.2, 0.1], [0.25] * 4]],
                       dtype=F64).log()
    z_t = torch.tensor([[P_T, [0.1, 0.2, 0.3, 0.4], [0.001, 0.001, 0.001, 0.997], [0.25] * 4],
                        [[0.4, 0.3, 0.2, 0.1], [0.0005, 0.9, 0.0995, 0.0], [0.4, 0.3, 0.2, 0.1], [0.9, 0.05, 0.03, 0.02]]],
                       dtype=F64).log()
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    return z_s, z_t, mask


def reference(z_s, z_t, mask, aggregation, eps):
    s = F.log_softmax(z_s, -1)
    found = target_diagnostics(aggregate(z_t, z_s, name=aggregation, parameter=TAU.get(aggregation, 1.0)), s, eps=eps)
    picked = {k: getattr(found, k)[mask] for k in ("unconsidered_mass", "max_log_ratio", "kl_target_student")}
    return {"unconsidered_mass": picked["unconsidered_mass"].mean(), "kl_target_student": picked["kl_target_student"].mean(),
            "max_log_ratio_mean": picked["max_log_ratio"].mean(), "max_log_ratio_max": picked["max_log_ratio"].max()}


@pytest.mark.parametrize("aggregation,divergence_name,path",
                         list(itertools.product(AGGREGATIONS, DIVERGENCES, ["fused", "generic"])))
@pytest.mark.parametrize("eps", [1e-3, 0.05])
def test_loss_diagnostics_equal_the_reference(aggregation, divergence_name, path, eps, monkeypatch):
    if path == "generic":
        real = losses.aggregation_named
        monkeypatch.setattr(losses, "aggregation_named", lambda name: dataclasses.replace(real(name), fused=None))
    z_s, z_t, mask = inputs()
    result = distillation_loss(z_s.float(), z_t.float(), mask, aggregation=aggregation, parameter=TAU.get(aggregation, 1.0),
                               divergence_name=divergence_name, chunk_size=3, unconsidered_eps=eps)
    expected = reference(z_s, z_t, mask, aggregation, eps)
    assert set(result.diagnostics) == set(expected)
    for name, value in expected.items():
        assert result.diagnostics[name].item() == pytest.approx(value.item(), rel=2e-4, abs=2e-5), name


def test_clip_diagnostics_show_the_z_to_zero_case_and_trust_region_bounds_it():
    z_s, z_t, mask = inputs()
    one = torch.zeros_like(mask)
    one[0, 0] = True
    clip = distillation_loss(z_s, z_t, one, aggregation="clip", parameter=1.0, divergence_name="forward_kl")
    bounded = distillation_loss(z_s, z_t, one, aggregation="trust_region", parameter=0.1, divergence_name="forward_kl")
    assert clip.diagnostics["unconsidered_mass"].item() > 0.5
    assert bounded.diagnostics["kl_target_student"].item() <= 0.1 + 1e-6
    assert bounded.diagnostics["unconsidered_mass"].item() < 0.04


@pytest.mark.parametrize("divergence_name", DIVERGENCES)
def test_diagnostics_do_not_change_loss_or_gradient(divergence_name):
    z_s, z_t, mask = inputs()
    mask[1, 1] = False  # the teacher's 0 there makes reverse KL to any w > 0 target infinite
    grads = []
    for monitor in (True, False):
        student = z_s.clone().requires_grad_()
        result = distillation_loss(student, z_t, mask, aggregation="trust_region", parameter=0.1,
                                   divergence_name=divergence_name, monitor_kl=monitor)
        result.loss.backward()
        grads.append((result.loss.detach(), student.grad))
        assert (result.diagnostics is None) == (not monitor)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
