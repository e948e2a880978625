"""The command line's answer to a config Hydra cannot compose: one line naming the fix.

Hydra's own message for ``aggregation=prodct`` lists its search path, and for a misspelt key
(``aggregation.taux=1``) it suggests appending it with ``+``, which then fails anyway; both exit
with status 1. ``cli_errors`` wraps the ``@hydra.main`` entry point so that these print
``sdharness: error: ...`` with the valid choices and exit 2, as the app's own config and data
errors do.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from sdharness import jobs
from sdharness.config import ConfigError, TrainConfig
from sdharness.data.jsonl import DataError


def _schema_keys(schema: type, dotted: str) -> list[str] | None:
    """Keys of the ``schema`` node at ``dotted`` ('' for the top), or None where there is no such node."""
    node = OmegaConf.structured(schema)
    node = OmegaConf.select(node, dotted) if dotted else node
    return [str(key) for key in node.keys()] if isinstance(node, DictConfig) else None


def composition_error_message(error: BaseException, schema: type = TrainConfig) -> str:
    """One clear line for an error Hydra raises while composing the config (an unknown group
    option, a misspelt key, a value of the wrong type): the override at fault and the valid
    choices, without Hydra's search path or its advice to append keys with ``+``."""
    cause = error.__cause__
    missing = getattr(error, "missing_cfg_file", None)
    options = list(getattr(error, "options", None) or [])
    if missing and "/" in missing and options:  # aggregation=prodct
        group, _, option = missing.rpartition("/")
        where = re.match(r"In '([^']+)':", str(error))
        inside = f" (in {where.group(1)}.yaml)" if where and where.group(1) != "train" else ""
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        return f"{group}={option} is unknown{inside}; choose one of: {', '.join(options)}{hint}"
    full_key = getattr(cause, "full_key", None)
    if full_key and type(cause).__name__ in ("ConfigAttributeError", "ConfigKeyError"):  # aggregation.taux=1
        parent, _, key = str(full_key).rpartition(".")
        known = _schema_keys(schema, parent)
        if known:  # a typed node; free-form ones (trainer.extra) take new keys with +key=value
            prefix = f"{parent}." if parent else ""
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            scope = f"{parent} has" if parent else "the config has"
            example = ", e.g. aggregation=clip" if schema is TrainConfig else ""
            group_hint = "" if parent else f"; choose a group option with group=name{example}"
            return f"{full_key} is not a config key{hint}; {scope}: {', '.join(known)}{group_hint}"
    message = str(error).split("\nConfig search path:")[0].replace("Error merging override ", "", 1)
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    if cause is not None and type(cause).__module__.startswith("omegaconf"):  # aggregation.tau=hot
        details = [line.strip() for line in str(cause).splitlines() if line.strip()]
        message += f": {details[0]}" if details else ""
    override = getattr(error, "override", None)  # OverrideParseException
    if not override:
        return message
    key, equals, value = override.partition("=")
    quoting = (f"; a value with braces, spaces or other special characters (a prompt template) must be quoted "
               f"for Hydra inside the shell's quotes: '{key}=\"{value}\"'"
               if equals and any(char in value for char in "{}[](),:=' ") and not value.startswith(('"', "'")) else "")
    return f"cannot parse the override {override!r}: {message}{quoting}"


def bad_input_exits(task_function: Callable) -> Callable:
    """Wrap a Hydra task function (under ``@hydra.main``) so that the app's own bad input, a
    ConfigError or DataError, prints one ``sdharness: error: ...`` line and exits with status 2. It
    must be caught inside the task: out of it, Hydra prints its own line before re-raising."""
    @functools.wraps(task_function)
    def task(*args, **kwargs):
        try:
            return task_function(*args, **kwargs)
        except (ConfigError, DataError) as error:
            print(f"sdharness: error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    return task


def cli_errors(hydra_main: Callable, schema: type = TrainConfig) -> Callable:
    """Wrap a ``@hydra.main`` entry point so that a config Hydra cannot compose (unknown group
    option, misspelt key, ill-typed value, unparsable override) prints one
    ``sdharness: error: ...`` line naming the valid choices and exits with status 2, as the
    app's own config and data errors do, instead of Hydra's message and status 1. A multirun
    whose jobs failed (recorded, the others run on) exits with status 1 once it ends.
    ``HYDRA_FULL_ERROR=1`` set by the user keeps Hydra's full behaviour. ``schema``: the app's config
    dataclass, whose keys a misspelt key is matched against."""
    @functools.wraps(hydra_main)
    def main(*args, **kwargs):
        from hydra.errors import ConfigCompositionException, OverrideParseException

        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return hydra_main(*args, **kwargs)
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises instead of printing and exiting 1
        jobs.failed_jobs.clear()
        try:
            result = hydra_main(*args, **kwargs)
        except (ConfigCompositionException, OverrideParseException) as error:
            print(f"sdharness: error: {composition_error_message(error, schema)}", file=sys.stderr, flush=True)
            sys.exit(2)
        finally:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        if jobs.failed_jobs:  # a multirun went on past failed jobs (sdharness/jobs.py); its status says so
            print(f"sdharness: error: {len(jobs.failed_jobs)} job(s) of the sweep failed, each recorded in its "
                  f"{jobs.FAILED_FILE}: {', '.join(jobs.failed_jobs)}", file=sys.stderr, flush=True)
            sys.exit(1)
        return result

    return main
