"""Baseline recommenders reported beside the two-stage model.

Each returns recommendations (user_id, item_id, score, rank) for the requested users. With
``exclude_seen`` (variant ``new``) items the user bought in ``history`` are never recommended.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from shoprec.candidates import CandidateModel, UserScores, rank_past_items
from shoprec.columns import Columns
from shoprec.interactions import slice_window

logger = logging.getLogger(__name__)


def top_k(scored: pd.DataFrame, k: int) -> pd.DataFrame:
    """Keep the k best rows per user by score (ties by item_id) and number them from 1."""
    ordered = scored.sort_values(
        [Columns.USER_ID, Columns.SCORE, Columns.ITEM_ID],
        ascending=[True, False, True],
        kind="stable",
    )
    ordered[Columns.RANK] = ordered.groupby(Columns.USER_ID).cumcount() + 1
    return ordered[ordered[Columns.RANK] <= k].reset_index(drop=True)


def _drop_seen(scored: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    seen = history[[Columns.USER_ID, Columns.ITEM_ID]].drop_duplicates().assign(_seen=True)
    merged = scored.merge(seen, on=[Columns.USER_ID, Columns.ITEM_ID], how="left")
    return merged[merged["_seen"].isna()].drop(columns="_seen")


def recommend_popular(
    history: pd.DataFrame,
    user_ids: pd.Index,
    cutoff: pd.Timestamp,
    k: int,
    exclude_seen: bool = False,
    days: int = 30,
) -> pd.DataFrame:
    """Recommend the items bought by most distinct users in the ``days`` before ``cutoff``."""
    recent = slice_window(history, cutoff - pd.Timedelta(days=days), cutoff)
    counts = recent.groupby(Columns.ITEM_ID)[Columns.USER_ID].nunique()
    # Enough spare items that k remain after removing any single user's past items.
    n_pool = k + (history.groupby(Columns.USER_ID)[Columns.ITEM_ID].nunique().max() or 0)
    pool = counts.sort_values(ascending=False, kind="stable").head(n_pool if exclude_seen else k)
    scored = pd.DataFrame(
        {
            Columns.USER_ID: np.repeat(np.asarray(user_ids, dtype=object), len(pool)),
            Columns.ITEM_ID: np.tile(pool.index.to_numpy(), len(user_ids)),
            Columns.SCORE: np.tile(pool.to_numpy(dtype=float), len(user_ids)),
        }
    )
    if exclude_seen:
        scored = _drop_seen(scored, history)
    return top_k(scored, k)


def recommend_buy_again(
    history: pd.DataFrame,
    user_ids: pd.Index,
    cutoff: pd.Timestamp,
    k: int,
    exclude_seen: bool = False,
) -> pd.DataFrame:
    """Recommend the user's own past items by invoice count, then recency.

    Slots left empty (short histories, or every slot with ``exclude_seen``) are filled with the
    recent popular items.
    """
    past = rank_past_items(history[history[Columns.USER_ID].isin(user_ids)])
    past = past[past[Columns.RANK] <= k]
    scored = past[[Columns.USER_ID, Columns.ITEM_ID]].assign(score=2.0 * k - past[Columns.RANK])
    if exclude_seen:
        scored = scored.iloc[0:0]

    fill = recommend_popular(history, user_ids, cutoff, k, exclude_seen=True)
    fill[Columns.SCORE] = k - fill[Columns.RANK].astype(float)
    combined = pd.concat([scored, fill[[Columns.USER_ID, Columns.ITEM_ID, Columns.SCORE]]])
    combined = combined.drop_duplicates([Columns.USER_ID, Columns.ITEM_ID], keep="first")
    return top_k(combined, k)


def _recommend_from_matrix(
    matrix: np.ndarray, scores: UserScores, model: CandidateModel, k: int, exclude_seen: bool
) -> pd.DataFrame:
    values = np.array(matrix, dtype=np.float32, copy=True)
    if exclude_seen:
        rows, cols = scores.user_items.nonzero()
        values[rows, cols] = -np.inf
    n = min(k, values.shape[1])
    top = np.argpartition(-values, n - 1, axis=1)[:, :n]
    picked = np.take_along_axis(values, top, axis=1)
    scored = pd.DataFrame(
        {
            Columns.USER_ID: np.repeat(scores.user_ids.to_numpy(), n),
            Columns.ITEM_ID: model.items.ids.to_numpy()[top.ravel()],
            Columns.SCORE: picked.ravel(),
        }
    )
    return top_k(scored[np.isfinite(scored[Columns.SCORE])], k)


def recommend_als(
    scores: UserScores, model: CandidateModel, k: int, exclude_seen: bool = False
) -> pd.DataFrame:
    """Recommend the items with the highest ALS score (user factor . item factor)."""
    return _recommend_from_matrix(scores.als, scores, model, k, exclude_seen)


def recommend_item_knn(
    scores: UserScores, model: CandidateModel, k: int, exclude_seen: bool = False
) -> pd.DataFrame:
    """Recommend by summed cosine similarity (top neighbours per item) to the user's items.

    Without ``exclude_seen`` each past item also counts as its own neighbour with similarity 1.
    """
    matrix = scores.knn
    if not exclude_seen:
        matrix = matrix + (scores.user_items > 0).astype(np.float32).toarray()
    return _recommend_from_matrix(matrix, scores, model, k, exclude_seen)
