"""Checkpoint files that are either the previous one or the new one, never half of each.

Lightning's own writer stages the file in the system temp directory and moves it into place;
when that directory is on another filesystem (``/tmp`` on tmpfs, a node-local disk, a cluster's
shared storage), the move is a copy, and a job killed during the copy leaves a truncated
``last.ckpt`` behind. This writer stages beside the target, on the same filesystem, syncs it to
disk, and renames it over the target in one step.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


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
        finally:
            staging.unlink(missing_ok=True)
