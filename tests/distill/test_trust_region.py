"""The bounded aggregation: q ~ p_S^(1-w) p_T^w with the largest w such that KL(q || p_S) <= delta."""

import math

import pytest
import torch
import torch.nn.functional as F

from sdharness.distill.aggregation import (TRUST_REGION_STEPS, aggregate, clip_target, trust_region_target,
                                   trust_region_weight, unconsidered_mass_bound)
from sdharness.distill.diagnostics import target_diagnostics
from sdharness.schema.method import AggregationConfig

F64 = torch.float64


def random_logits(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def kl_to_student(target_logp, student_logp):
    q = target_logp.exp()
    return torch.where(q > 0, q * (target_logp - student_logp), torch.zeros_like(q)).sum(-1)


def py_geometric(p_s, p_t, w):
    weights = [a ** (1 - w) * b ** w for a, b in zip(p_s, p_t)]
    return [x / sum(weights) for x in weights]


def py_kl(q, p):
    return sum(a * math.log(a / b) for a, b in zip(q, p) if a > 0)


# The issue's example after `42 + 20 = 6`: tokens 0, 7, 5, everything else. The student says 0,
# the teacher 7, and clip (tau = 1, q ~ min(p_S, p_T)) hands most of its target to 5, a token
# neither model considers.
P_S = [0.61, 1e-4, 4e-4, 1 - 0.61 - 1e-4 - 4e-4]
P_T = [1e-4, 0.999, 8e-4, 1 - 1e-4 - 0.999 - 8e-4]
Z_TO_ZERO = (torch.tensor(P_S, dtype=F64).log(), torch.tensor(P_T, dtype=F64).log())


def test_clip_hands_the_issues_example_to_a_token_neither_model_considers():
    s, t = Z_TO_ZERO
    q = clip_target(t, s, tau=1.0).exp()
    assert q.argmax().item() == 2 and q[2].item() == pytest.approx(4e-4 / (1e-4 + 1e-4 + 4e-4 + P_T[3]), rel=1e-9)
    assert target_diagnostics(clip_target(t, s, tau=1.0), s).unconsidered_mass.item() > 0.5


@pytest.mark.parametrize("delta", [0.01, 0.1, 0.5])
def test_weight_on_the_issues_example_is_the_largest_within_delta(delta):
    s, t = Z_TO_ZERO
    w = trust_region_weight(t, s, delta=delta).item()
    assert 0 < w < 1
    assert py_kl(py_geometric(P_S, P_T, w), P_S) <= delta
    assert py_kl(py_geometric(P_S, P_T, w + 2.0 ** -TRUST_REGION_STEPS), P_S) > delta


@pytest.mark.parametrize("delta", [1e-3, 0.05, 0.3, 2.0])
def test_kl_to_student_is_within_delta_at_every_position(delta):
    s = F.log_softmax(random_logits(64, 50, seed=1), -1)
    t = F.log_softmax(random_logits(64, 50, seed=2), -1)
    target = trust_region_target(t, s, kl_bound=delta)
    kl = kl_to_student(target, s)
    assert (kl <= delta).all()
    w = trust_region_weight(t, s, delta=delta)
    # Largest: one bisection step more would leave the bound, unless the teacher itself is within it.
    s_more = F.log_softmax((1 - (w + 2.0 ** -TRUST_REGION_STEPS)).unsqueeze(-1) * s
                           + (w + 2.0 ** -TRUST_REGION_STEPS).unsqueeze(-1) * t, -1)
    assert ((kl_to_student(s_more, s) > delta) | (w == 1)).all()


def test_target_is_the_geometric_mixture_at_its_weight():
    s = F.log_softmax(random_logits(8, 20, seed=3), -1)
    t = F.log_softmax(random_logits(8, 20, seed=4), -1)
    w = trust_region_weight(t, s, delta=0.2).unsqueeze(-1)
    torch.testing.assert_close(trust_region_target(t, s, kl_bound=0.2), F.log_softmax((1 - w) * s + w * t, -1))


def test_tiny_delta_gives_the_student_and_large_delta_the_teacher():
    z_s, z_t = random_logits(16, 30, seed=5), random_logits(16, 30, seed=6)
    torch.testing.assert_close(trust_region_target(z_t, z_s, kl_bound=1e-12), F.log_softmax(z_s, -1), atol=1e-5, rtol=0)
    kl_teacher = kl_to_student(F.log_softmax(z_t, -1), F.log_softmax(z_s, -1)).max().item()
    assert (trust_region_weight(F.log_softmax(z_t, -1), F.log_softmax(z_s, -1), delta=kl_teacher) == 1).all()
    torch.testing.assert_close(trust_region_target(z_t, z_s, kl_bound=kl_teacher), F.log_softmax(z_t, -1))


def test_weight_grows_with_delta():
    s = F.log_softmax(random_logits(32, 20, seed=7), -1)
    t = F.log_softmax(random_logits(32, 20, seed=8), -1)
    weights = [trust_region_weight(t, s, delta=d) for d in (0.01, 0.1, 1.0)]
    assert (weights[0] <= weights[1]).all() and (weights[1] <= weights[2]).all()


def test_is_invariant_to_logit_shifts():
    z_s, z_t = random_logits(4, 10, seed=9), random_logits(4, 10, seed=10)
    torch.testing.assert_close(trust_region_target(z_t + 3.0, z_s - 7.0, kl_bound=0.1), trust_region_target(z_t, z_s, kl_bound=0.1))
    torch.testing.assert_close(aggregate(z_t, z_s, name="trust_region", parameter=0.1), trust_region_target(z_t, z_s, kl_bound=0.1))


@pytest.mark.parametrize("p, delta, expected", [(1e-3, 0.1, 0.03748), (0.0, 1.0, 0.0), (0.5, 0.0, 0.5)])
def test_unconsidered_mass_bound_inverts_the_two_point_kl(p, delta, expected):
    bound = unconsidered_mass_bound(torch.tensor(p, dtype=F64), delta).item()
    assert bound == pytest.approx(expected, abs=1e-4)
    if 0 < bound < 1 and p > 0:
        two_point = bound * math.log(bound / p) + (1 - bound) * math.log((1 - bound) / (1 - p))
        assert two_point == pytest.approx(delta, abs=1e-9)


@pytest.mark.parametrize("delta", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("eps", [1e-3, 1e-2])
def test_mass_on_unconsidered_tokens_keeps_the_derived_bound(delta, eps):
    # Peaked students with a confident, disagreeing teacher: the case where clip's Z -> 0.
    z_s, z_t = random_logits(256, 40, scale=6.0, seed=11), random_logits(256, 40, scale=6.0, seed=12)
    s, t = F.log_softmax(z_s, -1), F.log_softmax(z_t, -1)
    target = trust_region_target(z_t, z_s, kl_bound=delta)
    mass = target_diagnostics(target, s, eps=eps).unconsidered_mass
    below = torch.where(s.exp() < eps, s.exp(), torch.zeros_like(s)).sum(-1)
    assert (mass <= unconsidered_mass_bound(below, delta) + 1e-12).all()
    assert (mass <= below + math.sqrt(delta / 2) + 1e-12).all()  # Pinsker
    positive = below > 0
    assert (mass[positive] <= (delta + math.log(2)) / (-below[positive].log())).all()
    clip_mass = target_diagnostics(clip_target(z_t, z_s, tau=1.0), s, eps=eps).unconsidered_mass
    assert (clip_mass > unconsidered_mass_bound(below, delta)).any()  # clip breaks the bound


def test_teacher_zero_on_student_tokens_falls_back_to_the_student_beyond_delta():
    # The teacher gives 0 to a token the student gives 0.5: any w > 0 drops it, KL >= log 2.
    s = torch.tensor([0.5, 0.3, 0.2], dtype=F64).log()
    t = torch.tensor([-math.inf, 0.0, 1.0], dtype=F64)
    assert trust_region_weight(F.log_softmax(t, -1), s, delta=0.5).item() == 0.0
    torch.testing.assert_close(trust_region_target(t, s, kl_bound=0.5), s)
    w = trust_region_weight(F.log_softmax(t, -1), s, delta=1.0).item()
    assert w > 0 and py_kl(py_geometric([0.5, 0.3, 0.2], [0.0, *F.softmax(t[1:], -1).tolist()], w),
                           [0.5, 0.3, 0.2]) <= 1.0
    disjoint = torch.tensor([-math.inf, -math.inf, 0.0], dtype=F64)
    only_first = torch.tensor([0.0, -math.inf, -math.inf], dtype=F64)
    assert trust_region_weight(only_first, disjoint, delta=10.0).item() == 0.0
    torch.testing.assert_close(trust_region_target(only_first, disjoint, kl_bound=10.0), disjoint)


def test_kl_bound_is_the_bound_tau_was():
    """``aggregation.kl_bound`` reaches the target as the bound that ``aggregation.tau`` set before the
    parameter had its own name: the values are the reference's at tau = 0.05 before the rename, exactly."""
    z_s = torch.tensor([[2.0, 1.0, -1.0, 0.5], [0.0, 3.0, -2.0, 1.0]], dtype=F64)
    z_t = torch.tensor([[-1.0, 2.5, 0.0, 1.0], [1.0, 0.0, 2.0, -1.0]], dtype=F64)
    before = torch.tensor([[-0.7875645100272413, -1.1056568562186473, -3.1814243733084915, -1.7571918903983348],
                           [-2.352132683516178, -0.28694713664117777, -3.651021843672427, -2.0532435233599275]],
                          dtype=F64)
    config = AggregationConfig(name="trust_region", kl_bound=0.05)
    assert config.parameter == 0.05
    assert torch.equal(trust_region_target(z_t, z_s, kl_bound=0.05), before)
    assert torch.equal(aggregate(z_t, z_s, name=config.name, parameter=config.parameter), before)


def test_the_loss_reads_kl_bound_from_the_config():
    """The chunked loss that an ``aggregation`` config sets up uses its kl_bound: forward KL against the
    reference target at that bound, and a different loss at another bound."""
    from sdharness.methods.self_distill import distil
    from sdharness.schema.method import LossConfig

    z_s, z_t = random_logits(2, 5, 9, seed=51), random_logits(2, 5, 9, seed=52)
    mask = torch.ones(2, 5, dtype=torch.bool)

    def loss_at(kl_bound):
        return distil(z_s.clone().requires_grad_(), z_t, mask, None,
                      AggregationConfig(name="trust_region", kl_bound=kl_bound), LossConfig(), monitor=False).loss

    s = F.log_softmax(z_s, -1)
    expected = kl_to_student(trust_region_target(z_t, z_s, kl_bound=0.05), s).mean()
    torch.testing.assert_close(loss_at(0.05).detach(), expected, rtol=0, atol=1e-12)
    assert abs(loss_at(0.5).item() - expected.item()) > 1e-3
