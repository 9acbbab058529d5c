"""Tests of the Redis online store against a real redis-server on loopback.

The store keeps the promises of the SQLite store: canonical events, a per-user cap and no
lost concurrent write. Because Redis can go away, a call also fails fast with
OnlineStoreUnavailableError while Redis is down, and the store responds again once it is back.
"""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from shoprec.columns import EVENT_COLUMNS, Columns
from shoprec.online_store import OnlineStoreUnavailableError, RedisOnlineStore

pytestmark = pytest.mark.integration


def view(item_id: str, ts: str | None = None) -> dict:
    return {"item_id": item_id, "event_type": "view", "ts": ts}


@pytest.fixture
def store(redis_server, request):
    # A key prefix per test keeps the tests of the module apart on one server.
    online = RedisOnlineStore(
        redis_server.url, max_events_per_user=5, key_prefix=f"test:{request.node.name}:"
    )
    yield online
    online.close()


def test_events_read_back_as_canonical_frame(store: RedisOnlineStore) -> None:
    store.append_events("u1", [view("A", "2011-12-01T10:00:00Z")])
    store.append_events("u1", [{"item_id": "B", "event_type": "purchase", "quantity": 3}])

    events = store.recent_events("u1", 10)

    assert list(events.columns) == list(EVENT_COLUMNS)
    assert events[Columns.ITEM_ID].tolist() == ["A", "B"]
    assert events[Columns.QUANTITY].tolist() == [1, 3]
    assert events[Columns.TS].iloc[0] == pd.Timestamp("2011-12-01T10:00:00Z")
    assert store.recent_events("nobody", 10).empty


def test_cap_keeps_newest_events(store: RedisOnlineStore, redis_server) -> None:
    for index in range(12):
        store.append_events("u2", [view(f"item-{index}")])

    newest = store.recent_events("u2", 100)[Columns.ITEM_ID].tolist()

    assert newest == [f"item-{index}" for index in range(7, 12)]
    assert store._client.llen(store._key("u2")) == 5  # noqa: SLF001


def test_concurrent_writers_lose_no_event(redis_server, request) -> None:
    prefix = f"test:{request.node.name}:"
    writers = [
        RedisOnlineStore(redis_server.url, max_events_per_user=1000, key_prefix=prefix)
        for _ in range(4)
    ]

    def write(store: RedisOnlineStore, worker: int) -> None:
        for index in range(50):
            store.append_events("shared", [view(f"w{worker}-{index}")])

    threads = [threading.Thread(target=write, args=(s, n)) for n, s in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    items = writers[0].recent_events("shared", 1000)[Columns.ITEM_ID].tolist()
    assert len(items) == 200
    assert set(items) == {f"w{w}-{i}" for w in range(4) for i in range(50)}
    for writer in writers:
        writer.close()


def test_redis_down_fails_fast_then_recovers(redis_server, request) -> None:
    store = RedisOnlineStore(
        redis_server.url, key_prefix=f"test:{request.node.name}:", backoff_seconds=0.5
    )
    store.append_events("u3", [view("A")])
    redis_server.stop()
    try:
        started = time.perf_counter()
        with pytest.raises(OnlineStoreUnavailableError, match=r"reading events from Redis at"):
            store.recent_events("u3", 10)
        # Inside the back-off window no call waits on the network at all.
        with pytest.raises(OnlineStoreUnavailableError, match=r"skipped: it failed"):
            store.append_events("u3", [view("B")])
        assert time.perf_counter() - started < 2.0
        assert store.ping() is False
    finally:
        redis_server.start()

    time.sleep(0.6)  # past the back-off window
    assert store.ping() is True
    store.append_events("u3", [view("C")])
    # The server keeps nothing on disk, so only the event written after the restart is there.
    assert store.recent_events("u3", 10)[Columns.ITEM_ID].tolist() == ["C"]
    store.close()
