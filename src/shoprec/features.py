"""Features of (user, item) candidates, shared by offline training and online scoring.

Item statistics are frozen at the training cutoff (``build_item_table``); user and user-item
features are computed from the history passed in, relative to ``now``. Every feature of a row
depends only on that user's history and the item, never on the other rows of the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from shoprec.candidates import SOURCES, CandidateModel, UserScores
from shoprec.columns import Columns
from shoprec.exceptions import ShoprecError
from shoprec.interactions import slice_window
from shoprec.user_candidates import UserCandidates
from shoprec.user_history import UserHistory

logger = logging.getLogger(__name__)

DAY = pd.Timedelta(days=1)


class FeaturesError(ShoprecError):
    """Features cannot be built as the model expects."""


class FeaturesConfig(BaseModel):
    """The ``features`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    popularity_windows: list[int] = Field(default_factory=lambda: [7, 30, 90])
    recent_days: int = Field(30, ge=1, description="window of the user's recent activity")
    n_shards: int = Field(4, ge=1, description="user shards of feature building, one task each")


def build_item_table(
    history: pd.DataFrame, cutoff: pd.Timestamp, config: FeaturesConfig
) -> pd.DataFrame:
    """Compute per-item statistics of the history before ``cutoff`` (index item_id)."""
    history = slice_window(history, None, cutoff)
    grouped = history.groupby(Columns.ITEM_ID, observed=True)
    table = pd.DataFrame(
        {
            "item_users": grouped[Columns.USER_ID].nunique(),
            "item_orders": grouped[Columns.ORDER_ID].nunique(),
            "item_price": grouped[Columns.PRICE].median(),
            "item_quantity_per_order": grouped[Columns.QUANTITY].sum()
            / grouped[Columns.ORDER_ID].nunique(),
            "item_age_days": (cutoff - grouped[Columns.TS].min()) / DAY,
            "item_days_since_sold": (cutoff - grouped[Columns.TS].max()) / DAY,
        }
    )
    per_user = history.groupby([Columns.ITEM_ID, Columns.USER_ID], observed=True)[
        Columns.ORDER_ID
    ].nunique()
    table["item_repeat_share"] = (per_user >= 2).groupby(level=0).mean()

    first_purchase = history.groupby([Columns.ITEM_ID, Columns.USER_ID], observed=True)[
        Columns.TS
    ].min()
    recent_first = first_purchase[first_purchase >= cutoff - config.recent_days * DAY]
    table["item_new_buyers"] = recent_first.groupby(level=0).size()
    table["item_new_buyers"] = table["item_new_buyers"].fillna(0)

    for days in config.popularity_windows:
        window = slice_window(history, cutoff - days * DAY, cutoff)
        table[f"item_users_{days}d"] = window.groupby(Columns.ITEM_ID)[Columns.USER_ID].nunique()
    table = table.fillna({f"item_users_{d}d": 0 for d in config.popularity_windows})
    shortest, longest = min(config.popularity_windows), max(config.popularity_windows)
    table["item_trend"] = (table[f"item_users_{shortest}d"] / shortest) / (
        (table[f"item_users_{longest}d"] + 1.0) / longest
    )
    return table.astype("float32")


def build_user_table(
    history: pd.DataFrame, now: pd.Timestamp, config: FeaturesConfig
) -> pd.DataFrame:
    """Compute per-user statistics of ``history`` relative to ``now`` (index user_id)."""
    spend = history[Columns.QUANTITY] * history[Columns.PRICE]
    grouped = history.assign(spend=spend).groupby(Columns.USER_ID, observed=True)
    orders = grouped[Columns.ORDER_ID].nunique()
    table = pd.DataFrame(
        {
            "user_orders": orders,
            "user_items": grouped[Columns.ITEM_ID].nunique(),
            "user_spend": grouped["spend"].sum(),
            "user_days_since_last": (now - grouped[Columns.TS].max()) / DAY,
            "user_days_since_first": (now - grouped[Columns.TS].min()) / DAY,
        }
    )
    table["user_lines_per_order"] = grouped.size() / orders
    span_days = table["user_days_since_first"] - table["user_days_since_last"]
    table["user_mean_gap_days"] = np.where(orders > 1, span_days / (orders - 1), np.nan)
    table["user_due_ratio"] = table["user_days_since_last"] / table["user_mean_gap_days"]
    table["user_spend_per_order"] = table["user_spend"] / orders
    recent = slice_window(history, now - config.recent_days * DAY, None)
    table["user_orders_recent"] = recent.groupby(Columns.USER_ID)[Columns.ORDER_ID].nunique()
    table["user_orders_recent"] = table["user_orders_recent"].fillna(0)
    table["user_country"] = grouped[Columns.COUNTRY].last() if Columns.COUNTRY in history else ""
    return table


def build_user_item_table(
    history: pd.DataFrame, now: pd.Timestamp, decay_days: float = 30.0
) -> pd.DataFrame:
    """Compute (user, item) history statistics relative to ``now``.

    ``ui_decayed_orders`` weights each invoice by exp(-age / decay_days); ``ui_orders_recent``
    counts the invoices of the last ``decay_days``.
    """
    grouped = history.groupby([Columns.USER_ID, Columns.ITEM_ID], observed=True)
    table = grouped.agg(
        ui_orders=(Columns.ORDER_ID, "nunique"),
        ui_quantity=(Columns.QUANTITY, "sum"),
        first_ts=(Columns.TS, "min"),
        last_ts=(Columns.TS, "max"),
    )
    table["ui_days_since_last"] = (now - table.pop("last_ts")) / DAY
    invoices = history.drop_duplicates([Columns.USER_ID, Columns.ITEM_ID, Columns.ORDER_ID])
    age_days = (now - invoices[Columns.TS]) / DAY
    decayed = invoices.assign(
        ui_decayed_orders=np.exp(-age_days.to_numpy(dtype=float) / decay_days),
        ui_orders_recent=(age_days <= decay_days).to_numpy(dtype=float),
    ).groupby([Columns.USER_ID, Columns.ITEM_ID], observed=True)
    table["ui_decayed_orders"] = decayed["ui_decayed_orders"].sum()
    table["ui_orders_recent"] = decayed["ui_orders_recent"].sum()
    table["ui_days_since_first"] = (now - table.pop("first_ts")) / DAY
    span = table["ui_days_since_first"] - table["ui_days_since_last"]
    table["ui_mean_gap_days"] = np.where(
        table["ui_orders"] > 1, span / (table["ui_orders"] - 1), np.nan
    )
    table["ui_due_ratio"] = table["ui_days_since_last"] / table["ui_mean_gap_days"]
    return table.reset_index()


def _gather(matrix: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    values = np.full(len(rows), np.nan, dtype=np.float32)
    valid = (rows >= 0) & (cols >= 0)
    values[valid] = matrix[rows[valid], cols[valid]]
    return values


def build_features(
    candidates: pd.DataFrame,
    history: pd.DataFrame,
    scores: UserScores,
    model: CandidateModel,
    item_table: pd.DataFrame,
    now: pd.Timestamp,
    config: FeaturesConfig,
) -> pd.DataFrame:
    """Add model scores, item, user and user-item features to candidate rows.

    ``history`` must be the clean purchases the candidates were generated from; ``scores``
    must come from ``score_users`` on the same users.
    """
    frame = candidates.copy()
    rows = scores.user_ids.get_indexer(frame[Columns.USER_ID])
    cols = model.items.to_index(frame[Columns.ITEM_ID])

    als_rank = np.argsort(np.argsort(-scores.als, axis=1, kind="stable"), axis=1) + 1
    frame["als_score"] = _gather(scores.als, rows, cols)
    frame["als_rank"] = _gather(als_rank.astype(np.float32), rows, cols)
    frame["knn_score"] = _gather(scores.knn, rows, cols)
    frame["copurchase_score"] = _gather(scores.copurchase, rows, cols)

    frame = frame.merge(item_table, left_on=Columns.ITEM_ID, right_index=True, how="left")
    users = history[history[Columns.USER_ID].isin(scores.user_ids)]
    frame = frame.merge(
        build_user_table(users, now, config), left_on=Columns.USER_ID, right_index=True, how="left"
    )
    frame = frame.merge(
        build_user_item_table(users, now, config.recent_days),
        on=[Columns.USER_ID, Columns.ITEM_ID],
        how="left",
    )
    frame["ui_orders"] = frame["ui_orders"].fillna(0)
    frame["ui_order_share"] = frame["ui_orders"] / frame["user_orders"]
    frame["price_vs_user"] = frame["item_price"] / (
        frame["user_spend"] / frame["user_items"].clip(lower=1)
    )
    for source in SOURCES:
        frame[f"from_{source}"] = frame[f"from_{source}"].astype("float32")
    logger.debug("features: %d rows x %d columns", *frame.shape)
    return frame


def attach_labels(features: pd.DataFrame, target: pd.DataFrame) -> pd.DataFrame:
    """Add ``label`` = distinct invoices of the (user, item) pair in the target window."""
    counts = (
        target.groupby([Columns.USER_ID, Columns.ITEM_ID], observed=True)[Columns.ORDER_ID]
        .nunique()
        .rename(Columns.LABEL)
        .reset_index()
    )
    labelled = features.merge(counts, on=[Columns.USER_ID, Columns.ITEM_ID], how="left")
    labelled[Columns.LABEL] = labelled[Columns.LABEL].fillna(0).astype("int32")
    return labelled


# Single-user path: the features above for one user's candidates, computed with numpy.
# tests/test_user_features.py checks that it gives the batch path's model input.

DAY_NS = float(DAY.value)


@dataclass(frozen=True)
class ItemLookup:
    """Rows of the item table by item id; unknown items get a row of NaN."""

    names: list[str]
    values: np.ndarray
    positions: dict[str, int]

    @classmethod
    def from_table(cls, item_table: pd.DataFrame) -> ItemLookup:
        values = item_table.to_numpy(dtype=np.float32)
        values = np.vstack([values, np.full((1, values.shape[1]), np.nan, dtype=np.float32)])
        positions = {str(item): row for row, item in enumerate(item_table.index)}
        return cls(list(item_table.columns), values, positions)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        missing = len(self.values) - 1
        return self.values[[self.positions.get(item, missing) for item in item_ids]]


def _kahan_sums(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum ``values`` per group in row order, skipping NaN, with the compensated summation
    of pandas' group-by sum, so both paths give the same float64 bits."""
    sums = [0.0] * n_groups
    compensations = [0.0] * n_groups
    for group, value in zip(groups.tolist(), values.tolist(), strict=True):
        if value != value:
            continue
        y = value - compensations[group]
        t = sums[group] + y
        compensation = t - sums[group] - y
        compensations[group] = 0.0 if compensation != compensation else compensation
        sums[group] = t
    return np.array(sums, dtype=np.float64)


def _days(now_ns: int, ts: np.ndarray) -> np.ndarray:
    return (now_ns - np.asarray(ts, dtype=np.int64)).astype(np.float64) / DAY_NS


def _gap_features(days_first: np.ndarray, days_last: np.ndarray, orders: np.ndarray) -> tuple:
    """Return (mean days between orders, days since last / mean gap) as the batch path does."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_gap = np.where(orders > 1, (days_first - days_last) / (orders - 1), np.nan)
        return mean_gap, days_last / mean_gap


def user_feature_values(
    history: UserHistory, now: pd.Timestamp, config: FeaturesConfig
) -> dict[str, Any]:
    """Return ``build_user_table``'s row for one user as scalars (user_country may be None)."""
    now_ns = now.value
    orders = len(set(history.order_ids.tolist()))
    spend = _kahan_sums(history.quantity * history.price, np.zeros(len(history), np.intp), 1)[0]
    days_last = _days(now_ns, [history.ts.max()])[0]
    days_first = _days(now_ns, [history.ts.min()])[0]
    mean_gap, due_ratio = _gap_features(
        np.array([days_first]), np.array([days_last]), np.array([orders])
    )
    recent = history.ts >= (now - config.recent_days * DAY).value
    countries = [c for c in history.country.tolist() if c is not None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "user_orders": orders,
            "user_items": len(set(history.item_ids.tolist())),
            "user_spend": spend,
            "user_days_since_last": days_last,
            "user_days_since_first": days_first,
            "user_lines_per_order": np.float64(len(history)) / orders,
            "user_mean_gap_days": mean_gap[0],
            "user_due_ratio": due_ratio[0],
            "user_spend_per_order": np.float64(spend) / orders,
            "user_orders_recent": len(set(history.order_ids[recent].tolist())),
            "user_country": countries[-1] if countries else None,
        }


def user_item_feature_values(
    history: UserHistory, now: pd.Timestamp, decay_days: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return (item ids, ``build_user_item_table`` columns) for one user's distinct items."""
    now_ns = now.value
    item_ids, item_codes = history.items
    n_items = len(item_ids)
    first_ts = np.full(n_items, np.iinfo(np.int64).max)
    last_ts = np.full(n_items, np.iinfo(np.int64).min)
    np.minimum.at(first_ts, item_codes, history.ts)
    np.maximum.at(last_ts, item_codes, history.ts)
    quantity = _kahan_sums(history.quantity, item_codes, n_items)

    # One row per (item, order): the first in history order, as drop_duplicates keeps.
    first: dict[tuple, int] = {}
    for row, key in enumerate(zip(item_codes.tolist(), history.order_ids.tolist(), strict=True)):
        first.setdefault(key, row)
    first_rows = np.fromiter(first.values(), dtype=np.intp, count=len(first))
    invoice_items = item_codes[first_rows]
    orders = np.bincount(invoice_items, minlength=n_items)
    age_days = _days(now_ns, history.ts[first_rows])
    decayed = _kahan_sums(np.exp(-age_days / decay_days), invoice_items, n_items)
    recent = np.bincount(invoice_items, weights=(age_days <= decay_days), minlength=n_items)

    days_last = _days(now_ns, last_ts)
    days_first = _days(now_ns, first_ts)
    mean_gap, due_ratio = _gap_features(days_first, days_last, orders)
    return item_ids.astype(object), {
        "ui_orders": orders.astype(np.float64),
        "ui_quantity": quantity,
        "ui_days_since_last": days_last,
        "ui_decayed_orders": decayed,
        "ui_orders_recent": recent,
        "ui_days_since_first": days_first,
        "ui_mean_gap_days": mean_gap,
        "ui_due_ratio": due_ratio,
    }


def build_user_features(
    candidates: UserCandidates,
    history: UserHistory,
    scores: UserScores,
    items: ItemLookup,
    now: pd.Timestamp,
    config: FeaturesConfig,
) -> dict[str, Any]:
    """Return ``build_features``'s columns for one user's candidates (arrays in candidate order).

    ``scores`` must come from ``score_user`` on the same history.
    """
    n = len(candidates)
    columns: dict[str, Any] = {}
    for position, source in enumerate(SOURCES):
        columns[f"rank_{source}"] = candidates.ranks[:, position]
        columns[f"from_{source}"] = (~np.isnan(candidates.ranks[:, position])).astype(np.float32)
    columns[Columns.SOURCE] = candidates.source

    rows = np.zeros(n, dtype=np.intp)
    # The inverse of the stable order by score is the rank that build_features computes.
    als_rank = np.empty_like(scores.als, dtype=np.float32)
    als_rank[0, np.argsort(-scores.als[0], kind="stable")] = np.arange(1, scores.als.shape[1] + 1)
    columns["als_score"] = _gather(scores.als, rows, candidates.columns)
    columns["als_rank"] = _gather(als_rank, rows, candidates.columns)
    columns["knn_score"] = _gather(scores.knn, rows, candidates.columns)
    columns["copurchase_score"] = _gather(scores.copurchase, rows, candidates.columns)

    item_values = items.rows(candidates.item_ids)
    for position, name in enumerate(items.names):
        columns[name] = item_values[:, position]
    user = user_feature_values(history, now, config)
    for name, value in user.items():
        columns[name] = np.full(n, value, dtype=object if name == "user_country" else None)

    bought, per_item = user_item_feature_values(history, now, config.recent_days)
    found = np.searchsorted(bought.astype(str), candidates.item_ids.astype(str))
    found = np.minimum(found, max(len(bought) - 1, 0))
    hit = bought[found] == candidates.item_ids if len(bought) else np.zeros(n, dtype=bool)
    for name, values in per_item.items():
        columns[name] = np.where(hit, values[found], np.nan)
    columns["ui_orders"] = np.where(hit, columns["ui_orders"], 0.0)

    with np.errstate(divide="ignore", invalid="ignore"):
        columns["ui_order_share"] = columns["ui_orders"] / user["user_orders"]
        spend_per_item = np.float64(user["user_spend"]) / max(user["user_items"], 1)
        columns["price_vs_user"] = columns["item_price"].astype(np.float64) / spend_per_item
    return columns


def feature_matrix(
    columns: dict[str, Any], features: list[str], categories: dict[str, list[str]]
) -> np.ndarray:
    """Return the float32 model input of ``columns`` in ``features`` order, as ``to_matrix``."""
    n = len(columns[Columns.SOURCE])
    matrix = np.empty((n, len(features)), dtype=np.float32)
    for position, name in enumerate(features):
        if name not in columns:
            raise FeaturesError(
                f"feature column {name!r} missing from the single-user features; "
                "retrain the bundle with this shoprec version"
            )
        if name in categories:
            codes = {category: code for code, category in enumerate(categories[name])}
            values, inverse = np.unique(np.asarray(columns[name]).astype(str), return_inverse=True)
            mapped = np.array([codes.get(value, np.nan) for value in values], dtype=np.float32)
            matrix[:, position] = mapped[inverse]
        else:
            matrix[:, position] = np.asarray(columns[name], dtype=np.float64)
    return matrix
