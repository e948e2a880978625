"""One run per run directory: ``<run dir>/.sdharness.lock``, held for as long as a run writes there.

Two runs in one directory overwrite each other's ``.hydra/config.yaml``, interleave their
``metrics.csv`` and checkpoints, and the report then reads a mixture as one run. The lock is an
``flock`` on the file, which the kernel drops when its process ends, however it ends, so a crashed
or killed run never leaves the directory stuck. The file also records the holder's pid, host and
start time: the refusal names them, and a run that finds the record of a holder that ended without
clearing it (killed, out of memory) logs that it takes the directory over.

``sdharness-train`` takes the lock in a Hydra callback, before Hydra writes ``.hydra/`` into the
directory; :func:`sdharness.train.train` takes it again (re-entrant within one process), which covers
a sweep's jobs and direct calls. Only the first process of a distributed run takes it: its other
ranks run in the same directory by design.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import socket
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from sdharness.config import ConfigError

log = logging.getLogger(__name__)
LOCK_FILE = ".sdharness.lock"
_held: dict[str, list[int]] = {}  # absolute run dir -> [file descriptor, times acquired in this process]


class RunDirectoryInUse(ConfigError):
    """Another live process holds the run directory."""


def is_first_process() -> bool:
    """False on the other ranks of a distributed run (Lightning's launcher, torchrun or SLURM set these)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _holder(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def acquire(run_dir: str | Path) -> None:
    """Hold ``run_dir`` for this process, or raise :class:`RunDirectoryInUse` naming its holder."""
    key = os.path.abspath(run_dir)
    if key in _held:
        _held[key][1] += 1
        return
    if not is_first_process():
        return
    os.makedirs(key, exist_ok=True)
    fd = os.open(os.path.join(key, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        record = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):  # a filesystem without file locks
            log.warning("%s: file locks are not supported here (%s); nothing stops a second run writing into this "
                        "run directory", key, error.strerror)
            return
        on_host = f" on {record['host']}" if record.get("host", socket.gethostname()) != socket.gethostname() else ""
        raise RunDirectoryInUse(f"{key} is in use by pid {record.get('pid', '?')}{on_host} (since "
                                f"{record.get('since', '?').replace('T', ' ')}); choose another hydra.run.dir, or "
                                "wait for that run to end") from None
    previous = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
    if previous.get("pid"):
        log.warning("%s: taking over the lock of pid %s (since %s), which ended without releasing it", key,
                    previous["pid"], previous.get("since", "?").replace("T", " "))
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={since}\n".encode(), 0)
    _held[key] = [fd, 1]


def release(run_dir: str | Path) -> None:
    """Undo one :func:`acquire`; the last clears the record and drops the lock."""
    key = os.path.abspath(run_dir)
    if key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] == 0:
        fd = _held.pop(key)[0]
        os.ftruncate(fd, 0)  # an empty record: the next run has nothing to take over
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _release_all() -> None:
    for key in list(_held):
        _held[key][1] = 1
        release(key)


# A run that ends by sys.exit (an error, SIGTERM) clears its record too; only a killed one leaves it behind.
atexit.register(_release_all)


@contextlib.contextmanager
def run_directory_lock(run_dir: str | Path):
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


class RunDirectoryLock(Callback):
    """Hydra callback (``conf/train.yaml``): a single run holds its directory from before Hydra
    writes ``.hydra/`` into it until the job ends. A sweep's jobs are locked by ``train`` itself."""

    run_dir: str | None = None

    def on_run_start(self, config, **kwargs) -> None:
        run_dir = str(OmegaConf.select(config, "hydra.run.dir"))  # ${now:...} is cached: the job's own dir
        try:
            acquire(run_dir)
        except RunDirectoryInUse as error:  # Hydra turns a callback's Exception into a warning and goes on
            print(f"sdharness: error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        self.run_dir = run_dir

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if self.run_dir is not None:  # a single run (a sweep's jobs end without a run start)
            release(self.run_dir)
            self.run_dir = None
