"""Checkpoints: when they are taken, and files that are either the previous one or the new one.

``StepCheckpoint`` writes ``last.ckpt`` every N steps and at the final step, always from inside
the training loop, and puts it in place once the step's metrics row is written. A checkpoint
taken after ``fit`` returns would record the cut-short epoch as finished, so a run extended from
it (``ckpt_path=last trainer.max_steps=<more>``) would skip the rest of that epoch's data.

Lightning's own writer stages the file in the system temp directory and moves it into place;
when that directory is on another filesystem (``/tmp`` on tmpfs, a node-local disk, a cluster's
shared storage), the move is a copy, and a job killed during the copy leaves a truncated
``last.ckpt`` behind. This writer stages beside the target, on the same filesystem, syncs it to
disk, and renames it over the target in one step.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def is_final_step(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended is the run's last (max_steps or a budget stop)."""
    return trainer.global_step >= trainer.max_steps or trainer.should_stop


class StepCheckpoint(L.Callback):
    """``last.ckpt`` every ``every_n_steps`` optimiser steps and at the final step.

    The checkpoint is written at the end of its step but put in place only at the next step's
    start (or the end of training): Lightning writes a step's metrics row after every callback's
    ``on_train_batch_end``, and a resumed run keeps the rows up to its checkpoint, so a kill
    between the two must find the previous checkpoint, all of whose rows are on disk."""

    def __init__(self, path: Path, every_n_steps: int):
        self.path, self.every_n_steps = Path(path), every_n_steps
        self.staged = self.path.with_name(f".{self.path.name}.staged")
        self.saved_step = 0

    def on_train_start(self, trainer, module) -> None:
        self.saved_step = trainer.global_step  # a resumed run's checkpoint holds this step already
        if trainer.is_global_zero:  # from a killed run: its step's metrics row may be missing
            remove_checkpoint(self.staged)
            remove_unlinked_directories(self.path)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = is_final_step(trainer) or (self.every_n_steps and step % self.every_n_steps == 0)
        if step != self.saved_step and due:  # a skipped update leaves the step where it was
            trainer.save_checkpoint(self.staged, weights_only=False)  # optimiser and loop state too, to resume
            self.saved_step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._put_in_place(trainer)

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        # Every checkpoint is taken inside an epoch, which Lightning counts as started (one more
        # than processed). Resumed from a checkpoint taken at an epoch's end, Lightning runs the
        # next epoch without counting its start, and a checkpoint of that epoch would resume one
        # epoch too far (another data order); the count is set as an uninterrupted run has it.
        progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
        for counts in (progress["current"], progress["total"]):
            if counts["started"] <= counts["processed"]:
                counts["ready"] = counts["started"] = counts["processed"] + 1

    def on_train_end(self, trainer, module) -> None:
        self._put_in_place(trainer)

    def _put_in_place(self, trainer) -> None:
        if trainer.is_global_zero and self.staged.exists():
            if self.staged.is_dir():  # DeepSpeed writes a directory of shards
                replace_directory(self.staged, self.path)
            else:
                os.replace(self.staged, self.path)


# A rename cannot replace a non-empty directory, so a directory checkpoint (DeepSpeed's) lives in a
# versioned directory beside the target, and the target is a symbolic link to it: replacing the
# link is the one-step rename, and the previous version is deleted after it.
def _versions(target: Path) -> list[Path]:
    return [path for path in target.parent.glob(f".{target.name}.v*") if path.is_dir()]


def replace_directory(staged: Path, target: Path) -> None:
    """Put the directory ``staged`` at ``target`` (a link to it) in one rename; delete the previous one."""
    previous = target.resolve() if target.is_symlink() else None
    version = staged.with_name(f".{target.name}.v{time.time_ns()}")
    os.replace(staged, version)
    link = target.with_name(f".{target.name}.link")
    link.unlink(missing_ok=True)
    link.symlink_to(version.name)  # relative: the run directory may be moved
    if target.is_dir() and not target.is_symlink():  # written before checkpoints were links
        shutil.rmtree(target)
    os.replace(link, target)
    if previous is not None and previous != version.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def remove_unlinked_directories(target: Path) -> None:
    """Versions a kill left behind between writing one and linking it (the link's own is kept)."""
    current = target.resolve() if target.is_symlink() else None
    for version in _versions(target):
        if version.resolve() != current:
            shutil.rmtree(version, ignore_errors=True)


def remove_checkpoint(path: Path) -> None:
    """A checkpoint file, or a directory of shards, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class DiskFullError(OSError):
    """No space left for a checkpoint; the message names the directory and the space it needs."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.partial")
        try:
            with open(staging, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, path)
        except (OSError, RuntimeError) as error:  # torch.save turns the file's OSError into a RuntimeError
            if not _disk_full(error):
                raise
            needed = sum(t.numel() * t.element_size() for t in _tensors(checkpoint)) / 2**20
            raise DiskFullError(errno.ENOSPC, f"no space left in {path.parent} for a checkpoint of about "
                                f"{needed:.1f} MiB ({shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free); free "
                                "that much there, or set hydra.run.dir on a larger disk; any previous checkpoint is "
                                "intact") from None
        finally:
            staging.unlink(missing_ok=True)


def _disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)
