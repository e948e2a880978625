"""The runs of a W&B group as :class:`sdharness.report.runs.Run` (``sdharness-report --wandb-group``).

Online only, through ``wandb.Api()`` (needs ``WANDB_API_KEY`` or ``wandb login``); the local report
never imports this module. Metrics come from each run's full history (``scan_history``), the config
from the resolved config that ``sdharness-train`` logs; W&B states other than finished/running count
as failed. A run counts as trained on bootstrapped data only when its ``data.path`` is readable here.
"""

from __future__ import annotations

from sdharness.report.runs import Run, bootstrapped_data, flatten, number


def load_wandb_runs(group: str, project: str, entity: str | None = None) -> list[Run]:
    """The runs of a W&B group through ``wandb.Api()`` (online; optional)."""
    try:
        import wandb
    except ImportError as error:  # pragma: no cover
        raise SystemExit(f"sdharness-report: --wandb-group needs the wandb package ({error})")
    runs = []
    for remote in wandb.Api().runs(f"{entity}/{project}" if entity else project, filters={"group": group}):
        rows = [{k: number(v) for k, v in row.items()} for row in remote.scan_history()]
        config = {k: v for k, v in dict(remote.config).items() if not k.startswith("_")}  # not W&B's own keys
        failure = None if remote.state in ("finished", "running") else {
            "error_type": f"W&B state {remote.state}", "message": remote.url, "traceback_tail": ""}
        config = flatten(config)  # bootstrapped: only when its data file is on this machine (same path)
        runs.append(Run(remote.name, config, rows, failure, remote.state == "finished",
                        bootstrapped=bootstrapped_data(config)))
    return runs
