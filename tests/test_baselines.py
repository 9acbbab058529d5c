import pandas as pd
from tests.modelling_data import CUTOFF, make_purchases

from shoprec.baselines import (
    recommend_als,
    recommend_buy_again,
    recommend_item_knn,
    recommend_popular,
    top_k,
)
from shoprec.candidates import CandidatesConfig, fit_candidate_model, score_users
from shoprec.interactions import clean_purchases

CONFIG = CandidatesConfig(als_factors=8, als_iterations=5, num_threads=1)


def _history() -> pd.DataFrame:
    purchases = clean_purchases(make_purchases())
    return purchases[purchases["ts"] < CUTOFF]


def _tiny_history() -> pd.DataFrame:
    rows = [
        ("u1", "A", "o1", "2011-02-20"),
        ("u1", "A", "o2", "2011-02-21"),
        ("u1", "B", "o2", "2011-02-21"),
        ("u2", "C", "o3", "2011-02-22"),
        ("u3", "C", "o4", "2011-02-23"),
        ("u3", "B", "o4", "2011-02-23"),
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "order_id", "ts"])
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    return frame


def test_top_k_orders_and_numbers():
    scored = pd.DataFrame(
        {"user_id": ["u", "u", "u"], "item_id": ["b", "a", "c"], "score": [1.0, 1.0, 2.0]}
    )
    ranked = top_k(scored, 2)
    assert ranked["item_id"].tolist() == ["c", "a"]
    assert ranked["rank"].tolist() == [1, 2]


def test_popularity_counts_recent_buyers():
    recs = recommend_popular(_tiny_history(), pd.Index(["u1"]), CUTOFF, k=3)
    # C and B have two buyers each (tie broken by id), A one.
    assert recs["item_id"].tolist() == ["B", "C", "A"]


def test_popularity_new_variant_skips_seen():
    recs = recommend_popular(_tiny_history(), pd.Index(["u1"]), CUTOFF, k=3, exclude_seen=True)
    assert recs["item_id"].tolist() == ["C"]


def test_buy_again_frequency_then_popular_fill():
    recs = recommend_buy_again(_tiny_history(), pd.Index(["u1"]), CUTOFF, k=3)
    assert recs["item_id"].tolist() == ["A", "B", "C"]


def test_als_and_knn_exclude_seen_items():
    history = _history()
    model = fit_candidate_model(history, CUTOFF, CONFIG)
    scores = score_users(model, history, pd.Index(["u00", "u20"]))
    seen = set(history.loc[history["user_id"] == "u00", "item_id"])
    for recommend in (recommend_als, recommend_item_knn):
        recs = recommend(scores, model, k=5, exclude_seen=True)
        assert recs.groupby("user_id").size().max() <= 5
        assert not set(recs.loc[recs["user_id"] == "u00", "item_id"]) & seen


def test_item_knn_stays_in_taste_group():
    history = _history()
    model = fit_candidate_model(history, CUTOFF, CONFIG)
    scores = score_users(model, history, pd.Index(["u20"]))
    recs = recommend_item_knn(scores, model, k=5)
    assert recs["item_id"].map(lambda item: int(item[1:]) >= 10).all()
