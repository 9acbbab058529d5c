"""Drift frames, Evidently reports and the retrain rule, on hand-made shop days."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shoprec.config import load_params
from shoprec.monitor import (
    KEEP,
    RETRAIN,
    SKIP,
    DriftResult,
    MonitorConfig,
    MonitorError,
    current_window,
    decide_retraining,
    monitor_day,
    reference_window,
)
from shoprec.monitor_data import build_feature_frame, item_popularity, recommend_users
from shoprec.monitor_report import read_day_summaries, write_day_report, write_index

REPO_ROOT = Path(__file__).resolve().parents[1]
START = date(2011, 6, 1)
DAY = date(2011, 8, 1)
TRAINING_WINDOW = {"start": "2011-06-01", "end": "2011-08-01"}
COUNTRIES = ["United Kingdom", "France", "Germany"]


def make_shop_events(
    first: date, n_days: int, seed: int = 3, orders_per_day: int = 40, n_users: int = 150
) -> pd.DataFrame:
    """Return canonical events of a small shop: 60 items with fixed prices, baskets of 1-15.

    Item prices and user countries are the same for every seed; the seed draws the orders.
    """
    shop = np.random.default_rng(0)
    item_prices = np.round(shop.lognormal(1.0, 0.6, size=60), 2)
    user_country = shop.choice(COUNTRIES, size=n_users, p=[0.8, 0.1, 0.1])
    rng = np.random.default_rng(seed)
    rows = []
    for offset in range(n_days):
        day = pd.Timestamp(first, tz="UTC") + pd.Timedelta(days=offset)
        for order in range(orders_per_day):
            user = int(rng.integers(0, n_users))
            anonymous = rng.random() < 0.1
            size = int(rng.integers(1, 16))
            items = rng.choice(60, size=size, replace=False, p=_popularity(60))
            ts = (day + pd.Timedelta(hours=8 + 10 * order / orders_per_day)).floor("s")
            for item in items:
                rows.append(
                    {
                        "event_id": f"e{len(rows)}",
                        "user_id": None if anonymous else f"u{user:03d}",
                        "item_id": f"i{item:02d}",
                        "event_type": "return" if rng.random() < 0.03 else "purchase",
                        "quantity": int(rng.integers(1, 13)),
                        "price": float(item_prices[item]),
                        "ts": ts,
                        "order_id": f"{offset}-{order}",
                        "country": str(user_country[user]),
                        "batch_id": "test",
                    }
                )
    events = pd.DataFrame(rows)
    events["ts"] = events["ts"].astype("datetime64[ns, UTC]")
    return events


def _popularity(n: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** 0.8
    return weights / weights.sum()


class FakeModel:
    """Recommends the same ten items to everyone, like a popularity list."""

    def recommend(self, user_history, k, context_items=None, exclude_items=None,
                  exclude_purchased=False, now=None, user_id=None):  # fmt: skip
        items = [f"i{i:02d}" for i in range(k)]
        return pd.DataFrame(
            {
                "item_id": items,
                "score": np.linspace(1.0, 0.1, k),
                "rank": np.arange(1, k + 1),
                "source": ["als"] * (k // 2) + ["popularity"] * (k - k // 2),
            }
        )


@pytest.fixture(scope="module")
def config() -> MonitorConfig:
    """The monitor section shipped in params.yaml."""
    return MonitorConfig.model_validate(load_params(REPO_ROOT / "params.yaml")["monitor"])


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    """Two months of shop events before DAY."""
    return make_shop_events(START, (DAY - START).days)


def day_events(seed: int, orders: int = 150) -> pd.DataFrame:
    events = make_shop_events(DAY, 1, seed=seed, orders_per_day=orders)
    events["event_id"] = "d" + events["event_id"]
    return events


def run_day(history: pd.DataFrame, day: pd.DataFrame, config: MonitorConfig):
    return monitor_day(
        pd.concat([history, day], ignore_index=True),
        FakeModel(),
        DAY,
        training_window=TRAINING_WINDOW,
        model_metrics=None,
        previous_quality=[],
        config=config,
    )


def test_normal_day_keeps_model(history, config):
    result = run_day(history, day_events(seed=11), config)

    assert result.decision.action == KEEP
    assert result.drift.drift_share < config.max_drift_share
    assert result.n_buyers >= config.min_users
    assert result.quality["n_users"] > 0
    assert set(result.quality) == {"hit_rate@10", "ndcg@10", "n_users"}


def test_prices_scaled_by_ten_trigger_retrain(history, config):
    day = day_events(seed=11)
    day["price"] = day["price"] * 10

    result = run_day(history, day, config)

    assert result.decision.action == RETRAIN
    assert "price" in result.drift.drifted_columns
    assert "critical column(s) drifted: price" in result.decision.reasons
    assert result.drift.columns["price"]["score"] > 1.0


def test_empty_column_is_reported_and_not_tested(history, config):
    day = day_events(seed=11)
    day["country"] = None

    result = run_day(history, day, config)

    assert result.decision.action == KEEP
    assert result.drift.columns["country"]["tested"] is False
    assert "country: empty in the current window: not tested" in result.drift.notes
    assert "country" not in result.drift.drifted_columns


def test_unseen_category_is_reported_without_retrain(history, config):
    day = day_events(seed=11)
    day.loc[day["order_id"].isin(["0-1", "0-2"]), "country"] = "Atlantis"

    result = run_day(history, day, config)

    assert result.decision.action == KEEP
    assert "Atlantis" in result.drift.columns["country"]["unseen"]
    assert any("categories unseen in the reference: Atlantis" in n for n in result.drift.notes)


def test_tiny_day_is_skipped(history, config):
    day = day_events(seed=11).head(5)
    day["price"] = day["price"] * 10

    result = run_day(history, day, config)

    assert result.decision.action == SKIP
    assert result.decision.reasons == [
        "day too small to judge: 5 events (min 200), 3 identified buyers (min 20)"
    ]
    assert result.drift.snapshot is not None


def test_day_without_identified_customers_is_skipped(history, config):
    day = day_events(seed=11)
    day["user_id"] = None

    result = run_day(history, day, config)

    assert result.decision.action == SKIP
    assert result.n_buyers == 0
    assert result.quality == {"n_users": 0}
    assert result.drift.columns["score"]["tested"] is False
    assert "score: empty in the current window: not tested" in result.drift.notes


def test_empty_day_writes_report_without_evidently(history, config, tmp_path):
    result = run_day(history, day_events(seed=11).head(0), config)
    summary = {"model_tag": "shoprec:test", **result.to_summary()}

    write_day_report(result, summary, tmp_path)

    assert result.decision.action == SKIP
    assert result.drift.drift_share is None
    assert "no column has values on both sides" in result.drift.notes
    page = (tmp_path / f"{DAY}.html").read_text()
    assert "decision <b>skip</b>" in page


def test_day_report_and_index_list_decision(history, config, tmp_path):
    day = day_events(seed=11)
    day["price"] = day["price"] * 10
    result = run_day(history, day, config)
    summary = {"model_tag": "shoprec:test", **result.to_summary()}

    write_day_report(result, summary, tmp_path)
    index = write_index(tmp_path).read_text()

    stored = json.loads((tmp_path / f"{DAY}.json").read_text())
    assert stored["decision"] == "retrain"
    assert stored["reasons"] == result.decision.reasons
    assert read_day_summaries(tmp_path)[0]["day"] == DAY.isoformat()
    page = (tmp_path / f"{DAY}.html").read_text()
    assert page.count("critical column(s) drifted: price") >= 1
    assert f"<a href='{DAY}.html'>{DAY}</a>" in index
    assert "<td>retrain</td>" in index


def test_new_items_and_customers_are_flagged(history):
    day = day_events(seed=11)
    day.loc[day["order_id"] == "0-0", "item_id"] = "brand-new"
    events = pd.concat([history, day], ignore_index=True)
    window = current_window(DAY, MonitorConfig())
    reference = reference_window(TRAINING_WINDOW, window, MonitorConfig())

    frame = build_feature_frame(events, window, item_popularity(events, reference))

    new_rows = frame["item_is_new"] == "new"
    assert new_rows.sum() == (day["item_id"] == "brand-new").sum()
    assert (frame.loc[new_rows, "item_popularity"] == 0.0).all()
    assert set(frame["customer"].dropna()) <= {"new", "returning", "anonymous"}
    assert (
        frame["basket_size"].notna().sum()
        == day.loc[day["event_type"] == "purchase", "order_id"].nunique()
    )


def test_reference_window_follows_training_window():
    config = MonitorConfig(reference_days=30)
    current = current_window(date(2011, 10, 5), config)

    reference = reference_window({"start": "2011-09-20", "end": "2011-10-01"}, current, config)
    fallback = reference_window(None, current, config)

    assert reference.start == pd.Timestamp("2011-09-20", tz="UTC")
    assert reference.end == pd.Timestamp("2011-10-01", tz="UTC")
    assert fallback.end == pd.Timestamp("2011-10-05", tz="UTC")
    assert fallback.start == pd.Timestamp("2011-09-05", tz="UTC")
    with pytest.raises(MonitorError, match="reference window .* is empty"):
        reference_window({"start": "2011-10-01", "end": "2011-10-01"}, current, config)


@pytest.mark.parametrize(
    ("recent", "age", "expected", "reason"),
    [
        ([0.32, 0.30], 10, KEEP, "no retrain rule fired (drift share 0.10)"),
        ([0.20, 0.22], 10, RETRAIN, "online ndcg@10 0.2100 (mean of last 2 days) < 0.3000"),
        ([0.35], 61, RETRAIN, "model data ends 61 days ago (max 60)"),
    ],
)
def test_decide_retraining_rules(recent, age, expected, reason):
    drift = DriftResult(0.1, {"price": {"drifted": False}})

    decision = decide_retraining(
        n_rows=500,
        n_buyers=50,
        drift=drift,
        recent_quality=recent,
        reference_quality=0.4,
        age_days=age,
        config=MonitorConfig(max_quality_drop=0.25, max_model_age_days=60),
    )

    assert decision.action == expected
    assert decision.reasons[0].startswith(reason)


def test_recommend_users_calls_model_per_user(history):
    users = ["u001", "u002"]

    recs = recommend_users(FakeModel(), history, users, pd.Timestamp(DAY, tz="UTC"), 3)

    assert recs["user_id"].tolist() == ["u001"] * 3 + ["u002"] * 3
    assert recs["rank"].tolist() == [1, 2, 3, 1, 2, 3]
