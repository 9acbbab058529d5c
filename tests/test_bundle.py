import dataclasses

import numpy as np
import pandas as pd
import pytest
from tests.modelling_data import CUTOFF, make_purchases

from shoprec.bundle import ModelBundle, UnknownItemError
from shoprec.candidates import (
    CandidatesConfig,
    fit_candidate_model,
    generate_candidates,
    score_users,
)
from shoprec.features import FeaturesConfig, attach_labels, build_features, build_item_table
from shoprec.interactions import clean_purchases
from shoprec.rank import RankConfig, predict_scores, train_ranker

CANDIDATES = CandidatesConfig(
    als_factors=8, als_iterations=5, n_als=6, n_copurchase=4, n_knn=4, n_popularity=3, num_threads=1
)
FEATURES = FeaturesConfig(popularity_windows=[7, 30])
RANK = RankConfig(
    num_boost_round=15, early_stopping_rounds=5, min_data_in_leaf=5, num_leaves=7, num_threads=1
)
LABEL_CUTOFF = pd.Timestamp("2011-02-10", tz="UTC")


@pytest.fixture(scope="module")
def purchases() -> pd.DataFrame:
    return clean_purchases(make_purchases())


@pytest.fixture(scope="module")
def bundle(purchases, tmp_path_factory) -> ModelBundle:
    history = purchases[purchases["ts"] < LABEL_CUTOFF]
    target = purchases[(purchases["ts"] >= LABEL_CUTOFF) & (purchases["ts"] < CUTOFF)]
    model = fit_candidate_model(history, LABEL_CUTOFF, CANDIDATES)
    users = pd.Index(sorted(history["user_id"].unique()))
    scores = score_users(model, history, users)
    candidates = generate_candidates(model, history, users, scores)
    items = build_item_table(history, LABEL_CUTOFF, FEATURES)
    features = attach_labels(
        build_features(candidates, history, scores, model, items, LABEL_CUTOFF, FEATURES), target
    )
    rankers = {
        "all": train_ranker(features, RANK),
        "new": train_ranker(features[features["from_past"] == 0], RANK),
    }
    catalogue = pd.DataFrame({"item_id": model.items.ids, "description": "thing"})
    built = ModelBundle(model, items, rankers, FEATURES, history, catalogue, {"note": "test"})
    directory = tmp_path_factory.mktemp("bundle")
    built.save(directory)
    return ModelBundle.load(directory)


def test_load_restores_metadata(bundle):
    assert bundle.metadata == {"note": "test"}
    assert set(bundle.rankers) == {"all", "new"}
    assert len(bundle.catalogue) == len(bundle.candidate_model.items)


def test_known_user_matches_offline_scores(bundle, purchases):
    history = purchases[purchases["ts"] < LABEL_CUTOFF]
    online = bundle.recommend(history.iloc[0:0], k=5, user_id="u03", now=LABEL_CUTOFF)
    assert online.columns.tolist() == ["item_id", "score", "rank", "source"]
    assert online["rank"].tolist() == [1, 2, 3, 4, 5]

    model = bundle.candidate_model
    users = pd.Index(["u03"])
    scores = score_users(model, history, users)
    candidates = generate_candidates(model, history, users, scores)
    offline = build_features(
        candidates, history, scores, model, bundle.item_table, LABEL_CUTOFF, FEATURES
    )
    offline["score"] = predict_scores(bundle.rankers["all"], offline)
    expected = offline.sort_values(["score", "item_id"], ascending=[False, True]).head(5)
    assert online["item_id"].tolist() == expected["item_id"].tolist()
    np.testing.assert_allclose(online["score"], expected["score"])


def test_unseen_user_gets_group_items(bundle, purchases):
    events = purchases[purchases["user_id"] == "u25"].assign(user_id="stranger")
    recs = bundle.recommend(events, k=5)
    assert len(recs) == 5
    assert recs["item_id"].map(lambda item: int(item[1:]) >= 10).mean() >= 0.6


def test_exclude_purchased_and_items(bundle, purchases):
    events = purchases[purchases["user_id"] == "u03"]
    recs = bundle.recommend(events, k=5, exclude_purchased=True, exclude_items={"i00"})
    assert not set(recs["item_id"]) & set(events["item_id"])
    assert "i00" not in set(recs["item_id"])


def test_empty_history_gets_popular_items(bundle):
    recs = bundle.recommend(pd.DataFrame(), k=3)
    assert recs["source"].tolist() == ["popularity"] * 3
    assert recs["item_id"].tolist() == bundle.candidate_model.popular.index[:3].tolist()


def test_context_items_steer_anonymous_shopper(bundle):
    recs = bundle.recommend(pd.DataFrame(), k=4, context_items=["i12", "i15"])
    assert recs["item_id"].map(lambda item: int(item[1:]) >= 10).mean() >= 0.75
    assert not {"i12", "i15"} & set(recs["item_id"])


def test_similar_items_and_unknown_item(bundle):
    similar = bundle.similar_items("i02", k=3)
    assert len(similar) == 3
    assert "i02" not in set(similar["item_id"])
    assert similar["item_id"].map(lambda item: int(item[1:]) < 10).all()
    with pytest.raises(UnknownItemError, match="'nope' is not in the model catalogue"):
        bundle.similar_items("nope", k=3)


def test_online_scores_independent_of_batch(bundle, purchases):
    history = purchases[purchases["ts"] < LABEL_CUTOFF]
    model = bundle.candidate_model
    users = pd.Index(sorted(history["user_id"].unique()))
    scores = score_users(model, history, users)
    candidates = generate_candidates(model, history, users, scores)
    offline = build_features(
        candidates, history, scores, model, bundle.item_table, LABEL_CUTOFF, FEATURES
    )
    offline["score"] = predict_scores(bundle.rankers["all"], offline)

    for user in ["u00", "u11", "u19", "u29"]:
        online = bundle.recommend(history.iloc[0:0], k=5, user_id=user, now=LABEL_CUTOFF)
        rows = offline[offline["user_id"] == user]
        expected = rows.sort_values(["score", "item_id"], ascending=[False, True]).head(5)
        assert online["item_id"].tolist() == expected["item_id"].tolist()
        np.testing.assert_allclose(online["score"], expected["score"], rtol=1e-6)


def test_orderless_purchase_brings_copurchases(bundle):
    event = pd.DataFrame(
        {
            "user_id": ["walk-in"],
            "item_id": ["i14"],
            "event_type": ["purchase"],
            "quantity": [1],
            "price": [None],
            "ts": [pd.Timestamp("2011-03-05", tz="UTC")],
            "order_id": [None],
        }
    )
    recs = bundle.recommend(event, k=5)
    assert "copurchase" in set(recs["source"])
    assert recs["item_id"].map(lambda item: int(item[1:]) >= 10).all()


def test_cached_scores_equal_fresh_scores(bundle, purchases):
    empty = purchases.iloc[0:0]
    fresh = dataclasses.replace(bundle)  # same model, empty score cache
    expected = fresh.recommend(empty, k=6, user_id="u21", now=LABEL_CUTOFF)
    first = expected["item_id"].iloc[0]

    narrowed = bundle.recommend(empty, k=5, user_id="u21", now=LABEL_CUTOFF, exclude_items={first})
    widened = bundle.recommend(empty, k=6, user_id="u21", now=LABEL_CUTOFF)
    repeated = bundle.recommend(empty, k=6, user_id="u21", now=LABEL_CUTOFF)

    assert narrowed["item_id"].tolist() == expected["item_id"].iloc[1:].tolist()
    pd.testing.assert_frame_equal(widened, expected)
    pd.testing.assert_frame_equal(repeated, expected)


def test_online_scores_cached_until_event(bundle, purchases):
    def purchase(item: str, day: str) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user_id": ["u21"],
                "item_id": [item],
                "event_type": ["purchase"],
                "quantity": [1],
                "price": [None],
                "ts": [pd.Timestamp(day, tz="UTC")],
                "order_id": [None],
            }
        )

    online = dataclasses.replace(bundle)  # an empty score cache of its own
    one = purchase("i14", "2011-03-05")
    two = pd.concat([one, purchase("i3", "2011-03-06")], ignore_index=True)

    first = online.recommend(one, k=5, user_id="u21")
    assert len(online.prepare_online().scores) == 1
    again = online.recommend(one.copy(), k=5, user_id="u21")
    assert len(online.prepare_online().scores) == 1  # served from the cache
    after_event = online.recommend(two, k=5, user_id="u21")

    pd.testing.assert_frame_equal(again, first)
    assert first.attrs["score_cache_hit"] is False
    assert again.attrs["score_cache_hit"] is True
    assert after_event.attrs["score_cache_hit"] is False
    assert len(online.prepare_online().scores) == 2
    pd.testing.assert_frame_equal(after_event, bundle.recommend(two, k=5, user_id="u21"))


def test_precomputed_scores_match_fresh(bundle, purchases, tmp_path):
    empty = purchases.iloc[0:0]
    users = bundle.prepare_online().purchases.users()
    fresh = dataclasses.replace(bundle)  # no precomputed scores, an empty cache

    served = bundle.recommend(empty, k=6, user_id="u21")
    computed = fresh.recommend(empty, k=6, user_id="u21")
    fresh.save(tmp_path, precompute=False)

    assert set(bundle.prepare_online().precomputed) == set(users)
    assert served.attrs["score_cache_hit"] is True
    assert computed.attrs["score_cache_hit"] is False
    pd.testing.assert_frame_equal(served, computed)
    assert not (tmp_path / "precomputed_scores.npz").exists()
