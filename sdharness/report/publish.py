"""``sdharness-report --publish``: the sweep's report as a W&B Report (``wandb_workspaces.reports.v2``).

Online only, and optional: it needs the ``report`` extra (``pip install -e '.[report]'``, the
``wandb-workspaces`` package) and online W&B (``WANDB_API_KEY`` set, ``WANDB_MODE`` not offline or
disabled). ``sdharness-report`` imports this module only for ``--publish`` and only after the local
report is written, so the local report never depends on the package or the network.

The W&B Report holds the local report's summary, final-score table and tokens-to-target table as a
markdown block, and a panel grid over the runs of the sweep's W&B group (``logger.group``, or
``--wandb-group``) with line plots of the eval metrics against each cost counter, runs grouped by
the config keys that make their labels (mean over seeds, min-max band).
"""

from __future__ import annotations

from sdharness.report.curves import AXIS_NAMES
from sdharness.report.runs import METHOD_KEYS, SETTING_KEYS, Run, differing_keys, extra_label_keys

INSTALL = "pip install -e '.[report]'  (or: pip install wandb-workspaces)"
EVAL_METRICS = {"eval/accuracy": "eval accuracy", "eval/early_answer_rate": "early-answer rate",
                "eval/leakage_rate": "leakage rate"}
TITLE_MAX = 128  # W&B's limit on a report title


class PublishError(RuntimeError):
    """Publishing is impossible here (package missing, W&B offline, no group) or failed."""


def single(runs: list[Run], key: str, fix: str):
    """The one value of ``key`` over the runs (None when unset); several values are an error."""
    values = {r.config.get(key) for r in runs} - {None}
    if len(values) > 1:
        raise PublishError(f"the runs have several {key} values ({', '.join(sorted(map(str, values)))}); {fix}")
    return next(iter(values), None)


def destination(runs: list[Run], group=None, project=None, entity=None) -> tuple[str, str, str | None]:
    """(group, project, entity) of the runs on W&B: the arguments, else the runs' ``logger.*``."""
    one_group = "publish one group at a time: sdharness-report --wandb-group NAME --publish"
    group = group or single(runs, "logger.group", one_group)
    if not group:
        raise PublishError("the runs were logged without a W&B group (logger.group is null), so a W&B Report cannot "
                           "select them; run the sweep with logger.group=NAME (sweeps/*.yaml set one)")
    project = project or single(runs, "logger.project", "pass --wandb-project") or "sdharness"
    return str(group), str(project), entity or single(runs, "logger.entity", "pass --wandb-entity")


def group_keys(runs: list[Run]) -> list[str]:
    """The config keys that tell the runs' labels apart (method, setting, other differing keys)."""
    done = [r for r in runs if r.status == "completed"] or runs
    keys = [*METHOD_KEYS, *SETTING_KEYS, *(["data.path"] if any(r.bootstrapped for r in done) else []),
            *(k for family_keys in extra_label_keys(runs).values() for k in family_keys)]
    differ = set(differing_keys([r.config for r in done]))
    return [k for k in dict.fromkeys(keys) if k in differ] or ["algo.name"]


def reports_module():
    """``wandb_workspaces.reports.v2``, or a :class:`PublishError` saying what to install and set."""
    from sdharness.config import resolve_wandb_mode

    problems, wr = [], None
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as error:
        problems.append(f"the wandb-workspaces package is not installed ({error}); install it: {INSTALL}")
    mode = resolve_wandb_mode("auto")
    if mode != "online":
        problems.append(f"W&B is {mode}: set WANDB_API_KEY (and leave WANDB_MODE unset or online); "
                        "the runs must be on W&B too (offline runs: wandb sync <run dir>/wandb/offline-run-*)")
    if problems:
        raise PublishError("cannot publish a W&B Report: " + "; ".join(problems))
    return wr


def markdown(result: dict, group: str) -> str:
    """The W&B Report's text: the local report's summary, score table and tokens-to-target section."""
    return "\n".join([f"W&B group `{group}`: {result['summary']} Written by `sdharness-report --publish`; "
                      "the local report (report.md) also has the config differences and failed jobs.", "",
                      "## Final scores", "", "Last eval of each run; mean ± std over seeds.", "", result["table"], "",
                      "## Tokens to target", "", result["to_target_md"]])


def build(wr, result: dict, *, group: str, project: str, entity: str | None):
    """The ``wr.Report`` (not saved): a markdown block, then line plots of the group's runs."""
    title = f"Sweep report: {result.get('title') or group}"[:TITLE_MAX]
    report = wr.Report(project=project, title=title, description=f"sdharness sweep, W&B group {group}",
                       width="fluid", **({"entity": entity} if entity else {}))  # else W&B's default entity
    runset = wr.Runset(entity=report.entity, project=project, name=f"group {group}",
                       filters=f"Metric('Group') == {group!r}",
                       groupby=[f"config.{key}" for key in group_keys(result["runs"])])
    curves = [(metric, name, axis, axis_name)  # accuracy against every cost counter, the other rates against tokens
              for metric, name in EVAL_METRICS.items() for axis, axis_name in AXIS_NAMES.items()
              if metric == "eval/accuracy" or axis == "generated_tokens"]
    panels = [wr.LinePlot(title=f"{name} vs {axis_name}", x=f"train/{axis}", y=[metric], title_x=axis_name,
                          title_y=name, groupby_aggfunc="mean", groupby_rangefunc="minmax")
              for metric, name, axis, axis_name in curves]
    report.blocks = [wr.MarkdownBlock(text=markdown(result, group)), wr.PanelGrid(runsets=[runset], panels=panels)]
    return report


def publish(result: dict, *, group: str | None = None, project: str | None = None, entity: str | None = None) -> str:
    """Save the report of :func:`sdharness.report.build.build_report` as a W&B Report; returns its URL."""
    wr = reports_module()
    group, project, entity = destination(result["runs"], group, project, entity)
    report = build(wr, result, group=group, project=project, entity=entity)
    try:
        report.save()
        return report.url
    except Exception as error:  # network, permissions, a project W&B does not know...
        raise PublishError(f"saving the W&B Report to {report.entity}/{project} failed: {error!r}") from error
