"""sdharness-report --publish: the W&B Report it builds (a fake wandb_workspaces: no network), the
clear errors without the package, offline or without a group, and the local report written first."""

import os
import subprocess
import sys
import types

import pytest

from sdharness.report.build import main
from tests.report.test_report import fake_run, sweep  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # end-to-end: whole runs, subprocesses or sweeps


class Recorder:
    """Stands for a wandb_workspaces.reports.v2 class: keeps its keyword arguments as attributes."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.__dict__.update(kwargs)


class FakeReport(Recorder):
    saved = []

    def __init__(self, **kwargs):
        super().__init__(**{"entity": "default-entity", "blocks": [], **kwargs})  # W&B's default entity
        self.id = ""

    def save(self):
        self.id = "abc123"
        FakeReport.saved.append(self)

    @property
    def url(self):
        return f"https://wandb.ai/{self.entity}/{self.project}/reports/x--{self.id}"


def fake_workspaces(monkeypatch) -> types.ModuleType:
    FakeReport.saved = []
    wr = types.ModuleType("wandb_workspaces.reports.v2")
    wr.Report = FakeReport
    for name in ("Runset", "PanelGrid", "LinePlot", "MarkdownBlock"):
        setattr(wr, name, type(name, (Recorder,), {}))
    package, reports = types.ModuleType("wandb_workspaces"), types.ModuleType("wandb_workspaces.reports")
    package.reports, reports.v2 = reports, wr
    for module in (package, reports, wr):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return wr


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)


def test_publish_builds_and_saves_a_wandb_report_of_the_sweep(sweep, tmp_path, monkeypatch, online, capsys):  # noqa: F811
    fake_workspaces(monkeypatch)
    main([str(sweep), "--out", str(tmp_path / "out"), "--publish", "--wandb-entity", "team"])
    out = capsys.readouterr().out
    assert (tmp_path / "out" / "report.md").exists()
    [report] = FakeReport.saved
    assert "W&B Report: https://wandb.ai/team/sdharness/reports/x--abc123" in out
    assert report.title == f"Sweep report: {sweep}" and (report.project, report.entity) == ("sdharness", "team")
    text, grid = report.blocks
    assert type(text).__name__ == "MarkdownBlock" and type(grid).__name__ == "PanelGrid"
    assert "W&B group `g`: 4 completed, 0 failed, 0 incomplete of 4 runs." in text.text
    assert "| sd/clip/tau=1 | 2 | 0.650 ± 0.635 |" in text.text  # the local score table
    assert "| sd/clip/tau=1 | 2/2 | 400 ± 0 | 0.400 |" in text.text and "| sft | 0/1 | not reached |" in text.text
    [runset] = grid.runsets
    assert runset.filters == "Metric('Group') == 'g'"  # only the sweep's runs
    assert (runset.entity, runset.project) == ("team", "sdharness")
    assert runset.groupby == ["config.algo.name"]  # seeds of one label are averaged
    plots = {(p.x, tuple(p.y)) for p in grid.panels}
    assert {("train/generated_tokens", ("eval/accuracy",)), ("train/flops", ("eval/accuracy",)),
            ("train/problems_seen", ("eval/accuracy",)), ("train/wall_seconds", ("eval/accuracy",)),
            ("train/generated_tokens", ("eval/early_answer_rate",))} <= plots
    assert all(p.groupby_aggfunc == "mean" and p.groupby_rangefunc == "minmax" for p in grid.panels)


def test_publish_groups_by_the_keys_that_make_the_labels(tmp_path, monkeypatch, online, capsys):
    wr = fake_workspaces(monkeypatch)
    more = {"logger": {"group": "tau-sweep", "project": "proj", "entity": None}}
    for i, (tau, lr) in enumerate([(1.0, 1e-5), (2.0, 1e-5), (1.0, 1e-4)]):
        fake_run(tmp_path / "s" / str(i), "sd", [(0, 0.1), (10, 0.2)], tau=tau, lr=lr, more=more)
    fake_run(tmp_path / "s" / "3", "sd", [(0, 0.1), (10, 0.2)], more={**more, "rollout": {"guidance": "always"}})
    main([str(tmp_path / "s"), "--publish", "--target-accuracy", "0.2"])
    [report] = FakeReport.saved
    assert (report.project, report.entity) == ("proj", "default-entity")  # from the runs' logger config
    runset = report.blocks[1].runsets[0]
    assert runset.filters == "Metric('Group') == 'tau-sweep'" and runset.entity == "default-entity"
    assert runset.groupby == ["config.aggregation.tau", "config.rollout.guidance", "config.optim.lr"]
    assert isinstance(report.blocks[0], wr.MarkdownBlock) and "sd/clip/tau=1 guided=always" in report.blocks[0].text


def test_publish_without_the_package_or_offline_says_what_to_install_and_set(sweep, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", None)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit) as exit_:
        main([str(sweep), "--out", str(tmp_path / "out"), "--publish"])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert "pip install -e '.[report]'" in captured.err and "set WANDB_API_KEY" in captured.err
    assert f"The local report is written: {tmp_path / 'out' / 'report.md'}" in captured.err
    assert (tmp_path / "out" / "report.md").exists() and "| grpo | 1 |" in captured.out  # written first


def test_publish_needs_a_wandb_group_and_reports_a_failed_save(tmp_path, monkeypatch, online, capsys):
    fake_workspaces(monkeypatch)
    fake_run(tmp_path / "s" / "0", "sd", [(0, 0.1), (10, 0.2)], more={"logger": {"group": None}})
    with pytest.raises(SystemExit):
        main([str(tmp_path / "s"), "--publish"])
    assert "run the sweep with logger.group=NAME" in capsys.readouterr().err and not FakeReport.saved
    fake_run(tmp_path / "s" / "1", "sd", [(0, 0.1), (10, 0.2)], more={"logger": {"group": "other"}}, seed=1)
    fake_run(tmp_path / "s" / "2", "sd", [(0, 0.1), (10, 0.2)], more={"logger": {"group": "more"}}, seed=2)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "s"), "--publish"])
    assert "several logger.group values (more, other); publish one group" in capsys.readouterr().err

    def refuse(self):
        raise ConnectionError("no route to api.wandb.ai")

    monkeypatch.setattr(FakeReport, "save", refuse)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "s" / "1"), "--publish", "--wandb-project", "p"])
    assert "saving the W&B Report to default-entity/p failed: ConnectionError" in capsys.readouterr().err


def test_the_local_report_imports_neither_the_publisher_nor_wandb(sweep, tmp_path):  # noqa: F811
    code = ("import sys; from sdharness.report.build import main; main([sys.argv[1], '--out', sys.argv[2]]); "
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('wandb', 'wandb_workspaces', 'requests')]; "
            "assert not loaded and 'sdharness.report.publish' not in sys.modules, loaded")
    result = subprocess.run([sys.executable, "-c", code, str(sweep), str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_real_package_accepts_what_publish_builds(sweep, tmp_path):  # noqa: F811
    """With wandb-workspaces installed: the same objects through its real (pydantic) classes, not saved."""
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    from wandb_workspaces.expr import expr_to_filters, groupby_str_to_key

    from sdharness.report.publish import build
    from sdharness.report.build import build_report
    from sdharness.report.runs import find_runs

    result = build_report(find_runs(sweep), tmp_path / "out", plots=False, title="multirun/x")
    report = build(wr, result, group="g", project="sdharness", entity="team")
    assert report.title == "Sweep report: multirun/x" and len(report.blocks) == 2
    grid = report.blocks[1]
    assert isinstance(grid, wr.PanelGrid) and all(isinstance(p, wr.LinePlot) for p in grid.panels)
    assert "| grpo | 1 |" in report.blocks[0]._to_model().content
    assert [p._to_model().config.x_axis for p in grid.panels][:2] == ["train/problems_seen", "train/generated_tokens"]
    leaf = expr_to_filters(grid.runsets[0].filters)  # the run attribute "group", not a config key
    assert (leaf.key.section, leaf.key.name, leaf.op, leaf.value) == ("run", "group", "=", "g")
    key = groupby_str_to_key(grid.runsets[0].groupby[0])  # sdharness-train logs its config as a nested dict
    assert (key.section, key.name) == ("config", "algo.value.name")
