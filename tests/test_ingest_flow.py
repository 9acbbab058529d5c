"""The ingest flow end to end: a real Prefect run, real GX, a real DVC repo, real data."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from shoprec.store import read_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]
DAYS = ["2011-03-04.csv", "2011-03-06.csv"]


def run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True)
    return result.stdout


@pytest.fixture
def project(tmp_path: Path, landing_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh git + DVC project with two real landing days and a header-only file."""
    root = tmp_path / "project"
    landing = tmp_path / "landing"
    root.mkdir()
    landing.mkdir()
    for day in DAYS:
        shutil.copy(landing_dir / day, landing / day)
    (landing / "2011-03-05.csv").write_text((landing_dir / DAYS[0]).read_text().splitlines()[0])
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)

    monkeypatch.chdir(root)
    monkeypatch.setenv("SHOPREC_LANDING_DIR", str(landing))
    monkeypatch.setenv("SHOPREC_PSEUDONYM_KEY", "integration-test-key-0123456789")
    monkeypatch.delenv("SHOPREC_DVC_REMOTE", raising=False)
    return root


def raw_customer_ids(landing: Path) -> set[str]:
    """Customer ids of the real days that appear nowhere else in those files."""
    frames = [pd.read_csv(landing / day, dtype=str, keep_default_na=False) for day in DAYS]
    raw = pd.concat(frames)
    ids = {value.removesuffix(".0") for value in raw["CustomerID"] if value}
    other_text = " ".join(raw.drop(columns="CustomerID").astype(str).agg(" ".join, axis=1))
    return {i for i in ids if i not in other_text}


def test_ingest_flow_versions_store_and_is_idempotent(project, prefect_api, caplog, capsys):
    from flows.ingest import ingest

    caplog.set_level(logging.DEBUG)
    landing = Path(project.parent / "landing")
    expected_rows = sum(len((landing / d).read_text().splitlines()) - 1 for d in DAYS)

    first = ingest()

    totals = first["totals"]
    assert first["files_ingested"] == 2
    assert first["files_rejected"] == {"2011-03-05.csv": "no_data_rows"}
    assert totals["rows_read"] == expected_rows
    assert totals["rows_read"] == totals["stored"] + totals["quarantined"] + totals["duplicates"]
    for entry in first["files"]:
        assert entry["rows_read"] == entry["stored"] + entry["quarantined"] + entry["duplicates"]
    assert len(read_events(project / "data")) == totals["stored"]
    assert (project / "reports/validation/data_docs/index.html").exists()
    assert (project / "reports/validation/2011-03-04.json").exists()
    assert first["data_version"] is not None
    assert first["previous_data_version"] is None
    assert "data" in (project / "data.dvc").read_text()
    assert "Data and pipelines are up to date" in run(
        [sys.executable, "-m", "dvc", "status", "data.dvc"], project
    )

    pointer_before = (project / "data.dvc").read_bytes()
    second = ingest()

    assert second["files_ingested"] == 0
    assert second["totals"]["stored"] == 0
    assert (project / "data.dvc").read_bytes() == pointer_before

    # No raw customer id anywhere in data/, reports/ or the logs.
    raw_ids = raw_customer_ids(landing)
    assert len(raw_ids) > 50
    pattern = re.compile(r"(?<![0-9A-Za-z])(" + "|".join(sorted(raw_ids)) + r")(\.0)?(?![0-9])")
    leaks = []
    for folder in ("data", "reports"):
        for path in (project / folder).rglob("*"):
            if not path.is_file():
                continue
            if path.suffix == ".parquet":
                text = pq.read_table(path).to_pandas().astype(str).to_csv()
            else:
                text = path.read_text(errors="replace")
            leaks += [(str(path), m.group(0)) for m in pattern.finditer(text)]
    logs = caplog.text + capsys.readouterr().out
    leaks += [("logs", m.group(0)) for m in pattern.finditer(logs)]
    assert leaks == []
