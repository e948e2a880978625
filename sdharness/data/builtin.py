"""The generated tasks of ``data=arithmetic``, by ``data.task``: the only list of them.

Adding a task is one :class:`sdharness.data.tasks.BuiltinTask` subclass and its entry here; the
datamodule, the testbed's pretraining and ``sdharness-probe`` ask this registry, never a task's name.
"""

from __future__ import annotations

from sdharness.errors import ConfigError
from sdharness.data.columns import COLUMNS
from sdharness.data.chain import CHAIN
from sdharness.data.tasks import BuiltinTask

TASKS: dict[str, BuiltinTask] = {
    "chain": CHAIN,      # chained operations; each result feeds the next (sdharness/data/chain.py)
    "columns": COLUMNS,  # multi-digit addition, one line per column (sdharness/data/columns.py)
}


def builtin_task(name: str, field: str = "data.task") -> BuiltinTask:
    if name not in TASKS:
        raise ConfigError(f"{field}={name!r} is unknown; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def check_difficulty(field: str, difficulty: str, task_name: str) -> None:
    """``difficulty`` (the value of ``field``) is one of ``data.task``'s; else one ConfigError line
    saying which task has it or that none does."""
    task = builtin_task(task_name)
    if difficulty in task.difficulties:
        return
    owners = [name for name, other in TASKS.items() if difficulty in other.difficulties]
    fix = f" or set data.task={owners[0]}" if owners else ""
    raise ConfigError(f"{field}={difficulty!r} is not a difficulty of data.task={task_name}; choose one of: "
                      f"{', '.join(task.difficulties)}{fix}")
