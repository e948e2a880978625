"""trainer=deepspeed without DeepSpeed (it needs CUDA): what the harness does around it, checked with
stand-ins. Its checkpoints are directories (a strategy that writes DeepSpeed's layout), its
clipping comes from the engine's config, and ZeRO-2 frees ``p.grad`` after the backward."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

import sdharness.train
from sdharness.train import train
from tests.conftest import TINY, compose_config

RUN = TINY + ["data.train_size=6", "trainer.checkpoint_every_n_steps=1", "threads=1", "logger.mode=disabled"]


class DirectoryCheckpoints(SingleDeviceStrategy):
    """Saves as DeepSpeed does: a directory holding ``latest`` (the tag) and
    ``<tag>/mp_rank_00_model_states.pt`` (Lightning's checkpoint dict)."""

    def __init__(self):
        super().__init__(device=torch.device("cpu"))

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        directory = Path(filepath) / "checkpoint"
        directory.mkdir(parents=True)
        torch.save(checkpoint, directory / "mp_rank_00_model_states.pt")
        (Path(filepath) / "latest").write_text("checkpoint")

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        return torch.load(Path(checkpoint_path) / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)


class StepsRun(L.Callback):
    def __init__(self):
        self.started = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.started.append(trainer.global_step)


def global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)["global_step"]


def test_directory_checkpoints_are_replaced_cleaned_up_and_resumed(tmp_path, monkeypatch):
    monkeypatch.setattr(sdharness.train, "build_strategy", lambda trainer_cfg: DirectoryCheckpoints())
    train(compose_config(RUN + ["trainer.max_steps=3"]), tmp_path)  # three checkpoints, each replacing the last
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_dir() and global_step(last) == 3
    versions = [path for path in last.parent.iterdir() if path.name != "last.ckpt"]
    assert [path.resolve() for path in versions] == [last.resolve()]  # the previous ones are deleted

    staged = last.with_name(".last.ckpt.staged")  # a kill mid-save leaves a directory behind
    (staged / "checkpoint").mkdir(parents=True)
    steps = StepsRun()
    train(compose_config(RUN + ["trainer.max_steps=4", "ckpt_path=last"]), tmp_path, callbacks=(steps,))
    assert steps.started == [3] and global_step(last) == 4 and not staged.exists()  # resumed at step 3
    assert sorted(path.name for path in last.parent.iterdir() if path.resolve() != last.resolve()) == []


def test_a_directory_that_is_no_deepspeed_checkpoint_is_a_config_error(tmp_path):
    from sdharness.config import ConfigError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"ckpt_path=.*empty: the directory .* holds no DeepSpeed checkpoint"):
        train(compose_config(RUN + [f"ckpt_path={tmp_path / 'empty'}"]), tmp_path)


@pytest.fixture
def deepspeed_stand_in(monkeypatch):
    """Enough of a ``deepspeed`` module for Lightning's DeepSpeedStrategy to be built on CPU."""
    import sys
    import types

    import lightning.pytorch.strategies.deepspeed as lightning_deepspeed

    module, utils = types.ModuleType("deepspeed"), types.ModuleType("deepspeed.utils")
    module.__path__, module.utils = [], utils  # a package, so `from deepspeed.utils import ...` works
    utils.logging = types.SimpleNamespace(logger=types.SimpleNamespace(setLevel=lambda level: None))
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
    monkeypatch.setattr(lightning_deepspeed, "_DEEPSPEED_AVAILABLE", True)
    monkeypatch.setattr(lightning_deepspeed, "_DEEPSPEED_GREATER_EQUAL_0_16", True, raising=False)
    return module


@pytest.mark.parametrize("clip, expected", [("0.5", 0.5), ("null", 0.0)])
def test_deepspeed_config_carries_the_gradient_clip_value(deepspeed_stand_in, clip, expected):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from sdharness.config import to_train_config
    from sdharness.scale.strategy import build_strategy

    cfg = to_train_config(compose_config(["trainer=deepspeed", f"trainer.gradient_clip_val={clip}"]))
    strategy = build_strategy(cfg.trainer)
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["gradient_clipping"] == expected
    assert strategy.config["zero_optimization"]["stage"] == 2


def test_a_nan_gradient_zero2_has_freed_from_p_grad_is_caught(deepspeed_stand_in):
    """ZeRO-2 leaves ``p.grad`` None after the backward; the guard asks DeepSpeed for the full gradient."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    from sdharness.methods.policy import PolicyModule

    class OneRank(DeepSpeedStrategy):
        def __init__(self):  # no engine: only the type and the cross-rank decision matter here
            pass

        def reduce_boolean_decision(self, decision, all=True):
            return decision

    model = torch.nn.Linear(3, 2)
    full_grads = {id(model.weight): torch.tensor([[0.0, float("nan"), 1.0]] * 2), id(model.bias): torch.zeros(2)}
    deepspeed_stand_in.utils.safe_get_full_grad = lambda p: full_grads[id(p)]
    assert all(p.grad is None for p in model.parameters())
    module = SimpleNamespace(model=model, trainer=SimpleNamespace(strategy=OneRank()))
    assert PolicyModule._all_finite(module, torch.tensor(1.0)) is False
    full_grads[id(model.weight)] = torch.ones(2, 3)
    assert PolicyModule._all_finite(module, torch.tensor(1.0)) is True


@pytest.mark.parametrize("algo, copy", [("sd", "teacher_model"), ("grpo", "reference_model")])
def test_frozen_copies_stay_float32_after_deepspeed_casts_to_bf16(deepspeed_stand_in, monkeypatch, algo, copy):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from sdharness.config import to_train_config
    from sdharness.methods import method_class
    from sdharness.models import load_model_and_tokenizer
    from sdharness.scale.strategy import build_strategy

    # The engine's cast (deepspeed.initialize under bf16) stands in for DeepSpeed's setup.
    monkeypatch.setattr(DeepSpeedStrategy, "setup", lambda self, trainer: self.lightning_module.bfloat16())
    copies = ["teacher=ema"] if algo == "sd" else ["algo.beta=0.1"]  # the EMA teacher; GRPO's initial reference
    cfg = to_train_config(compose_config(TINY + ["trainer=deepspeed", f"algo={algo}", *copies]))
    module = method_class(algo)(*load_model_and_tokenizer(cfg.model), cfg)
    strategy = build_strategy(cfg.trainer)
    strategy._lightning_module = module
    strategy.setup(trainer=None)
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in getattr(module, copy).parameters()} == {torch.float32}


def test_an_ema_step_at_decay_0_99_survives_in_the_float32_copy(deepspeed_stand_in):
    from sdharness.methods.policy import ShadowWeights
    from sdharness.scale.strategy import frozen_copies_to_float32

    holder = torch.nn.Module()
    holder.live = torch.nn.Linear(4, 4, bias=False)
    shadow = ShadowWeights(holder.live, "ema", decay=0.99)
    holder.copy = shadow.copy
    holder.bfloat16()
    frozen_copies_to_float32(holder)
    start = shadow.copy.weight.detach().clone()
    with torch.no_grad():
        holder.live.weight.add_(0.1)  # bf16 live weights, as the engine keeps them
    shadow.update()
    expected = start.double() + 0.01 * (holder.live.weight.double() - start.double())
    torch.testing.assert_close(shadow.copy.weight.double(), expected, rtol=0, atol=1e-7)
    assert shadow.copy.weight.dtype == torch.float32 and not torch.equal(shadow.copy.weight, start)


@pytest.mark.parametrize("zipped", [True, False])
def test_the_resume_state_is_read_from_the_tag_latest_names(tmp_path, zipped):
    from sdharness.scale.resume import load_sdharness_state

    (tmp_path / "global_step7").mkdir()
    (tmp_path / "latest").write_text("global_step7\n")
    state = {"sdharness_counters": {"problems_seen": 12}, "ds_config": {"bf16": {"enabled": True}}}
    torch.save(state, tmp_path / "global_step7" / "mp_rank_00_model_states.pt", _use_new_zipfile_serialization=zipped)
    assert load_sdharness_state(tmp_path, "last") == state
