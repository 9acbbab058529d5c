"""The shoprec command line: help texts and the store status."""

from __future__ import annotations

import pytest
from tests.test_store import make_batch
from typer.testing import CliRunner

from shoprec.cli import app
from shoprec.store import EventStore

runner = CliRunner()


@pytest.mark.parametrize(
    "command", ["ingest", "status", "build-bento", "train", "evaluate", "monitor", "replay"]
)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])

    assert result.exit_code == 0
    assert "Usage" in result.output


def test_status_prints_store_counts(tmp_path, monkeypatch):
    store = EventStore(tmp_path / "data", tmp_path / "staging")
    store.commit([make_batch("b1", "2011-01-04", ["A", "B", "C"])])
    monkeypatch.setenv("SHOPREC_DATA_DIR", str(tmp_path / "data"))

    result = runner.invoke(app, ["status"])

    assert result.exit_code == 0
    assert "rows read" in result.output
    assert "│     1 │         4 │      3 │           1 │          0 │       yes │" in result.output
    assert "quarantined by rule: price_out_of_range: 1" in result.output
