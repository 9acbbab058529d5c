import math

import pandas as pd
import pytest

from shoprec.metrics import (
    METRICS,
    MetricContext,
    MetricsError,
    compute_metrics,
    coverage_at_k,
    hit_rate_at_k,
    map_at_k,
    ndcg_at_k,
    novelty_at_k,
    precision_at_k,
    recall_at_k,
)

# u1 gets A (hit), B (miss), C (hit); u2 gets D (miss); u3 gets nothing.
RECS = pd.DataFrame(
    {
        "user_id": ["u1", "u1", "u1", "u2"],
        "item_id": ["A", "B", "C", "D"],
        "rank": [1, 2, 3, 1],
    }
)
RELEVANT = pd.DataFrame(
    {"user_id": ["u1", "u1", "u1", "u2", "u3"], "item_id": ["A", "C", "E", "E", "A"]}
)
CONTEXT = MetricContext(
    n_items=10, item_popularity=pd.Series({"A": 0.5, "B": 0.25, "C": 0.125, "D": 1.0})
)


def test_precision_hand_computed():
    # u1: 2 hits / 3 slots; u2 and u3: 0.
    assert precision_at_k(RECS, RELEVANT, 3, CONTEXT) == pytest.approx((2 / 3) / 3)


def test_recall_hand_computed():
    # u1: 2 of 3 relevant; u2: 0 of 1; u3: 0 of 1.
    assert recall_at_k(RECS, RELEVANT, 20, CONTEXT) == pytest.approx((2 / 3) / 3)


def test_ndcg_binary_gain_hand_computed():
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(RECS, RELEVANT, 10, CONTEXT) == pytest.approx((dcg / idcg) / 3)


def test_ndcg_cut_at_k():
    # With k=1 only A counts for u1, and the ideal has one slot.
    assert ndcg_at_k(RECS, RELEVANT, 1, CONTEXT) == pytest.approx(1 / 3)


def test_map_hand_computed():
    # u1: (1/1 + 2/3) / min(3, 10).
    assert map_at_k(RECS, RELEVANT, 10, CONTEXT) == pytest.approx(((1 + 2 / 3) / 3) / 3)


def test_hit_rate_hand_computed():
    assert hit_rate_at_k(RECS, RELEVANT, 10, CONTEXT) == pytest.approx(1 / 3)


def test_coverage_counts_distinct_items():
    assert coverage_at_k(RECS, RELEVANT, 10, CONTEXT) == pytest.approx(4 / 10)


def test_novelty_is_mean_self_information():
    # u1: mean(1, 2, 3) bits; u2: 0 bits.
    assert novelty_at_k(RECS, RELEVANT, 10, CONTEXT) == pytest.approx((2 + 0) / 2)


def test_perfect_ranking_scores_one():
    perfect = pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["A", "C"], "rank": [1, 2]})
    relevant = perfect[["user_id", "item_id"]]
    for name, (fn, k) in METRICS.items():
        if name != "coverage@10":
            assert fn(perfect, relevant, k, CONTEXT) == pytest.approx(
                1.0 if name != "precision@10" else 0.2
            ), name


def test_every_metric_shares_one_signature():
    values = compute_metrics(RECS, RELEVANT, CONTEXT, with_novelty=True)
    assert sorted(values) == sorted(
        [
            "precision@10",
            "recall@20",
            "ndcg@10",
            "map@10",
            "hit_rate@10",
            "coverage@10",
            "novelty@10",
        ]
    )


def test_missing_column_rejected():
    with pytest.raises(MetricsError, match=r"recommendations lacks columns \['rank'\]"):
        precision_at_k(RECS.drop(columns="rank"), RELEVANT, 10, CONTEXT)


def test_coverage_needs_catalogue_size():
    with pytest.raises(MetricsError, match="n_items=0"):
        coverage_at_k(RECS, RELEVANT, 10, MetricContext())
