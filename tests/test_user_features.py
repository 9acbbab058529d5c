"""The single-user path (user_history, user_candidates, features) against the batch path."""

import numpy as np
import pandas as pd
import pytest
from tests.modelling_data import CUTOFF, make_purchases

from shoprec.candidates import (
    CandidatesConfig,
    fit_candidate_model,
    generate_candidates,
    popularity_scores,
    score_users,
)
from shoprec.features import (
    FeaturesConfig,
    ItemLookup,
    _kahan_sums,
    build_features,
    build_item_table,
    build_user_features,
    feature_matrix,
)
from shoprec.interactions import InteractionsError, clean_purchases
from shoprec.rank import build_feature_spec, to_matrix
from shoprec.user_candidates import generate_user_candidates, score_user
from shoprec.user_history import PurchaseIndex, UserHistory, context_purchases, new_purchases

CONFIG = CandidatesConfig(
    als_factors=8, als_iterations=5, n_als=5, n_copurchase=4, n_knn=4, n_popularity=3, num_threads=1
)
FEATURES = FeaturesConfig(popularity_windows=[7, 30])
FIT_CUTOFF = pd.Timestamp("2011-02-10", tz="UTC")


@pytest.fixture(scope="module")
def trained():
    purchases = clean_purchases(make_purchases())
    history = purchases[purchases["ts"] < FIT_CUTOFF]
    model = fit_candidate_model(history, FIT_CUTOFF, CONFIG)
    items = build_item_table(history, FIT_CUTOFF, FEATURES)
    return purchases, history, model, items


def _random_events(rng: np.random.Generator, user: str, n: int, with_orders: bool) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": user,
            "item_id": [f"i{i:02d}" for i in rng.integers(0, 21, n)],  # i20 is unknown
            "event_type": rng.choice(["purchase", "purchase", "view"], n),
            "quantity": rng.integers(1, 4, n),
            "price": rng.choice([np.nan, 2.5, 7.0], n),
            "ts": FIT_CUTOFF + pd.to_timedelta(rng.integers(-3, 20, n), unit="D"),
            "order_id": [f"n{i}" for i in rng.integers(0, 3, n)] if with_orders else None,
            "country": rng.choice([None, "France"], n),
        }
    )


def _batch_features(model, items, frame: pd.DataFrame, users: list[str], now: pd.Timestamp):
    users = pd.Index(users)
    scores = score_users(model, frame, users)
    candidates = generate_candidates(model, frame, users, scores)
    return build_features(candidates, frame, scores, model, items, now, FEATURES)


def _fast_matrix(model, items, history: UserHistory, now: pd.Timestamp, spec):
    scores = score_user(model, history, model.items.to_index(history.item_ids))
    candidates = generate_user_candidates(model, history, scores, popularity_scores(model))
    columns = build_user_features(
        candidates, history, scores, ItemLookup.from_table(items), now, FEATURES
    )
    return candidates, feature_matrix(columns, spec.features, spec.categories)


def test_user_features_equal_batch_features(trained):
    purchases, history, model, items = trained
    rng = np.random.default_rng(3)
    index = PurchaseIndex(history)
    all_users = sorted(history["user_id"].unique())
    spec = build_feature_spec(_batch_features(model, items, history, all_users, CUTOFF))
    users = list(rng.choice(all_users, 6, replace=False)) + ["stranger1", "stranger2"]

    for case, user in enumerate(users):
        stored = index.history(user)
        events = _random_events(rng, user, int(rng.integers(0, 6)), with_orders=case % 2 == 0)
        user_history = stored.append(new_purchases(events, stored)) if len(events) else stored
        if case % 3 == 0:
            cart = context_purchases(["i03", "i20"], np.array([4.0, 1.0]), CUTOFF, user)
            user_history = user_history.append(cart)
        if len(user_history) == 0:
            continue
        now = CUTOFF + pd.Timedelta(days=int(rng.integers(0, 10)))

        features = _batch_features(model, items, user_history.to_frame(), [user], now)
        expected = to_matrix(features, spec).to_numpy()
        candidates, matrix = _fast_matrix(model, items, user_history, now, spec)
        assert candidates.item_ids.tolist() == features["item_id"].tolist(), user
        assert candidates.source.tolist() == features["source"].tolist(), user
        np.testing.assert_array_equal(matrix, expected, err_msg=user)


def test_features_independent_of_batch_users(trained):
    _, history, model, items = trained
    users = pd.Index(["u02", "u07", "u16", "u23"])
    scores = score_users(model, history, users)
    candidates = generate_candidates(model, history, users, scores)
    together = build_features(candidates, history, scores, model, items, CUTOFF, FEATURES)
    spec = build_feature_spec(together)
    index = PurchaseIndex(history)

    for user in users:
        rows = together[together["user_id"] == user]
        alone, matrix = _fast_matrix(model, items, index.history(user), CUTOFF, spec)
        assert alone.item_ids.tolist() == rows["item_id"].tolist()
        # ALS scores come from one matrix product per batch; BLAS may round the last bit
        # differently for one row than for four, so they agree to float32 precision only.
        np.testing.assert_allclose(matrix, to_matrix(rows, spec).to_numpy(), rtol=1e-6, atol=1e-6)


def test_new_purchases_equal_clean_concat(trained):
    _, history, _, _ = trained
    stored = PurchaseIndex(history).history("u04")
    repeated = stored.to_frame().iloc[[0]].assign(quantity=99)
    events = pd.concat(
        [
            repeated,
            _random_events(np.random.default_rng(5), "u04", 6, with_orders=True),
        ],
        ignore_index=True,
    )
    merged = stored.append(new_purchases(events, stored))

    batch = pd.concat([history[history["user_id"] == "u04"], events], ignore_index=True)
    expected = clean_purchases(
        batch.drop_duplicates(["order_id", "item_id", "ts", "event_type"])
    ).reset_index(drop=True)
    got = merged.to_frame()
    assert len(got) == len(expected) == len(stored) + (events["event_type"] == "purchase").sum() - 1
    assert got["item_id"].tolist() == expected["item_id"].tolist()
    assert got["order_id"].tolist() == expected["order_id"].tolist()
    assert got["quantity"].tolist() == expected["quantity"].tolist()


def test_missing_order_id_becomes_own_order():
    events = pd.DataFrame(
        {
            "item_id": ["A", "B", "A"],
            "event_type": "purchase",
            "ts": pd.to_datetime(["2011-12-01 10:00", "2011-12-01 10:00", "2011-12-02 00:00"]),
            "order_id": [None, None, None],
        }
    )
    history = new_purchases(events, UserHistory.empty("u"))
    assert history.order_ids.tolist() == [
        "ts:2011-12-01 10:00:00+00:00",
        "ts:2011-12-01 10:00:00+00:00",
        "ts:2011-12-02 00:00:00+00:00",
    ]
    assert np.isnan(history.quantity).all()


def test_new_purchases_missing_columns():
    with pytest.raises(InteractionsError, match=r"events lack columns \['event_type', 'ts'\]"):
        new_purchases(pd.DataFrame({"item_id": ["A"]}), UserHistory.empty("u"))


def test_kahan_sums_equal_pandas_sums():
    rng = np.random.default_rng(0)
    values = rng.exponential(size=500) * 10.0 ** rng.integers(-8, 8, 500)
    values[::17] = np.nan
    groups = rng.integers(0, 7, 500)
    expected = pd.Series(values).groupby(groups).sum().to_numpy()
    assert _kahan_sums(values, groups, 7).tobytes() == expected.tobytes()


def test_purchase_index_slices_equal_clean_purchases(trained):
    _, history, _, _ = trained
    shuffled = history.sample(frac=1.0, random_state=1)
    index = PurchaseIndex(shuffled)

    for user in sorted(history["user_id"].unique()):
        expected = clean_purchases(shuffled[shuffled["user_id"] == user])
        got = index.history(user).to_frame()
        assert got["item_id"].tolist() == expected["item_id"].tolist()
        assert got["order_id"].tolist() == expected["order_id"].tolist()
        assert got["ts"].tolist() == expected["ts"].tolist()
    assert len(index.history("nobody")) == 0
    assert "nobody" not in index
