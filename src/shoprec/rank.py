"""LightGBM lambdarank reranker over candidate features.

Rows are stably sorted by (user_id, item_id) before training, so the input row order does not
change the model. Queries (users) without any positive row carry no ranking signal and are
dropped. Early stopping uses a fixed, hash-based share of held-out users.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from shoprec.candidates import SOURCES
from shoprec.columns import Columns
from shoprec.exceptions import ShoprecError

logger = logging.getLogger(__name__)

# Identifier and label columns that are never features.
NON_FEATURES: frozenset[str] = frozenset(
    {Columns.USER_ID, Columns.ITEM_ID, Columns.LABEL, Columns.SCORE, Columns.RANK}
)
CATEGORICAL: tuple[str, ...] = (Columns.SOURCE, "user_country")


class RankError(ShoprecError):
    """Ranker training or scoring got data it cannot use."""


class RankConfig(BaseModel):
    """The ``rank`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(0.05, gt=0)
    num_leaves: int = Field(31, ge=2)
    min_data_in_leaf: int = Field(50, ge=1)
    feature_fraction: float = Field(0.8, gt=0, le=1)
    lambda_l2: float = Field(1.0, ge=0)
    num_boost_round: int = Field(600, ge=1)
    early_stopping_rounds: int = Field(50, ge=1)
    valid_share: float = Field(0.2, gt=0, lt=1, description="share of users held out")
    max_label: int = Field(3, ge=1, description="labels above this are clipped")
    eval_at: int = Field(10, ge=1)
    truncation_level: int = Field(30, ge=1)
    max_negatives: int = Field(
        200, ge=1, description="negative rows kept per query, chosen by a hash of the item id"
    )
    n_models: int = Field(
        1, ge=1, description="boosters averaged, each with its own held-out users and negatives"
    )
    refit_full: bool = Field(True, description="retrain on all users with the best iteration")
    seed: int = 42
    num_threads: int = Field(1, ge=1)


@dataclass
class FeatureSpec:
    """Feature order and the fixed category -> code mapping of each categorical feature."""

    features: list[str]
    categories: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"features": self.features, "categories": self.categories}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        return cls(list(data["features"]), {k: list(v) for k, v in data["categories"].items()})


@dataclass
class Ranker:
    """Trained boosters (scores are averaged) with their feature spec and training summary."""

    boosters: list[lgb.Booster]
    spec: FeatureSpec
    best_iteration: int
    share_queries_without_positive: float


def build_feature_spec(features: pd.DataFrame) -> FeatureSpec:
    """Choose feature columns and freeze category mappings from the training frame."""
    names = [c for c in features.columns if c not in NON_FEATURES and not c.startswith("_")]
    categories = {Columns.SOURCE: list(SOURCES)}
    if "user_country" in features:
        categories["user_country"] = sorted(features["user_country"].dropna().astype(str).unique())
    return FeatureSpec(names, categories)


def to_matrix(features: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """Return the numeric model input: spec columns in order, categories as fixed codes."""
    missing = [c for c in spec.features if c not in features.columns]
    if missing:
        raise RankError(f"feature columns {missing} missing; build features with features.py")
    columns = {}
    for name in spec.features:
        if name in spec.categories:
            codes = pd.Index(spec.categories[name]).get_indexer(features[name].astype(str))
            columns[name] = np.where(codes >= 0, codes, np.nan).astype("float32")
        else:
            columns[name] = pd.to_numeric(features[name], errors="coerce").to_numpy("float32")
    return pd.DataFrame(columns, index=features.index, columns=spec.features)


def sort_queries(features: pd.DataFrame) -> pd.DataFrame:
    """Stably sort rows by (user_id, item_id) so every query is one contiguous block."""
    return features.sort_values([Columns.USER_ID, Columns.ITEM_ID], kind="stable").reset_index(
        drop=True
    )


def group_sizes(sorted_features: pd.DataFrame) -> np.ndarray:
    """Return query sizes in row order, checked to sum to the row count."""
    users = sorted_features[Columns.USER_ID].to_numpy()
    boundaries = np.flatnonzero(users[1:] != users[:-1]) + 1
    sizes = np.diff(np.concatenate([[0], boundaries, [len(users)]]))
    if sizes.sum() != len(sorted_features):
        raise RankError(f"group sizes sum to {sizes.sum()}, expected {len(sorted_features)} rows")
    return sizes


def _dataset(frame: pd.DataFrame, spec: FeatureSpec, config: RankConfig) -> lgb.Dataset:
    labels = frame[Columns.LABEL].clip(upper=config.max_label).to_numpy()
    return lgb.Dataset(
        to_matrix(frame, spec),
        label=labels,
        group=group_sizes(frame),
        categorical_feature=[c for c in spec.features if c in spec.categories],
        free_raw_data=False,
    )


def _params(config: RankConfig) -> dict:
    return {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [config.eval_at],
        # Linear gains cover every clipped label, however large max_label is.
        "label_gain": [float(g) for g in range(config.max_label + 1)],
        "lambdarank_truncation_level": config.truncation_level,
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_data_in_leaf": config.min_data_in_leaf,
        "feature_fraction": config.feature_fraction,
        "lambda_l2": config.lambda_l2,
        "seed": config.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": config.num_threads,
        "verbosity": -1,
    }


def is_held_out(user_ids: pd.Series, share: float, seed: int = 0) -> np.ndarray:
    """Return a fixed, order-independent mask of users held out for early stopping."""
    unique = pd.unique(user_ids.astype(str))
    buckets = pd.Series([zlib.crc32(f"{seed}|{u}".encode()) % 1000 for u in unique], index=unique)
    return buckets.reindex(user_ids.astype(str)).to_numpy() < share * 1000


def _sample_negatives(frame: pd.DataFrame, max_negatives: int, seed: int) -> pd.DataFrame:
    """Keep every positive and at most ``max_negatives`` negatives per query.

    The choice hashes (seed, user, item), so it does not depend on the row order.
    """
    keys = (frame[Columns.USER_ID].astype(str) + "|" + frame[Columns.ITEM_ID].astype(str)).map(
        lambda key: zlib.crc32(f"{seed}|{key}".encode())
    )
    negative = frame[Columns.LABEL].to_numpy() <= 0
    order = frame.assign(_key=keys.to_numpy(), _negative=negative)
    order["_pos"] = (
        order.sort_values([Columns.USER_ID, "_key"], kind="stable")
        .groupby([Columns.USER_ID, "_negative"])
        .cumcount()
    )
    keep = ~negative | (order["_pos"].to_numpy() < max_negatives)
    return frame.loc[keep].reset_index(drop=True)


def train_ranker(features: pd.DataFrame, config: RankConfig) -> Ranker:
    """Train a lambdarank booster on labelled candidate features (one query per user)."""
    if Columns.LABEL not in features:
        raise RankError("features lack a 'label' column; add it with features.attach_labels")
    frame = sort_queries(features)
    positives = frame.groupby(Columns.USER_ID, sort=False)[Columns.LABEL].transform("max") > 0
    n_queries = frame[Columns.USER_ID].nunique()
    share_without = 1.0 - frame.loc[positives, Columns.USER_ID].nunique() / max(n_queries, 1)
    frame = frame.loc[positives].reset_index(drop=True)
    if frame.empty:
        raise RankError("no query has a positive label; check the label window dates")
    logger.info(
        "ranker data: %d rows, %d queries (%.1f%% of queries had no positive and were dropped)",
        len(frame),
        frame[Columns.USER_ID].nunique(),
        100 * share_without,
    )

    spec = build_feature_spec(frame)
    boosters, iterations = [], []
    for member in range(config.n_models):
        booster, best_iteration = _train_member(frame, spec, config, config.seed + member)
        boosters.append(booster)
        iterations.append(best_iteration)
    return Ranker(boosters, spec, int(round(np.mean(iterations))), share_without)


def _train_member(
    frame: pd.DataFrame, spec: FeatureSpec, config: RankConfig, seed: int
) -> tuple[lgb.Booster, int]:
    """Train one booster; ``seed`` picks its held-out users and sampled negatives."""
    held_out = is_held_out(frame[Columns.USER_ID], config.valid_share, seed)
    if held_out.all() or not held_out.any():
        held_out = np.zeros(len(frame), dtype=bool)
        held_out[frame[Columns.USER_ID] == frame[Columns.USER_ID].iloc[-1]] = True
    # Held-out queries keep every row, so early stopping scores the full candidate lists.
    sampled = _sample_negatives(frame, config.max_negatives, seed)
    held_users = frame.loc[held_out, Columns.USER_ID].unique()
    train_set = _dataset(
        sampled.loc[~sampled[Columns.USER_ID].isin(held_users)].reset_index(drop=True),
        spec,
        config,
    )
    valid_set = _dataset(frame.loc[held_out].reset_index(drop=True), spec, config)

    params = {**_params(config), "seed": seed}
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=config.num_boost_round,
        valid_sets=[valid_set],
        callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False)],
    )
    best_iteration = int(booster.best_iteration or config.num_boost_round)
    logger.info(
        "ranker (seed %d) early-stopped at %d rounds, held-out ndcg@%d %.4f",
        seed,
        best_iteration,
        config.eval_at,
        booster.best_score["valid_0"][f"ndcg@{config.eval_at}"],
    )

    if config.refit_full:
        booster = lgb.train(params, _dataset(sampled, spec, config), num_boost_round=best_iteration)
    else:
        booster = booster.model_from_string(booster.model_to_string(num_iteration=best_iteration))
    return booster, best_iteration


def predict_scores(ranker: Ranker, features: pd.DataFrame) -> np.ndarray:
    """Score rows one by one (mean over the boosters): a score depends only on its own row."""
    matrix = to_matrix(features, ranker.spec)
    scores = [booster.predict(matrix, num_threads=1) for booster in ranker.boosters]
    return np.mean(scores, axis=0)


def feature_importance(ranker: Ranker) -> pd.DataFrame:
    """Return total gain per feature, highest first."""
    gains = np.sum([b.feature_importance(importance_type="gain") for b in ranker.boosters], axis=0)
    frame = pd.DataFrame({"feature": ranker.boosters[0].feature_name(), "gain": gains})
    return frame.sort_values("gain", ascending=False, kind="stable").reset_index(drop=True)
