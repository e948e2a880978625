import math

import pytest
import torch

from sdharness.distill.aggregation import (
    AGGREGATIONS,
    PARAMETER_NAMES,
    Parameter,
    aggregate,
    clip_target,
    entropy,
    entropy_matched_target,
    entropy_matched_tau,
    product_target,
    teacher_target,
    trust_region_target,
)

F64 = torch.float64

# Hand-made pairs (student, teacher) over 2-3 vocab entries, including a tie, a strong
# disagreement and a position where the teacher is uniform.
HAND_MADE = [
    ([1.0, 0.0, -1.0], [0.0, 2.0, -0.5]),
    ([0.5, 0.5, 0.0], [3.0, -3.0, 0.0]),
    ([2.0, -1.0], [-1.0, 2.0]),
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
    ([-4.0, 1.0, 1.5], [0.0, 0.0, 0.0]),
]


# ---------------------------------------------------------------- references (plain python)

def py_softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    total = sum(e)
    return [v / total for v in e]


def py_normalise(weights):
    total = sum(weights)
    return [w / total for w in weights]


def py_entropy(p):
    return -sum(v * math.log(v) for v in p if v > 0)


def ref_softmax(z):
    e = (z - z.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def ref_clip_probs(p_s, p_t, tau):
    weights = p_s * torch.clamp((p_t / p_s) ** (1.0 / tau), max=1.0)
    return weights / weights.sum(-1, keepdim=True)


def random_logits(*shape, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def hand_made_tensors():
    for z_s, z_t in HAND_MADE:
        yield torch.tensor(z_s, dtype=F64), torch.tensor(z_t, dtype=F64)


# ---------------------------------------------------------------- teacher

@pytest.mark.parametrize("z_s,z_t", HAND_MADE)
def test_teacher_target_is_teacher_log_softmax_on_hand_made(z_s, z_t):
    got = teacher_target(torch.tensor(z_t, dtype=F64), torch.tensor(z_s, dtype=F64))
    expected = [math.log(p) for p in py_softmax(z_t)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)


def test_teacher_target_ignores_student_and_any_parameter():
    z_t = random_logits(2, 4, 6, seed=1)
    a = aggregate(z_t, random_logits(2, 4, 6, seed=2), name="teacher", parameter=0.3)
    b = aggregate(z_t, random_logits(2, 4, 6, seed=3), name="teacher", parameter=7.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, ref_softmax(z_t).log(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- product

@pytest.mark.parametrize("z_s,z_t", HAND_MADE)
def test_product_tau2_is_normalised_geometric_mean_on_hand_made(z_s, z_t):
    got = product_target(torch.tensor(z_t, dtype=F64), torch.tensor(z_s, dtype=F64), tau=2.0)
    p_s, p_t = py_softmax(z_s), py_softmax(z_t)
    expected = py_normalise([math.sqrt(a * b) for a, b in zip(p_s, p_t)])
    torch.testing.assert_close(got.exp(), torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)


def test_product_tau2_is_normalised_geometric_mean_on_random():
    z_s, z_t = random_logits(3, 5, 11, seed=4), random_logits(3, 5, 11, seed=5)
    geo = (ref_softmax(z_s) * ref_softmax(z_t)).sqrt()
    expected = geo / geo.sum(-1, keepdim=True)
    torch.testing.assert_close(product_target(z_t, z_s, tau=2.0).exp(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tau", [0.25, 0.5, 1.0, 1.7, 3.0, 10.0])
def test_product_general_tau_matches_formula(tau):
    for z_s, z_t in hand_made_tensors():
        # p ∝ (p_S p_T)^(1/tau), written with plain python loops
        p_s, p_t = py_softmax(z_s.tolist()), py_softmax(z_t.tolist())
        expected = py_normalise([(a * b) ** (1.0 / tau) for a, b in zip(p_s, p_t)])
        got = product_target(z_t, z_s, tau=tau).exp()
        torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)
    z_s, z_t = random_logits(2, 3, 9, seed=6), random_logits(2, 3, 9, seed=7)
    weights = (ref_softmax(z_s) * ref_softmax(z_t)) ** (1.0 / tau)
    expected = weights / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(product_target(z_t, z_s, tau=tau).exp(), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- clip

@pytest.mark.parametrize("z_s,z_t", HAND_MADE)
def test_clip_tau1_is_proportional_to_min_of_student_and_teacher(z_s, z_t):
    got = clip_target(torch.tensor(z_t, dtype=F64), torch.tensor(z_s, dtype=F64), tau=1.0)
    expected = py_normalise([min(a, b) for a, b in zip(py_softmax(z_s), py_softmax(z_t))])
    torch.testing.assert_close(got.exp(), torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)


def test_clip_tau1_is_proportional_to_min_on_random():
    z_s, z_t = random_logits(2, 4, 13, seed=8), random_logits(2, 4, 13, seed=9)
    weights = torch.minimum(ref_softmax(z_s), ref_softmax(z_t))
    expected = weights / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(clip_target(z_t, z_s, tau=1.0).exp(), expected, rtol=0, atol=1e-12)


def test_clip_huge_tau_gives_student():
    z_s, z_t = random_logits(2, 4, 7, seed=10), random_logits(2, 4, 7, seed=11)
    got = clip_target(z_t, z_s, tau=1e6)
    # (t - s) / 1e6 is at most ~1e-5 here, so the target differs from s by about that much
    torch.testing.assert_close(got, ref_softmax(z_s).log(), rtol=0, atol=1e-4)
    for z_s1, z_t1 in hand_made_tensors():
        torch.testing.assert_close(clip_target(z_t1, z_s1, tau=1e6).exp(), ref_softmax(z_s1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 5.0, 100.0])
def test_clip_matches_min_ratio_reference(tau):
    z_s, z_t = random_logits(3, 4, 8, seed=12), random_logits(3, 4, 8, seed=13)
    expected = ref_clip_probs(ref_softmax(z_s), ref_softmax(z_t), tau)
    torch.testing.assert_close(clip_target(z_t, z_s, tau=tau).exp(), expected, rtol=0, atol=1e-12)
    for z_s1, z_t1 in hand_made_tensors():
        p_s, p_t = py_softmax(z_s1.tolist()), py_softmax(z_t1.tolist())
        ref = py_normalise([a * min(1.0, (b / a) ** (1.0 / tau)) for a, b in zip(p_s, p_t)])
        torch.testing.assert_close(clip_target(z_t1, z_s1, tau=tau).exp(), torch.tensor(ref, dtype=F64),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_clip_never_raises_a_token_more_than_the_renormalisation(tau):
    z_s, z_t = random_logits(4, 6, 10, seed=14), random_logits(4, 6, 10, seed=15)
    s = torch.log_softmax(z_s, -1)
    t = torch.log_softmax(z_t, -1)
    target = clip_target(z_t, z_s, tau=tau)
    # target = s + min(0, (t - s)/tau) - log Z with Z <= 1, so target - s <= -log Z, with
    # equality exactly where the teacher agrees with or exceeds the student.
    log_z = torch.logsumexp(s + torch.clamp((t - s) / tau, max=0.0), -1, keepdim=True)
    assert (log_z <= 1e-12).all()
    ratio = target - s
    assert (ratio <= -log_z + 1e-12).all()
    raised = t >= s
    torch.testing.assert_close(ratio[raised], (-log_z).expand_as(ratio)[raised], rtol=0, atol=1e-12)
    assert (ratio[~raised] < (-log_z).expand_as(ratio)[~raised]).all()


def test_clip_keeps_student_order_among_tokens_the_teacher_does_not_push_down():
    z_s, z_t = random_logits(3, 4, 10, seed=29), random_logits(3, 4, 10, seed=30)
    s, t = torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)
    target = clip_target(z_t, z_s, tau=2.0)
    kept = t >= s
    # on those tokens target - s is one constant per position
    diff = target - s
    spread = torch.where(kept, diff, -torch.inf).amax(-1) - torch.where(kept, diff, torch.inf).amin(-1)
    assert (spread[kept.any(-1)] < 1e-12).all()


def test_clip_renormalisation_can_lift_a_token_the_student_barely_considers():
    # Documents a caveat of the formula: when the teacher pushes down every token the student
    # likes, renormalisation (1/Z) lifts the rest, even one with p_S ~ 5e-14.
    z_s = torch.tensor([0.0, 0.0, -30.0], dtype=F64)
    z_t = torch.tensor([-5.0, -5.0, 10.0], dtype=F64)
    p_s, p_t = ref_softmax(z_s), ref_softmax(z_t)
    got = clip_target(z_t, z_s, tau=0.5).exp()
    torch.testing.assert_close(got, ref_clip_probs(p_s, p_t, 0.5), rtol=1e-10, atol=0)
    assert p_s[2] < 1e-12 and got[2] > 0.1


# ---------------------------------------------------------------- entropy / entropy_matched

def test_entropy_matches_plain_formula():
    for z_s, _ in HAND_MADE:
        got = entropy(torch.log_softmax(torch.tensor(z_s, dtype=F64), -1))
        assert got.item() == pytest.approx(py_entropy(py_softmax(z_s)), abs=1e-12)
    uniform = torch.log_softmax(torch.zeros(5, dtype=F64), -1)
    assert entropy(uniform).item() == pytest.approx(math.log(5), abs=1e-12)


def test_entropy_matched_target_has_student_entropy_on_random():
    z_s, z_t = random_logits(4, 8, 12, scale=1.5, seed=16), random_logits(4, 8, 12, scale=1.5, seed=17)
    target = entropy_matched_target(z_t, z_s)
    h_s = entropy(torch.log_softmax(z_s, -1))
    torch.testing.assert_close(entropy(target), h_s, rtol=0, atol=1e-3)


def test_entropy_matched_target_is_product_at_fitted_tau():
    z_s, z_t = random_logits(2, 3, 6, seed=18), random_logits(2, 3, 6, seed=19)
    fitted = entropy_matched_tau(z_t, z_s)
    expected = torch.log_softmax((z_s + z_t) / fitted.to(F64).unsqueeze(-1), -1)
    torch.testing.assert_close(entropy_matched_target(z_t, z_s), expected, rtol=0, atol=1e-12)


def test_entropy_matched_tau_matches_grid_search():
    z_s, z_t = random_logits(3, 5, 9, scale=1.5, seed=20), random_logits(3, 5, 9, scale=1.5, seed=21)
    fitted = entropy_matched_tau(z_t, z_s).to(F64)
    assert fitted.shape == (3, 5)

    log_taus = torch.linspace(math.log(1e-2), math.log(1e2), 4001, dtype=F64)
    summed = (z_s + z_t).unsqueeze(0)
    h_grid = entropy(torch.log_softmax(summed / log_taus.exp().view(-1, 1, 1, 1), -1))
    h_s = entropy(torch.log_softmax(z_s, -1))
    best = (h_grid - h_s).abs().argmin(0)
    grid_tau = log_taus.exp()[best]
    # grid spacing is ~0.23% in tau; allow a few spacings
    torch.testing.assert_close(fitted, grid_tau, rtol=1e-2, atol=0)


def test_entropy_matched_tau_stops_at_bracket_when_unreachable():
    # A uniform student has maximal entropy; a non-uniform sum can only reach it as tau -> inf,
    # so bisection ends at tau_max.
    z_s = torch.zeros(2, 4, dtype=F64)
    z_t = torch.tensor([[3.0, 0.0, 0.0, -1.0], [1.0, 2.0, 3.0, 4.0]], dtype=F64)
    fitted = entropy_matched_tau(z_t, z_s, tau_min=0.1, tau_max=50.0)
    torch.testing.assert_close(fitted.to(F64), torch.full((2,), 50.0, dtype=F64), rtol=1e-4, atol=0)


def test_entropy_matched_tau_is_one_when_teacher_is_uniform():
    # z_T constant => the sum is the student shifted, so tau = 1 reproduces its entropy exactly.
    z_s = random_logits(2, 3, 7, seed=22)
    z_t = torch.full_like(z_s, 0.7)
    torch.testing.assert_close(entropy_matched_tau(z_t, z_s).to(F64), torch.ones(2, 3, dtype=F64),
                               rtol=1e-4, atol=0)


# ---------------------------------------------------------------- parameters

def test_each_aggregation_declares_its_parameter():
    """tau is a temperature (product, clip), kl_bound a bound in nats (trust_region); teacher and
    entropy_matched have none."""
    declared = {name: aggregation.parameter for name, aggregation in AGGREGATIONS.items()}
    assert declared == {
        "teacher": None,
        "product": Parameter(name="tau", meaning="temperature", default=2.0),
        "clip": Parameter(name="tau", meaning="temperature", default=1.0),
        "entropy_matched": None,
        "trust_region": Parameter(name="kl_bound", meaning="bound on KL(target||student) per token, nats", default=0.1),
    }
    assert PARAMETER_NAMES == ("tau", "kl_bound")


def test_every_parameter_is_a_config_field_whose_default_is_the_registrys():
    """Each Parameter names an AggregationConfig field; the dataclass default is that of the aggregation
    selected by default (product) or the only one using it (trust_region), and ``aggregation=<name>``
    composes the registry's default (tests/tools/test_probe.py)."""
    from dataclasses import fields

    from sdharness.schema.method import AggregationConfig

    defaults = {field.name: field.default for field in fields(AggregationConfig)}
    assert set(PARAMETER_NAMES) <= set(defaults)
    assert defaults["tau"] == AGGREGATIONS[defaults["name"]].parameter.default
    assert defaults["kl_bound"] == AGGREGATIONS["trust_region"].parameter.default


def test_a_reference_takes_its_parameter_by_its_declared_name_only():
    z = random_logits(1, 2, 4, seed=29)
    with pytest.raises(TypeError):
        trust_region_target(z, z, tau=0.1)
    with pytest.raises(TypeError):
        teacher_target(z, z, tau=1.0)


# ---------------------------------------------------------------- aggregate dispatcher

@pytest.mark.parametrize("name", AGGREGATIONS)
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_every_aggregation_returns_normalised_log_probs_of_input_shape(name, tau):
    z_s, z_t = random_logits(2, 5, 7, seed=23), random_logits(2, 5, 7, seed=24)
    out = aggregate(z_t, z_s, name=name, parameter=tau)
    assert out.shape == (2, 5, 7)
    assert out.dtype == F64
    assert torch.isfinite(out).all()
    assert (out <= 1e-12).all()
    torch.testing.assert_close(torch.logsumexp(out, -1), torch.zeros(2, 5, dtype=F64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_aggregate_dispatches_to_the_named_function(name):
    """The parameter reaches each reference under its declared name (a wrong name is a TypeError)."""
    calls = {
        "teacher": lambda t, s: teacher_target(t, s),
        "product": lambda t, s: product_target(t, s, tau=1.5),
        "clip": lambda t, s: clip_target(t, s, tau=1.5),
        "entropy_matched": lambda t, s: entropy_matched_target(t, s),
        "trust_region": lambda t, s: trust_region_target(t, s, kl_bound=1.5),
    }
    z_s, z_t = random_logits(2, 3, 5, seed=25), random_logits(2, 3, 5, seed=26)
    torch.testing.assert_close(aggregate(z_t, z_s, name=name, parameter=1.5), calls[name](z_t, z_s), rtol=0, atol=0)


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_every_aggregation_is_invariant_to_logit_shifts(name):
    z_s, z_t = random_logits(2, 3, 6, seed=27), random_logits(2, 3, 6, seed=28)
    base = aggregate(z_t, z_s, name=name, parameter=1.5)
    shifted = aggregate(z_t + 4.0, z_s - 2.5, name=name, parameter=1.5)
    torch.testing.assert_close(shifted, base, rtol=0, atol=1e-5 if name == "entropy_matched" else 1e-12)


def test_unknown_aggregation_raises_value_error_listing_valid_names():
    z = torch.zeros(1, 1, 3, dtype=F64)
    with pytest.raises(ValueError) as info:
        aggregate(z, z, name="geometric", parameter=1.0)
    message = str(info.value)
    assert "geometric" in message
    for name in AGGREGATIONS:
        assert name in message


@pytest.mark.parametrize("name", [name for name, aggregation in AGGREGATIONS.items() if aggregation.fused])
@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_fused_form_equals_the_reference(name, tau):
    """The fused form (bits, rows shifted by arbitrary constants) gives the reference target."""
    from sdharness.distill.aggregation import LOG2E, ChunkBits

    z_s, z_t = random_logits(6, 11, seed=40), random_logits(6, 11, seed=41)
    shift_s, shift_t = torch.randn(6, 1, dtype=F64), torch.randn(6, 1, dtype=F64)
    s, t = z_s * LOG2E + shift_s, z_t * LOG2E + shift_t
    log_zs, log_zt = torch.logsumexp(s / LOG2E, -1, keepdim=True) * LOG2E, torch.logsumexp(t / LOG2E, -1, keepdim=True) * LOG2E
    aggregation = AGGREGATIONS[name]
    bits = aggregation.fused(ChunkBits(s, log_zs, z_t, t if aggregation.needs_teacher_bits else None,
                                       log_zt if aggregation.needs_teacher_bits else None,
                                       lambda name: torch.empty_like(s)),
                             torch.empty_like(s), tau)
    torch.testing.assert_close(torch.log_softmax(bits / LOG2E, -1), aggregate(z_t, z_s, name=name, parameter=tau),
                               rtol=0, atol=1e-12)
