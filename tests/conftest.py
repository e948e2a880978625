"""Shared fixtures: the real Hydra config, composed and shrunk for a CPU test run."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sdharness.config import CONF_DIR as PACKAGE_CONF_DIR, ModelConfig, register_configs
from sdharness.rollout.vllm import ENGINE_ENVIRONMENT

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

# The shipped testbed bases (sdharness/assets), part of the package, so always there: the default
# (column addition, data.task=columns) and the chained-arithmetic one (data.task=chain).
TESTBED = ModelConfig(name="testbed", source="hf", path="pkg://sdharness/assets/testbed")
TESTBED_CHAIN = ModelConfig(name="testbed_chain", source="hf", path="pkg://sdharness/assets/testbed_chain")
CONF_DIR = str(PACKAGE_CONF_DIR)
TINY = [
    "model=tiny_random",
    "data.train_size=8",
    "data.eval_size=4",
    "data.batch_size=2",
    "rollout.max_new_tokens=12",
    "rollout.progress=false",
    "eval.max_new_tokens=12",
    "eval.batch_size=4",
    "trainer.max_steps=2",
    "optim.lr=1e-2",
]


@pytest.fixture(autouse=True)
def process_group_environment():
    """Restores what vLLM's in-process engine sets in ``os.environ`` (RANK, WORLD_SIZE, MASTER_PORT, ...:
    :data:`sdharness.rollout.vllm.ENGINE_ENVIRONMENT`) after every test: a later test launching DDP
    ranks as subprocesses would inherit a world of size 1 and wait for ever for its second rank."""
    saved = {key: os.environ.get(key) for key in ENGINE_ENVIRONMENT}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need a CUDA device; without one they are skipped, never failed.
    The fast lane (`make test-fast`, ``-m "not slow"``) is the kernel, config and unit tests; a file of
    end-to-end runs says ``pytestmark = pytest.mark.slow`` at its top, a single test ``@pytest.mark.slow``."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not any keyword (a test id "gpu")
            item.add_marker(skip)


def rollout_gradient(model, prompt_ids, prompt_mask, completion_ids, completion_mask, weights=None) -> torch.Tensor:
    """The embedding gradient of the weighted log-likelihood of a completion, with ``completion_ids``
    as a differentiable gather's index (autograd saves it) and ``completion_mask`` picking the terms,
    as GRPO's and the SD loss's positions use a rollout."""
    from sdharness.distill.logits import completion_logits

    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    logp = logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    if weights is not None:
        logp = logp * weights
    model.zero_grad()
    (-logp[completion_mask].sum()).backward()
    return model.get_input_embeddings().weight.grad.clone()


def assert_rollout_trains_like_its_copy(model, prompt_ids, prompt_mask, rollout, weights=None) -> None:
    """A rollout decoded under inference mode must serve a backward pass exactly as normal tensors
    with its values do (an inference tensor would raise when autograd saves it)."""
    tensors = [rollout.completion_ids, rollout.completion_mask] + ([] if weights is None else [weights])
    assert not any(t.is_inference() for t in tensors)
    copies = [t.clone() for t in tensors]
    got = rollout_gradient(model, prompt_ids, prompt_mask, *tensors[:2], *tensors[2:])
    expected = rollout_gradient(model, prompt_ids, prompt_mask, *copies[:2], *copies[2:])
    assert torch.equal(got, expected) and bool(got.ne(0).any())


def compose_config(overrides: list[str] | None = None, config_name: str = "train"):
    """The project's real config (``conf/train.yaml``) with ``overrides`` applied."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


@pytest.fixture
def tiny_cfg():
    return compose_config(TINY)


def oracle_lm():
    """An lm-eval LM whose generation is each document's reference solution."""
    from lm_eval.api.model import LM

    class Oracle(LM):
        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            return [request.doc["solution"] for request in requests]

    return Oracle()
