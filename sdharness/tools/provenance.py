"""Provenance of a file ``sdharness-bootstrap`` writes: the key it was made from (the input's and the
model's hashes, the settings), and the output's own hash, in ``<out>.provenance.json`` beside it, so
that a rerun with the same key reuses the file and any other run rewrites it (atomically)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

from sdharness.config import ConfigError, ModelConfig
from sdharness.errors import DataError
from sdharness.methods.accounting import X_AXES

log = logging.getLogger(__name__)

def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def model_identity(cfg: ModelConfig) -> dict:
    """Name, source and path of the model plus ``config_sha256``: a hash of its ModelConfig and, for a
    local directory, of its ``config.json`` and the size and mtime of its weight files (retraining
    in place changes them)."""
    parts = {"model_config": asdict(cfg)}
    if cfg.path and cfg.source in ("hf", "gguf"):
        from sdharness.models import resolve_path

        try:
            directory = resolve_path(cfg.path)
        except ConfigError:
            directory = None
        if directory is not None and directory.is_dir():
            config_json = directory / "config.json"
            if config_json.exists():
                parts["config.json"] = sha256_file(config_json)
            weights = sorted(p for p in directory.iterdir()
                             if p.suffix in (".safetensors", ".bin", ".gguf", ".pt") and p.is_file())
            parts["weights"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    return {"name": cfg.name, "source": cfg.source, "path": cfg.path,
            "config_sha256": hashlib.sha256(canonical(parts).encode()).hexdigest()}


def harness_version() -> str:
    """The installed sdharness version (a checkout that is not installed says so)."""
    try:
        return importlib.metadata.version("sdharness")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def source_commit() -> str | None:
    """The git commit of the checkout this package runs from (``+dirty`` with uncommitted changes to
    tracked files), or None for an installed wheel or a checkout git cannot read."""
    from sdharness.paths import checkout_dir

    root = checkout_dir()
    if root is None:
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".provenance.json")


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def cached(out: str | Path, key: dict) -> dict | None:
    """The sidecar of ``out`` when its key equals ``key`` and ``out`` still hashes to what it recorded."""
    out, sidecar = Path(out), provenance_path(out)
    if not (out.exists() and sidecar.exists()):
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or canonical(record.get("key")) != canonical(key):
        return None
    return record if record.get("output_sha256") == sha256_file(out) else None


def first_row_is_bootstrapped(path: str | Path) -> bool:
    """Whether the first row of the JSONL ``path`` carries the ``bootstrap`` record sdharness-bootstrap writes."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        return isinstance(row := json.loads(first), dict) and "bootstrap" in row
    except (OSError, ValueError):
        return False


def bootstrap_record(data_file: str | Path | None) -> dict | None:
    """The provenance record of ``data_file`` when it is sdharness-bootstrap output, else None. A run
    trained on it starts its counters from the record's ``summary.cost``, so a bootstrap output whose
    cost cannot be read (no sidecar, or one from before costs were recorded) is refused, naming the fix."""
    if data_file is None:
        return None
    data_file, sidecar = Path(data_file), provenance_path(data_file)
    if not sidecar.exists():
        if first_row_is_bootstrapped(data_file):
            raise DataError(f"{data_file} is sdharness-bootstrap output (its rows carry a bootstrap record) but its "
                            f"provenance sidecar {sidecar} is missing, so the sampling's cost cannot be counted; "
                            "copy the sidecar beside it or rerun sdharness-bootstrap")
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        cost = record["summary"]["cost"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{sidecar}: records no sampling cost (summary.cost; unreadable, or written by an older "
                        f"sdharness-bootstrap); rerun sdharness-bootstrap to regenerate {data_file.name}") from None
    if record.get("output_sha256") != sha256_file(data_file):
        log.warning("%s changed since sdharness-bootstrap wrote it (its sha256 differs from %s): the run still "
                    "counts the recorded sampling cost", data_file, sidecar)
    return {**record, "cost": cost}


def bootstrap_metrics(record: dict) -> dict[str, float]:
    """``bootstrap/*``: the offset a run on bootstrap output starts its counters from, logged apart, with
    the problems the bootstrap sampled and the ones it dropped (no correct sample)."""
    summary = record["summary"]
    metrics = {f"bootstrap/{name}": float(record["cost"][name]) for name in X_AXES if name != "problems_seen"}
    return {**metrics, "bootstrap/problems": float(summary["problems"]),
            "bootstrap/unsolved_problems": float(summary["unsolved"]),
            "bootstrap/dropped_problems": float(summary["dropped"])}
