"""Guided sampling's exact output for one seed, pinned: any speed-up of the decoding loop must keep it.

The golden values were computed by ``guided_generate`` before its loop was optimised (float32 tiny_random,
peaked as in test_guided.py), so they pin the tokens a seed draws, where rows stop at EOS, and the two
log-probabilities the importance weights use, including the ``-inf`` of a token top-p removes from the
student's own distribution.
"""

import math

import pytest
import torch

from sdharness.config import ModelConfig
from sdharness.models import load_model_and_tokenizer
from sdharness.rollout.guided import guided_generate
from tests.rollout.test_guided import peaked, prompts, seeded

INF = math.inf
STOPS = [71, 88, 51]  # extra EOS ids that the seed draws, so the three rows stop at different steps

GOLDEN = {
    "shared": {
        "sampling": dict(temperature=1.0, top_p=1.0),
        "ids": [[63, 63, 81, 50, 33, 20, 71, 0], [70, 70, 70, 70, 70, 70, 38, 88], [60, 46, 98, 98, 51, 0, 0, 0]],
        "lengths": [7, 8, 5],
        "sampling_logprobs": [
            [-2.2708588, -1.2841654, -4.7662525, -5.500721, -3.386857, -3.6795301, -7.532825, 0.0],
            [-2.7812445, -0.3209563, -0.3211725, -0.3213574, -0.3215186, -0.3216594, -3.7312546, -5.4284935],
            [-4.3293452, -2.3925455, -6.3846517, -0.1185053, -5.7479014, 0.0, 0.0, 0.0]],
        "student_logprobs": [
            [-3.8367634, -1.2846519, -4.7612495, -5.5018201, -3.3896117, -3.6781425, -7.5340948, 0.0],
            [-8.7785368, -0.3208416, -0.3210751, -0.3212722, -0.3214436, -0.3215945, -3.7318237, -5.4294114],
            [-4.4223914, -2.4003267, -6.3854513, -0.1185463, -5.7561145, 0.0, 0.0, 0.0]],
    },
    "separate": {
        "sampling": dict(temperature=1.3, top_p=0.9),
        "ids": [[63, 63, 81, 50, 72, 68, 71, 0], [70, 70, 70, 57, 57, 57, 38, 88], [60, 85, 98, 98, 51, 0, 0, 0]],
        "lengths": [7, 8, 5],
        "sampling_logprobs": [
            [-1.6722989, -0.9953381, -4.068388, -5.2072206, -4.9246044, -4.4217734, -5.0434718, 0.0],
            [-3.3058619, -0.6366978, -0.6371833, -4.5390477, -1.0104818, -1.0106705, -4.3776069, -5.3338609],
            [-4.1803646, -4.6372848, -4.5751057, -0.3430064, -5.6706438, 0.0, 0.0, 0.0]],
        "student_logprobs": [
            [-3.5714145, -1.695397, -4.369626, -4.7607665, -INF, -4.7758446, -INF, 0.0],
            [-INF, -0.6626183, -0.6629934, -4.6700482, -1.2445667, -1.2448328, -INF, -4.4269471],
            [-3.953562, -5.3137407, -3.23084, -0.3064147, -4.6385713, 0.0, 0.0, 0.0]],
    },
}


@pytest.fixture(scope="module")
def models():
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny", source="tiny_random", hidden_size=16))
    other, _ = load_model_and_tokenizer(ModelConfig(name="other", source="tiny_random", hidden_size=16, seed=7))
    model.generation_config.eos_token_id = [tok.eos_token_id, *STOPS]
    return peaked(model), peaked(other), tok


@pytest.mark.parametrize("teacher", ["shared", "separate"])
def test_guided_generate_reproduces_the_pinned_rollout_of_seed_5(models, teacher):
    model, other, tok = models
    golden = GOLDEN[teacher]
    out = guided_generate(model, tok, *prompts(tok), aggregation="product", parameter=2.0, max_new_tokens=12,
                          generator=seeded(5), teacher_model=other if teacher == "separate" else None,
                          **golden["sampling"])
    assert out.completion_ids.tolist() == golden["ids"]
    assert out.completion_mask.sum(-1).tolist() == golden["lengths"]
    # Stored to 7 decimals: 1e-6 is that rounding plus float32 noise, far below any change of the maths.
    for key in ("sampling_logprobs", "student_logprobs"):
        torch.testing.assert_close(getattr(out, key), torch.tensor(golden[key]), rtol=0, atol=1e-6, msg=key)
