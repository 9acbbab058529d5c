"""Candidates of one user, the single-request path of candidates.py.

``score_user`` and ``generate_user_candidates`` give the rows and scores that ``score_users``
and ``generate_candidates`` give for the same user, using numpy on that user's arrays instead of
pandas group-bys over a frame. tests/test_user_candidates.py checks that both paths agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from shoprec.candidates import (
    SOURCES,
    CandidateModel,
    FoldIn,
    UserScores,
    _top_new_items,
)
from shoprec.user_history import UserHistory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserCandidates:
    """One user's candidates sorted by item id.

    ``columns`` are model item positions (-1 for items the model does not know), ``ranks`` the
    within-source rank per SOURCES column (NaN when that source did not propose the item) and
    ``source`` the first source in SOURCES order that proposed it.
    """

    item_ids: np.ndarray
    columns: np.ndarray
    ranks: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def from_past(self) -> np.ndarray:
        return ~np.isnan(self.ranks[:, SOURCES.index("past")])

    def select(self, keep: np.ndarray) -> UserCandidates:
        """Return the candidates where ``keep`` is true, in the same order."""
        return UserCandidates(
            self.item_ids[keep], self.columns[keep], self.ranks[keep], self.source[keep]
        )


def _unique_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the sorted distinct strings of ``values`` and each value's position among them."""
    return np.unique(values.astype(str), return_inverse=True)


def _row(columns: np.ndarray, weights: np.ndarray, n_items: int) -> sp.csr_matrix:
    """Build a 1 x n_items CSR row from distinct sorted columns."""
    return sp.csr_matrix(
        (weights.astype(np.float32), columns, np.array([0, len(columns)])), shape=(1, n_items)
    )


def score_user(
    model: CandidateModel, history: UserHistory, columns: np.ndarray, fold_in: FoldIn | None = None
) -> UserScores:
    """Compute one user's ALS, item-kNN and co-purchase scores, as ``score_users`` does.

    ``columns`` are the model item positions of the history rows (-1 for unknown items).
    Pass a ``FoldIn`` of the model's item factors to reuse it across requests.
    """
    n_items = len(model.items)
    known = columns >= 0
    order_ids, order_codes = history.orders
    pairs = np.unique(columns[known].astype(np.int64) * (len(history) + 1) + order_codes[known])
    item_columns, weights = np.unique(pairs // (len(history) + 1), return_counts=True)
    user_items = _row(item_columns, weights, n_items)

    position = model.users.to_index([history.user_id])[0]
    refit = position < 0 or bool((history.ts >= model.cutoff.value).any())
    if refit:
        fold_in = fold_in or FoldIn(model.item_factors, model.config)
        vectors = fold_in(user_items)
    else:
        vectors = model.user_factors[[position]]
    als = vectors @ model.item_factors.T
    knn = ((user_items > 0).astype(np.float32) @ model.knn).toarray()

    # Recent baskets: the last orders by (first purchase time, order id).
    first_ts = np.full(len(order_ids), np.iinfo(np.int64).max)
    np.minimum.at(first_ts, order_codes, history.ts)
    recent_orders = np.lexsort((np.arange(len(order_ids)), first_ts))[
        -model.config.recent_baskets :
    ]
    in_recent = np.isin(order_codes, recent_orders) & known
    recent_columns = np.unique(columns[in_recent])
    recent_items = _row(recent_columns, np.ones(len(recent_columns)), n_items)
    copurchase = (recent_items @ model.copurchase).toarray()
    return UserScores(pd.Index([history.user_id]), user_items, als, knn, copurchase)


def rank_user_past_items(history: UserHistory) -> tuple[np.ndarray, np.ndarray]:
    """Return the user's distinct items ranked by distinct orders, then latest purchase, then id.

    Returns (item_ids in rank order, ranks starting at 1), as ``rank_past_items`` ranks them.
    """
    item_ids, item_codes = history.items
    order_codes = history.orders[1]
    pairs = np.unique(item_codes.astype(np.int64) * (len(history) + 1) + order_codes)
    weight = np.bincount(pairs // (len(history) + 1), minlength=len(item_ids))
    last_ts = np.full(len(item_ids), np.iinfo(np.int64).min)
    np.maximum.at(last_ts, item_codes, history.ts)
    order = np.lexsort((np.arange(len(item_ids)), -last_ts, -weight))
    return item_ids[order].astype(object), np.arange(1, len(item_ids) + 1)


def generate_user_candidates(
    model: CandidateModel, history: UserHistory, scores: UserScores, popular: np.ndarray
) -> UserCandidates:
    """Propose one user's candidates from every source, as ``generate_candidates`` does.

    ``popular`` is ``popularity_scores(model)``.
    """
    config = model.config
    model_ids = model.items.ids.to_numpy()
    proposals: list[tuple[str, np.ndarray, np.ndarray]] = []

    past_ids, past_ranks = rank_user_past_items(history)
    keep = past_ranks <= config.n_past
    proposals.append(("past", past_ids[keep], past_ranks[keep]))
    for name, matrix, n in (
        ("als", scores.als, config.n_als),
        ("copurchase", scores.copurchase, config.n_copurchase),
        ("knn", scores.knn, config.n_knn),
        ("popularity", popular[None, :], config.n_popularity),
    ):
        if name in ("copurchase", "knn"):
            matrix = np.where(matrix > 0, matrix, -np.inf)
        _, cols, ranks = _top_new_items(matrix, scores.user_items, n)
        proposals.append((name, model_ids[cols], ranks))

    every_id = np.concatenate([ids for _, ids, _ in proposals])
    item_ids, positions = _unique_codes(every_id)
    ranks = np.full((len(item_ids), len(SOURCES)), np.nan)
    start = 0
    for name, ids, source_ranks in proposals:
        ranks[positions[start : start + len(ids)], SOURCES.index(name)] = source_ranks
        start += len(ids)
    source = np.array(SOURCES, dtype=object)[(~np.isnan(ranks)).argmax(axis=1)]
    item_ids = item_ids.astype(object)
    logger.debug("candidates of %s: %d items", history.user_id, len(item_ids))
    return UserCandidates(item_ids, model.items.to_index(item_ids), ranks, source)
