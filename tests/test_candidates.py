import numpy as np
import pandas as pd
import pytest
from tests.modelling_data import CUTOFF, make_purchases

from shoprec.candidates import (
    SOURCES,
    CandidatesConfig,
    CandidatesError,
    fit_als,
    fit_candidate_model,
    generate_candidates,
    rank_past_items,
    score_users,
)
from shoprec.interactions import clean_purchases

CONFIG = CandidatesConfig(
    als_factors=8,
    als_iterations=5,
    n_past=5,
    n_als=4,
    n_copurchase=3,
    n_knn=3,
    n_popularity=2,
    num_threads=1,
)


def _history() -> pd.DataFrame:
    purchases = clean_purchases(make_purchases())
    return purchases[purchases["ts"] < CUTOFF]


def test_tiny_data_trains_finite_als():
    import scipy.sparse as sp

    user_items = sp.csr_matrix(np.array([[1, 0, 2], [0, 1, 0]], dtype=np.float32))
    user_factors, item_factors = fit_als(user_items, CandidatesConfig(als_factors=64))
    # Factors are capped below the smaller side of the 2x3 matrix.
    assert user_factors.shape == (2, 1)
    assert item_factors.shape == (3, 1)
    assert np.isfinite(user_factors).all()
    assert np.isfinite(item_factors).all()


def test_candidates_tagged_with_sources():
    history = _history()
    model = fit_candidate_model(history, CUTOFF, CONFIG)
    candidates = generate_candidates(model, history, pd.Index(["u00", "u20"]))
    assert set(candidates["source"]) <= set(SOURCES)
    for source in SOURCES:
        flagged = candidates[f"from_{source}"]
        assert (flagged == candidates[f"rank_{source}"].notna()).all()
    assert not candidates.duplicated(["user_id", "item_id"]).any()


def test_only_past_source_proposes_past_items():
    history = _history()
    model = fit_candidate_model(history, CUTOFF, CONFIG)
    candidates = generate_candidates(model, history, pd.Index(["u00"]))
    bought = set(history.loc[history["user_id"] == "u00", "item_id"])
    new_rows = candidates[~candidates["from_past"]]
    assert len(new_rows) > 0
    assert not set(new_rows["item_id"]) & bought


def test_als_candidates_follow_taste_group():
    history = _history()
    model = fit_candidate_model(history, CUTOFF, CONFIG)
    candidates = generate_candidates(model, history, pd.Index(["u00"]))
    als_items = candidates.loc[candidates["from_als"], "item_id"]
    assert als_items.map(lambda item: int(item[1:]) < 10).mean() >= 0.5


def test_unseen_user_is_folded_in():
    history = _history()
    model = fit_candidate_model(history[history["user_id"] != "u05"], CUTOFF, CONFIG)
    scores = score_users(model, history, pd.Index(["u05"]))
    assert np.isfinite(scores.als).all()
    assert np.abs(scores.als).sum() > 0
    candidates = generate_candidates(model, history, pd.Index(["u05"]), scores)
    assert candidates["from_past"].sum() == 5


def test_past_items_ranked_by_frequency_then_recency():
    history = pd.DataFrame(
        {
            "user_id": ["u", "u", "u", "u"],
            "item_id": ["old", "new", "often", "often"],
            "order_id": ["o1", "o3", "o1", "o2"],
            "ts": pd.to_datetime(["2011-01-01", "2011-01-03", "2011-01-01", "2011-01-02"]),
        }
    )
    ranked = rank_past_items(history)
    assert ranked["item_id"].tolist() == ["often", "new", "old"]
    assert ranked["rank"].tolist() == [1, 2, 3]


def test_empty_history_rejected():
    with pytest.raises(CandidatesError, match="no purchases before"):
        fit_candidate_model(_history().iloc[0:0], CUTOFF, CONFIG)
