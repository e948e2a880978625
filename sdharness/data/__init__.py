"""Data: problems (or logged chats) -> encoded, left-padded prompt batches.

``data.name`` picks a source; :data:`SOURCES` is the only list of them and says what each one is,
so that the config check, the datamodule, the SD step and the probe ask it rather than a name.
Adding a source is one entry here, its reader in ``loading.load_data`` and ``conf/data/<name>.yaml``.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSource:
    """``reads_path``: rows come from ``data.path``. ``logged_completions``: rows are logged chats whose
    assistant turns are ``g`` (nothing is generated). ``built_in_task``: a generated task, the one
    ``data.task`` names (:data:`sdharness.data.builtin.TASKS`: both reference notations, slip analysis
    in the probe)."""

    reads_path: bool = True
    logged_completions: bool = False
    built_in_task: bool = False


SOURCES = {
    "arithmetic": DataSource(reads_path=False, built_in_task=True),
    "jsonl": DataSource(),
    "chatlog": DataSource(logged_completions=True),
}
