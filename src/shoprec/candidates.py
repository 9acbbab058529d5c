"""Candidate generation: ALS, the user's past items, co-purchase, item-kNN and recent popularity.

``fit_candidate_model`` learns what the candidate stage needs from the purchases before a
cutoff. ``generate_candidates`` then proposes items per user and tags each item with the
sources that proposed it. Past items come only from the ``past`` source: the other sources pick
among items the user has not bought, so the ``new`` variant is the rows where ``from_past`` is
false.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import threadpool_limits

from shoprec.columns import Columns
from shoprec.exceptions import ShoprecError
from shoprec.interactions import (
    IdMap,
    build_interactions,
    build_user_items,
    check_user_items,
    slice_window,
)

logger = logging.getLogger(__name__)

# Order decides the primary ``source`` of a candidate proposed by several sources.
SOURCES: tuple[str, ...] = ("past", "als", "copurchase", "knn", "popularity")


class CandidatesError(ShoprecError):
    """Candidate generation got data it cannot use."""


class CandidatesConfig(BaseModel):
    """The ``candidates`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    als_factors: int = Field(64, ge=1)
    als_regularization: float = Field(0.05, ge=0)
    als_alpha: float = Field(10.0, gt=0)
    als_iterations: int = Field(15, ge=1)
    n_past: int = Field(200, ge=0, description="max past items per user")
    n_als: int = Field(150, ge=0)
    n_copurchase: int = Field(100, ge=0)
    n_knn: int = Field(100, ge=0)
    n_popularity: int = Field(50, ge=0)
    recent_baskets: int = Field(3, ge=1, description="last invoices used for co-purchase")
    popular_days: int = Field(30, ge=1)
    n_neighbours: int = Field(100, ge=1, description="neighbours kept per item")
    seed: int = 42
    num_threads: int = Field(1, ge=1)
    n_shards: int = Field(4, ge=1, description="user shards of candidate generation, one task each")


@dataclass
class CandidateModel:
    """State fitted on the history before ``cutoff``: ALS factors, similarities, popularity."""

    users: IdMap
    items: IdMap
    user_factors: np.ndarray
    item_factors: np.ndarray
    copurchase: sp.csr_matrix
    knn: sp.csr_matrix
    popular: pd.Series
    cutoff: pd.Timestamp
    config: CandidatesConfig


def fit_als(user_items: sp.csr_matrix, config: CandidatesConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fit implicit ALS on a users x items matrix; return (user_factors, item_factors).

    The factor count is capped below the smaller matrix side so tiny data stays well posed,
    and BLAS runs single-threaded because implicit parallelises over users itself.
    """
    from implicit.cpu.als import AlternatingLeastSquares

    n_users, n_items = user_items.shape
    factors = max(1, min(config.als_factors, min(n_users, n_items) - 1))
    if factors < config.als_factors:
        logger.warning(
            "ALS factors capped from %d to %d for a %dx%d matrix",
            config.als_factors,
            factors,
            n_users,
            n_items,
        )
    started = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=config.als_regularization,
            alpha=config.als_alpha,
            iterations=config.als_iterations,
            random_state=config.seed,
            num_threads=config.num_threads,
        )
        model.fit(user_items, show_progress=False)
    logger.debug("ALS fit %dx%d in %.2fs", n_users, n_items, time.perf_counter() - started)

    user_factors = np.asarray(model.user_factors, dtype=np.float32)
    item_factors = np.asarray(model.item_factors, dtype=np.float32)
    if not (np.isfinite(user_factors).all() and np.isfinite(item_factors).all()):
        raise CandidatesError(
            f"ALS produced non-finite factors (factors={factors}, "
            f"regularization={config.als_regularization}); raise candidates.als_regularization"
        )
    return user_factors, item_factors


class FoldIn:
    """Recompute user factors with the item factors held fixed (ALS fold-in).

    One instance keeps implicit's model, so the item Gram matrix is computed once, and a
    threadpool controller, so the BLAS libraries are looked up once rather than per call.
    """

    def __init__(self, item_factors: np.ndarray, config: CandidatesConfig) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import ThreadpoolController

        self._controller = ThreadpoolController()
        self._model = AlternatingLeastSquares(
            factors=item_factors.shape[1],
            regularization=config.als_regularization,
            alpha=config.als_alpha,
            num_threads=1,
        )
        self._model.item_factors = item_factors

    def __call__(self, user_items: sp.csr_matrix) -> np.ndarray:
        rows = np.arange(user_items.shape[0])
        with self._controller.limit(limits=1, user_api="blas"):
            factors = self._model.recalculate_user(
                rows, sp.csr_matrix(user_items, dtype=np.float32)
            )
        n_factors = self._model.item_factors.shape[1]
        return np.asarray(factors, dtype=np.float32).reshape(len(rows), n_factors)


def fold_in_users(
    user_items: sp.csr_matrix, item_factors: np.ndarray, config: CandidatesConfig
) -> np.ndarray:
    """Recompute user factors from their rows of user_items with the items held fixed."""
    return FoldIn(item_factors, config)(user_items)


def build_item_similarity(rows_items: sp.csr_matrix, n_neighbours: int) -> sp.csr_matrix:
    """Cosine similarity between item columns of a binary rows x items matrix, top-k per item."""
    binary = (rows_items > 0).astype(np.float32)
    counts = np.asarray(binary.sum(axis=0)).ravel()
    norms = np.sqrt(np.maximum(counts, 1.0))
    co = (binary.T @ binary).tocsr().astype(np.float32)
    co.setdiag(0)
    co.eliminate_zeros()
    co = sp.diags(1.0 / norms) @ co @ sp.diags(1.0 / norms)
    return _keep_top_per_row(co.tocsr(), n_neighbours)


def _keep_top_per_row(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    rows, cols, vals = [], [], []
    for row in range(matrix.shape[0]):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        data, idx = matrix.data[start:end], matrix.indices[start:end]
        if len(data) > k:
            keep = np.argpartition(-data, k - 1)[:k]
            data, idx = data[keep], idx[keep]
        rows.append(np.full(len(data), row))
        cols.append(idx)
        vals.append(data)
    pruned = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=matrix.shape
    )
    pruned.sort_indices()
    return pruned.astype(np.float32)


def fit_candidate_model(
    history: pd.DataFrame, cutoff: pd.Timestamp, config: CandidatesConfig
) -> CandidateModel:
    """Fit ALS, item similarities and recent popularity on clean purchases before ``cutoff``."""
    history = slice_window(history, None, cutoff)
    if history.empty:
        raise CandidatesError(f"no purchases before {cutoff}; ingest data or move split dates")

    interactions = build_interactions(history)
    users = IdMap.from_values(interactions[Columns.USER_ID])
    items = IdMap.from_values(interactions[Columns.ITEM_ID])
    user_items = check_user_items(
        build_user_items(interactions, users, items), len(users), len(items)
    )
    user_factors, item_factors = fit_als(user_items, config)

    baskets = history[[Columns.ORDER_ID, Columns.ITEM_ID]].drop_duplicates()
    order_index = IdMap.from_values(baskets[Columns.ORDER_ID])
    basket_items = sp.csr_matrix(
        (
            np.ones(len(baskets), dtype=np.float32),
            (
                order_index.to_index(baskets[Columns.ORDER_ID]),
                items.to_index(baskets[Columns.ITEM_ID]),
            ),
        ),
        shape=(len(order_index), len(items)),
    )
    copurchase = build_item_similarity(basket_items, config.n_neighbours)
    knn = build_item_similarity(user_items, config.n_neighbours)

    recent = slice_window(history, cutoff - pd.Timedelta(days=config.popular_days), cutoff)
    popular = (
        recent.groupby(Columns.ITEM_ID)[Columns.USER_ID]
        .nunique()
        .sort_values(ascending=False, kind="stable")
    )
    logger.info(
        "candidate model fitted: %d users, %d items, %d interactions, cutoff %s",
        len(users),
        len(items),
        user_items.nnz,
        cutoff.date(),
    )
    return CandidateModel(
        users, items, user_factors, item_factors, copurchase, knn, popular, cutoff, config
    )


@dataclass
class UserScores:
    """Dense users x items scores of the model-based sources for a set of users."""

    user_ids: pd.Index
    user_items: sp.csr_matrix
    als: np.ndarray
    knn: np.ndarray
    copurchase: np.ndarray


def rank_past_items(history: pd.DataFrame) -> pd.DataFrame:
    """Rank each user's past items by distinct invoices, then by latest purchase.

    Returns user_id, item_id, weight, last_ts and rank (1 = bought most often).
    """
    grouped = history.groupby([Columns.USER_ID, Columns.ITEM_ID], sort=False, observed=True)
    past = grouped.agg(
        weight=(Columns.ORDER_ID, "nunique"), last_ts=(Columns.TS, "max")
    ).reset_index()
    past = past.sort_values(
        [Columns.USER_ID, Columns.WEIGHT, "last_ts", Columns.ITEM_ID],
        ascending=[True, False, False, True],
        kind="stable",
    )
    past[Columns.RANK] = past.groupby(Columns.USER_ID).cumcount() + 1
    return past.reset_index(drop=True)


def score_users(model: CandidateModel, history: pd.DataFrame, user_ids: pd.Index) -> UserScores:
    """Compute ALS, item-kNN and co-purchase scores of every item for ``user_ids``.

    A user known to the model with no purchase after its cutoff keeps the trained ALS vector.
    Any other user (unseen, or with newer purchases) is folded in from ``history``.
    """
    user_ids = pd.Index(user_ids, dtype=str)
    history = history[history[Columns.USER_ID].isin(user_ids)]
    local = IdMap(user_ids)
    user_items = build_user_items(build_interactions(history), local, model.items)

    known = model.users.to_index(user_ids)
    newer = history.loc[history[Columns.TS] >= model.cutoff, Columns.USER_ID].unique()
    refit = (known < 0) | user_ids.isin(newer)
    vectors = np.zeros((len(user_ids), model.item_factors.shape[1]), dtype=np.float32)
    vectors[~refit] = model.user_factors[known[~refit]]
    if refit.any():
        vectors[refit] = fold_in_users(
            user_items[np.flatnonzero(refit)], model.item_factors, model.config
        )
        logger.debug("folded in ALS vectors of %d users", int(refit.sum()))
    als = vectors @ model.item_factors.T

    knn = ((user_items > 0).astype(np.float32) @ model.knn).toarray()
    last_orders = (
        history[[Columns.USER_ID, Columns.ORDER_ID, Columns.TS]]
        .drop_duplicates([Columns.USER_ID, Columns.ORDER_ID])
        .sort_values(Columns.TS, kind="stable")
        .groupby(Columns.USER_ID)
        .tail(model.config.recent_baskets)
    )
    recent = history.merge(last_orders[[Columns.USER_ID, Columns.ORDER_ID]])
    recent_items = build_user_items(
        recent.drop_duplicates([Columns.USER_ID, Columns.ITEM_ID]).assign(weight=1.0),
        local,
        model.items,
    )
    copurchase = (recent_items @ model.copurchase).toarray()
    return UserScores(user_ids, user_items, als, knn, copurchase)


def _top_new_items(scores: np.ndarray, seen: sp.csr_matrix, n: int) -> tuple[np.ndarray, ...]:
    """Return (row, column, rank) of the n best-scored items per row, skipping seen items.

    Items scored -inf are never returned.
    """
    if n <= 0 or scores.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    masked = np.array(scores, dtype=np.float32, copy=True)
    rows, cols = seen.nonzero()
    masked[rows, cols] = -np.inf
    n = min(n, masked.shape[1])
    top = np.argpartition(-masked, n - 1, axis=1)[:, :n]
    order = np.argsort(-np.take_along_axis(masked, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    row_index = np.repeat(np.arange(masked.shape[0]), n)
    col_index = top.ravel()
    ranks = np.tile(np.arange(1, n + 1), masked.shape[0])
    valid = np.isfinite(masked[row_index, col_index])
    return row_index[valid], col_index[valid], ranks[valid]


def popularity_scores(model: CandidateModel) -> np.ndarray:
    """Return recent buyers per model item as one row (-inf for items without recent buyers)."""
    scores = np.zeros(len(model.items), dtype=np.float32)
    columns = model.items.to_index(model.popular.index.to_numpy())
    kept = columns >= 0
    scores[columns[kept]] = model.popular.to_numpy(dtype=np.float32)[kept]
    scores[scores <= 0] = -np.inf
    return scores


def generate_candidates(
    model: CandidateModel,
    history: pd.DataFrame,
    user_ids: pd.Index,
    scores: UserScores | None = None,
) -> pd.DataFrame:
    """Propose candidates for ``user_ids`` from every source.

    Returns one row per (user_id, item_id) with ``source`` (first source in SOURCES order that
    proposed it), a boolean ``from_<source>`` and the within-source rank ``rank_<source>``
    (NaN when that source did not propose the item).
    """
    config = model.config
    scores = scores if scores is not None else score_users(model, history, user_ids)
    users = scores.user_ids
    item_ids = model.items.ids.to_numpy()
    parts = []

    past = rank_past_items(history[history[Columns.USER_ID].isin(users)])
    past = past[past[Columns.RANK] <= config.n_past]
    parts.append(past[[Columns.USER_ID, Columns.ITEM_ID, Columns.RANK]].assign(src="past"))

    for name, matrix, n in (
        ("als", scores.als, config.n_als),
        ("copurchase", scores.copurchase, config.n_copurchase),
        ("knn", scores.knn, config.n_knn),
    ):
        if name != "als":
            matrix = np.where(matrix > 0, matrix, -np.inf)
        rows, cols, ranks = _top_new_items(matrix, scores.user_items, n)
        frame = pd.DataFrame(
            {Columns.USER_ID: users[rows], Columns.ITEM_ID: item_ids[cols], Columns.RANK: ranks}
        )
        parts.append(frame.assign(src=name))

    popular_scores = np.tile(popularity_scores(model), (len(users), 1))
    rows, cols, ranks = _top_new_items(popular_scores, scores.user_items, config.n_popularity)
    parts.append(
        pd.DataFrame(
            {Columns.USER_ID: users[rows], Columns.ITEM_ID: item_ids[cols], Columns.RANK: ranks}
        ).assign(src="popularity")
    )

    long = pd.concat(parts, ignore_index=True)
    wide = long.pivot_table(
        index=[Columns.USER_ID, Columns.ITEM_ID], columns="src", values=Columns.RANK, aggfunc="min"
    )
    wide = wide.reindex(columns=list(SOURCES)).add_prefix("rank_").reset_index()
    for source in SOURCES:
        wide[f"from_{source}"] = wide[f"rank_{source}"].notna()
    flags = wide[[f"from_{source}" for source in SOURCES]].to_numpy()
    wide[Columns.SOURCE] = np.array(SOURCES)[flags.argmax(axis=1)]
    wide = wide.sort_values([Columns.USER_ID, Columns.ITEM_ID], kind="stable").reset_index(
        drop=True
    )
    logger.info(
        "candidates: %d rows for %d users (%.1f per user)",
        len(wide),
        len(users),
        len(wide) / max(len(users), 1),
    )
    return wide
