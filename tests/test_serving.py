"""Tests of the serving logic without HTTP: a small stand-in bundle, a real SQLite online store."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr, ValidationError

from shoprec.bundle import ModelBundle
from shoprec.bundle import UnknownItemError as BundleUnknownItemError
from shoprec.columns import Columns
from shoprec.online_store import OnlineStore, OnlineStoreUnavailableError, SQLiteOnlineStore
from shoprec.privacy import Pseudonymizer
from shoprec.serving import (
    Recommender,
    ServingConfig,
    ServingSettings,
    UnauthorizedError,
    UnknownItemError,
    WritesDisabledError,
    check_bearer_token,
    prepare_model,
    warn_on_key_mismatch,
)
from shoprec.serving_metrics import ServingMetrics
from shoprec.serving_schemas import (
    EventsRequest,
    RecommendRequest,
    ShopperEvent,
    SimilarItemsRequest,
)

KEY = b"test-key-0123456789abcdef"
RAW_USER = "CUSTOMER-17850"
DATA_END = pd.Timestamp("2011-12-09", tz="UTC")


class StubBundle:
    """Has the ModelBundle interface; ranks a fixed list and reacts to history and context.

    Popularity order is STALE (inactive), A, GONE (not in the catalogue), B, C, D. An item in
    the user's history or context moves its complement (A->C, B->D) to the top. Excluded
    items are left out, as ModelBundle.recommend does; similar_items leaves nothing out.
    """

    complements = {"A": "C", "B": "D"}

    def __init__(self, version_marker: str = "v1") -> None:
        self.version_marker = version_marker
        self.catalogue = pd.DataFrame(
            {
                "item_id": ["A", "B", "C", "D", "STALE"],
                "description": ["MUG", "LANTERN", "SAUCER", "CANDLE", None],
                "last_price": [2.5, 3.75, 1.25, 0.85, 4.0],
                "first_seen": [DATA_END - pd.Timedelta(days=300)] * 5,
                "last_seen": [DATA_END - pd.Timedelta(days=d) for d in (0, 3, 10, 30, 200)],
            }
        )
        self.histories: list[pd.DataFrame] = []
        self.user_ids: list[str | None] = []

    def recommend(
        self,
        user_history: pd.DataFrame,
        k: int,
        context_items: list[str] = [],  # noqa: B006 - mirrors the ModelBundle signature
        exclude_items: set[str] = set(),  # noqa: B006
        exclude_purchased: bool = False,
        now: pd.Timestamp | None = None,
        user_id: str | None = None,
    ) -> pd.DataFrame:
        self.histories.append(user_history)
        self.user_ids.append(user_id)
        seen = list(user_history[Columns.ITEM_ID]) + list(context_items)
        boosted = [self.complements[item] for item in reversed(seen) if item in self.complements]
        popular = ["STALE", "A", "GONE", "B", "C", "D"]
        rows = [(item, "als") for item in boosted] + [(item, "popularity") for item in popular]
        frame = pd.DataFrame(rows, columns=[Columns.ITEM_ID, Columns.SOURCE])
        frame = frame[~frame[Columns.ITEM_ID].isin(exclude_items)]
        frame = frame.drop_duplicates(Columns.ITEM_ID).head(k)
        frame[Columns.SCORE] = [1.0 / (index + 1) for index in range(len(frame))]
        frame[Columns.RANK] = range(1, len(frame) + 1)
        return frame

    def similar_items(self, item_id: str, k: int) -> pd.DataFrame:
        rows = [(item_id, 1.0), ("STALE", 0.9), ("GONE", 0.8), ("B", 0.7), ("C", 0.6)]
        frame = pd.DataFrame(rows[:k], columns=[Columns.ITEM_ID, Columns.SCORE])
        frame[Columns.SOURCE] = "co_purchase"
        return frame


@pytest.fixture
def metrics() -> ServingMetrics:
    return ServingMetrics(CollectorRegistry())


@pytest.fixture
def store(tmp_path: Path):
    online_store = SQLiteOnlineStore(tmp_path / "online.sqlite", max_events_per_user=20)
    yield online_store
    online_store.close()


def make_recommender(
    store: OnlineStore,
    metrics: ServingMetrics,
    config: ServingConfig | None = None,
    **hooks: Callable,
) -> Recommender:
    """Build a recommender serving StubBundle as shoprec:v1; `hooks` are find_champion etc."""
    config = config or ServingConfig()
    model = prepare_model(StubBundle(), "shoprec:v1", config.inactive_days)
    return Recommender(model, store, Pseudonymizer(KEY), config, metrics, **hooks)


@pytest.fixture
def recommender(store: SQLiteOnlineStore, metrics: ServingMetrics) -> Recommender:
    return make_recommender(store, metrics, ServingConfig(inactive_days=90))


def sample(metrics: ServingMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def item_ids(response) -> list[str]:
    return [item.item_id for item in response.items]


def test_unknown_user_gets_cold_start(recommender: Recommender, metrics: ServingMetrics) -> None:
    response = recommender.recommend(RecommendRequest(user_id="new-shopper", k=3))

    assert item_ids(response) == ["A", "B", "C"]
    assert response.cold_start is True
    assert response.model_version == "shoprec:v1"
    assert sample(metrics, "shoprec_cold_start_fallbacks_total") == 1.0
    assert sample(metrics, "shoprec_requests_total", endpoint="recommend", outcome="ok") == 1.0


def test_posted_event_changes_next_recommendation(
    recommender: Recommender, metrics: ServingMetrics
) -> None:
    before = recommender.recommend(RecommendRequest(user_id=RAW_USER, k=3))

    recorded = recommender.record_events(
        EventsRequest(user_id=RAW_USER, events=[ShopperEvent(item_id="B", event_type="purchase")])
    )
    after = recommender.recommend(RecommendRequest(user_id=RAW_USER, k=3))

    assert recorded.accepted == 1
    assert item_ids(before) == ["A", "B", "C"]
    assert item_ids(after) == ["D", "A", "B"]
    assert after.items[0].source == "als"
    assert after.cold_start is False
    assert sample(metrics, "shoprec_fold_ins_total") == 1.0
    assert sample(metrics, "shoprec_events_recorded_total", event_type="purchase") == 1.0


def test_history_reaches_bundle_pseudonymized(recommender: Recommender) -> None:
    recommender.record_events(
        EventsRequest(user_id=RAW_USER, events=[ShopperEvent(item_id="A", event_type="view")])
    )

    recommender.recommend(RecommendRequest(user_id=RAW_USER))

    bundle = recommender._model.bundle  # noqa: SLF001
    pseudonym = Pseudonymizer(KEY).user_id(RAW_USER)
    assert bundle.histories[-1][Columns.ITEM_ID].tolist() == ["A"]
    assert bundle.histories[-1][Columns.USER_ID].tolist() == [pseudonym]
    assert bundle.user_ids[-1] == pseudonym


def test_raw_user_id_never_stored(recommender: Recommender, store: SQLiteOnlineStore) -> None:
    recommender.record_events(
        EventsRequest(
            user_id=RAW_USER,
            events=[ShopperEvent(item_id="A", event_type="view") for _ in range(3)],
        )
    )
    recommender.recommend(RecommendRequest(user_id=RAW_USER))

    stored = b"".join(path.read_bytes() for path in store.path.parent.iterdir())
    pseudonym = Pseudonymizer(KEY).user_id(RAW_USER)
    assert RAW_USER.encode() not in stored
    assert pseudonym.encode() in stored


def test_raw_user_id_never_logged(recommender: Recommender, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="shoprec")

    recommender.record_events(
        EventsRequest(user_id=RAW_USER, events=[ShopperEvent(item_id="A", event_type="view")])
    )
    recommender.recommend(RecommendRequest(user_id=RAW_USER, context_items=["NOPE"]))

    assert caplog.records
    assert RAW_USER not in caplog.text


def test_unknown_context_items_reported(recommender: Recommender) -> None:
    response = recommender.recommend(
        RecommendRequest(user_id="new-shopper", k=2, context_items=["NOPE", "A", "NOPE", "X9"])
    )

    assert response.unknown_context_items == ["NOPE", "X9"]
    assert item_ids(response) == ["C", "A"]
    assert response.cold_start is False


def test_inactive_and_unlisted_items_never_returned(recommender: Recommender) -> None:
    response = recommender.recommend(RecommendRequest(user_id="someone", k=10))

    assert item_ids(response) == ["A", "B", "C", "D"]
    assert [item.rank for item in response.items] == [1, 2, 3, 4]


def test_item_table_layout_gives_servable_items() -> None:
    bundle = StubBundle()
    del bundle.catalogue
    bundle.item_table = pd.DataFrame(
        {"item_price": [2.5, 3.75, 9.0], "item_days_since_sold": [0.5, 89.0, 120.0]},
        index=pd.Index(["A", "B", "C"], name="item_id"),
    )

    model = prepare_model(bundle, "shoprec:v1", inactive_days=90)

    assert model.servable_items == {"A", "B"}
    assert model.inactive_items == {"C"}
    assert model.details_by_item["B"] == (None, 3.75)
    assert all(description is None for description, _ in model.details_by_item.values())


def test_excluded_items_never_returned(recommender: Recommender) -> None:
    response = recommender.recommend(
        RecommendRequest(user_id="someone", k=3, exclude_items=["A", "C"])
    )

    assert item_ids(response) == ["B", "D"]


def test_items_carry_catalogue_details(recommender: Recommender) -> None:
    response = recommender.recommend(RecommendRequest(user_id="someone", k=1))

    assert response.items[0].description == "MUG"
    assert response.items[0].price == 2.5
    assert response.items[0].score == 1.0


def test_similar_items_filtered(recommender: Recommender) -> None:
    response = recommender.similar_items(SimilarItemsRequest(item_id="A", k=2))

    assert response.item_id == "A"
    assert item_ids(response) == ["B", "C"]
    assert response.items[0].source == "co_purchase"


def test_similar_items_unknown_item(recommender: Recommender, metrics: ServingMetrics) -> None:
    with pytest.raises(UnknownItemError, match="item_id 'NOPE' not found"):
        recommender.similar_items(SimilarItemsRequest(item_id="NOPE"))

    assert (
        sample(metrics, "shoprec_requests_total", endpoint="similar_items", outcome="not_found")
        == 1.0
    )


def test_events_report_unknown_items(recommender: Recommender) -> None:
    response = recommender.record_events(
        EventsRequest(
            user_id=RAW_USER,
            events=[
                ShopperEvent(item_id="NEW1", event_type="view"),
                ShopperEvent(item_id="A", event_type="add_to_cart", quantity=2, price=2.5),
            ],
        )
    )

    assert response.accepted == 2
    assert response.unknown_items == ["NEW1"]


def test_stage_latency_recorded(recommender: Recommender, metrics: ServingMetrics) -> None:
    recommender.recommend(RecommendRequest(user_id="someone"))

    for stage in ("total", "history", "model"):
        count = sample(
            metrics, "shoprec_stage_latency_seconds_count", endpoint="recommend", stage=stage
        )
        assert count == 1.0, stage


def test_reload_swaps_champion(store, metrics: ServingMetrics) -> None:
    recommender = make_recommender(
        store,
        metrics,
        find_champion=lambda: "shoprec:v2",
        load_model=lambda tag: StubBundle(tag),
    )

    response = recommender.reload()
    again = recommender.reload()

    assert response.reloaded is True
    assert response.model_version == "shoprec:v2"
    assert recommender.model_version == "shoprec:v2"
    assert again.reloaded is False
    assert again.detail == "already serving champion"


def test_polling_picks_up_new_champion(store, metrics: ServingMetrics) -> None:
    champion = {"tag": "shoprec:v1"}
    recommender = make_recommender(
        store,
        metrics,
        config=ServingConfig(reload_poll_seconds=0.05),
        find_champion=lambda: champion["tag"],
        load_model=lambda tag: StubBundle(tag),
    )
    thread = recommender.start_polling()
    try:
        champion["tag"] = "shoprec:v2"
        deadline = time.monotonic() + 5
        while recommender.model_version != "shoprec:v2" and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        recommender.stop_polling()
    thread.join(timeout=2)

    assert recommender.model_version == "shoprec:v2"
    assert not thread.is_alive()
    assert sample(metrics, "shoprec_model_reloads_total", outcome="reloaded") == 1.0


def test_polling_off_when_interval_is_zero(store, metrics: ServingMetrics) -> None:
    recommender = make_recommender(store, metrics, ServingConfig(reload_poll_seconds=0))

    assert recommender.start_polling() is None


def test_reload_failure_keeps_model(store, metrics: ServingMetrics, caplog) -> None:
    def broken_load(tag: str) -> StubBundle:
        raise OSError(f"bundle files of {tag} missing")

    recommender = make_recommender(
        store,
        metrics,
        find_champion=lambda: "shoprec:v3",
        load_model=broken_load,
    )

    response = recommender.reload()

    assert response.reloaded is False
    assert response.model_version == "shoprec:v1"
    assert "bundle files of shoprec:v3 missing" in response.detail
    assert recommender.model_version == "shoprec:v1"
    assert "Reload of champion shoprec:v3 failed" in caplog.text
    assert sample(metrics, "shoprec_model_reloads_total", outcome="failed") == 1.0
    assert item_ids(recommender.recommend(RecommendRequest(user_id="x", k=1))) == ["A"]


class ItemsWithoutFactors(StubBundle):
    """Lists "D" in its catalogue but, like a bundle without factors for it, cannot rank it."""

    def similar_items(self, item_id: str, k: int) -> pd.DataFrame:
        if item_id == "D":
            raise BundleUnknownItemError(f"item {item_id!r} is not in the model catalogue")
        return super().similar_items(item_id, k)


def test_similar_items_missing_factors_is_unknown(
    store: SQLiteOnlineStore, metrics: ServingMetrics
) -> None:
    config = ServingConfig()
    model = prepare_model(ItemsWithoutFactors(), "shoprec:v1", config.inactive_days)
    recommender = Recommender(model, store, Pseudonymizer(KEY), config, metrics)

    with pytest.raises(UnknownItemError, match="item_id 'D' has no similar items"):
        recommender.similar_items(SimilarItemsRequest(item_id="D"))

    assert sample(metrics, "shoprec_requests_total", endpoint="similar_items", outcome="not_found")


@pytest.fixture(scope="module")
def corrupt_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle saved from the hand-made data, with its booster file overwritten."""
    import lightgbm as lgb
    import numpy as np
    from tests.modelling_data import CUTOFF, make_purchases

    from shoprec.candidates import CandidatesConfig, fit_candidate_model
    from shoprec.features import FeaturesConfig, build_item_table
    from shoprec.interactions import clean_purchases
    from shoprec.rank import FeatureSpec, Ranker

    purchases = clean_purchases(make_purchases())
    candidates = CandidatesConfig(als_factors=4, als_iterations=2, num_threads=1)
    model = fit_candidate_model(purchases, CUTOFF, candidates)
    features = FeaturesConfig(popularity_windows=[7, 30])
    # The booster only has to be saved: its file is overwritten below.
    rng = np.random.default_rng(0)
    booster = lgb.train(
        {"objective": "regression", "verbose": -1, "num_threads": 1},
        lgb.Dataset(rng.random((20, 2)), label=rng.random(20)),
        num_boost_round=1,
    )
    ranker = Ranker([booster], FeatureSpec(["f0", "f1"], {}), 1, 0.0)
    directory = tmp_path_factory.mktemp("corrupt_bundle")
    ModelBundle(
        model,
        build_item_table(purchases, CUTOFF, features),
        {"all": ranker},
        features,
        purchases,
        pd.DataFrame({"item_id": model.items.ids}),
    ).save(directory, precompute=False)  # the dummy booster cannot score real features
    (directory / "ranker_all_0.txt").write_text("not a LightGBM model\n", encoding="utf-8")
    return directory


def test_reload_of_corrupt_bundle_keeps_model(
    store: SQLiteOnlineStore, metrics: ServingMetrics, corrupt_bundle_dir: Path, caplog
) -> None:
    recommender = make_recommender(
        store,
        metrics,
        find_champion=lambda: "shoprec:corrupt",
        load_model=lambda tag: ModelBundle.load(corrupt_bundle_dir),
    )

    response = recommender.reload()
    served = recommender.recommend(RecommendRequest(user_id="x", k=2))

    assert response.reloaded is False
    assert response.model_version == "shoprec:v1"
    assert response.detail.startswith("reload of shoprec:corrupt failed: ")
    assert served.model_version == "shoprec:v1"
    assert item_ids(served) == ["A", "B"]
    assert "Reload of champion shoprec:corrupt failed, still serving shoprec:v1" in caplog.text
    assert sample(metrics, "shoprec_model_reloads_total", outcome="failed") == 1.0


def test_from_settings_reads_serving_params(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("serving:\n  inactive_days: 5\n  history_limit: 7\n", encoding="utf-8")
    settings = ServingSettings(
        params_file=params,
        pseudonym_key=SecretStr(KEY.decode()),
        online_db=tmp_path / "state" / "online.sqlite",
        redis_url=None,
    )

    recommender = Recommender.from_settings(settings, StubBundle(), "shoprec:v1")

    assert recommender.config.history_limit == 7
    assert recommender._model.servable_items == {"A", "B"}  # noqa: SLF001
    assert recommender.is_ready() is True
    recommender.store.close()


def test_bearer_token_accepted() -> None:
    check_bearer_token("Bearer s3cret-token", "s3cret-token", insecure=False)


@pytest.mark.parametrize("header", [None, "", "Bearer wrong", "Basic s3cret-token", "s3cret-token"])
def test_bearer_token_rejected(header: str | None) -> None:
    with pytest.raises(UnauthorizedError, match="missing or invalid bearer token"):
        check_bearer_token(header, "s3cret-token", insecure=False)


def test_writes_disabled_without_token() -> None:
    with pytest.raises(WritesDisabledError, match="SHOPREC_API_TOKEN is not set"):
        check_bearer_token("Bearer anything", None, insecure=False)


def test_insecure_local_allows_writes_without_token() -> None:
    check_bearer_token(None, None, insecure=True)


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"user_id": "u", "k": 0}, "k", "greater than or equal to 1"),
        ({"user_id": "u", "k": 101}, "k", "less than or equal to 100"),
        ({"user_id": "u", "k": "ten"}, "k", "valid integer"),
        ({"user_id": ""}, "user_id", "at least 1 character"),
        ({"user_id": "   "}, "user_id", "at least 1 character"),
        ({"user_id": "u" * 129}, "user_id", "at most 128 characters"),
        ({"user_id": 17850}, "user_id", "valid string"),
        ({"user_id": "u", "context_items": ["A"] * 101}, "context_items", "at most 100 items"),
        ({"user_id": "u", "contxt_items": ["A"]}, "contxt_items", "Extra inputs"),
    ],
)
def test_recommend_request_validation_names_field(payload, field, message) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        RecommendRequest.model_validate(payload)

    assert caught.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize(
    ("events", "location", "message"),
    [
        ([{"item_id": "A", "event_type": "click"}], ("events", 0, "event_type"), "'view'"),
        (
            [{"item_id": "A", "event_type": "view", "quantity": 0}],
            ("events", 0, "quantity"),
            "equal to 1",
        ),
        ([{"item_id": "A", "event_type": "view", "price": 0}], ("events", 0, "price"), "than 0"),
        ([{"item_id": "", "event_type": "view"}], ("events", 0, "item_id"), "at least 1"),
        ([], ("events",), "at least 1 item"),
        ([{"item_id": "A", "event_type": "view"}] * 501, ("events",), "at most 500 items"),
    ],
)
def test_events_request_validation_names_field(events, location, message) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        EventsRequest.model_validate({"user_id": "u", "events": events})

    assert caught.value.errors()[0]["loc"] == location


class DownStore(SQLiteOnlineStore):
    """A store whose backend has gone away, as a stopped Redis looks to the recommender."""

    def recent_rows(self, user_id: str, limit: int) -> list[dict]:
        raise OnlineStoreUnavailableError("reading events from Redis at 127.0.0.1:1 failed")

    def append_events(self, user_id: str, events) -> int:
        raise OnlineStoreUnavailableError("writing events to Redis at 127.0.0.1:1 failed")


def test_store_outage_degrades_recommend(tmp_path: Path, metrics: ServingMetrics) -> None:
    store = DownStore(tmp_path / "online.sqlite")
    recommender = make_recommender(store, metrics)

    response = recommender.recommend(RecommendRequest(user_id="shopper-1", k=2))

    assert response.degraded is True
    assert response.degraded_reason == "online store unavailable"
    assert len(response.items) == 2
    assert (
        sample(metrics, "shoprec_degraded_responses_total", reason="online_store_unavailable") == 1
    )
    assert sample(metrics, "shoprec_online_store_errors_total", operation="read") == 1
    with pytest.raises(OnlineStoreUnavailableError, match="writing events to Redis"):
        recommender.record_events(
            EventsRequest(
                user_id="shopper-1", events=[ShopperEvent(item_id="A", event_type="view")]
            )
        )
    assert sample(metrics, "shoprec_online_store_errors_total", operation="write") == 1
    assert recommender.is_ready() is True
    store.close()


def test_response_cache_until_new_event(recommender: Recommender, metrics: ServingMetrics) -> None:
    request = RecommendRequest(user_id="shopper-9", k=2)

    first = recommender.recommend(request)
    again = recommender.recommend(request)
    recommender.record_events(
        EventsRequest(user_id="shopper-9", events=[ShopperEvent(item_id="A", event_type="view")])
    )
    after_event = recommender.recommend(request)

    assert again is first
    assert after_event is not first
    assert sample(metrics, "shoprec_response_cache_total", result="hit") == 1
    assert sample(metrics, "shoprec_response_cache_total", result="miss") == 2


def test_key_mismatch_warns(caplog) -> None:
    bundle = StubBundle()
    bundle.metadata = {"pseudonym_key_check": Pseudonymizer(b"another-key-0123456789").key_check()}

    with caplog.at_level("WARNING", logger="shoprec.serving"):
        mismatch = warn_on_key_mismatch(bundle, "shoprec:v1", Pseudonymizer(KEY))
    same = warn_on_key_mismatch(bundle, "shoprec:v1", Pseudonymizer(b"another-key-0123456789"))

    assert mismatch is True
    assert same is False
    assert "another key than the one in use" in caplog.text
