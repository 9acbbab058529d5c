"""Features of (user, item) candidates, shared by offline training and online scoring.

Item statistics are frozen at the training cutoff (``build_item_table``); user and user-item
features are computed from the history passed in, relative to ``now``. Every feature of a row
depends only on that user's history and the item, never on the other rows of the batch.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from shoprec.candidates import SOURCES, CandidateModel, UserScores
from shoprec.columns import Columns
from shoprec.interactions import slice_window

logger = logging.getLogger(__name__)

DAY = pd.Timedelta(days=1)


class FeaturesConfig(BaseModel):
    """The ``features`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    popularity_windows: list[int] = Field(default_factory=lambda: [7, 30, 90])
    recent_days: int = Field(30, ge=1, description="window of the user's recent activity")


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
