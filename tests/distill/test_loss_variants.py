"""The loss variants of sdharness/distill/variants.py against float64 references: top-k + tail
support, the sampled-token estimator (its mean gradient by enumeration), per-entry clipping."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sdharness.distill.aggregation import AGGREGATIONS, aggregate
from sdharness.distill.divergences import DIVERGENCES, reverse_kl
from sdharness.distill.losses import distillation_loss
from sdharness.distill.variants import entry_clip_reference, topk_buckets, topk_reference
from tests.distill.test_losses import make_inputs

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-10)


def ref_topk(student, teacher, mask, *, aggregation, parameter, name, top_k, topk_from, beta=0.5):
    target = aggregate(teacher, student.detach(), name=aggregation, parameter=parameter).detach()
    index = (teacher if topk_from == "teacher" else student.detach()).topk(top_k, dim=-1).indices
    per_position = topk_reference(target, F.log_softmax(student, -1), index, name=name, beta=beta)
    return per_position[mask].sum() / mask.sum()


def chunked(student, teacher, mask, **kwargs):
    leaf = student.detach().clone().requires_grad_()
    out = distillation_loss(leaf, teacher, mask, **kwargs)
    out.loss.backward()
    return out, leaf.grad


# ---------------------------------------------------------------- top-k + tail

def test_topk_buckets_hold_the_top_entries_and_the_rest_of_the_mass():
    logp = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=F64))
    buckets = topk_buckets(logp, torch.tensor([1, 3]))
    torch.testing.assert_close(buckets.exp(), torch.tensor([0.4, 0.3, 0.3], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("aggregation,divergence_name", list(itertools.product(AGGREGATIONS, DIVERGENCES)))
@pytest.mark.parametrize("topk_from", ["teacher", "student"])
def test_topk_support_matches_the_float64_reference(aggregation, divergence_name, topk_from):
    student, teacher, mask = make_inputs(batch=2, length=5, vocab=11, seed=80)
    ref_student = student.detach().clone().requires_grad_()
    ref = ref_topk(ref_student, teacher, mask, aggregation=aggregation, parameter=1.3, name=divergence_name, top_k=4,
                   topk_from=topk_from, beta=0.3)
    ref.backward()
    atol = 1e-6 if aggregation == "entropy_matched" else 1e-10  # bisection from bits vs from logits
    for chunk_size in (1, 3, 32):
        out, grad = chunked(student, teacher, mask, aggregation=aggregation, parameter=1.3, divergence_name=divergence_name,
                            beta=0.3, chunk_size=chunk_size, support="topk", top_k=4, topk_from=topk_from)
        torch.testing.assert_close(out.loss, ref.detach(), rtol=0, atol=atol)
        torch.testing.assert_close(grad, ref_student.grad, rtol=0, atol=atol)
        assert (grad[~mask] == 0).all()


def test_topk_is_a_lower_bound_and_equals_the_full_loss_when_k_covers_the_vocabulary():
    student, teacher, mask = make_inputs(batch=2, length=5, vocab=9, seed=81)
    kwargs = dict(aggregation="product", parameter=2.0, divergence_name="forward_kl")
    full, full_grad = chunked(student, teacher, mask, **kwargs)
    every, every_grad = chunked(student, teacher, mask, support="topk", top_k=50, **kwargs)  # k clipped to the vocab
    torch.testing.assert_close(every.loss, full.loss, **TOL)
    torch.testing.assert_close(every_grad, full_grad, **TOL)
    few, _ = chunked(student, teacher, mask, support="topk", top_k=2, **kwargs)
    assert 0 < few.loss.item() < full.loss.item()


@pytest.mark.parametrize("divergence_name", list(DIVERGENCES))
def test_topk_with_neg_inf_logits_is_finite_and_matches_the_reference(divergence_name):
    student, teacher, mask = make_inputs(batch=2, length=4, vocab=8, seed=82)
    masked = torch.zeros(8, dtype=torch.bool)
    masked[[2, 5]] = True  # both sides mask two entries: they sit in the tail with probability 0
    student = student.detach().masked_fill(masked, -math.inf)
    teacher = teacher.masked_fill(masked, -math.inf)
    ref_student = student.clone().requires_grad_()
    ref = ref_topk(ref_student, teacher, mask, aggregation="teacher", parameter=1.0, name=divergence_name, top_k=3,
                   topk_from="teacher")
    ref.backward()
    out, grad = chunked(student, teacher, mask, aggregation="teacher", parameter=1.0, divergence_name=divergence_name,
                        support="topk", top_k=3, monitor_kl=True)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(out.loss, ref.detach(), **TOL)
    torch.testing.assert_close(grad, ref_student.grad.nan_to_num(0.0), **TOL)
    assert (grad[..., masked] == 0).all()
    # k = the 6 finite entries: the tail is empty on both sides and takes no gradient
    six, six_grad = chunked(student, teacher, mask, aggregation="teacher", parameter=1.0, divergence_name=divergence_name,
                            support="topk", top_k=6)
    full, full_grad = chunked(student, teacher, mask, aggregation="teacher", parameter=1.0, divergence_name=divergence_name)
    torch.testing.assert_close(six.loss, full.loss, **TOL)
    torch.testing.assert_close(six_grad, full_grad, **TOL)


def test_topk_monitoring_is_the_full_vocabulary_one():
    student, teacher, mask = make_inputs(batch=2, length=5, vocab=9, seed=83)
    kwargs = dict(aggregation="clip", parameter=1.0, divergence_name="forward_kl", chunk_size=3)
    full, _ = chunked(student, teacher, mask, **kwargs)
    topk, _ = chunked(student, teacher, mask, support="topk", top_k=2, **kwargs)
    torch.testing.assert_close(topk.teacher_student_kl, full.teacher_student_kl, **TOL)
    for name, value in full.diagnostics.items():
        torch.testing.assert_close(topk.diagnostics[name], value, **TOL)


# ---------------------------------------------------------------- sampled token

@pytest.mark.parametrize("aggregation", ["teacher", "product", "clip", "entropy_matched"])
def test_sampled_token_gradient_in_expectation_is_the_reverse_kl_gradient(aggregation):
    """Enumerate every token of a 6-token vocabulary at one position: the p_S-weighted mean of the
    estimator's gradients and values is the reverse KL's gradient and value."""
    vocab = 6
    g = torch.Generator().manual_seed(84)
    z_s, z_t = torch.randn(vocab, generator=g, dtype=F64) * 2, torch.randn(vocab, generator=g, dtype=F64) * 2
    p_s = torch.softmax(z_s, -1)
    # row v samples token v; weighting row v by p_S(v) * vocab undoes the token mean's 1 / vocab
    student = z_s.expand(1, vocab, vocab).clone().requires_grad_()
    teacher = z_t.expand(1, vocab, vocab)
    out = distillation_loss(student, teacher, torch.ones(1, vocab, dtype=torch.bool), aggregation=aggregation,
                            parameter=1.5, divergence_name="reverse_kl", support="sampled",
                            sampled_tokens=torch.arange(vocab).unsqueeze(0), token_weights=(p_s * vocab).unsqueeze(0))
    out.loss.backward()
    leaf = z_s.clone().requires_grad_()
    target = aggregate(z_t, leaf.detach(), name=aggregation, parameter=1.5)
    expected = reverse_kl(target, F.log_softmax(leaf, -1))
    expected.backward()
    torch.testing.assert_close(out.loss, expected.detach(), rtol=0, atol=1e-6 if aggregation == "entropy_matched" else 1e-12)
    torch.testing.assert_close(student.grad.sum((0, 1)), leaf.grad, rtol=0, atol=1e-12)


def test_sampled_token_matches_the_surrogate_reference_per_token():
    from sdharness.distill.variants import sampled_reference

    student, teacher, mask = make_inputs(batch=2, length=5, vocab=7, seed=85)
    tokens = torch.randint(7, mask.shape, generator=torch.Generator().manual_seed(86))
    leaf = student.detach().clone().requires_grad_()
    target = aggregate(teacher, leaf.detach(), name="product", parameter=2.0)
    student_logp = F.log_softmax(leaf, -1)
    (sampled_reference(target, student_logp, tokens)[mask].sum() / mask.sum()).backward()
    estimate = (student_logp - target).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    for chunk_size in (1, 4):
        out, grad = chunked(student, teacher, mask, aggregation="product", parameter=2.0, divergence_name="reverse_kl",
                            chunk_size=chunk_size, support="sampled", sampled_tokens=tokens)
        torch.testing.assert_close(out.loss, estimate[mask].mean().detach(), **TOL)
        torch.testing.assert_close(grad, leaf.grad, **TOL)


def test_sampled_token_with_masked_entries_other_than_the_token_is_finite():
    student, teacher, mask = make_inputs(batch=1, length=3, vocab=5, seed=87)
    student, teacher = student.detach().clone(), teacher.clone()
    student[..., 4], teacher[..., 4] = -math.inf, -math.inf
    out, grad = chunked(student, teacher, mask, aggregation="clip", parameter=1.0, divergence_name="reverse_kl",
                        support="sampled", sampled_tokens=torch.zeros(mask.shape, dtype=torch.long))
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and (grad[..., 4] == 0).all()


def test_sampled_support_refuses_other_divergences_and_missing_tokens():
    student, teacher, mask = make_inputs(seed=88)
    with pytest.raises(ValueError, match="loss.divergence=reverse_kl"):
        distillation_loss(student, teacher, mask, aggregation="teacher", parameter=1.0, divergence_name="forward_kl",
                          support="sampled", sampled_tokens=torch.zeros(mask.shape, dtype=torch.long))
    with pytest.raises(ValueError, match="sampled tokens"):
        distillation_loss(student, teacher, mask, aggregation="teacher", parameter=1.0, divergence_name="reverse_kl",
                          support="sampled")


# ---------------------------------------------------------------- per-entry clipping

@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
@pytest.mark.parametrize("clip", [0.01, 0.05, 10.0])
def test_entry_clip_matches_the_float64_reference(aggregation, clip):
    student, teacher, mask = make_inputs(batch=2, length=5, vocab=9, seed=89)
    leaf = student.detach().clone().requires_grad_()
    target = aggregate(teacher, leaf.detach(), name=aggregation, parameter=1.2).detach()
    ref = entry_clip_reference(target, F.log_softmax(leaf, -1), clip=clip)[mask].mean()
    ref.backward()
    atol = 1e-6 if aggregation == "entropy_matched" else 1e-10
    for chunk_size in (1, 32):
        out, grad = chunked(student, teacher, mask, aggregation=aggregation, parameter=1.2, divergence_name="forward_kl",
                            chunk_size=chunk_size, entry_clip=clip)
        torch.testing.assert_close(out.loss, ref.detach(), rtol=0, atol=atol)
        torch.testing.assert_close(grad, leaf.grad, rtol=0, atol=atol)


def test_entry_clip_above_every_term_is_the_forward_kl_and_a_small_one_caps_it():
    student, teacher, mask = make_inputs(batch=2, length=5, vocab=9, seed=90)
    kwargs = dict(aggregation="teacher", parameter=1.0, divergence_name="forward_kl")
    full, full_grad = chunked(student, teacher, mask, **kwargs)
    loose, loose_grad = chunked(student, teacher, mask, entry_clip=1e6, **kwargs)
    torch.testing.assert_close(loose.loss, full.loss, **TOL)
    torch.testing.assert_close(loose_grad, full_grad, **TOL)
    tight, _ = chunked(student, teacher, mask, entry_clip=0.01, **kwargs)
    assert tight.loss.item() <= 9 * 0.01 + 1e-12 and tight.loss.item() < full.loss.item()


def test_entry_clip_keeps_a_student_masked_token_finite():
    """p_S = 0 where the target has mass makes the forward KL infinite; the capped term is finite
    and takes no gradient."""
    student, teacher, mask = make_inputs(batch=1, length=3, vocab=5, seed=91)
    student = student.detach().clone()
    student[..., 1] = -math.inf
    out, grad = chunked(student, teacher, mask, aggregation="teacher", parameter=1.0, divergence_name="forward_kl",
                        entry_clip=0.5)
    leaf = student.clone().requires_grad_()
    ref = entry_clip_reference(F.log_softmax(teacher, -1), F.log_softmax(leaf, -1), clip=0.5)[mask].mean()
    ref.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(out.loss, ref.detach(), **TOL)
    torch.testing.assert_close(grad, leaf.grad, **TOL)


def test_entry_clip_refuses_what_it_cannot_cap():
    student, teacher, mask = make_inputs(seed=92)
    for kwargs in (dict(divergence_name="reverse_kl"), dict(divergence_name="forward_kl", support="topk"),
                   dict(divergence_name="forward_kl", entry_clip=0.0)):
        with pytest.raises(ValueError, match="loss.entry_clip"):
            distillation_loss(student, teacher, mask, aggregation="teacher", parameter=1.0,
                              **{"entry_clip": 0.5, **kwargs})


def test_largest_entry_term_is_the_biggest_forward_kl_summand():
    from sdharness.distill.variants import largest_entry_term

    q, p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=F64), torch.tensor([0.1, 0.3, 0.5, 0.1], dtype=F64)
    terms = [a * math.log(a / b) for a, b in zip(q.tolist(), p.tolist()) if a > 0]
    assert largest_entry_term(q.log(), p.log()).item() == pytest.approx(max(terms), abs=1e-15)
    masked = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64)
    assert largest_entry_term(q.log(), masked.log()).item() == math.inf  # q has mass the student masks


def test_unknown_support_and_bad_top_k_are_value_errors_naming_the_field():
    student, teacher, mask = make_inputs(seed=93)
    kwargs = dict(aggregation="teacher", parameter=1.0, divergence_name="forward_kl")
    with pytest.raises(ValueError, match=r"loss.support='top' is unknown; choose one of full, topk, sampled"):
        distillation_loss(student, teacher, mask, support="top", **kwargs)
    with pytest.raises(ValueError, match=r"loss.top_k=0 must be >= 1"):
        distillation_loss(student, teacher, mask, support="topk", top_k=0, **kwargs)
