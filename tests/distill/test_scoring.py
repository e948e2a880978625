"""Rollout, scoring alignment, masking and gradients on a tiny random model."""

import pytest
import torch

from sdharness.config import ModelConfig
from sdharness.distill.logits import completion_logits
from sdharness.distill.losses import distillation_loss
from sdharness.models import load_model_and_tokenizer
from sdharness.distill.positions import loss_positions
from sdharness.data.prompts import left_pad
from sdharness.rollout.hf import completion_mask, eos_token_ids, generate
from tests.conftest import assert_rollout_trains_like_its_copy


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model_and_tokenizer(ModelConfig(name="tiny", source="tiny_random", hidden_size=16))


def right_pad(rows, pad):
    ids, mask = left_pad([r[::-1] for r in rows], pad)
    return ids.flip(1), mask.flip(1).bool()


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert completion_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_position_i_predicts_token_i_of_the_completion(tiny):
    model, tok = tiny
    prompt, completion = [1, 10, 11, 12], [20, 21, 22]
    ids, mask = left_pad([prompt], tok.pad_token_id)
    logits = completion_logits(model, ids, mask, torch.tensor([completion]), torch.ones(1, 3, dtype=torch.bool))
    full = model(torch.tensor([prompt + completion])).logits
    torch.testing.assert_close(logits[0], full[0, len(prompt) - 1: len(prompt) + 2], rtol=1e-5, atol=1e-5)


def test_padding_and_batch_neighbours_do_not_change_completion_logits(tiny):
    model, tok = tiny
    prompts, completions = [[1, 10, 11], [1, 30, 31, 32, 33, 34]], [[40, 41], [50, 51, 52, 53]]
    p_ids, p_mask = left_pad(prompts, tok.pad_token_id)
    c_ids, c_mask = right_pad(completions, tok.pad_token_id)
    batched = completion_logits(model, p_ids, p_mask, c_ids, c_mask)
    for row in range(2):
        alone = completion_logits(model, *left_pad([prompts[row]], tok.pad_token_id),
                                  torch.tensor([completions[row]]), torch.ones(1, len(completions[row]), dtype=torch.bool))
        torch.testing.assert_close(batched[row, : len(completions[row])], alone[0], rtol=1e-4, atol=1e-5)
    # Whatever sits in padded slots is invisible.
    noisy_prompt = p_ids.masked_fill(p_mask == 0, 77)
    noisy_completion = c_ids.masked_fill(~c_mask, 88)
    noisy = completion_logits(model, noisy_prompt, p_mask, noisy_completion, c_mask)
    torch.testing.assert_close(noisy[c_mask], batched[c_mask], rtol=1e-4, atol=1e-5)


def test_generate_is_batched_and_masks_after_eos(tiny):
    model, tok = tiny
    ids, mask = left_pad([[1, 10, 11], [1, 30, 31, 32, 33]], tok.pad_token_id)
    torch.manual_seed(0)
    rollout = generate(model, tok, ids, mask, max_new_tokens=8, temperature=1.0)
    assert rollout.completion_ids.shape[0] == 2 and rollout.completion_ids.shape[1] <= 8
    assert model.training  # mode restored
    eos = eos_token_ids(model, tok)
    assert (rollout.completion_mask == completion_mask(rollout.completion_ids, eos)).all()
    assert (rollout.completion_ids[~rollout.completion_mask] == tok.pad_token_id).all()
    assert rollout.texts[0] == tok.decode(rollout.completion_ids[0], skip_special_tokens=True)


def test_a_rollout_can_be_saved_for_backward(tiny):
    """generate decodes under inference mode; its rollout still indexes GRPO's and SFT's gathers."""
    model, tok = tiny
    ids, mask = left_pad([[1, 10, 11], [1, 30, 31, 32]], tok.pad_token_id)
    assert_rollout_trains_like_its_copy(model, ids, mask, generate(model, tok, ids, mask, max_new_tokens=5, greedy=True))


def test_greedy_generation_is_deterministic(tiny):
    model, tok = tiny
    ids, mask = left_pad([[1, 10, 11]], tok.pad_token_id)
    first = generate(model, tok, ids, mask, max_new_tokens=6, greedy=True)
    second = generate(model, tok, ids, mask, max_new_tokens=6, greedy=True)
    assert torch.equal(first.completion_ids, second.completion_ids)


def test_reasoning_positions_exclude_the_answer_span_and_eos(tiny):
    _, tok = tiny
    text = "3 + 4 = 7\nThe answer is 7."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    completion = torch.tensor([ids + [tok.pad_token_id] * 2])
    mask = completion_mask(completion, [tok.eos_token_id])
    reasoning = loss_positions(tok, completion, mask, [text], mode="reasoning", answer_marker="The answer is",
                               eos_ids=[tok.eos_token_id])
    assert reasoning[0].tolist() == [True] * text.index("The") + [False] * (len(ids) - text.index("The") + 2)
    assert torch.equal(loss_positions(tok, completion, mask, [text], mode="all", answer_marker="The answer is",
                                      eos_ids=[tok.eos_token_id]), mask)
    no_marker = loss_positions(tok, completion, mask, ["3 + 4 = 7"], mode="reasoning", answer_marker="The answer is",
                               eos_ids=[tok.eos_token_id])
    assert no_marker[0].sum() == len(ids) - 1  # everything but EOS


def test_student_gets_gradient_and_teacher_pass_does_not(tiny):
    model, tok = tiny
    model.zero_grad()
    p_ids, p_mask = left_pad([[1, 10, 11]], tok.pad_token_id)
    t_ids, t_mask = left_pad([[1, 10, 11, 60, 61, 62]], tok.pad_token_id)
    g, g_mask = torch.tensor([[40, 41, 42]]), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        teacher = completion_logits(model, t_ids, t_mask, g, g_mask)
    assert not teacher.requires_grad
    student = completion_logits(model, p_ids, p_mask, g, g_mask)
    loss = distillation_loss(student, teacher, g_mask, aggregation="product", parameter=2.0, divergence_name="forward_kl")
    loss.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


def test_hidden_states_through_the_head_equal_completion_logits(tiny):
    from sdharness.distill.logits import completion_hidden

    model, tok = tiny
    p_ids, p_mask = left_pad([[1, 10, 11], [1, 30, 31, 32, 33]], tok.pad_token_id)
    c_ids, c_mask = right_pad([[40, 41], [50, 51, 52]], tok.pad_token_id)
    with torch.no_grad():
        dense = completion_logits(model, p_ids, p_mask, c_ids, c_mask)
        lazy = completion_hidden(model, p_ids, p_mask, c_ids, c_mask)
    assert lazy.shape == dense.shape
    torch.testing.assert_close(lazy.materialize(), dense, rtol=1e-5, atol=1e-5)
