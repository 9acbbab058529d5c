import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from shoprec.interactions import (
    IdMap,
    InteractionsError,
    SplitConfig,
    build_interactions,
    build_targets,
    build_user_items,
    check_user_items,
    clean_purchases,
    make_folds,
    resolve_split,
)


def _events() -> pd.DataFrame:
    rows = [
        # user, item, type, order, day
        ("u1", "A", "purchase", "o1", "2011-01-01"),
        ("u1", "A", "purchase", "o1", "2011-01-01"),
        ("u1", "B", "purchase", "o1", "2011-01-01"),
        ("u1", "A", "purchase", "o2", "2011-01-05"),
        ("u1", "A", "return", "C9", "2011-01-06"),
        (None, "A", "purchase", "o3", "2011-01-07"),
        ("u2", "B", "purchase", "o4", "2011-01-08"),
        ("u1", "C", "purchase", "o5", "2011-02-02"),
        ("u1", "A", "purchase", "o6", "2011-02-03"),
        ("u3", "A", "purchase", "o7", "2011-02-03"),
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "order_id", "day"])
    frame["ts"] = pd.to_datetime(frame.pop("day"), utc=True)
    frame["quantity"] = 1
    frame["price"] = 2.0
    return frame


def test_clean_purchases_drops_returns_and_anonymous():
    purchases = clean_purchases(_events())
    assert len(purchases) == 8
    assert set(purchases["event_type"]) == {"purchase"}
    assert purchases["user_id"].notna().all()


def test_weight_counts_distinct_invoices():
    interactions = build_interactions(clean_purchases(_events()))
    weights = interactions.set_index(["user_id", "item_id"])["weight"]
    assert weights[("u1", "A")] == 3.0
    assert weights[("u1", "B")] == 1.0


def test_targets_all_and_new_variants():
    purchases = clean_purchases(_events())
    cutoff = pd.Timestamp("2011-02-01", tz="UTC")
    history, target = purchases[purchases.ts < cutoff], purchases[purchases.ts >= cutoff]
    all_pairs = build_targets(history, target, "all")
    new_pairs = build_targets(history, target, "new")
    # u3 has no history, so it is not evaluated.
    assert list(map(tuple, all_pairs.to_numpy())) == [("u1", "A"), ("u1", "C")]
    assert list(map(tuple, new_pairs.to_numpy())) == [("u1", "C")]


def test_user_items_is_users_by_items():
    interactions = build_interactions(clean_purchases(_events()))
    users, items = IdMap.from_values(interactions.user_id), IdMap.from_values(interactions.item_id)
    matrix = build_user_items(interactions, users, items)
    assert matrix.shape == (3, 3)
    assert matrix[users.to_index(["u1"])[0], items.to_index(["A"])[0]] == 3.0


def test_wrong_orientation_rejected():
    matrix = sp.csr_matrix(np.ones((4, 3), dtype=np.float32))
    with pytest.raises(InteractionsError, match=r"items x users.*pass user_items\.T\.tocsr\(\)"):
        check_user_items(matrix, n_users=3, n_items=4)


def test_non_finite_weights_rejected():
    matrix = sp.csr_matrix(np.array([[np.nan, 1.0]], dtype=np.float32))
    with pytest.raises(InteractionsError, match="NaN or infinite"):
        check_user_items(matrix, n_users=1, n_items=2)


def test_unknown_ids_map_to_minus_one():
    ids = IdMap.from_values(["b", "a"])
    assert ids.to_index(["a", "b", "zz"]).tolist() == [0, 1, -1]


def test_split_dates_must_increase():
    with pytest.raises(ValueError, match="split dates must increase"):
        SplitConfig(fit_end="2011-11-09", train_end="2011-10-09")


def test_protocol_folds():
    folds = make_folds(SplitConfig())
    assert folds["train"].cutoff == pd.Timestamp("2011-10-09", tz="UTC")
    assert folds["test"].cutoff == pd.Timestamp("2011-11-09", tz="UTC")
    assert folds["test"].target_end == pd.Timestamp("2011-12-10", tz="UTC")


def test_auto_split_follows_short_data():
    split = resolve_split(SplitConfig(), pd.Timestamp("2011-03-09 15:00", tz="UTC"))
    assert (split.fit_end, split.train_end, split.test_end) == (
        "2011-01-07",
        "2011-02-07",
        "2011-03-10",
    )
    assert resolve_split(SplitConfig(), pd.Timestamp("2011-12-09", tz="UTC")) == SplitConfig()
