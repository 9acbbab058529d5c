"""Clean purchases, time windows and the user_items matrix of the evaluation protocol.

The protocol: a clean purchase is a ``purchase`` event with a known user. An interaction is a
(user, item) pair weighted by the number of distinct invoices. A user is evaluated when they
bought something before the target window and something inside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, model_validator

from shoprec.columns import Columns
from shoprec.exceptions import ShoprecError

logger = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("all", "new")


class InteractionsError(ShoprecError):
    """Interaction data or a user_items matrix does not meet its contract."""


class SplitConfig(BaseModel):
    """Time windows (the ``split`` section of params.yaml), each window [start, end)."""

    model_config = ConfigDict(extra="forbid")

    fit_end: str = "2011-10-09"
    train_end: str = "2011-11-09"
    test_end: str = "2011-12-10"
    # "fixed" uses the dates above. "latest" ends the test window the day after the newest
    # purchase and steps back window_days per window. "auto" is fixed when the data reaches
    # test_end and latest otherwise, as in a store that is still being replayed.
    anchor: Literal["fixed", "latest", "auto"] = "auto"
    window_days: int = 31

    @model_validator(mode="after")
    def _check_order(self) -> SplitConfig:
        fit_end, train_end, test_end = (pd.Timestamp(d) for d in self.date_strings())
        if not fit_end < train_end < test_end:
            raise ValueError(
                f"split dates must increase: fit_end={self.fit_end} < train_end={self.train_end}"
                f" < test_end={self.test_end}; fix the split section of params.yaml"
            )
        return self

    def date_strings(self) -> tuple[str, str, str]:
        return self.fit_end, self.train_end, self.test_end


@dataclass(frozen=True)
class Fold:
    """One history/target pair: history is everything before ``cutoff``."""

    name: str
    cutoff: pd.Timestamp
    target_end: pd.Timestamp


def resolve_split(config: SplitConfig, last_ts: pd.Timestamp) -> SplitConfig:
    """Return the split with fixed dates, moving the windows to the data end when asked."""
    data_end = pd.Timestamp(last_ts).tz_localize(None) if last_ts.tzinfo else last_ts
    reaches_test_end = data_end >= pd.Timestamp(config.test_end) - pd.Timedelta(days=1)
    if config.anchor == "fixed" or (config.anchor == "auto" and reaches_test_end):
        return config
    test_end = data_end.normalize() + pd.Timedelta(days=1)
    train_end = test_end - pd.Timedelta(days=config.window_days)
    fit_end = train_end - pd.Timedelta(days=config.window_days)
    logger.warning(
        "data ends %s, before the fixed test end %s: evaluating on [%s, %s) instead",
        data_end.date(),
        config.test_end,
        train_end.date(),
        test_end.date(),
    )
    return config.model_copy(
        update={
            "fit_end": str(fit_end.date()),
            "train_end": str(train_end.date()),
            "test_end": str(test_end.date()),
            "anchor": "fixed",
        }
    )


def make_folds(config: SplitConfig) -> dict[str, Fold]:
    """Return the ``train`` fold (ranker labels) and the ``test`` fold (final evaluation)."""
    fit_end, train_end, test_end = (pd.Timestamp(d, tz="UTC") for d in config.date_strings())
    return {
        "train": Fold("train", cutoff=fit_end, target_end=train_end),
        "test": Fold("test", cutoff=train_end, target_end=test_end),
    }


def clean_purchases(events: pd.DataFrame) -> pd.DataFrame:
    """Keep purchase events with a known user, sorted by time then order id.

    The event store already drops cancellations, non-positive quantities and prices and
    non-product codes, so this only filters the event type and anonymous shoppers.
    """
    required = {Columns.USER_ID, Columns.ITEM_ID, Columns.EVENT_TYPE, Columns.TS}
    missing = required - set(events.columns)
    if missing:
        raise InteractionsError(
            f"events lack columns {sorted(missing)}; expected canonical events with "
            f"{sorted(required)} (read them with shoprec.store.read_events)"
        )
    mask = (events[Columns.EVENT_TYPE] == "purchase") & events[Columns.USER_ID].notna()
    purchases = events.loc[mask].copy()
    purchases[Columns.USER_ID] = purchases[Columns.USER_ID].astype(str)
    purchases[Columns.ITEM_ID] = purchases[Columns.ITEM_ID].astype(str)
    if Columns.ORDER_ID not in purchases.columns:
        purchases[Columns.ORDER_ID] = purchases[Columns.TS].astype(str)
    purchases[Columns.TS] = pd.to_datetime(purchases[Columns.TS], utc=True)
    sort_keys = [Columns.TS, Columns.ORDER_ID, Columns.ITEM_ID]
    purchases = purchases.sort_values(sort_keys, kind="stable").reset_index(drop=True)
    logger.debug("clean purchases: %d of %d events", len(purchases), len(events))
    return purchases


def slice_window(
    purchases: pd.DataFrame, start: pd.Timestamp | None, end: pd.Timestamp | None
) -> pd.DataFrame:
    """Return purchases with ``start <= ts < end``; a None bound is open."""
    mask = np.ones(len(purchases), dtype=bool)
    if start is not None:
        mask &= (purchases[Columns.TS] >= start).to_numpy()
    if end is not None:
        mask &= (purchases[Columns.TS] < end).to_numpy()
    return purchases.loc[mask]


def build_interactions(purchases: pd.DataFrame) -> pd.DataFrame:
    """Aggregate purchases to (user_id, item_id, weight) with weight = distinct invoices."""
    grouped = purchases.groupby([Columns.USER_ID, Columns.ITEM_ID], sort=True, observed=True)
    interactions = grouped[Columns.ORDER_ID].nunique().rename(Columns.WEIGHT).reset_index()
    interactions[Columns.WEIGHT] = interactions[Columns.WEIGHT].astype("float32")
    return interactions


def build_targets(history: pd.DataFrame, target: pd.DataFrame, variant: str) -> pd.DataFrame:
    """Return relevant (user_id, item_id) pairs of the target window for one variant.

    Only users with a purchase in ``history`` and in ``target`` are kept. Variant ``new``
    drops items the user bought in ``history``.
    """
    if variant not in VARIANTS:
        raise InteractionsError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    pairs = target[[Columns.USER_ID, Columns.ITEM_ID]].drop_duplicates()
    known_users = pd.Index(history[Columns.USER_ID].unique())
    pairs = pairs[pairs[Columns.USER_ID].isin(known_users)]
    if variant == "new":
        seen = history[[Columns.USER_ID, Columns.ITEM_ID]].drop_duplicates()
        merged = pairs.merge(seen, how="left", indicator=True)
        pairs = merged.loc[merged["_merge"] == "left_only", [Columns.USER_ID, Columns.ITEM_ID]]
    return pairs.sort_values([Columns.USER_ID, Columns.ITEM_ID]).reset_index(drop=True)


@dataclass(frozen=True)
class IdMap:
    """Bidirectional map between external ids and matrix row/column indices."""

    ids: pd.Index

    @classmethod
    def from_values(cls, values: pd.Series | np.ndarray | list[str]) -> IdMap:
        return cls(pd.Index(sorted(pd.unique(pd.Series(values, dtype=str)))))

    def __len__(self) -> int:
        return len(self.ids)

    def to_index(self, values: pd.Series | np.ndarray | list[str]) -> np.ndarray:
        """Return positions of ``values``; unknown ids map to -1."""
        return self.ids.get_indexer(pd.Index(values, dtype=str))


def build_user_items(interactions: pd.DataFrame, users: IdMap, items: IdMap) -> sp.csr_matrix:
    """Build the users x items CSR matrix of interaction weights; unknown ids are dropped."""
    rows = users.to_index(interactions[Columns.USER_ID])
    cols = items.to_index(interactions[Columns.ITEM_ID])
    keep = (rows >= 0) & (cols >= 0)
    weights = interactions[Columns.WEIGHT].to_numpy(dtype=np.float32)[keep]
    matrix = sp.csr_matrix(
        (weights, (rows[keep], cols[keep])), shape=(len(users), len(items)), dtype=np.float32
    )
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix


def check_user_items(user_items: sp.spmatrix, n_users: int, n_items: int) -> sp.csr_matrix:
    """Return ``user_items`` as CSR after checking it is users x items with finite weights."""
    if not sp.issparse(user_items):
        raise InteractionsError(
            f"user_items must be a scipy sparse matrix, got {type(user_items).__name__}; "
            "build it with build_user_items"
        )
    if user_items.shape == (n_items, n_users) and n_items != n_users:
        raise InteractionsError(
            f"user_items has shape {user_items.shape}, which is items x users; expected users x "
            f"items ({n_users}, {n_items}); pass user_items.T.tocsr()"
        )
    if user_items.shape != (n_users, n_items):
        raise InteractionsError(
            f"user_items has shape {user_items.shape}; expected ({n_users} users, {n_items} items)"
        )
    matrix = sp.csr_matrix(user_items, dtype=np.float32)
    if not np.isfinite(matrix.data).all():
        raise InteractionsError(
            "user_items contains NaN or infinite weights; drop or fix those interactions"
        )
    return matrix
