import numpy as np
import pandas as pd
import pytest
from tests.modelling_data import CUTOFF, make_purchases

from shoprec.candidates import (
    CandidatesConfig,
    fit_candidate_model,
    generate_candidates,
    score_users,
)
from shoprec.features import (
    FeaturesConfig,
    attach_labels,
    build_features,
    build_item_table,
    build_user_item_table,
)
from shoprec.interactions import clean_purchases

CONFIG = CandidatesConfig(als_factors=8, als_iterations=5, n_als=4, n_popularity=2, num_threads=1)
FEATURES = FeaturesConfig(popularity_windows=[7, 30])


def _features(users: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    purchases = clean_purchases(make_purchases())
    history = purchases[purchases["ts"] < CUTOFF]
    model = fit_candidate_model(history, CUTOFF, CONFIG)
    scores = score_users(model, history, pd.Index(users))
    candidates = generate_candidates(model, history, pd.Index(users), scores)
    items = build_item_table(history, CUTOFF, FEATURES)
    return build_features(candidates, history, scores, model, items, CUTOFF, FEATURES), purchases


def test_user_item_history_features():
    history = pd.DataFrame(
        {
            "user_id": ["u", "u", "u"],
            "item_id": ["A", "A", "B"],
            "order_id": ["o1", "o2", "o2"],
            "quantity": [2, 3, 1],
            "ts": pd.to_datetime(["2011-01-01", "2011-01-11", "2011-01-11"], utc=True),
        }
    )
    table = build_user_item_table(history, pd.Timestamp("2011-01-21", tz="UTC"))
    row = table.set_index("item_id").loc["A"]
    assert row["ui_orders"] == 2
    assert row["ui_quantity"] == 5
    assert row["ui_days_since_last"] == pytest.approx(10.0)
    assert row["ui_mean_gap_days"] == pytest.approx(10.0)
    assert row["ui_due_ratio"] == pytest.approx(1.0)


def test_item_popularity_windows_and_trend():
    purchases = clean_purchases(make_purchases())
    table = build_item_table(purchases, CUTOFF, FEATURES)
    assert {"item_users_7d", "item_users_30d", "item_trend", "item_price"} <= set(table.columns)
    assert (table["item_users_7d"] <= table["item_users_30d"]).all()
    assert table.loc["i03", "item_price"] == pytest.approx(4.0)


def test_features_cover_every_candidate():
    features, _ = _features(["u00", "u20"])
    assert not features.duplicated(["user_id", "item_id"]).any()
    assert features["als_score"].notna().all()
    assert (features["als_rank"] >= 1).all()
    past = features[features["from_past"] == 1]
    assert (past["ui_orders"] >= 1).all()


def test_features_do_not_depend_on_other_users():
    together, _ = _features(["u00", "u20"])
    alone, _ = _features(["u00"])
    columns = [
        c for c in alone.columns if c not in ("user_id", "item_id", "source", "user_country")
    ]
    left = together[together["user_id"] == "u00"].set_index("item_id").sort_index()[columns]
    right = alone.set_index("item_id").sort_index()[columns]
    np.testing.assert_allclose(left.to_numpy(float), right.to_numpy(float), rtol=1e-5)


def test_labels_count_target_invoices():
    features, purchases = _features(["u00"])
    target = purchases[purchases["ts"] >= CUTOFF]
    labelled = attach_labels(features, target)
    expected = target[target["user_id"] == "u00"].groupby("item_id")["order_id"].nunique()
    got = labelled.set_index("item_id")["label"]
    for item, count in expected.items():
        if item in got.index:
            assert got[item] == count
    assert labelled["label"].sum() <= expected.sum()
