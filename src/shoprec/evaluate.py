"""Fixed-protocol evaluation: every model scored by the same metric code on both variants."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from shoprec.baselines import (
    recommend_als,
    recommend_buy_again,
    recommend_item_knn,
    recommend_popular,
    top_k,
)
from shoprec.candidates import SOURCES, CandidateModel, UserScores
from shoprec.columns import Columns
from shoprec.interactions import VARIANTS, build_targets
from shoprec.metrics import MetricContext, compute_metrics
from shoprec.rank import predict_scores

if TYPE_CHECKING:
    from shoprec.bundle import ModelBundle

logger = logging.getLogger(__name__)


class EvaluateConfig(BaseModel):
    """The ``evaluate`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(20, ge=10, description="recommendations kept per user (max metric cutoff)")
    popular_days: int = Field(30, ge=1)
    curve_fractions: list[float] = Field(
        default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
    )


def candidate_recall(candidates: pd.DataFrame, relevant: pd.DataFrame) -> float:
    """Mean over users of the share of their relevant items present among the candidates."""
    if relevant.empty:
        return 0.0
    found = relevant.merge(
        candidates[[Columns.USER_ID, Columns.ITEM_ID]].drop_duplicates().assign(_found=True),
        on=[Columns.USER_ID, Columns.ITEM_ID],
        how="left",
    )
    found["_found"] = found["_found"].notna()
    return float(found.groupby(Columns.USER_ID)["_found"].mean().mean())


def recall_curve(
    candidates: pd.DataFrame, relevant: pd.DataFrame, fractions: list[float], variant: str
) -> pd.DataFrame:
    """Candidate recall when every source keeps only a fraction of its per-user list.

    Returns variant, fraction, n_candidates (mean per user) and recall.
    """
    rows = []
    rank_columns = [f"rank_{s}" for s in SOURCES]
    longest = candidates[rank_columns].max()
    for fraction in fractions:
        limits = np.ceil(longest * fraction)
        keep = (candidates[rank_columns] <= limits).any(axis=1)
        subset = candidates[keep]
        rows.append(
            {
                "variant": variant,
                "fraction": fraction,
                "n_candidates": len(subset) / max(subset[Columns.USER_ID].nunique(), 1),
                "recall": candidate_recall(subset, relevant),
            }
        )
    return pd.DataFrame(rows)


def recommend_baselines(
    history: pd.DataFrame,
    scores: UserScores,
    model: CandidateModel,
    cutoff: pd.Timestamp,
    config: EvaluateConfig,
    exclude_seen: bool,
) -> dict[str, pd.DataFrame]:
    """Return the recommendations of every baseline for the users of ``scores``."""
    users = scores.user_ids
    return {
        "popularity": recommend_popular(
            history, users, cutoff, config.k, exclude_seen, days=config.popular_days
        ),
        "buy_again": recommend_buy_again(history, users, cutoff, config.k, exclude_seen),
        "als": recommend_als(scores, model, config.k, exclude_seen),
        "item_knn": recommend_item_knn(scores, model, config.k, exclude_seen),
    }


def rank_scored(scored: pd.DataFrame, k: int) -> pd.DataFrame:
    """Turn scored candidate rows into top-k recommendations."""
    return top_k(scored[[Columns.USER_ID, Columns.ITEM_ID, Columns.SCORE]].copy(), k)


def score_variant(
    recommendations: dict[str, pd.DataFrame],
    relevant: pd.DataFrame,
    context: MetricContext,
    with_novelty: bool,
) -> dict[str, dict[str, float]]:
    """Compute the protocol metrics of every model for one variant."""
    results = {}
    for name, recs in recommendations.items():
        results[name] = compute_metrics(recs, relevant, context, with_novelty=with_novelty)
        logger.info("%s: ndcg@10 %.4f", name, results[name]["ndcg@10"])
    return results


def evaluate_test_fold(
    features: pd.DataFrame,
    history: pd.DataFrame,
    target: pd.DataFrame,
    scores: UserScores,
    bundle: ModelBundle,
    cutoff: pd.Timestamp,
    config: EvaluateConfig,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score the two-stage model and the baselines on both variants.

    Returns the reports/metrics.json content and the candidate recall curve. Every evaluated
    user counts in the metrics, including users whose candidates hold no relevant item.
    """
    model = bundle.candidate_model
    buyers = history.groupby(Columns.ITEM_ID)[Columns.USER_ID].nunique()
    context = MetricContext(
        n_items=len(model.items), item_popularity=buyers / history[Columns.USER_ID].nunique()
    )
    metrics: dict[str, Any] = {"candidate_recall": {}, "n_users": {}}
    curves = []
    for variant in VARIANTS:
        exclude_seen = variant == "new"
        relevant = build_targets(history, target, variant)
        rows = features[features["from_past"] == 0] if exclude_seen else features
        rows = rows.assign(score=predict_scores(bundle.rankers[variant], rows))

        recommendations = recommend_baselines(history, scores, model, cutoff, config, exclude_seen)
        recommendations["two_stage"] = rank_scored(rows, config.k)
        metrics[variant] = score_variant(recommendations, relevant, context, exclude_seen)
        metrics["candidate_recall"][variant] = round(candidate_recall(rows, relevant), 6)
        metrics["n_users"][variant] = int(relevant[Columns.USER_ID].nunique())
        curves.append(recall_curve(rows, relevant, config.curve_fractions, variant))

    per_user = features.groupby(Columns.USER_ID).size()
    metrics["candidate_recall"]["n_candidates"] = int(round(per_user.mean()))
    metrics["ranker"] = {
        "share_queries_without_positive": bundle.rankers["all"].share_queries_without_positive,
        "best_iteration": bundle.rankers["all"].best_iteration,
        "new": {
            "share_queries_without_positive": bundle.rankers["new"].share_queries_without_positive,
            "best_iteration": bundle.rankers["new"].best_iteration,
        },
    }
    return metrics, pd.concat(curves, ignore_index=True)
