"""`shoprec ingest` killed with SIGKILL in the middle of a file, then run again.

Each test builds two identical git + DVC projects on six real landing days. Project A is
ingested once without interruption. Project B is ingested by a `shoprec ingest` subprocess
that is killed at a known point, then ingested again to the end. The rerun must leave B's
store and data.dvc exactly as A's.

The kill points are deterministic. The store's test-only hook (SHOPREC_FAULT_PAUSE_AT) makes
a commit block at a named step, and a landing file that is a named pipe keeps its parse task
waiting for input. Every subprocess talks to the session's temporary Prefect API on
127.0.0.1, so no run starts a server of its own.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from shoprec.store import (
    CATALOGUE,
    FAULT_MARKER_ENV,
    FAULT_PAUSE_ENV,
    MANIFEST,
    EventStore,
    read_catalogue,
    read_events,
)
from shoprec.summary import IngestSummary

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]
DAYS = [
    "2011-03-01.csv",
    "2011-03-02.csv",
    "2011-03-03.csv",
    "2011-03-04.csv",
    "2011-03-06.csv",
    "2011-03-07.csv",
]
FILES_PER_COMMIT = 2  # six files make three store transactions
PSEUDONYM_KEY = "fault-injection-test-key-0123456789"
WAIT_SECONDS = 150  # upper bound for one ingest run to reach a kill point or finish
STAGING = ".shoprec/staging"


def run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True)
    return result.stdout


def make_project(root: Path, landing_dir: Path) -> Path:
    """Create a git + DVC project under `root` with its own copy of the landing days."""
    project = root / "project"
    landing = root / "landing"
    project.mkdir(parents=True)
    landing.mkdir()
    for day in DAYS:
        shutil.copy(landing_dir / day, landing / day)

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["ingest"]["files_per_commit"] = FILES_PER_COMMIT
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    run(["git", "init", "-q"], project)
    run([sys.executable, "-m", "dvc", "init", "-q"], project)
    return project


def ingest_env(project: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of one `shoprec ingest` subprocess of `project`."""
    from prefect.settings import PREFECT_API_URL

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SHOPREC_", "PREFECT_"))
    }
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
            "PREFECT_API_URL": str(PREFECT_API_URL.value()),
            "PREFECT_HOME": str(project.parent / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "SHOPREC_LANDING_DIR": str(project.parent / "landing"),
            "SHOPREC_PSEUDONYM_KEY": PSEUDONYM_KEY,
            "SHOPREC_TASK_RUNNER": "thread",
            "COLUMNS": "200",
        }
    )
    env.update(extra or {})
    return env


@dataclass
class IngestRun:
    """One `shoprec ingest` subprocess and the file that receives its output."""

    process: subprocess.Popen
    log: Path

    def output(self, tail: int | None = None) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return text if tail is None else text[-tail:]

    def stop(self) -> None:
        """SIGKILL the process group unless the run has ended."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def started() -> Iterator[list[IngestRun]]:
    """Runs started by a test; any still running at teardown is killed with its group."""
    runs: list[IngestRun] = []
    yield runs
    for ingest_run in runs:
        ingest_run.stop()


def start_ingest(
    project: Path, started: list[IngestRun], extra_env: dict[str, str] | None = None
) -> IngestRun:
    """Start `shoprec ingest` in its own process group, with its output going to a file."""
    log = project.parent / f"ingest-{len(started)}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "shoprec.cli", "ingest"],
            cwd=project,
            env=ingest_env(project, extra_env),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ingest_run = IngestRun(process, log)
    started.append(ingest_run)
    return ingest_run


def ingest_to_end(project: Path, started: list[IngestRun]) -> str:
    """Run `shoprec ingest` to completion and return its output."""
    ingest_run = start_ingest(project, started)
    try:
        code = ingest_run.process.wait(timeout=WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"shoprec ingest did not finish in {WAIT_SECONDS} s:\n{ingest_run.output(3000)}"
        )
    assert code == 0, ingest_run.output(3000)
    return ingest_run.output()


def wait_until(condition: Callable[[], bool], ingest_run: IngestRun, description: str) -> None:
    """Poll `condition` until it holds; fail when the run exits or time runs out."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if ingest_run.process.poll() is not None:
            pytest.fail(
                f"shoprec ingest exited ({ingest_run.process.returncode}) before "
                f"{description}:\n{ingest_run.output(3000)}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_SECONDS} s waiting for {description}")
        time.sleep(0.2)


def kill(ingest_run: IngestRun) -> None:
    """SIGKILL the ingest process and any child it started."""
    os.killpg(ingest_run.process.pid, signal.SIGKILL)
    assert ingest_run.process.wait(timeout=30) == -signal.SIGKILL


def committed_files(project: Path) -> list[str]:
    path = project / "data" / MANIFEST
    if not path.exists():
        return []
    manifest = json.loads(path.read_text(encoding="utf-8"))  # replaced atomically by commits
    return sorted(batch["source_file"] for batch in manifest["batches"].values())


def staged_folders(project: Path) -> list[Path]:
    staging = project / STAGING
    return sorted(staging.iterdir()) if staging.exists() else []


def data_files(project: Path) -> set[str]:
    data = project / "data"
    return {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()}


def referenced_files(project: Path) -> set[str]:
    """Files of data/ that the committed manifest refers to, with the manifest itself."""
    manifest = EventStore(project / "data", project / STAGING).manifest()
    files = {MANIFEST, CATALOGUE}
    for batch in manifest["batches"].values():
        files.update(batch["event_files"])
        if batch["quarantine_file"]:
            files.add(batch["quarantine_file"])
    return files


def store_totals(project: Path) -> dict[str, Any]:
    """Totals of the committed store, as `shoprec status` prints them."""
    manifest = EventStore(project / "data", project / STAGING).manifest()
    files = [{"source_file": b["source_file"], **b["counts"]} for b in manifest["batches"].values()]
    return IngestSummary(files=files).totals()


def data_dvc_outs(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / "data.dvc").read_text(encoding="utf-8"))["outs"][0]


def sorted_events(project: Path) -> pd.DataFrame:
    events = read_events(project / "data")
    return events.sort_values("event_id", kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, landing_dir: Path, prefect_api) -> Path:
    """Project A: the six days ingested by one uninterrupted `shoprec ingest`."""
    project = make_project(tmp_path_factory.mktemp("reference"), landing_dir)
    runs: list[IngestRun] = []
    try:
        ingest_to_end(project, runs)
    finally:
        for ingest_run in runs:
            ingest_run.stop()
    return project


@pytest.fixture
def interrupted(tmp_path: Path, landing_dir: Path, prefect_api) -> Path:
    """Project B, identical to the reference project before any ingest."""
    return make_project(tmp_path, landing_dir)


def assert_same_store(project: Path, reference: Path, landing_dir: Path) -> None:
    """Check that `project` ended exactly as the uninterrupted reference run."""
    expected_rows = sum(
        len((landing_dir / day).read_text(encoding="utf-8").splitlines()) - 1 for day in DAYS
    )
    events = sorted_events(project)
    pd.testing.assert_frame_equal(events, sorted_events(reference))
    assert events["event_id"].is_unique
    pd.testing.assert_frame_equal(
        read_catalogue(project / "data"), read_catalogue(reference / "data")
    )

    totals = store_totals(project)
    assert totals == store_totals(reference)
    assert totals["conserved"] is True
    assert totals["rows_read"] == expected_rows
    assert totals["stored"] == len(events)
    assert totals["rows_read"] == totals["stored"] + totals["quarantined"] + totals["duplicates"]
    assert committed_files(project) == DAYS

    manifest = (project / "data" / MANIFEST).read_bytes()
    assert manifest == (reference / "data" / MANIFEST).read_bytes()
    assert data_files(project) == referenced_files(project)
    assert data_files(project) == data_files(reference)
    assert staged_folders(project) == []

    outs = data_dvc_outs(project)
    assert outs["md5"] == data_dvc_outs(reference)["md5"]
    assert outs["nfiles"] == len(data_files(reference))
    assert "Data and pipelines are up to date" in run(
        [sys.executable, "-m", "dvc", "status", "data.dvc"], project
    )


@pytest.mark.timeout(480)
@pytest.mark.parametrize(
    ("pause_at", "committed_before_kill", "recovery"),
    [
        # Second transaction, after its event files were moved into data/events and before
        # the manifest lists them, so the rerun must drop those files and ingest days 3-6.
        pytest.param(
            "partitions_written:2",
            DAYS[:2],
            "discarded uncommitted batch txn-2011-03-03-",
            id="before-commit-point",
        ),
        # Second transaction, after its commit point and before the catalogue is replaced,
        # so the rerun must finish the catalogue and ingest days 5-6 only.
        pytest.param(
            "manifest_committed:2",
            DAYS[:4],
            "finished catalogue of committed batch txn-2011-03-03-",
            id="after-commit-point",
        ),
    ],
)
def test_kill_mid_commit_then_rerun(
    interrupted, reference, landing_dir, started, pause_at, committed_before_kill, recovery
):
    marker = interrupted.parent / "paused"
    fault = {FAULT_PAUSE_ENV: pause_at, FAULT_MARKER_ENV: str(marker)}

    ingest_run = start_ingest(interrupted, started, fault)
    wait_until(marker.exists, ingest_run, f"the commit paused at {pause_at}")
    kill(ingest_run)

    assert committed_files(interrupted) == committed_before_kill
    committed_ids = set(sorted_events(interrupted)["batch_id"])
    reference_events = sorted_events(reference)
    expected = reference_events[reference_events["batch_id"].isin(committed_ids)]
    assert len(expected) > 0
    pd.testing.assert_frame_equal(sorted_events(interrupted), expected.reset_index(drop=True))
    staged = staged_folders(interrupted)
    assert len(staged) == 1
    if pause_at.startswith("partitions_written"):
        orphans = data_files(interrupted) - referenced_files(interrupted)
        # Batch ids start with the day, so every orphan belongs to the second transaction.
        assert {Path(name).name[:10] for name in orphans} == {d[:10] for d in DAYS[2:4]}
        assert any(name.startswith("events/") for name in orphans)
    else:
        assert (staged[0] / CATALOGUE).exists()
    assert not (interrupted / "data.dvc").exists()

    output = ingest_to_end(interrupted, started)

    assert f"store recovery: {recovery}" in output
    assert_same_store(interrupted, reference, landing_dir)


@pytest.mark.timeout(480)
def test_kill_while_parsing_file_then_rerun(interrupted, reference, landing_dir, started):
    # The fifth day is a named pipe. Its parse task opens it and waits for the rest of the
    # file while days 1-4 are committed in two transactions.
    fifo_day = DAYS[4]
    landing = interrupted.parent / "landing"
    (landing / fifo_day).unlink()
    os.mkfifo(landing / fifo_day)
    content = (landing_dir / fifo_day).read_bytes()

    ingest_run = start_ingest(interrupted, started)
    writer: int | None = None

    def parse_task_opened_file() -> bool:
        nonlocal writer
        try:
            writer = os.open(landing / fifo_day, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: no reader has opened the pipe yet
                raise
            return False
        return True

    try:
        wait_until(parse_task_opened_file, ingest_run, f"the parse task opened {fifo_day}")
        assert os.write(writer, content[:4096]) == 4096
        wait_until(lambda: committed_files(interrupted) == DAYS[:4], ingest_run, "days 1-4")
        kill(ingest_run)
    finally:
        if writer is not None:
            os.close(writer)

    assert committed_files(interrupted) == DAYS[:4]
    assert set(sorted_events(interrupted)["batch_id"].str[:10]) == {d[:10] for d in DAYS[:4]}
    assert staged_folders(interrupted) == []
    assert not (interrupted / "data.dvc").exists()

    (landing / fifo_day).unlink()
    shutil.copy(landing_dir / fifo_day, landing / fifo_day)
    ingest_to_end(interrupted, started)

    assert_same_store(interrupted, reference, landing_dir)
