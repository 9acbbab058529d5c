"""Top-k ranking metrics with one signature for every metric.

Every metric is ``metric(recommendations, relevant, k, context) -> float`` where
``recommendations`` has columns user_id, item_id, rank (1 = best) and ``relevant`` has
user_id, item_id. The evaluated users are the users of ``relevant``: a user without any
recommendation counts as a miss. Gains are binary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from shoprec.columns import Columns
from shoprec.exceptions import ShoprecError

logger = logging.getLogger(__name__)


class MetricsError(ShoprecError):
    """Metric inputs are malformed."""


@dataclass(frozen=True)
class MetricContext:
    """Data some metrics need beyond the two frames.

    ``n_items`` is the catalogue size for coverage; ``item_popularity`` is the share of
    history users who bought each item (index item_id), used by novelty.
    """

    n_items: int = 0
    item_popularity: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))


MetricFn = Callable[[pd.DataFrame, pd.DataFrame, int, MetricContext], float]


def _hits(recommendations: pd.DataFrame, relevant: pd.DataFrame, k: int) -> pd.DataFrame:
    """Return the top-k rows of evaluated users with a boolean ``hit`` column."""
    for name, frame, columns in (
        ("recommendations", recommendations, (Columns.USER_ID, Columns.ITEM_ID, Columns.RANK)),
        ("relevant", relevant, (Columns.USER_ID, Columns.ITEM_ID)),
    ):
        missing = set(columns) - set(frame.columns)
        if missing:
            raise MetricsError(f"{name} lacks columns {sorted(missing)}; expected {columns}")
    if k <= 0:
        raise MetricsError(f"k must be positive, got {k}")

    users = relevant[Columns.USER_ID].unique()
    top = recommendations.loc[
        (recommendations[Columns.RANK] <= k) & recommendations[Columns.USER_ID].isin(users),
        [Columns.USER_ID, Columns.ITEM_ID, Columns.RANK],
    ]
    marked = relevant[[Columns.USER_ID, Columns.ITEM_ID]].drop_duplicates().assign(hit=True)
    top = top.merge(marked, on=[Columns.USER_ID, Columns.ITEM_ID], how="left")
    top["hit"] = top["hit"].notna()
    return top


def _n_relevant(relevant: pd.DataFrame) -> pd.Series:
    return (
        relevant.drop_duplicates([Columns.USER_ID, Columns.ITEM_ID])
        .groupby(Columns.USER_ID)[Columns.ITEM_ID]
        .size()
    )


def _mean_over_users(per_user: pd.Series, relevant: pd.DataFrame) -> float:
    users = pd.Index(relevant[Columns.USER_ID].unique())
    if len(users) == 0:
        return 0.0
    return float(per_user.reindex(users, fill_value=0.0).mean())


def precision_at_k(
    recommendations: pd.DataFrame, relevant: pd.DataFrame, k: int, context: MetricContext
) -> float:
    """Mean share of the k slots holding a relevant item."""
    hits = _hits(recommendations, relevant, k)
    per_user = hits.groupby(Columns.USER_ID)["hit"].sum() / k
    return _mean_over_users(per_user, relevant)


def recall_at_k(
    recommendations: pd.DataFrame, relevant: pd.DataFrame, k: int, context: MetricContext
) -> float:
    """Mean share of a user's relevant items found in the top k."""
    hits = _hits(recommendations, relevant, k)
    per_user = hits.groupby(Columns.USER_ID)["hit"].sum() / _n_relevant(relevant)
    return _mean_over_users(per_user.dropna(), relevant)


def ndcg_at_k(
    recommendations: pd.DataFrame, relevant: pd.DataFrame, k: int, context: MetricContext
) -> float:
    """Mean NDCG@k with binary gain: sum of 1/log2(rank+1) over hits, over the ideal."""
    hits = _hits(recommendations, relevant, k)
    hits["gain"] = hits["hit"] / np.log2(hits[Columns.RANK] + 1.0)
    dcg = hits.groupby(Columns.USER_ID)["gain"].sum()

    discounts = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))
    n_ideal = _n_relevant(relevant).clip(upper=k)
    idcg = pd.Series(discounts[n_ideal.to_numpy() - 1], index=n_ideal.index)
    return _mean_over_users((dcg / idcg).dropna(), relevant)


def map_at_k(
    recommendations: pd.DataFrame, relevant: pd.DataFrame, k: int, context: MetricContext
) -> float:
    """Mean average precision@k, normalised by min(number relevant, k)."""
    hits = _hits(recommendations, relevant, k).sort_values([Columns.USER_ID, Columns.RANK])
    hits["hits_so_far"] = hits.groupby(Columns.USER_ID)["hit"].cumsum()
    hits["precision"] = np.where(hits["hit"], hits["hits_so_far"] / hits[Columns.RANK], 0.0)
    summed = hits.groupby(Columns.USER_ID)["precision"].sum()
    per_user = summed / _n_relevant(relevant).clip(upper=k)
    return _mean_over_users(per_user.dropna(), relevant)


def hit_rate_at_k(
    recommendations: pd.DataFrame, relevant: pd.DataFrame, k: int, context: MetricContext
) -> float:
    """Share of users with at least one relevant item in the top k."""
    hits = _hits(recommendations, relevant, k)
    per_user = hits.groupby(Columns.USER_ID)["hit"].any().astype(float)
    return _mean_over_users(per_user, relevant)


def coverage_at_k(
    recommendations: pd.DataFrame, relevant: pd.DataFrame, k: int, context: MetricContext
) -> float:
    """Share of the catalogue (``context.n_items``) recommended to some evaluated user."""
    if context.n_items <= 0:
        raise MetricsError(
            f"coverage needs the catalogue size; got n_items={context.n_items}, "
            "pass MetricContext(n_items=...)"
        )
    hits = _hits(recommendations, relevant, k)
    return float(hits[Columns.ITEM_ID].nunique() / context.n_items)


def novelty_at_k(
    recommendations: pd.DataFrame, relevant: pd.DataFrame, k: int, context: MetricContext
) -> float:
    """Mean self-information -log2(p) of recommended items, p = share of users who bought it.

    Items never bought in history get half the smallest observed share.
    """
    popularity = context.item_popularity
    if popularity.empty:
        raise MetricsError("novelty needs item popularity; pass MetricContext(item_popularity=...)")
    hits = _hits(recommendations, relevant, k)
    if hits.empty:
        return 0.0
    floor = float(popularity[popularity > 0].min()) / 2.0
    shares = hits[Columns.ITEM_ID].map(popularity).fillna(floor).clip(lower=floor)
    hits["information"] = -np.log2(shares.to_numpy(dtype=float))
    per_user = hits.groupby(Columns.USER_ID)["information"].mean()
    return float(per_user.mean())


# Metric name -> (function, k). One table, so every model is scored by the same code.
METRICS: dict[str, tuple[MetricFn, int]] = {
    "precision@10": (precision_at_k, 10),
    "recall@20": (recall_at_k, 20),
    "ndcg@10": (ndcg_at_k, 10),
    "map@10": (map_at_k, 10),
    "hit_rate@10": (hit_rate_at_k, 10),
    "coverage@10": (coverage_at_k, 10),
}
NOVELTY: dict[str, tuple[MetricFn, int]] = {"novelty@10": (novelty_at_k, 10)}


def compute_metrics(
    recommendations: pd.DataFrame,
    relevant: pd.DataFrame,
    context: MetricContext,
    with_novelty: bool = False,
) -> dict[str, float]:
    """Compute every protocol metric for one model and one variant."""
    table = {**METRICS, **NOVELTY} if with_novelty else METRICS
    return {
        name: round(fn(recommendations, relevant, k, context), 6) for name, (fn, k) in table.items()
    }
