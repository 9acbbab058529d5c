"""Online state: the recent events of each shopper, written by the service and read back at once.

Events posted to the service are appended here and read by the very next request for the same
user. The default backend is an embedded SQLite file in WAL mode, so one machine needs no server.
Several service replicas share state through Redis when ``SHOPREC_REDIS_URL`` is set. Both
backends keep only the newest ``max_events_per_user`` events of each user, so the history of one
user stays bounded. User ids reaching this module are pseudonyms already.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shoprec.columns import EVENT_COLUMNS, EVENT_TYPES, Columns
from shoprec.config import Settings
from shoprec.exceptions import ShoprecError

logger = logging.getLogger(__name__)

DEFAULT_MAX_EVENTS_PER_USER = 200
ONLINE_BATCH_ID = "online"
SQLITE_BUSY_TIMEOUT_MS = 5000
REDIS_KEY_PREFIX = "shoprec:events:"
# Redis responds in well under a millisecond on a LAN, so half a second means it is down.
REDIS_SOCKET_TIMEOUT_S = 0.5
# After a failed call, calls fail at once for this long instead of each waiting on Redis.
REDIS_BACKOFF_S = 1.0


class OnlineStoreError(ShoprecError):
    """An online event is invalid or the online store cannot be reached."""


class OnlineStoreUnavailableError(OnlineStoreError):
    """The online store's backend did not respond (server down, timed out, locked file)."""


class OnlineStore(ABC):
    """Recent events per user, shared by every worker of the service."""

    def __init__(self, max_events_per_user: int = DEFAULT_MAX_EVENTS_PER_USER) -> None:
        if max_events_per_user < 1:
            raise OnlineStoreError(
                f"max_events_per_user is {max_events_per_user}; expected at least 1"
            )
        self.max_events_per_user = max_events_per_user

    @abstractmethod
    def append_events(self, user_id: str, events: Sequence[Mapping[str, Any]]) -> int:
        """Append events of one user, trim the user's history to the cap, return the count added.

        Each event has ``item_id`` and ``event_type`` and optionally ``quantity`` (default 1),
        ``price`` and ``ts`` (default: now, UTC).
        """

    @abstractmethod
    def recent_rows(self, user_id: str, limit: int) -> list[dict[str, Any]]:
        """Return the user's newest `limit` recorded events as stored rows, oldest first.

        Each row has the keys of ``normalize_event``'s result; ``event_id`` is unique.
        """

    def recent_events(self, user_id: str, limit: int) -> pd.DataFrame:
        """Return the user's newest `limit` recorded events as canonical events, oldest first."""
        return events_frame(self.recent_rows(user_id, limit))

    @abstractmethod
    def ping(self) -> bool:
        """Return True when the backend responds to a trivial query."""

    def close(self) -> None:  # noqa: B027 - backends without resources need no cleanup
        """Release connections held by this process."""


def normalize_event(user_id: str, event: Mapping[str, Any]) -> dict[str, Any]:
    """Check one posted event and return it as a canonical event row (ts as int ns, UTC)."""
    item_id = event.get(Columns.ITEM_ID)
    if not isinstance(item_id, str) or not item_id.strip():
        raise OnlineStoreError(f"event item_id {item_id!r} is invalid; expected a non-empty string")
    event_type = event.get(Columns.EVENT_TYPE)
    if event_type not in EVENT_TYPES:
        raise OnlineStoreError(
            f"event_type {event_type!r} is invalid; expected one of {list(EVENT_TYPES)}"
        )
    quantity = event.get(Columns.QUANTITY)
    quantity = 1 if quantity is None else quantity
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1:
        raise OnlineStoreError(f"event quantity {quantity!r} is invalid; expected an int >= 1")
    price = event.get(Columns.PRICE)
    if price is not None and (
        isinstance(price, bool) or not isinstance(price, int | float) or not price > 0
    ):
        raise OnlineStoreError(f"event price {price!r} is invalid; expected a number > 0 or null")

    ts_value = event.get(Columns.TS)
    ts = pd.Timestamp.now(tz="UTC") if ts_value is None else pd.Timestamp(ts_value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")

    return {
        Columns.EVENT_ID: uuid.uuid4().hex,
        Columns.USER_ID: user_id,
        Columns.ITEM_ID: item_id.strip(),
        Columns.EVENT_TYPE: event_type,
        Columns.QUANTITY: quantity,
        Columns.PRICE: None if price is None else float(price),
        Columns.TS: int(ts.value),
    }


def events_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Build a canonical event DataFrame (EVENT_COLUMNS, canonical dtypes) from stored rows.

    Rows are expected oldest first, as both backends return them; the sort only breaks ties
    of equal timestamps by arrival. The frame is built column by column from numpy arrays,
    because this runs on every recommendation.
    """
    n = len(rows)
    if n == 0:
        return _empty_frame().copy()
    column = {name: [row[name] for row in rows] for name in _STORED_COLUMNS}
    frame = pd.DataFrame(
        {
            Columns.EVENT_ID: np.array(column[Columns.EVENT_ID], dtype=object),
            Columns.USER_ID: np.array(column[Columns.USER_ID], dtype=object),
            Columns.ITEM_ID: np.array(column[Columns.ITEM_ID], dtype=object),
            Columns.EVENT_TYPE: np.array(column[Columns.EVENT_TYPE], dtype=object),
            Columns.QUANTITY: np.array(column[Columns.QUANTITY], dtype=np.int64),
            Columns.PRICE: np.array(
                [np.nan if price is None else price for price in column[Columns.PRICE]],
                dtype=np.float64,
            ),
            Columns.TS: pd.DatetimeIndex(
                np.array(column[Columns.TS], dtype=np.int64).view("datetime64[ns]"), tz="UTC"
            ),
            Columns.ORDER_ID: np.full(n, None, dtype=object),
            Columns.COUNTRY: np.full(n, None, dtype=object),
            Columns.BATCH_ID: np.full(n, ONLINE_BATCH_ID, dtype=object),
        },
        columns=list(EVENT_COLUMNS),
    )
    ts = frame[Columns.TS].to_numpy()
    if n > 1 and (ts[1:] < ts[:-1]).any():
        frame = frame.sort_values(Columns.TS, kind="stable").reset_index(drop=True)
    return frame


@functools.cache
def _empty_frame() -> pd.DataFrame:
    # Built once: most shoppers have no online events, and building a frame costs ~0.5 ms.
    template = {name: "" for name in _STORED_COLUMNS} | {
        Columns.QUANTITY: 1,
        Columns.PRICE: None,
        Columns.TS: 0,
    }
    frame = events_frame([template])
    return frame.iloc[0:0].reset_index(drop=True)


# The columns an online event carries; the others are the same for every online event.
_STORED_COLUMNS = tuple(
    name
    for name in EVENT_COLUMNS
    if name not in (Columns.ORDER_ID, Columns.COUNTRY, Columns.BATCH_ID)
)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS online_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    price REAL,
    ts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS online_events_user_seq ON online_events (user_id, seq);
"""

_INSERT = (
    "INSERT INTO online_events (user_id, event_id, item_id, event_type, quantity, price, ts) "
    "VALUES (:user_id, :event_id, :item_id, :event_type, :quantity, :price, :ts)"
)

# Delete every row of the user at or below the seq of its (cap + 1)-th newest row.
_TRIM = (
    "DELETE FROM online_events WHERE user_id = :user_id AND seq <= ("
    "SELECT seq FROM online_events WHERE user_id = :user_id "
    "ORDER BY seq DESC LIMIT 1 OFFSET :cap)"
)

_SELECT_RECENT = (
    "SELECT event_id, user_id, item_id, event_type, quantity, price, ts FROM ("
    "SELECT * FROM online_events WHERE user_id = ? ORDER BY seq DESC LIMIT ?"
    ") ORDER BY seq"
)


class SQLiteOnlineStore(OnlineStore):
    """Online store in one SQLite file (WAL mode), shared by threads and processes.

    Each thread of each process opens its own connection. Every write runs in a ``BEGIN
    IMMEDIATE`` transaction, so concurrent writers wait for SQLite's lock (up to the busy timeout)
    instead of failing. A committed write is visible to every later read.
    """

    def __init__(
        self,
        path: Path,
        max_events_per_user: int = DEFAULT_MAX_EVENTS_PER_USER,
        busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
    ) -> None:
        super().__init__(max_events_per_user)
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            connection = self._open()
            connection.executescript(_SCHEMA)
        logger.info(
            "SQLite online store at %s (max %d events per user)", self.path, max_events_per_user
        )

    def _open(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            connection.close()
            raise OnlineStoreError(
                f"SQLite file {self.path} cannot use WAL mode (got {mode!r}); put it on a local "
                "file system or set SHOPREC_ONLINE_DB to another path"
            )
        connection.execute("PRAGMA synchronous = NORMAL")
        self._local.connection = connection
        self._local.pid = os.getpid()
        self._connections.append(connection)
        return connection

    def _connection(self) -> sqlite3.Connection:
        # A connection inherited through fork must not be used in the child: open a new one.
        connection = getattr(self._local, "connection", None)
        if connection is None or self._local.pid != os.getpid():
            with self._lock:
                connection = self._open()
        return connection

    def append_events(self, user_id: str, events: Sequence[Mapping[str, Any]]) -> int:
        rows = [normalize_event(user_id, event) for event in events]
        if not rows:
            return 0
        connection = self._connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(_INSERT, rows)
            connection.execute(_TRIM, {"user_id": user_id, "cap": self.max_events_per_user})
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise OnlineStoreUnavailableError(
                f"writing {len(rows)} events to {self.path} failed: {error}"
            ) from error
        return len(rows)

    def recent_rows(self, user_id: str, limit: int) -> list[dict[str, Any]]:
        try:
            cursor = self._connection().execute(_SELECT_RECENT, (user_id, int(limit)))
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
        except sqlite3.Error as error:
            raise OnlineStoreUnavailableError(
                f"reading events from {self.path} failed: {error}"
            ) from error

    def ping(self) -> bool:
        try:
            return self._connection().execute("SELECT 1").fetchone() == (1,)
        except sqlite3.Error as error:
            logger.error("SQLite online store %s did not respond: %s", self.path, error)
            return False

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
            self._local = threading.local()


class RedisOnlineStore(OnlineStore):
    """Online store in Redis: one list of JSON events per user, capped with LTRIM.

    Calls fail fast when Redis is down: short socket timeouts, one retry, and after a failure
    no call goes to Redis for `backoff_seconds`, so a request in that window gets
    OnlineStoreUnavailableError at once instead of waiting on a dead connection. The first call
    after the window tries again, so the store recovers by itself when Redis returns.
    """

    def __init__(
        self,
        url: str,
        max_events_per_user: int = DEFAULT_MAX_EVENTS_PER_USER,
        key_prefix: str = REDIS_KEY_PREFIX,
        socket_timeout: float = REDIS_SOCKET_TIMEOUT_S,
        backoff_seconds: float = REDIS_BACKOFF_S,
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        super().__init__(max_events_per_user)
        self.key_prefix = key_prefix
        self.backoff_seconds = backoff_seconds
        self._client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._redis_error = redis.RedisError
        self._down_until = 0.0
        self._failed_at = 0.0
        self._last_error = ""
        # The URL may carry a password: log only where it points.
        where = self._client.connection_pool.connection_kwargs
        self.address = f"{where.get('host', where.get('path', '?'))}:{where.get('port', '')}"
        logger.info(
            "Redis online store at %s (max %d events per user)", self.address, max_events_per_user
        )

    def _key(self, user_id: str) -> str:
        return self.key_prefix + user_id

    def _call(self, action: str, call: Callable[[], Any]) -> Any:
        now = time.monotonic()
        if now < self._down_until:
            raise OnlineStoreUnavailableError(
                f"{action} Redis at {self.address} skipped: it failed "
                f"{now - self._failed_at:.1f} s ago ({self._last_error}); "
                f"next try in {self._down_until - now:.1f} s"
            )
        try:
            result = call()
        except self._redis_error as error:
            if not self._down_until:
                logger.warning(
                    "Redis online store at %s failed (%s): recommendations degrade to the "
                    "model's stored history and events get 503 until it responds again",
                    self.address,
                    error,
                )
            self._failed_at = time.monotonic()
            self._down_until = self._failed_at + self.backoff_seconds
            self._last_error = str(error)
            raise OnlineStoreUnavailableError(
                f"{action} Redis at {self.address} failed: {error}"
            ) from error
        if self._down_until:
            logger.info("Redis online store at %s responds again", self.address)
            self._down_until = 0.0
        return result

    def append_events(self, user_id: str, events: Sequence[Mapping[str, Any]]) -> int:
        rows = [normalize_event(user_id, event) for event in events]
        if not rows:
            return 0
        key = self._key(user_id)

        def write() -> None:
            with self._client.pipeline(transaction=True) as pipeline:
                pipeline.rpush(key, *(json.dumps(row) for row in rows))
                pipeline.ltrim(key, -self.max_events_per_user, -1)
                pipeline.execute()

        self._call(f"writing {len(rows)} events to", write)
        return len(rows)

    def recent_rows(self, user_id: str, limit: int) -> list[dict[str, Any]]:
        key = self._key(user_id)
        payloads = self._call("reading events from", lambda: self._client.lrange(key, -limit, -1))
        return [json.loads(payload) for payload in payloads]

    def ping(self) -> bool:
        try:
            return bool(self._call("pinging", self._client.ping))
        except OnlineStoreUnavailableError as error:
            logger.error("Redis online store did not respond: %s", error)
            return False

    def close(self) -> None:
        self._client.close()


def create_online_store(
    settings: Settings, max_events_per_user: int = DEFAULT_MAX_EVENTS_PER_USER
) -> OnlineStore:
    """Open Redis when SHOPREC_REDIS_URL is set, else the SQLite file at SHOPREC_ONLINE_DB."""
    if settings.redis_url is not None and settings.redis_url.get_secret_value():
        logger.info("Online store: Redis (SHOPREC_REDIS_URL is set)")
        return RedisOnlineStore(settings.redis_url.get_secret_value(), max_events_per_user)
    return SQLiteOnlineStore(settings.online_db, max_events_per_user)
