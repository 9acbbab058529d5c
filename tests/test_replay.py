"""Replay bookkeeping: landing days, the retrain budget, state, timeline and summary files."""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
import typer
import yaml
from flows.ingest import ingest
from flows.replay import replay
from tests.test_monitor_flow import build_bundle, register_champion
from tests.test_train_flow import FAKE_PIPELINE, model_store  # noqa: F401 - pytest fixture
from typer.testing import CliRunner

from shoprec import cli_monitor, registry
from shoprec.config import load_params
from shoprec.replay import (
    ReplayConfig,
    ReplayError,
    build_timeline,
    landing_days,
    may_retrain,
    read_state,
    summarize,
    write_outputs,
    write_state,
)
from shoprec.store import read_events

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = ReplayConfig(cutoff=date(2011, 9, 30), max_retrains=2, min_retrain_gap_days=10)


def record(day: str, quality: float, baseline: float, decision: str = "keep", retrained=False):
    return {
        "day": day,
        "model_tag": "shoprec:b" if day > "2011-10-05" else "shoprec:a",
        "n_rows": 2000,
        "n_users": 50,
        "drift_share": 0.1,
        "decision": decision,
        "reasons": ["drift share 0.40 >= 0.3"] if decision == "retrain" else ["no rule fired"],
        "quality": quality,
        "quality_without_retraining": baseline,
        "hit_rate": 0.8,
        "hit_rate_without_retraining": 0.7,
        "retrained": retrained,
        "retrain_reason": "drift share 0.40 >= 0.3" if retrained else "monitor decision: keep",
        "promoted": True if retrained else None,
    }


RECORDS = [
    record("2011-10-03", 0.30, 0.30),
    record("2011-10-05", 0.20, 0.20, decision="retrain", retrained=True),
    record("2011-10-06", 0.34, 0.22),
    record("2011-10-07", None, None, decision="skip"),
]


def test_landing_days_after_cutoff(tmp_path: Path):
    for name in ("2011-09-30.csv", "2011-10-02.csv", "2011-10-03.csv", "notes.csv"):
        (tmp_path / name).write_text("x")

    days = landing_days(tmp_path, "*.csv", date(2011, 9, 30), None)
    until = landing_days(tmp_path, "*.csv", date(2011, 9, 30), date(2011, 10, 2))

    assert days == [date(2011, 10, 2), date(2011, 10, 3)]
    assert until == [date(2011, 10, 2)]
    with pytest.raises(ReplayError, match="landing folder .* not found"):
        landing_days(tmp_path / "missing", "*.csv", date(2011, 9, 30), None)


@pytest.mark.parametrize(
    ("day", "decision", "done", "expected", "reason"),
    [
        (date(2011, 10, 20), "keep", [], False, "monitor decision: keep"),
        (date(2011, 10, 20), "retrain", [], True, "monitor decision: retrain"),
        (date(2011, 10, 20), "retrain", [date(2011, 10, 15)], False, "last retrain 5 days ago"),
        (
            date(2011, 11, 30),
            "retrain",
            [date(2011, 10, 1), date(2011, 10, 20)],
            False,
            "retrain budget used (2 retrains)",
        ),
    ],
)
def test_may_retrain_respects_budget_and_gap(day, decision, done, expected, reason):
    allowed, budget_reason = may_retrain(day, decision, done, CONFIG)

    assert allowed is expected
    assert budget_reason.startswith(reason)


def test_summary_compares_same_days():
    summary = summarize(build_timeline(RECORDS), CONFIG)

    assert summary["days_replayed"] == 4
    assert summary["days_compared"] == 3
    assert summary["mean_with_retraining"] == pytest.approx(0.28)
    assert summary["mean_without_retraining"] == pytest.approx(0.24)
    assert summary["difference"] == pytest.approx(0.04)
    assert summary["retrains"] == [
        {"day": "2011-10-05", "reasons": "drift share 0.40 >= 0.3", "promoted": True}
    ]
    assert summary["decisions"] == {"keep": 2, "retrain": 1, "skip": 1}


def test_outputs_are_written_and_stable(tmp_path: Path):
    first = write_outputs(RECORDS, tmp_path, CONFIG)
    files = {
        name: (tmp_path / name).read_bytes() for name in sorted(p.name for p in tmp_path.iterdir())
    }
    second = write_outputs(RECORDS, tmp_path, CONFIG)

    assert set(files) == {
        "summary.json",
        "summary.md",
        "timeline.csv",
        "timeline.json",
        "timeline.png",
    }
    assert first == second
    assert files == {name: (tmp_path / name).read_bytes() for name in files}
    assert json.loads(files["summary.json"])["mean_with_retraining"] == pytest.approx(0.28)
    assert "| with retraining | 0.2800 |" in files["summary.md"].decode()
    assert files["timeline.png"][:4] == b"\x89PNG"


def test_state_round_trip(tmp_path: Path):
    path = tmp_path / "replay" / "state.json"
    state = {"days": RECORDS[:2], "initial_model": "shoprec:a"}

    write_state(state, path)

    assert read_state(path) == state
    assert read_state(tmp_path / "none.json") == {"days": [], "initial_model": None}


@pytest.mark.parametrize(
    ("command", "option", "text"),
    [
        ("monitor", "--day", "Day to monitor"),
        ("monitor", "--no-retrain", "do not start training"),
        ("replay", "--end", "Last day to replay"),
    ],
)
def test_cli_commands_document_options(command, option, text):
    app = typer.Typer()
    cli_monitor.register(app)

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0
    assert option in result.output
    assert text in result.output


@pytest.mark.slow
@pytest.mark.integration
def test_replay_flow_plays_days_once(
    tmp_path: Path,
    landing_dir: Path,
    model_store: Path,  # noqa: F811 - pytest fixture
    prefect_api: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "fake_pipeline.py").write_text(FAKE_PIPELINE)
    params = load_params(REPO_ROOT / "params.yaml")
    params["replay"] = {"cutoff": "2010-12-07", "end": "2010-12-10", "max_retrains": 1}
    sections = ("ingest", "validate", "gate", "monitor", "replay")
    (project / "params.yaml").write_text(yaml.safe_dump({s: params[s] for s in sections}))
    monkeypatch.chdir(project)
    monkeypatch.setenv("SHOPREC_LANDING_DIR", str(landing_dir))
    monkeypatch.setenv("SHOPREC_DVC_ENABLED", "false")
    monkeypatch.setenv("SHOPREC_PSEUDONYM_KEY", "replay-test-key-of-32-characters")

    ingest(until=date(2010, 12, 7), version=False)
    bundle = build_bundle(
        read_events(Path("data")),
        label_cutoff=pd.Timestamp("2010-12-05", tz="UTC"),
        cutoff=pd.Timestamp("2010-12-08", tz="UTC"),
    )
    bundle.save(tmp_path / "bundle")
    champion = register_champion(tmp_path / "bundle")
    # A challenger scoring 0.1 fails the gate against the champion's 0.2, so it stays in force.
    fake_repro = [sys.executable, "fake_pipeline.py", "0.1"]

    first = replay(project_dir=project, repro_cmd=fake_repro)
    out_dir = project / "reports" / "replay"
    files = {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}
    second = replay(project_dir=project, repro_cmd=fake_repro)

    timeline = pd.read_csv(out_dir / "timeline.csv")
    assert timeline["day"].tolist() == ["2010-12-08", "2010-12-09", "2010-12-10"]
    assert set(timeline["model_tag"]) == {champion}
    assert timeline["retrained"].sum() <= 1
    assert (timeline.loc[timeline["retrained"], "decision"] == "retrain").all()
    assert timeline["quality"].tolist() == timeline["quality_without_retraining"].tolist()
    assert first == second
    assert files == {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}
    assert str(registry.get_champion().tag) == champion
    assert (project / "reports" / "drift" / "2010-12-10.json").exists()
