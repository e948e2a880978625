"""Exact resume: which checkpoint to continue from (checked against this config before any model
loads), the metric rows it still holds, and every RNG a step draws from."""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from sdharness.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


# Settings that decide what a checkpoint's weights, optimiser state and data position mean; a
# resume must match them.
RESUME_GROUPS = ("algo", "model", "data", "prompt", "aggregation", "optim")
# Where things live on this machine, not what they are.
RESUME_IGNORED = ("model.cache_dir",)
DATA_FILES = ("path", "eval_path", "solutions_path")


def config_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The flattened ``RESUME_GROUPS`` settings plus the sha256 of each data file's contents (a
    file edited in place keeps its path), stored in every checkpoint."""
    flat = {}
    for group in RESUME_GROUPS:
        for key, value in OmegaConf.to_container(OmegaConf.structured(getattr(cfg, group))).items():
            if f"{group}.{key}" not in RESUME_IGNORED:
                flat[f"{group}.{key}"] = value
    for name in DATA_FILES:
        if getattr(cfg.data, name):
            flat[f"data.{name} contents (sha256)"] = _data_file_sha256(getattr(cfg.data, name), f"data.{name}")
    return flat


def _data_file_sha256(path: str, field_name: str) -> str | None:
    from sdharness.data.loading import data_path

    resolved = data_path(path, field_name)
    if not os.path.isfile(resolved):
        return None
    stat = os.stat(resolved)
    return _sha256(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: re-hash a file that changed
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_resume(saved: dict[str, Any], cfg: TrainConfig, checkpoint: str) -> None:
    """Refuse to resume ``checkpoint`` under a different method, model, data (settings or file
    contents), prompt, aggregation or optimiser config, naming each field."""
    current = config_fingerprint(cfg)
    # A field added to the schema after the checkpoint was written reads as its default there.
    defaults = config_fingerprint(TrainConfig())
    differing = [f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
                 for key in sorted(set(saved) | set(current)) if saved.get(key, defaults.get(key)) != current.get(key)]
    if differing and not cfg.resume_allow_changes:
        raise ConfigError(f"ckpt_path={checkpoint} was trained with a different config: " + "; ".join(differing) +
                          ". Resume with the checkpoint's settings, or add resume_allow_changes=true to resume anyway")


@dataclass
class Resume:
    """What a resumed run needs from its checkpoint before the Trainer restores the rest."""

    path: str
    problems_seen: int  # metric rows past this point are from steps the checkpoint does not hold
    wandb_id: str | None


def resume_from(cfg, output_dir: Path) -> Resume | None:
    """The checkpoint to resume from, checked against this config before any model loads.

    ``last`` with no checkpoint yet starts afresh, so a requeued job can always pass it."""
    if cfg.ckpt_path is None:
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.exists():
        if cfg.ckpt_path == "last":
            log.info("ckpt_path=last: no checkpoint in %s yet; starting from the beginning", path.parent)
            return None
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such file; give a .ckpt file, or ckpt_path=last with "
                          "hydra.run.dir=<the run directory to resume>")
    checkpoint = load_sdharness_state(path, cfg.ckpt_path)
    check_resume(checkpoint.get("sdharness_config", {}), cfg, str(path))
    return Resume(str(path), checkpoint.get("sdharness_counters", {}).get("problems_seen", 0),
                  checkpoint.get("sdharness_wandb_id"))


def load_sdharness_state(path: Path, ckpt_path: str) -> dict:
    """The checkpoint's state dict without loading weights eagerly: a ``.ckpt`` file, or DeepSpeed's
    directory, whose ``<tag>/mp_rank_00_model_states.pt`` holds the state Lightning gave it
    (``<tag>`` read from its ``latest`` file)."""
    if not path.is_dir():
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else "checkpoint"
    states = sorted((path / tag).glob("*mp_rank_00_model_states.pt"))
    if not states:
        raise ConfigError(f"ckpt_path={ckpt_path}: the directory {path} holds no DeepSpeed checkpoint "
                          f"({tag}/mp_rank_00_model_states.pt); give a .ckpt file or a trainer=deepspeed checkpoint")
    # DeepSpeed stores its own config and bookkeeping objects there and loads it with weights_only=False too;
    # a file in torch's legacy (non-zip) format, which a DeepSpeed config may ask for, cannot be memory-mapped.
    with open(states[0], "rb") as handle:
        zipped = handle.read(4) == b"PK\x03\x04"
    return torch.load(states[0], map_location="cpu", mmap=zipped, weights_only=False)


def metric_rows_to_keep(path: Path, resume: Resume | None) -> tuple[list[str], list[dict]] | None:
    """``(header, rows)`` of a resumed run's metrics up to its checkpoint; later rows are from
    steps that are about to be re-run."""
    if resume is None:
        return None
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [row for row in reader
                    if not row.get("train/problems_seen") or float(row["train/problems_seen"]) <= resume.problems_seen]
    except FileNotFoundError:  # no metrics yet (or, on ranks > 0, rank 0 is rewriting them; only it writes)
        return None
    return list(reader.fieldnames or []), rows


def rng_state() -> dict:
    """Every RNG a step draws from (rollout sampling uses torch's), for an exact resume."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    # Tensors and plain values only: checkpoints must load with torch.load(weights_only=True).
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                     has_gauss, gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
