import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sdharness.distill.aggregation import AGGREGATIONS, aggregate
from sdharness.distill.divergences import DIVERGENCES, divergence, forward_kl, jsd, reverse_kl
from sdharness.distill.losses import distillation_loss
from sdharness.methods.sft import masked_token_mean

F64 = torch.float64

# distillation_loss evaluates every chunk in float32 (it upcasts with .float(), which also
# downcasts float64 inputs), so comparisons against float64 references use float32-level
# tolerances; see test_distillation_loss_keeps_float64_precision for the strict version.
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-7)

HAND_MADE = [
    ([1.0, 0.0, -1.0], [0.0, 2.0, -0.5]),
    ([0.5, 0.5, 0.0], [3.0, -3.0, 0.0]),
    ([2.0, -1.0], [-1.0, 2.0]),
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
]


# ---------------------------------------------------------------- references

def random_logits(*shape, scale=2.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def random_mask(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) < 0.6
    mask[0, 0] = False  # at least one prompt/padding position
    mask[-1, -1] = True  # at least one loss position
    return mask


def py_softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def py_kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_forward_kl(target_logp, student_logp):
    return F.kl_div(student_logp, target_logp, reduction="none", log_target=True).sum(-1)


def ref_reverse_kl(target_logp, student_logp):
    return F.kl_div(target_logp, student_logp, reduction="none", log_target=True).sum(-1)


def ref_jsd(target_logp, student_logp, beta):
    p_t, p_s = target_logp.exp(), student_logp.exp()
    m = beta * p_t + (1 - beta) * p_s
    return beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)


def ref_divergence(target_logp, student_logp, name, beta):
    if name == "forward_kl":
        return ref_forward_kl(target_logp, student_logp)
    if name == "reverse_kl":
        return ref_reverse_kl(target_logp, student_logp)
    return ref_jsd(target_logp, student_logp, beta)


def ref_distillation(student_logits, teacher_logits, mask, *, aggregation, parameter, divergence_name, beta=0.5):
    # unchunked: aggregate -> divergence -> explicit mean over loss-carrying positions
    target = aggregate(teacher_logits, student_logits.detach(), name=aggregation, parameter=parameter).detach()
    per_position = ref_divergence(target, F.log_softmax(student_logits, -1), divergence_name, beta)
    selected = [per_position[b, i] for b in range(mask.shape[0]) for i in range(mask.shape[1]) if mask[b, i]]
    return torch.stack(selected).sum() / len(selected)


def make_inputs(batch=2, length=5, vocab=7, seed=0, dtype=F64):
    student = random_logits(batch, length, vocab, seed=seed, dtype=dtype).requires_grad_()
    teacher = random_logits(batch, length, vocab, seed=seed + 1000, dtype=dtype)
    return student, teacher, random_mask(batch, length, seed=seed)


# ---------------------------------------------------------------- divergences

@pytest.mark.parametrize("z_s,z_t", HAND_MADE)
def test_divergences_match_plain_python_on_hand_made(z_s, z_t):
    s = F.log_softmax(torch.tensor(z_s, dtype=F64), -1)
    t = F.log_softmax(torch.tensor(z_t, dtype=F64), -1)
    p_s, p_t = py_softmax(z_s), py_softmax(z_t)
    assert forward_kl(t, s).item() == pytest.approx(py_kl(p_t, p_s), abs=1e-12)
    assert reverse_kl(t, s).item() == pytest.approx(py_kl(p_s, p_t), abs=1e-12)
    for beta in (0.1, 0.5, 0.9):
        m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
        expected = beta * py_kl(p_t, m) + (1 - beta) * py_kl(p_s, m)
        assert jsd(t, s, beta=beta).item() == pytest.approx(expected, abs=1e-12)


def test_forward_and_reverse_kl_match_torch_kl_div_on_random():
    s = F.log_softmax(random_logits(3, 4, 11, seed=1), -1)
    t = F.log_softmax(random_logits(3, 4, 11, seed=2), -1)
    torch.testing.assert_close(forward_kl(t, s), ref_forward_kl(t, s), rtol=0, atol=1e-12)
    torch.testing.assert_close(reverse_kl(t, s), ref_reverse_kl(t, s), rtol=0, atol=1e-12)
    assert forward_kl(t, s).shape == (3, 4)


@pytest.mark.parametrize("beta", [0.05, 0.3, 0.5, 0.7, 0.95])
def test_jsd_matches_explicit_mixture_formula_on_random(beta):
    s = F.log_softmax(random_logits(3, 4, 11, seed=3), -1)
    t = F.log_softmax(random_logits(3, 4, 11, seed=4), -1)
    torch.testing.assert_close(jsd(t, s, beta=beta), ref_jsd(t, s, beta), rtol=0, atol=1e-12)


def test_jsd_is_symmetric_at_half_and_swaps_beta_otherwise():
    s = F.log_softmax(random_logits(3, 4, 9, seed=5), -1)
    t = F.log_softmax(random_logits(3, 4, 9, seed=6), -1)
    torch.testing.assert_close(jsd(t, s, beta=0.5), jsd(s, t, beta=0.5), rtol=0, atol=1e-12)
    torch.testing.assert_close(jsd(t, s, beta=0.2), jsd(s, t, beta=0.8), rtol=0, atol=1e-12)


def test_jsd_is_bounded_by_the_entropy_of_beta():
    # disjoint-ish supports approach the bound H(beta); it is never exceeded
    s = F.log_softmax(random_logits(4, 5, 6, scale=8.0, seed=7), -1)
    t = F.log_softmax(random_logits(4, 5, 6, scale=8.0, seed=8), -1)
    for beta in (0.2, 0.5):
        bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
        assert (jsd(t, s, beta=beta) <= bound + 1e-12).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergences_are_zero_when_target_equals_student_and_positive_otherwise(name):
    s = F.log_softmax(random_logits(3, 4, 8, seed=9), -1)
    t = F.log_softmax(random_logits(3, 4, 8, seed=10), -1)
    torch.testing.assert_close(divergence(s, s, name=name), torch.zeros(3, 4, dtype=F64), rtol=0, atol=1e-14)
    assert (divergence(t, s, name=name) > 0).all()


def test_forward_kl_ignores_zero_probability_target_tokens():
    target = torch.tensor([[0.0, 0.0, float("-inf")]], dtype=F64) - math.log(2)
    student_logits = torch.tensor([[0.3, -0.2, 1.0]], dtype=F64, requires_grad=True)
    student = F.log_softmax(student_logits, -1)
    value = forward_kl(target, student)
    p_s = py_softmax([0.3, -0.2, 1.0])
    expected = 0.5 * math.log(0.5 / p_s[0]) + 0.5 * math.log(0.5 / p_s[1])
    assert value.item() == pytest.approx(expected, abs=1e-12)
    value.sum().backward()
    assert torch.isfinite(student_logits.grad).all()
    expected_grad = torch.tensor([p_s], dtype=F64) - torch.tensor([[0.5, 0.5, 0.0]], dtype=F64)
    torch.testing.assert_close(student_logits.grad, expected_grad, rtol=0, atol=1e-12)


def test_forward_kl_gradient_wrt_student_logits_is_p_s_minus_p_t():
    z_s = random_logits(2, 3, 6, seed=11).requires_grad_()
    z_t = random_logits(2, 3, 6, seed=12)
    forward_kl(F.log_softmax(z_t, -1), F.log_softmax(z_s, -1)).sum().backward()
    expected = torch.softmax(z_s.detach(), -1) - torch.softmax(z_t, -1)
    torch.testing.assert_close(z_s.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_dispatches_by_name_and_passes_beta(name):
    s = F.log_softmax(random_logits(2, 3, 5, seed=13), -1)
    t = F.log_softmax(random_logits(2, 3, 5, seed=14), -1)
    torch.testing.assert_close(divergence(t, s, name=name, beta=0.3), ref_divergence(t, s, name, 0.3),
                               rtol=0, atol=1e-12)


def test_unknown_divergence_raises_value_error_listing_valid_names():
    x = F.log_softmax(torch.zeros(1, 3, dtype=F64), -1)
    with pytest.raises(ValueError) as info:
        divergence(x, x, name="kl")
    for name in DIVERGENCES:
        assert name in str(info.value)


# ---------------------------------------------------------------- distillation_loss

@pytest.mark.parametrize("aggregation,divergence_name", list(itertools.product(AGGREGATIONS, DIVERGENCES)))
def test_distillation_loss_matches_unchunked_reference_for_every_chunk_size(aggregation, divergence_name):
    student, teacher, mask = make_inputs(seed=20)
    ref_student = student.detach().clone().requires_grad_()
    ref = ref_distillation(ref_student, teacher, mask, aggregation=aggregation, parameter=1.7,
                           divergence_name=divergence_name, beta=0.3)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    for chunk_size in (1, 3, 7, 1024):
        student.grad = None
        out = distillation_loss(student, teacher, mask, aggregation=aggregation, parameter=1.7,
                                divergence_name=divergence_name, beta=0.3, chunk_size=chunk_size)
        assert out.tokens == int(mask.sum())
        torch.testing.assert_close(out.loss.to(F64), ref.detach(), **LOSS_TOL)
        out.loss.backward()
        assert student.grad.dtype == F64
        torch.testing.assert_close(student.grad, ref_grad, **GRAD_TOL)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_distillation_loss_does_not_depend_on_chunk_size(aggregation):
    student, teacher, mask = make_inputs(batch=2, length=6, vocab=9, seed=21, dtype=torch.float32)
    results = []
    for chunk_size in (1, 4, 1024):
        student.grad = None
        out = distillation_loss(student, teacher, mask, aggregation=aggregation, parameter=2.0,
                                divergence_name="jsd", chunk_size=chunk_size)
        out.loss.backward()
        results.append((out.loss.detach(), out.teacher_student_kl, student.grad.clone()))
    for loss, kl, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(kl, results[0][1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][2], rtol=1e-6, atol=1e-8)


def test_forward_kl_teacher_gradient_is_probability_difference_over_tokens():
    student, teacher, mask = make_inputs(batch=3, length=4, vocab=5, seed=22)
    out = distillation_loss(student, teacher, mask, aggregation="teacher", parameter=1.0,
                            divergence_name="forward_kl", chunk_size=3)
    out.loss.backward()
    n_tokens = int(mask.sum())
    expected = (torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)) / n_tokens
    torch.testing.assert_close(student.grad[mask], expected[mask], **GRAD_TOL)
    assert (student.grad[~mask] == 0).all()


@pytest.mark.parametrize("aggregation,divergence_name", [(a, "jsd") for a in AGGREGATIONS]
                         + [("product", "forward_kl"), ("product", "reverse_kl")])
def test_masked_positions_do_not_affect_loss(aggregation, divergence_name):
    student, teacher, mask = make_inputs(seed=23)
    kwargs = dict(aggregation=aggregation, parameter=1.3, divergence_name=divergence_name, chunk_size=3)
    base = distillation_loss(student, teacher, mask, **kwargs)
    base.loss.backward()
    base_grad = student.grad.clone()

    noise = random_logits(*student.shape, scale=50.0, seed=24)
    changed_student = torch.where(mask.unsqueeze(-1), student.detach(), noise).requires_grad_()
    changed_teacher = torch.where(mask.unsqueeze(-1), teacher, -noise)
    changed = distillation_loss(changed_student, changed_teacher, mask, **kwargs)
    changed.loss.backward()
    assert changed.loss.item() == base.loss.item()
    assert changed.teacher_student_kl.item() == base.teacher_student_kl.item()
    torch.testing.assert_close(changed_student.grad, base_grad, rtol=0, atol=0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_teacher_logits_receive_no_gradient(aggregation):
    student, teacher, mask = make_inputs(seed=25)
    teacher.requires_grad_()
    out = distillation_loss(student, teacher, mask, aggregation=aggregation, parameter=1.5,
                            divergence_name="reverse_kl")
    (out.loss + out.teacher_student_kl).backward()
    assert teacher.grad is None or (teacher.grad == 0).all()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_all_false_mask_gives_zero_loss_that_still_backpropagates():
    student, teacher, _ = make_inputs(seed=26)
    mask = torch.zeros(student.shape[:2], dtype=torch.bool)
    out = distillation_loss(student, teacher, mask, aggregation="product", parameter=2.0, divergence_name="jsd")
    assert out.tokens == 0
    assert out.loss.item() == 0.0
    assert out.teacher_student_kl.item() == 0.0
    assert out.loss.requires_grad
    out.loss.backward()
    assert student.grad is not None
    assert (student.grad == 0).all()


@pytest.mark.parametrize("aggregation,divergence_name", [("product", "jsd"), ("clip", "reverse_kl"),
                                                         ("teacher", "forward_kl")])
def test_teacher_student_kl_is_masked_mean_of_kl_teacher_to_student(aggregation, divergence_name):
    student, teacher, mask = make_inputs(batch=3, length=4, vocab=6, seed=27)
    out = distillation_loss(student, teacher, mask, aggregation=aggregation, parameter=0.8,
                            divergence_name=divergence_name, chunk_size=2)
    per_position = ref_forward_kl(F.log_softmax(teacher, -1), F.log_softmax(student.detach(), -1))
    expected = per_position[mask].mean()
    torch.testing.assert_close(out.teacher_student_kl.to(F64), expected, **LOSS_TOL)
    assert not out.teacher_student_kl.requires_grad


def test_loss_is_float32_and_gradient_keeps_student_dtype():
    student, teacher, mask = make_inputs(seed=28, dtype=torch.bfloat16)
    out = distillation_loss(student, teacher, mask, aggregation="clip", parameter=1.0, divergence_name="forward_kl")
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert student.grad.dtype == torch.bfloat16
    assert (student.grad[~mask] == 0).all()


def test_distillation_loss_handles_non_contiguous_logits():
    student, teacher, mask = make_inputs(batch=2, length=4, vocab=5, seed=29)
    student_t = student.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    teacher_t = teacher.transpose(0, 1).contiguous().transpose(0, 1)
    assert not student_t.is_contiguous()
    kwargs = dict(aggregation="product", parameter=2.0, divergence_name="forward_kl", chunk_size=2)
    expected = distillation_loss(student, teacher, mask, **kwargs)
    expected.loss.backward()
    got = distillation_loss(student_t, teacher_t, mask, **kwargs)
    got.loss.backward()
    assert got.loss.item() == expected.loss.item()
    torch.testing.assert_close(student_t.grad, student.grad, rtol=0, atol=0)


def test_distillation_loss_without_student_grad_still_evaluates():
    student, teacher, mask = make_inputs(seed=30)
    with_grad = distillation_loss(student, teacher, mask, aggregation="clip", parameter=1.0, divergence_name="jsd")
    no_grad = distillation_loss(student.detach(), teacher, mask, aggregation="clip", parameter=1.0,
                                divergence_name="jsd")
    assert not no_grad.loss.requires_grad
    assert no_grad.loss.item() == with_grad.loss.item()


def test_gradient_scales_with_upstream_gradient():
    student, teacher, mask = make_inputs(seed=31)
    kwargs = dict(aggregation="teacher", parameter=1.0, divergence_name="forward_kl")
    distillation_loss(student, teacher, mask, **kwargs).loss.backward()
    once = student.grad.clone()
    student.grad = None
    (3.0 * distillation_loss(student, teacher, mask, **kwargs).loss).backward()
    torch.testing.assert_close(student.grad, 3.0 * once, rtol=1e-12, atol=0)


def test_mismatched_logit_shapes_raise_value_error():
    student = torch.zeros(2, 3, 5, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for teacher in (torch.zeros(2, 3, 6), torch.zeros(2, 4, 5), torch.zeros(3, 5)):
        with pytest.raises(ValueError, match="same shape"):
            distillation_loss(student, teacher, mask, aggregation="teacher", parameter=1.0,
                              divergence_name="forward_kl")


def test_unknown_names_raise_value_error_in_distillation_loss():
    student, teacher, mask = make_inputs(seed=32)
    with pytest.raises(ValueError, match="forward_kl"):
        distillation_loss(student, teacher, mask, aggregation="teacher", parameter=1.0, divergence_name="tvd")
    with pytest.raises(ValueError, match="entropy_matched"):
        distillation_loss(student, teacher, mask, aggregation="mix", parameter=1.0, divergence_name="jsd")


# ---------------------------------------------------------------- precision and input checks

def test_distillation_loss_keeps_float64_precision():
    student, teacher, mask = make_inputs(seed=40)
    ref_student = student.detach().clone().requires_grad_()
    ref = ref_distillation(ref_student, teacher, mask, aggregation="product", parameter=2.0,
                           divergence_name="forward_kl")
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    out = distillation_loss(student, teacher, mask, aggregation="product", parameter=2.0, divergence_name="forward_kl")
    out.loss.backward()
    torch.testing.assert_close(out.loss.to(F64), ref.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(student.grad, ref_grad, rtol=0, atol=1e-10)


def test_mask_shape_mismatch_raises_value_error():
    student, teacher, mask = make_inputs(batch=2, length=5, vocab=4, seed=41)
    with pytest.raises(ValueError, match="loss_mask"):
        distillation_loss(student, teacher, mask[:, :-1], aggregation="teacher", parameter=1.0,
                          divergence_name="forward_kl")


def test_teacher_requiring_grad_does_not_attach_the_loss_to_it():
    student, teacher, mask = make_inputs(seed=42)
    teacher.requires_grad_()
    out = distillation_loss(student.detach(), teacher, mask, aggregation="teacher", parameter=1.0,
                            divergence_name="forward_kl")
    assert not out.loss.requires_grad  # the target is detached by definition
    assert teacher.grad is None


# ---------------------------------------------------------------- masked_token_mean

def test_masked_token_mean_averages_selected_positions():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert masked_token_mean(values, mask).item() == pytest.approx((1.0 + 3.0 + 6.0) / 3, abs=1e-15)
    assert masked_token_mean(values, torch.ones_like(mask)).item() == pytest.approx(3.5, abs=1e-15)
    assert masked_token_mean(values, mask.to(torch.int64)).item() == pytest.approx(10.0 / 3, abs=1e-15)
    assert masked_token_mean(values, mask.to(torch.float32)).item() == pytest.approx(10.0 / 3, abs=1e-15)


def test_masked_token_mean_is_zero_without_selected_positions():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64, requires_grad=True)
    out = masked_token_mean(values, torch.zeros(2, 2, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert (values.grad == 0).all()


def test_masked_token_mean_gradient_only_reaches_selected_positions():
    values = random_logits(3, 4, seed=50).requires_grad_()
    mask = random_mask(3, 4, seed=51)
    masked_token_mean(values, mask).backward()
    expected = mask.to(F64) / mask.sum()
    torch.testing.assert_close(values.grad, expected, rtol=0, atol=1e-15)


def test_lazy_teacher_logits_give_the_same_loss_and_gradient():
    from sdharness.distill.logits import LazyLogits

    g = torch.Generator().manual_seed(50)
    hidden = torch.randn(2, 5, 6, generator=g, dtype=F64)
    head = torch.nn.Linear(6, 11, bias=False).double()
    student, _, mask = make_inputs(batch=2, length=5, vocab=11, seed=51)
    lazy = LazyLogits(hidden, head)
    with torch.no_grad():
        dense = head(hidden)
    torch.testing.assert_close(lazy.materialize(), dense)
    results = []
    for teacher in (lazy, dense):
        leaf = student.detach().clone().requires_grad_()
        out = distillation_loss(leaf, teacher, mask, aggregation="clip", parameter=0.5, divergence_name="jsd", chunk_size=3)
        out.loss.backward()
        results.append((out.loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-12)
    assert head.weight.grad is None


# ---------------------------------------------------------------- token weights (importance weighting)

def _loss_and_grad(student, teacher, mask, **kwargs):
    leaf = student.detach().clone().requires_grad_()
    out = distillation_loss(leaf, teacher, mask, aggregation="clip", parameter=0.7, divergence_name="jsd", chunk_size=3,
                            **kwargs)
    out.loss.backward()
    return out, leaf.grad


def test_token_weights_of_ones_change_nothing():
    student, teacher, mask = make_inputs(seed=60)
    base, base_grad = _loss_and_grad(student, teacher, mask)
    ones, ones_grad = _loss_and_grad(student, teacher, mask, token_weights=torch.ones(mask.shape, dtype=F64))
    assert ones.loss.item() == base.loss.item() and ones.tokens == base.tokens
    torch.testing.assert_close(ones_grad, base_grad, rtol=0, atol=0)


def test_zero_token_weight_equals_masking_out_except_for_the_token_count():
    student, teacher, mask = make_inputs(seed=61)
    dropped = mask.reshape(-1).nonzero()[1].item()
    weights = torch.ones(mask.shape, dtype=F64)
    weights.view(-1)[dropped] = 0.0
    weighted, weighted_grad = _loss_and_grad(student, teacher, mask, token_weights=weights)
    fewer = mask.clone()
    fewer.view(-1)[dropped] = False
    masked, masked_grad = _loss_and_grad(student, teacher, fewer)
    scale = masked.tokens / weighted.tokens  # the weighted mean still divides by every loss token
    assert weighted.tokens == masked.tokens + 1
    torch.testing.assert_close(weighted.loss, masked.loss * scale, rtol=1e-12, atol=0)
    torch.testing.assert_close(weighted_grad, masked_grad * scale, rtol=1e-12, atol=1e-15)
    assert weighted.teacher_student_kl.item() > 0  # monitoring stays unweighted


def test_token_weights_scale_each_position_against_the_reference():
    student, teacher, mask = make_inputs(seed=62)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(63), dtype=F64) * 2
    out, grad = _loss_and_grad(student, teacher, mask, token_weights=weights)
    leaf = student.detach().clone().requires_grad_()
    target = aggregate(teacher, leaf.detach(), name="clip", parameter=0.7)
    per_position = ref_divergence(target, F.log_softmax(leaf, -1), "jsd", 0.5)
    ref = (per_position * weights)[mask].sum() / mask.sum()
    ref.backward()
    torch.testing.assert_close(out.loss.to(F64), ref.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="token_weights"):
        distillation_loss(student, teacher, mask, aggregation="clip", parameter=0.7, divergence_name="jsd",
                          token_weights=weights[:, :-1])


# ---------------------------------------------------------------- fast paths: monitoring off, consecutive rows, teacher blocks

@pytest.mark.parametrize("aggregation,divergence_name", list(itertools.product(AGGREGATIONS, DIVERGENCES)))
def test_monitoring_kl_off_gives_identical_loss_and_gradient(aggregation, divergence_name):
    student, teacher, mask = make_inputs(batch=2, length=6, vocab=9, seed=70, dtype=torch.float32)
    results = []
    for monitor in (True, False):
        leaf = student.detach().clone().requires_grad_()
        out = distillation_loss(leaf, teacher, mask, aggregation=aggregation, parameter=1.5, divergence_name=divergence_name,
                                chunk_size=3, monitor_kl=monitor)
        out.loss.backward()
        results.append((out, leaf.grad))
    (on, on_grad), (off, off_grad) = results
    assert off.teacher_student_kl is None and on.teacher_student_kl is not None
    assert off.tokens == on.tokens
    assert off.loss.item() == on.loss.item()
    torch.testing.assert_close(off_grad, on_grad, rtol=0, atol=0)


def test_monitoring_kl_off_with_an_empty_mask():
    student, teacher, _ = make_inputs(seed=71)
    out = distillation_loss(student, teacher, torch.zeros(student.shape[:2], dtype=torch.bool), aggregation="product",
                            parameter=2.0, divergence_name="forward_kl", monitor_kl=False)
    assert out.tokens == 0 and out.teacher_student_kl is None and out.loss.item() == 0.0


@pytest.mark.parametrize("aggregation,divergence_name", list(itertools.product(AGGREGATIONS, DIVERGENCES)))
@pytest.mark.parametrize("mask_kind", ["all", "tail", "holes"])
def test_lazy_teacher_in_blocks_matches_reference(monkeypatch, aggregation, divergence_name, mask_kind):
    """Consecutive loss positions are read as views (the gradient written in place), the teacher is
    projected in blocks of several chunks into one reused buffer; none of it changes the result."""
    from sdharness.distill import losses
    from sdharness.distill.logits import LazyLogits

    monkeypatch.setattr(losses, "TEACHER_BLOCK_ROWS", 4)
    g = torch.Generator().manual_seed(72)
    batch, length, hidden_size, vocab = 2, 9, 5, 13
    hidden = torch.randn(batch, length, hidden_size, generator=g, dtype=F64)
    head = torch.nn.Linear(hidden_size, vocab, bias=True).double()
    student = random_logits(batch, length, vocab, seed=73)
    mask = {"all": torch.ones(batch, length, dtype=torch.bool),
            "tail": torch.arange(length).expand(batch, length) >= torch.tensor([[2], [5]]),
            "holes": random_mask(batch, length, seed=74)}[mask_kind]
    with torch.no_grad():
        dense = head(hidden)
    ref_student = student.detach().clone().requires_grad_()
    ref = ref_distillation(ref_student, dense, mask, aggregation=aggregation, parameter=1.3,
                           divergence_name=divergence_name, beta=0.4)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    ref_kl = ref_forward_kl(F.log_softmax(dense, -1), F.log_softmax(student, -1))[mask].mean()
    # entropy_matched bisects on tau (30 halvings), from log-probabilities here, from logits in the reference
    atol = 1e-6 if aggregation == "entropy_matched" else 1e-10
    for chunk_size in (1, 3, 4, 7):
        leaf = student.detach().clone().requires_grad_()
        out = distillation_loss(leaf, LazyLogits(hidden, head), mask, aggregation=aggregation, parameter=1.3,
                                divergence_name=divergence_name, beta=0.4, chunk_size=chunk_size)
        out.loss.backward()
        torch.testing.assert_close(out.loss, ref.detach(), rtol=0, atol=atol)
        torch.testing.assert_close(out.teacher_student_kl, ref_kl, rtol=0, atol=1e-10)
        torch.testing.assert_close(leaf.grad, ref_grad, rtol=0, atol=atol)
    assert head.weight.grad is None


def test_consecutive_rows_with_half_precision_student_gradient():
    """A bfloat16 student cannot take the float32 gradient in place: its rows are copied in."""
    student, teacher, _ = make_inputs(batch=2, length=5, vocab=7, seed=75, dtype=torch.bfloat16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out = distillation_loss(student, teacher, mask, aggregation="product", parameter=2.0, divergence_name="forward_kl",
                            chunk_size=4)
    out.loss.backward()
    ref_student = student.detach().to(F64).requires_grad_()
    ref = ref_distillation(ref_student, teacher.to(F64), mask, aggregation="product", parameter=2.0,
                           divergence_name="forward_kl")
    ref.backward()
    assert student.grad.dtype == torch.bfloat16 and (student.grad[~mask] == 0).all()
    torch.testing.assert_close(out.loss.to(F64), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.to(F64), ref_student.grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_lazy_logits_rows_into_a_buffer_equal_the_head(softcap):
    from sdharness.distill.logits import LazyLogits

    g = torch.Generator().manual_seed(76)
    hidden = torch.randn(2, 4, 6, generator=g)
    head = torch.nn.Linear(6, 11, bias=True)
    lazy = LazyLogits(hidden, head, softcap)
    index = torch.tensor([1, 2, 6])
    buffer = torch.empty(3, 11)
    fresh = lazy.rows(index, out=buffer)  # the head's weights require grad: no buffer under autograd
    assert fresh.requires_grad and fresh.data_ptr() != buffer.data_ptr()
    with torch.no_grad():
        into = lazy.rows(index, out=buffer)
        assert into.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(into, fresh.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lazy.rows(slice(2, 5), out=buffer), lazy.rows(torch.arange(2, 5)),
                                   rtol=1e-6, atol=1e-6)
        other = lazy.rows(index, out=torch.empty(3, 11, dtype=F64))  # a buffer it cannot use: a fresh tensor
        assert other.dtype == torch.float32
        torch.testing.assert_close(other, fresh.detach(), rtol=0, atol=0)
