"""Tests of the SQLite online store: WAL mode, the per-user cap, sharing across connections."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pandas as pd
import pytest
from pydantic import SecretStr

from shoprec.columns import EVENT_COLUMNS, Columns
from shoprec.config import Settings
from shoprec.online_store import (
    OnlineStoreError,
    SQLiteOnlineStore,
    create_online_store,
)


def view(item_id: str, ts: str | None = None) -> dict:
    return {"item_id": item_id, "event_type": "view", "ts": ts}


def write_from_process(path: str, user_id: str, count: int) -> None:
    store = SQLiteOnlineStore(Path(path), max_events_per_user=1000)
    for index in range(count):
        store.append_events(user_id, [view(f"item-{index}")])
    store.close()


@pytest.fixture
def store(tmp_path: Path):
    online_store = SQLiteOnlineStore(tmp_path / "online.sqlite", max_events_per_user=5)
    yield online_store
    online_store.close()


def test_sqlite_store_uses_wal_mode(store: SQLiteOnlineStore) -> None:
    connection = sqlite3.connect(store.path)
    mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    connection.close()

    assert mode == "wal"


def test_recent_events_have_canonical_columns(store: SQLiteOnlineStore) -> None:
    added = store.append_events(
        "u1",
        [
            {
                "item_id": "85123A",
                "event_type": "purchase",
                "quantity": 3,
                "price": 2.55,
                "ts": "2011-12-01T10:00:00Z",
            },
            {"item_id": "22423", "event_type": "add_to_cart", "ts": "2011-12-01T09:00:00"},
        ],
    )

    events = store.recent_events("u1", limit=10)

    assert added == 2
    assert list(events.columns) == list(EVENT_COLUMNS)
    assert events[Columns.ITEM_ID].tolist() == ["22423", "85123A"]
    assert events[Columns.QUANTITY].tolist() == [1, 3]
    assert events[Columns.QUANTITY].dtype == "int64"
    assert events[Columns.PRICE].isna().tolist() == [True, False]
    assert events[Columns.PRICE].iloc[1] == 2.55
    assert str(events[Columns.TS].dtype) == "datetime64[ns, UTC]"
    assert events[Columns.TS].iloc[0] == pd.Timestamp("2011-12-01 09:00", tz="UTC")
    assert set(events[Columns.USER_ID]) == {"u1"}
    assert set(events[Columns.BATCH_ID]) == {"online"}
    assert events[Columns.EVENT_ID].nunique() == 2


def test_recent_events_empty_for_unknown_user(store: SQLiteOnlineStore) -> None:
    events = store.recent_events("nobody", limit=10)

    assert len(events) == 0
    assert list(events.columns) == list(EVENT_COLUMNS)
    assert str(events[Columns.TS].dtype) == "datetime64[ns, UTC]"


def test_cap_keeps_newest_events(store: SQLiteOnlineStore) -> None:
    for index in range(8):
        store.append_events("u1", [view(f"item-{index}")])
    store.append_events("u2", [view("other")])

    kept = store.recent_events("u1", limit=100)
    rows = sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM online_events").fetchone()

    assert kept[Columns.ITEM_ID].tolist() == [f"item-{index}" for index in range(3, 8)]
    assert rows == (6,)


def test_cap_applies_within_one_batch(store: SQLiteOnlineStore) -> None:
    store.append_events("u1", [view(f"item-{index}") for index in range(7)])

    kept = store.recent_events("u1", limit=100)

    assert kept[Columns.ITEM_ID].tolist() == [f"item-{index}" for index in range(2, 7)]


def test_limit_returns_newest_recorded(store: SQLiteOnlineStore) -> None:
    store.append_events("u1", [view("a"), view("b"), view("c")])

    events = store.recent_events("u1", limit=2)

    assert events[Columns.ITEM_ID].tolist() == ["b", "c"]


def test_second_connection_reads_writes(tmp_path: Path) -> None:
    writer = SQLiteOnlineStore(tmp_path / "online.sqlite")
    reader = SQLiteOnlineStore(tmp_path / "online.sqlite")

    writer.append_events("u1", [view("a")])
    first = reader.recent_events("u1", limit=10)
    reader.append_events("u1", [view("b")])
    second = writer.recent_events("u1", limit=10)

    assert first[Columns.ITEM_ID].tolist() == ["a"]
    assert second[Columns.ITEM_ID].tolist() == ["a", "b"]
    writer.close()
    reader.close()


@pytest.mark.slow
def test_processes_write_concurrently_without_loss(tmp_path: Path) -> None:
    path = tmp_path / "online.sqlite"
    SQLiteOnlineStore(path).close()
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=write_from_process, args=(str(path), f"user-{index}", 40))
        for index in range(3)
    ]

    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    reader = SQLiteOnlineStore(path, max_events_per_user=1000)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    for index in range(3):
        assert len(reader.recent_events(f"user-{index}", limit=1000)) == 40
    reader.close()


def test_threads_write_concurrently_without_loss(tmp_path: Path) -> None:
    store = SQLiteOnlineStore(tmp_path / "online.sqlite", max_events_per_user=1000)
    errors: list[Exception] = []

    def write(thread_index: int) -> None:
        try:
            for index in range(50):
                store.append_events("shared", [view(f"t{thread_index}-{index}")])
        except Exception as error:  # collected so the main thread can assert on it
            errors.append(error)

    threads = [threading.Thread(target=write, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    events = store.recent_events("shared", limit=1000)
    assert errors == []
    assert len(events) == 200
    assert events[Columns.ITEM_ID].nunique() == 200
    store.close()


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"item_id": "", "event_type": "view"}, "item_id '' is invalid"),
        ({"item_id": "a", "event_type": "click"}, "event_type 'click' is invalid"),
        ({"item_id": "a", "event_type": "view", "quantity": 0}, "quantity 0 is invalid"),
        ({"item_id": "a", "event_type": "view", "price": -1.0}, "price -1.0 is invalid"),
    ],
)
def test_invalid_event_rejected(store: SQLiteOnlineStore, event: dict, message: str) -> None:
    with pytest.raises(OnlineStoreError, match=message):
        store.append_events("u1", [event])

    assert len(store.recent_events("u1", limit=10)) == 0


def test_cap_below_one_rejected(tmp_path: Path) -> None:
    with pytest.raises(OnlineStoreError, match="max_events_per_user is 0"):
        SQLiteOnlineStore(tmp_path / "online.sqlite", max_events_per_user=0)


def test_factory_picks_sqlite_without_redis_url(tmp_path: Path) -> None:
    settings = Settings(online_db=tmp_path / "state" / "online.sqlite", redis_url=None)

    store = create_online_store(settings, max_events_per_user=7)

    assert isinstance(store, SQLiteOnlineStore)
    assert store.path == tmp_path / "state" / "online.sqlite"
    assert store.max_events_per_user == 7
    assert store.ping() is True
    store.close()


def test_factory_picks_redis_with_url(tmp_path: Path) -> None:
    settings = Settings(
        online_db=tmp_path / "online.sqlite", redis_url=SecretStr("redis://127.0.0.1:1/0")
    )

    store = create_online_store(settings)

    assert type(store).__name__ == "RedisOnlineStore"
    assert not (tmp_path / "online.sqlite").exists()


def test_open_reader_sees_other_process_write(tmp_path: Path) -> None:
    path = tmp_path / "online.sqlite"
    reader = SQLiteOnlineStore(path, max_events_per_user=1000)
    before = reader.recent_events("shared-user", limit=10)
    writer = multiprocessing.get_context("spawn").Process(
        target=write_from_process, args=(str(path), "shared-user", 2)
    )

    writer.start()
    writer.join(timeout=60)
    after = reader.recent_events("shared-user", limit=10)

    assert writer.exitcode == 0
    assert before.empty
    assert after[Columns.ITEM_ID].tolist() == ["item-0", "item-1"]
    reader.close()
