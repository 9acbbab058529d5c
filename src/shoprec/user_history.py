"""One user's clean purchases as numpy arrays, for scoring a single request quickly.

``UserHistory`` contains the rows ``clean_purchases`` returns for one user, in the same order
(time, then order id, then item id), so the single-user paths of candidates.py and features.py
see exactly the rows the batch paths see. ``PurchaseIndex`` keeps the training purchases of
every user sorted that way, so a known user's history is a slice, not a scan.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from shoprec.columns import Columns
from shoprec.interactions import InteractionsError

logger = logging.getLogger(__name__)

# Rows of a history that carry no order id get this prefix plus their timestamp.
MISSING_ORDER_PREFIX = "ts:"


@dataclass(frozen=True)
class UserHistory:
    """Clean purchases of one user, sorted by (ts, order_id, item_id).

    ``ts`` is int64 nanoseconds since the epoch (UTC), ``quantity`` and ``price`` are float64
    (NaN when unknown) and ``country`` is None when unknown.
    """

    user_id: str
    item_ids: np.ndarray
    order_ids: np.ndarray
    ts: np.ndarray
    quantity: np.ndarray
    price: np.ndarray
    country: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    @cached_property
    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct item ids in sorted order, and each row's position among them."""
        return np.unique(self.item_ids.astype(str), return_inverse=True)

    @cached_property
    def orders(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct order ids in sorted order, and each row's position among them."""
        return np.unique(self.order_ids.astype(str), return_inverse=True)

    @classmethod
    def empty(cls, user_id: str) -> UserHistory:
        none = np.empty(0, dtype=object)
        return cls(user_id, none, none, np.empty(0, np.int64), *[np.empty(0)] * 2, none)

    @classmethod
    def from_purchases(cls, purchases: pd.DataFrame, user_id: str) -> UserHistory:
        """Wrap clean purchases (``clean_purchases`` output) of one user without re-sorting."""
        country = (
            purchases[Columns.COUNTRY].to_numpy(dtype=object)
            if Columns.COUNTRY in purchases
            else np.full(len(purchases), None, dtype=object)
        )
        return cls(
            user_id=user_id,
            item_ids=purchases[Columns.ITEM_ID].to_numpy(dtype=object),
            order_ids=purchases[Columns.ORDER_ID].to_numpy(dtype=object),
            ts=_to_ns(purchases[Columns.TS]),
            quantity=purchases[Columns.QUANTITY].to_numpy(dtype=np.float64),
            price=purchases[Columns.PRICE].to_numpy(dtype=np.float64),
            country=np.where(pd.isna(country), None, country),
        )

    def to_frame(self) -> pd.DataFrame:
        """Return the rows as a clean purchases DataFrame, as the batch paths take them."""
        return pd.DataFrame(
            {
                Columns.USER_ID: np.full(len(self), self.user_id, dtype=object),
                Columns.ITEM_ID: self.item_ids,
                Columns.EVENT_TYPE: "purchase",
                Columns.QUANTITY: self.quantity,
                Columns.PRICE: self.price,
                Columns.TS: pd.to_datetime(self.ts, unit="ns", utc=True),
                Columns.ORDER_ID: self.order_ids,
                Columns.COUNTRY: self.country,
            }
        )

    def append(self, other: UserHistory) -> UserHistory:
        """Return both histories' rows in clean_purchases order (ties keep self first)."""
        if len(other) == 0:
            return self
        if len(self) == 0:
            return other._sorted()
        joined = UserHistory(
            self.user_id,
            *(
                np.concatenate([getattr(self, name), getattr(other, name)])
                for name in ("item_ids", "order_ids", "ts", "quantity", "price", "country")
            ),
        )
        return joined._sorted()

    def _sorted(self) -> UserHistory:
        order = np.lexsort((_codes(self.item_ids), _codes(self.order_ids), self.ts))
        return UserHistory(
            self.user_id,
            *(
                getattr(self, name)[order]
                for name in ("item_ids", "order_ids", "ts", "quantity", "price", "country")
            ),
        )


def _codes(values: np.ndarray) -> np.ndarray:
    """Return integer codes that sort like the strings in ``values``."""
    return np.unique(values.astype(str), return_inverse=True)[1]


def _to_ns(ts: pd.Series) -> np.ndarray:
    return pd.to_datetime(ts, utc=True).to_numpy(dtype="datetime64[ns]").view(np.int64)


def new_purchases(events: pd.DataFrame, stored: UserHistory) -> UserHistory:
    """Return the purchase events of ``events`` as the history of ``stored.user_id``.

    Rows repeating the (order_id, item_id, ts) of a row of ``stored`` or of an earlier row are
    dropped. A purchase without an order id counts as its own order, named after its timestamp.
    """
    required = {Columns.ITEM_ID, Columns.EVENT_TYPE, Columns.TS}
    missing = required - set(events.columns)
    if missing:
        raise InteractionsError(
            f"events lack columns {sorted(missing)}; expected canonical events with "
            f"{sorted(required | {Columns.USER_ID})} (read them with shoprec.store.read_events)"
        )
    user_id = stored.user_id
    events = events[(events[Columns.EVENT_TYPE] == "purchase").to_numpy()]
    if events.empty:
        return UserHistory.empty(user_id)

    ts = _to_ns(events[Columns.TS])
    orders = _column(events, Columns.ORDER_ID, None)
    missing_order = pd.isna(orders)
    if missing_order.any():
        stamps = pd.to_datetime(ts[missing_order], unit="ns", utc=True).astype(str)
        orders = orders.copy()
        orders[missing_order] = [MISSING_ORDER_PREFIX + stamp for stamp in stamps]
    items = events[Columns.ITEM_ID].astype(str).to_numpy(dtype=object)
    orders = orders.astype(str).astype(object)

    seen: set[tuple] = set()
    if len(stored) and len(ts) and ts.min() <= stored.ts.max():
        seen.update(zip(stored.order_ids, stored.item_ids, stored.ts.tolist(), strict=True))
    keep = np.zeros(len(events), dtype=bool)
    for row, key in enumerate(zip(orders, items, ts.tolist(), strict=True)):
        if key not in seen:
            seen.add(key)
            keep[row] = True

    country = _column(events, Columns.COUNTRY, None)
    history = UserHistory(
        user_id=user_id,
        item_ids=items[keep],
        order_ids=orders[keep],
        ts=ts[keep],
        quantity=_column(events, Columns.QUANTITY, np.nan).astype(np.float64)[keep],
        price=_column(events, Columns.PRICE, np.nan).astype(np.float64)[keep],
        country=np.where(pd.isna(country), None, country)[keep],
    )
    return history._sorted()


def _column(events: pd.DataFrame, name: str, default: object) -> np.ndarray:
    if name in events:
        return events[name].to_numpy(dtype=object)
    return np.full(len(events), default, dtype=object)


def context_purchases(
    items: Iterable[str], prices: np.ndarray, ts: pd.Timestamp, user_id: str
) -> UserHistory:
    """Return cart items as purchases of one unknown-country order ``"context"`` at ``ts``."""
    item_ids = np.array([str(item) for item in items], dtype=object)
    history = UserHistory(
        user_id=user_id,
        item_ids=item_ids,
        order_ids=np.full(len(item_ids), "context", dtype=object),
        ts=np.full(len(item_ids), _to_ns(pd.Series([ts]))[0], dtype=np.int64),
        quantity=np.ones(len(item_ids)),
        price=np.asarray(prices, dtype=np.float64),
        country=np.full(len(item_ids), None, dtype=object),
    )
    return history._sorted()


class PurchaseIndex:
    """Training purchases grouped by user, each user's rows in clean_purchases order."""

    def __init__(self, purchases: pd.DataFrame) -> None:
        frame = purchases.sort_values(
            [Columns.USER_ID, Columns.TS, Columns.ORDER_ID, Columns.ITEM_ID], kind="stable"
        )
        users = frame[Columns.USER_ID].astype(str).to_numpy()
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else []
        ends = np.r_[starts[1:], len(users)] if len(users) else []
        self._ranges = {
            users[start]: (int(start), int(end)) for start, end in zip(starts, ends, strict=True)
        }
        self._all = UserHistory.from_purchases(frame, "")
        logger.debug("purchase index: %d rows of %d users", len(frame), len(self._ranges))

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._ranges

    def users(self) -> list[str]:
        """Return the ids of every user with training purchases, sorted."""
        return sorted(self._ranges)

    def history(self, user_id: str) -> UserHistory:
        """Return the user's training purchases (empty for an unknown user)."""
        bounds = self._ranges.get(user_id)
        if bounds is None:
            return UserHistory.empty(user_id)
        start, end = bounds
        rows = slice(start, end)
        data = self._all
        return UserHistory(
            user_id,
            data.item_ids[rows],
            data.order_ids[rows],
            data.ts[rows],
            data.quantity[rows],
            data.price[rows],
            data.country[rows],
        )
