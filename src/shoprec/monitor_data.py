"""Monitor inputs: feature frames of a time window and the champion's recommendations.

``build_feature_frame`` stacks rows of two granularities into one frame, each column being
non-null only on rows of its own granularity (see shoprec.monitor for the column list).
Recommendations come from ``ModelBundle``'s own candidate, feature and ranker code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd

from shoprec.bundle import RESULT_COLUMNS, ModelBundle
from shoprec.candidates import generate_candidates, score_users
from shoprec.columns import Columns
from shoprec.features import build_features
from shoprec.interactions import clean_purchases
from shoprec.metrics import MetricContext, hit_rate_at_k, ndcg_at_k
from shoprec.rank import predict_scores

if TYPE_CHECKING:
    from shoprec.monitor import MonitorConfig

logger = logging.getLogger(__name__)


class Recommends(Protocol):
    """Model interface the monitor scores: the signature of ``ModelBundle.recommend``."""

    def recommend(
        self,
        user_history: pd.DataFrame,
        k: int,
        context_items: list[str] | None = None,
        exclude_items: set[str] | None = None,
        exclude_purchased: bool = False,
        now: pd.Timestamp | None = None,
        user_id: str | None = None,
    ) -> pd.DataFrame: ...


@dataclass(frozen=True)
class Window:
    """A time window [start, end) in UTC."""

    start: pd.Timestamp
    end: pd.Timestamp

    def to_dict(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}


def in_window(events: pd.DataFrame, window: Window) -> pd.DataFrame:
    ts = events[Columns.TS]
    return events.loc[(ts >= window.start) & (ts < window.end)]


def item_popularity(events: pd.DataFrame, window: Window) -> pd.Series:
    """Return log1p(distinct buyers) of each item bought in ``window``, indexed by item_id."""
    purchases = in_window(events, window)
    purchases = purchases[
        (purchases[Columns.EVENT_TYPE] == "purchase") & purchases[Columns.USER_ID].notna()
    ]
    buyers = purchases.groupby(Columns.ITEM_ID)[Columns.USER_ID].nunique()
    return np.log1p(buyers.astype(float))


def build_feature_frame(
    events: pd.DataFrame, window: Window, popularity: pd.Series
) -> pd.DataFrame:
    """Build the stacked event and basket rows of ``window`` (columns: see shoprec.monitor).

    ``events`` must contain the store up to the window end, so that first events are known.
    """
    day_of = events[Columns.TS].dt.floor("D")
    first_item_day = day_of.groupby(events[Columns.ITEM_ID]).transform("min")
    in_window = (events[Columns.TS] >= window.start) & (events[Columns.TS] < window.end)
    rows = events.loc[in_window]

    event_rows = pd.DataFrame(
        {
            "price": rows[Columns.PRICE].astype(float),
            "quantity": rows[Columns.QUANTITY].astype(float),
            "event_type": rows[Columns.EVENT_TYPE].astype(str),
            "item_is_new": np.where(first_item_day[in_window] == day_of[in_window], "new", "known"),
            "item_popularity": rows[Columns.ITEM_ID].map(popularity).fillna(0.0).astype(float),
        }
    )
    baskets = build_basket_frame(events, rows)
    return pd.concat([event_rows, baskets], ignore_index=True)


def build_basket_frame(events: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Build one row per purchase invoice of ``rows``; ``events`` gives users' first days."""
    purchases = rows[rows[Columns.EVENT_TYPE] == "purchase"]
    if purchases.empty:
        return pd.DataFrame(columns=["basket_size", "basket_value", "country", "customer"])

    first_user_day = events.groupby(Columns.USER_ID)[Columns.TS].min().dt.floor("D")
    value = purchases[Columns.QUANTITY] * purchases[Columns.PRICE]
    grouped = purchases.assign(value=value).groupby(Columns.ORDER_ID, sort=True)
    baskets = grouped.agg(
        basket_size=(Columns.ITEM_ID, "nunique"),
        basket_value=("value", "sum"),
        country=(Columns.COUNTRY, "first"),
        user_id=(Columns.USER_ID, "first"),
        ts=(Columns.TS, "min"),
    )
    first_day = baskets["user_id"].map(first_user_day)
    baskets["customer"] = np.where(
        baskets["user_id"].isna(),
        "anonymous",
        np.where(first_day == baskets["ts"].dt.floor("D"), "new", "returning"),
    )
    baskets["basket_size"] = baskets["basket_size"].astype(float)
    return baskets[["basket_size", "basket_value", "country", "customer"]].reset_index(drop=True)


def sample_users(users: pd.Index | list[str], n: int, seed: int) -> list[str]:
    """Return at most ``n`` of ``users``, sorted, chosen reproducibly with ``seed``."""
    ordered = sorted(str(u) for u in users)
    if len(ordered) <= n:
        return ordered
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ordered, size=n, replace=False).tolist())


def recommend_users(
    model: Recommends,
    history: pd.DataFrame,
    users: list[str],
    now: pd.Timestamp,
    k: int,
) -> pd.DataFrame:
    """Return the top-k of each user from their events in ``history`` (all before ``now``).

    A ``ModelBundle`` scores every user in one batch (see ``recommend_batch``); any other
    model is called once per user through ``recommend``.
    """
    if isinstance(model, ModelBundle) and users:
        return recommend_batch(model, history, users, now, k)
    by_user = {user: frame for user, frame in history.groupby(Columns.USER_ID, sort=False)}
    empty = history.iloc[0:0]
    parts = []
    for user in users:
        recs = model.recommend(by_user.get(user, empty), k=k, now=now, user_id=user)
        parts.append(recs.assign(**{Columns.USER_ID: user}))
    if not parts:
        return pd.DataFrame(columns=[Columns.USER_ID, *RESULT_COLUMNS])
    return pd.concat(parts, ignore_index=True)


def recommend_batch(
    bundle: ModelBundle, history: pd.DataFrame, users: list[str], now: pd.Timestamp, k: int
) -> pd.DataFrame:
    """Rank items for many users at once with the steps of ``ModelBundle.recommend``.

    Candidates, features and ranker scores are the ones ``recommend(user_history, k, now=now,
    user_id=user)`` computes for each user alone, because each feature row depends only on its
    own user. One batch takes about the time of one ``recommend`` call. Users without any
    purchase get the popular items, as in ``recommend``.
    """
    stored = bundle.purchases[bundle.purchases[Columns.USER_ID].isin(users)]
    combined = pd.concat([stored, history[history[Columns.USER_ID].isin(users)]])
    combined = combined.drop_duplicates(
        [Columns.USER_ID, Columns.ORDER_ID, Columns.ITEM_ID, Columns.TS, Columns.EVENT_TYPE]
    )
    purchases = clean_purchases(combined)
    buyers = pd.Index(sorted(purchases[Columns.USER_ID].unique()), dtype=str)

    parts = []
    if len(buyers):
        model = bundle.candidate_model
        scores = score_users(model, purchases, buyers)
        candidates = generate_candidates(model, purchases, buyers, scores)
        features = build_features(
            candidates, purchases, scores, model, bundle.item_table, now, bundle.features_config
        )
        features[Columns.SCORE] = predict_scores(bundle.rankers["all"], features)
        ranked = features.sort_values(
            [Columns.USER_ID, Columns.SCORE, Columns.ITEM_ID],
            ascending=[True, False, True],
            kind="stable",
        )
        ranked = ranked.groupby(Columns.USER_ID, sort=False).head(k).copy()
        ranked[Columns.RANK] = ranked.groupby(Columns.USER_ID).cumcount() + 1
        parts.append(ranked[[Columns.USER_ID, *RESULT_COLUMNS]])
    for user in sorted(set(users) - set(buyers)):
        popular = bundle.recommend(pd.DataFrame(), k=k)
        parts.append(popular.assign(**{Columns.USER_ID: user})[[Columns.USER_ID, *RESULT_COLUMNS]])
    if not parts:
        return pd.DataFrame(columns=[Columns.USER_ID, *RESULT_COLUMNS])
    return pd.concat(parts, ignore_index=True)


def active_users(events: pd.DataFrame, window: Window) -> tuple[pd.Index, pd.Index]:
    """Return (returning, new) identified buyers of ``window``.

    A returning buyer bought something before the window start.
    """
    purchases = events[(events[Columns.EVENT_TYPE] == "purchase") & events[Columns.USER_ID].notna()]
    buyers = pd.Index(in_window(purchases, window)[Columns.USER_ID].unique())
    before = purchases.loc[purchases[Columns.TS] < window.start, Columns.USER_ID].unique()
    returning = buyers[buyers.isin(before)]
    return returning, buyers[~buyers.isin(before)]


def measure_online_quality(
    recommendations: pd.DataFrame, relevant: pd.DataFrame, k: int
) -> dict[str, float | int]:
    """Score recommendations made before the window against what the users bought in it."""
    users = relevant[Columns.USER_ID].nunique()
    if users == 0:
        return {"n_users": 0}
    context = MetricContext()
    return {
        f"hit_rate@{k}": round(hit_rate_at_k(recommendations, relevant, k, context), 6),
        f"ndcg@{k}": round(ndcg_at_k(recommendations, relevant, k, context), 6),
        "n_users": int(users),
    }


def prediction_rows(recommendations: pd.DataFrame) -> pd.DataFrame:
    """Keep the monitored prediction columns of a recommendations frame."""
    frame = recommendations[[Columns.SCORE, Columns.SOURCE]].rename(
        columns={Columns.SCORE: "score", Columns.SOURCE: "source"}
    )
    return frame.astype({"score": float, "source": str}).reset_index(drop=True)


def reference_predictions(
    model: Recommends, events: pd.DataFrame, reference: Window, config: MonitorConfig
) -> pd.DataFrame:
    """Return the model's top-k at the end of the reference window for sampled buyers of it."""
    returning, new = active_users(events[events[Columns.TS] < reference.end], reference)
    users = sample_users(returning.append(new), config.reference_users, config.seed)
    history = events[(events[Columns.TS] < reference.end) & events[Columns.USER_ID].isin(users)]
    return prediction_rows(recommend_users(model, history, users, reference.end, config.k))


def score_window(
    model: Recommends, events: pd.DataFrame, current: Window, config: MonitorConfig
) -> tuple[pd.DataFrame, dict[str, float | int]]:
    """Recommend to sampled returning buyers of ``current`` as of its start and score the lists.

    Returns the recommendations and the online quality against the items each user bought in
    the window. ``events`` must contain the store up to the window end.
    """
    returning, _ = active_users(events[events[Columns.TS] < current.end], current)
    users = sample_users(returning, config.max_users, config.seed)
    before = events[(events[Columns.TS] < current.start) & events[Columns.USER_ID].isin(users)]
    recommendations = recommend_users(model, before, users, current.start, config.k)
    inside = in_window(events, current)
    relevant = inside.loc[
        (inside[Columns.EVENT_TYPE] == "purchase") & inside[Columns.USER_ID].isin(users),
        [Columns.USER_ID, Columns.ITEM_ID],
    ].drop_duplicates()
    return recommendations, measure_online_quality(recommendations, relevant, config.k)
