import numpy as np
import pandas as pd
import pytest

from shoprec.rank import (
    RankConfig,
    RankError,
    build_feature_spec,
    group_sizes,
    predict_scores,
    sort_queries,
    to_matrix,
    train_ranker,
)

CONFIG = RankConfig(
    num_boost_round=20,
    early_stopping_rounds=5,
    min_data_in_leaf=5,
    num_leaves=7,
    valid_share=0.25,
    num_threads=1,
    max_negatives=30,
)


def _features(n_users: int = 40, n_items: int = 12, seed: int = 3) -> pd.DataFrame:
    """Rows whose label grows with ``signal``; every user has one positive at least."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(n_users):
        for item in range(n_items):
            signal = rng.normal()
            rows.append(
                {
                    "user_id": f"u{user:02d}",
                    "item_id": f"i{item:02d}",
                    "signal": signal,
                    "noise": rng.normal(),
                    "source": ["past", "als", "popularity"][item % 3],
                    "user_country": "France" if user % 2 else "Spain",
                    "label": int(signal > 1.0) + int(signal > 1.5),
                }
            )
        rows[-1]["label"] = max(rows[-1]["label"], 1)
    return pd.DataFrame(rows)


def test_shuffled_rows_give_same_ranker():
    features = _features()
    first = train_ranker(features, CONFIG)
    second = train_ranker(features.sample(frac=1.0, random_state=11), CONFIG)
    assert first.best_iteration == second.best_iteration
    np.testing.assert_array_equal(predict_scores(first, features), predict_scores(second, features))


def test_ranker_learns_signal():
    features = _features()
    ranker = train_ranker(features, CONFIG)
    scores = predict_scores(ranker, features)
    assert np.corrcoef(scores, features["signal"])[0, 1] > 0.5


def test_label_beyond_default_label_gain_handled():
    features = _features()
    # LightGBM's default label_gain covers labels 0..30 only.
    features.loc[features["label"] > 0, "label"] = 50
    ranker = train_ranker(features, CONFIG.model_copy(update={"max_label": 40}))
    assert ranker.best_iteration >= 1


def test_queries_without_positive_dropped_and_counted():
    features = _features()
    features.loc[features["user_id"].isin(["u00", "u01"]), "label"] = 0
    ranker = train_ranker(features, CONFIG)
    assert ranker.share_queries_without_positive == pytest.approx(2 / 40)


def test_score_independent_of_batch():
    features = _features()
    ranker = train_ranker(features, CONFIG)
    full = predict_scores(ranker, features)
    subset = features.iloc[[5, 100, 7]]
    np.testing.assert_array_equal(predict_scores(ranker, subset), full[[5, 100, 7]])


def test_group_sizes_match_rows():
    frame = sort_queries(_features(n_users=3, n_items=4).sample(frac=1.0, random_state=1))
    assert group_sizes(frame).tolist() == [4, 4, 4]


def test_categories_use_fixed_mapping():
    features = _features(n_users=2, n_items=3)
    spec = build_feature_spec(features)
    unseen = features.assign(user_country="Atlantis")
    matrix = to_matrix(unseen, spec)
    assert matrix["source"].tolist()[:3] == [0.0, 1.0, 4.0]
    assert matrix["user_country"].isna().all()


def test_missing_label_rejected():
    with pytest.raises(RankError, match="attach_labels"):
        train_ranker(_features().drop(columns="label"), CONFIG)


def test_averaged_boosters_score_mean():
    features = _features()
    ranker = train_ranker(features, CONFIG.model_copy(update={"n_models": 2}))
    assert len(ranker.boosters) == 2
    matrix = to_matrix(features, ranker.spec)
    expected = (ranker.boosters[0].predict(matrix) + ranker.boosters[1].predict(matrix)) / 2
    np.testing.assert_allclose(predict_scores(ranker, features), expected)
