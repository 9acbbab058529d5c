"""Atomic, idempotent commits of the event store, and recovery after a crash."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from shoprec.exceptions import StoreError
from shoprec.store import BatchToCommit, CrashInjected, EventStore


def make_batch(batch_id: str, day: str, items: list[str], price: float = 1.0) -> BatchToCommit:
    ts = pd.Timestamp(day, tz="UTC") + pd.to_timedelta(range(len(items)), unit="min")
    events = pd.DataFrame(
        {
            "event_id": [f"{batch_id}-{i}" for i in range(len(items))],
            "user_id": ["u0000000000000001"] * len(items),
            "item_id": items,
            "event_type": "purchase",
            "quantity": 1,
            "price": price,
            "ts": ts,
            "order_id": "1",
            "country": "United Kingdom",
        }
    )
    quarantine = pd.DataFrame(
        {
            "source_file": [f"{day}.csv"],
            "line_number": [9],
            "rule": ["price_out_of_range"],
            "detail": ["price 0.0"],
            "source_line": ["1,X,...,0.0"],
        }
    )
    return BatchToCommit(
        batch_id=batch_id,
        source_file=f"{day}.csv",
        file_sha256=batch_id * 4,
        events=events,
        descriptions=pd.Series([f"desc {item}" for item in items]),
        quarantine=quarantine,
        counts={
            "rows_read": len(items) + 1,
            "stored": len(items),
            "quarantined": 1,
            "duplicates": 0,
            "quarantined_by_rule": {"price_out_of_range": 1},
        },
    )


def snapshot(data_dir: Path) -> dict[str, bytes]:
    return {
        p.relative_to(data_dir).as_posix(): p.read_bytes()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def store(tmp_path: Path) -> EventStore:
    return EventStore(tmp_path / "data", tmp_path / "staging")


def test_commit_writes_partitions_catalogue_and_quarantine(store):
    store.commit([make_batch("b1", "2011-01-04", ["A", "B"])])

    events = store.read_events()
    assert list(events["item_id"]) == ["A", "B"]
    assert set(events["batch_id"]) == {"b1"}
    assert (store.data_dir / "events/date=2011-01-04/b1.parquet").exists()
    assert list(store.read_catalogue()["description"]) == ["desc A", "desc B"]
    assert len(store.read_quarantine()) == 1


def test_recommitting_a_batch_adds_nothing(store):
    store.commit([make_batch("b1", "2011-01-04", ["A", "B"])])
    before = snapshot(store.data_dir)

    store.commit([make_batch("b1", "2011-01-04", ["A", "B"])])

    assert snapshot(store.data_dir) == before


def test_catalogue_keeps_first_seen_and_latest_price(store):
    store.commit([make_batch("b1", "2011-01-04", ["A"], price=1.0)])
    store.commit([make_batch("b2", "2011-01-05", ["A"], price=2.5)])

    row = store.read_catalogue().set_index("item_id").loc["A"]
    assert row["last_price"] == 2.5
    assert row["first_seen"] == pd.Timestamp("2011-01-04", tz="UTC")
    assert row["last_seen"] == pd.Timestamp("2011-01-05", tz="UTC")


@pytest.mark.parametrize("step", ["staged", "partitions_written"])
def test_crash_before_commit_point_leaves_store_as_it_was(tmp_path, store, step):
    store.commit([make_batch("b1", "2011-01-04", ["A", "B"])])
    before_files = snapshot(store.data_dir)
    before_events = store.read_events()
    before_catalogue = store.read_catalogue()

    store.crash_at = step
    with pytest.raises(CrashInjected):
        store.commit([make_batch("b2", "2011-01-05", ["C"])])

    reader = EventStore(store.data_dir, store.staging_dir)
    pd.testing.assert_frame_equal(reader.read_events(), before_events)
    pd.testing.assert_frame_equal(reader.read_catalogue(), before_catalogue)
    actions = reader.recover()
    assert actions and actions[0] == "discarded uncommitted batch txn-b2"
    assert snapshot(store.data_dir) == before_files
    assert not any(store.staging_dir.iterdir())


def test_crash_after_commit_point_is_finished_by_recovery(store):
    store.crash_at = "manifest_committed"
    with pytest.raises(CrashInjected):
        store.commit([make_batch("b1", "2011-01-04", ["A", "B"])])

    reader = EventStore(store.data_dir, store.staging_dir)
    assert reader.recover() == ["finished catalogue of committed batch txn-b1"]
    assert list(reader.read_events()["item_id"]) == ["A", "B"]
    assert list(reader.read_catalogue()["item_id"]) == ["A", "B"]


def test_rerun_after_crash_equals_uninterrupted_run(tmp_path):
    clean = EventStore(tmp_path / "clean", tmp_path / "clean-staging")
    clean.commit([make_batch("b1", "2011-01-04", ["A"])])
    clean.commit([make_batch("b2", "2011-01-05", ["B"])])

    crashed = EventStore(tmp_path / "crashed", tmp_path / "crashed-staging")
    crashed.commit([make_batch("b1", "2011-01-04", ["A"])])
    crashed.crash_at = "partitions_written"
    with pytest.raises(CrashInjected):
        crashed.commit([make_batch("b2", "2011-01-05", ["B"])])
    rerun = EventStore(tmp_path / "crashed", tmp_path / "crashed-staging")
    rerun.recover()
    rerun.commit([make_batch("b2", "2011-01-05", ["B"])])

    assert snapshot(rerun.data_dir) == snapshot(clean.data_dir)


def test_recover_discards_batch_with_truncated_id_file(store):
    store.commit([make_batch("b1", "2011-01-04", ["A"])])
    before = snapshot(store.data_dir)
    staged = store.staging_dir / "txn-b2"
    staged.mkdir(parents=True)
    (staged / "batch_ids.json").write_text('["b', encoding="utf-8")  # killed mid-write

    reader = EventStore(store.data_dir, store.staging_dir)

    assert reader.recover() == ["discarded uncommitted batch txn-b2"]
    assert snapshot(store.data_dir) == before
    assert list(store.staging_dir.iterdir()) == []


def test_fault_pause_stops_nth_commit(store, monkeypatch):
    def stop(spec: str) -> None:
        raise CrashInjected(f"paused at {spec}")

    monkeypatch.setattr("shoprec.store._pause_forever", stop)
    monkeypatch.setenv("SHOPREC_FAULT_PAUSE_AT", "partitions_written:2")
    store.commit([make_batch("b1", "2011-01-04", ["A"])])

    with pytest.raises(CrashInjected, match="paused at partitions_written:2"):
        store.commit([make_batch("b2", "2011-01-05", ["B"])])

    assert (store.data_dir / "events/date=2011-01-05/b2.parquet").exists()
    assert list(EventStore(store.data_dir, store.staging_dir).manifest()["batches"]) == ["b1"]


@pytest.mark.parametrize("spec", ["written", "staged:0", "staged:x"])
def test_fault_pause_rejects_invalid_setting(store, monkeypatch, spec):
    monkeypatch.setenv("SHOPREC_FAULT_PAUSE_AT", spec)

    with pytest.raises(StoreError, match=f"SHOPREC_FAULT_PAUSE_AT='{spec}' is invalid"):
        store.commit([make_batch("b1", "2011-01-04", ["A"])])


def test_fault_pause_requires_marker_path(store, monkeypatch):
    monkeypatch.setenv("SHOPREC_FAULT_PAUSE_AT", "staged")
    monkeypatch.delenv("SHOPREC_FAULT_PAUSE_MARKER", raising=False)

    with pytest.raises(StoreError, match="SHOPREC_FAULT_PAUSE_MARKER is not"):
        store.commit([make_batch("b1", "2011-01-04", ["A"])])
