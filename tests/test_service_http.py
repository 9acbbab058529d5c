"""End-to-end tests of the service: a real model store, `bentoml serve`, real HTTP calls.

A small bundle trained on two weeks of the real data (tests/serving_bundle.py) is registered as
champion in a temporary BENTOML_HOME, `bentoml serve` runs from the project root on a free
loopback port, and every endpoint is called over HTTP. The tests of one module share the server,
and the reload tests change the champion, so they run last.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.serving_bundle import (
    API_TOKEN,
    LANDING_FILES,
    PROJECT_ROOT,
    PSEUDONYM_KEY,
    TrainedBundle,
    bentoml_serve,
    corrupt_copy,
    register_champion,
    service_env,
    shared_bundle,
)

from shoprec.bundle import ModelBundle
from shoprec.columns import Columns
from shoprec.privacy import Pseudonymizer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
RAW_USER = "RAW-CUSTOMER-4242"
# Days of recent purchases behind the cold-start list (CandidatesConfig.popular_days default).
POPULAR_DAYS = 30
N_COPURCHASED = 10


@pytest.fixture(scope="module")
def trained(landing_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedBundle:
    return shared_bundle(landing_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def server(trained: TrainedBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("bentoml_home")
    env = service_env(home)
    tag = register_champion(trained.directory, env)
    log_file = home / "serve.log"
    with bentoml_serve(".", env, log_file, PROJECT_ROOT) as url:
        yield {"url": url, "env": env, "tag": tag, "home": home, "log": log_file}


@pytest.fixture(scope="module")
def client(server: dict) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server["url"], timeout=30) as http:
        yield http


def known_raw_user(landing_dir: Path, trained: TrainedBundle) -> tuple[str, str]:
    """Return (raw CustomerID, pseudonym) of the training user with the most purchases."""
    raw_ids: set[str] = set()
    for name in LANDING_FILES:
        raw = pd.read_csv(landing_dir / name, dtype=str, usecols=["CustomerID"])
        raw_ids |= set(raw["CustomerID"].dropna().str.replace(r"\.0+$", "", regex=True))
    pseudonymizer = Pseudonymizer(PSEUDONYM_KEY.encode())
    by_pseudonym = {pseudonymizer.user_id(raw_id): raw_id for raw_id in sorted(raw_ids)}
    counts = trained.purchases[Columns.USER_ID].value_counts()
    pseudonym = min(counts.index[counts == counts.max()])
    return by_pseudonym[pseudonym], pseudonym


def strongly_copurchased_item(purchases: pd.DataFrame) -> tuple[str, set[str]]:
    """Return an item X and the N_COPURCHASED items sharing the most orders with it.

    X is the item, of those in at least 30 orders, whose most frequent partner shares the
    largest share of X's orders (a pair that shoppers buy together).
    """
    baskets = purchases[[Columns.ORDER_ID, Columns.ITEM_ID]].drop_duplicates()
    orders_per_item = baskets.groupby(Columns.ITEM_ID)[Columns.ORDER_ID].nunique()
    pairs = baskets.merge(baskets, on=Columns.ORDER_ID, suffixes=("", "_partner"))
    pairs = pairs[pairs[Columns.ITEM_ID] != pairs["item_id_partner"]]
    shared = pairs.groupby([Columns.ITEM_ID, "item_id_partner"]).size().rename("orders")
    shared = shared.reset_index().sort_values(
        ["orders", "item_id_partner"], ascending=[False, True], kind="stable"
    )

    strongest = shared.groupby(Columns.ITEM_ID)["orders"].first()
    frequent = orders_per_item[orders_per_item >= 30]
    confidence = (strongest.reindex(frequent.index) / frequent).sort_index()
    item = str(confidence.sort_values(ascending=False, kind="stable").index[0])
    partners = shared.loc[shared[Columns.ITEM_ID] == item, "item_id_partner"]
    return item, set(partners.head(N_COPURCHASED))


@pytest.fixture(scope="module")
def copurchase(trained: TrainedBundle) -> tuple[str, set[str]]:
    return strongly_copurchased_item(trained.purchases)


def recent_buyers(trained: TrainedBundle) -> pd.Series:
    """Distinct buyers per item over the last POPULAR_DAYS days of the training data."""
    start = trained.cutoff - pd.Timedelta(days=POPULAR_DAYS)
    recent = trained.purchases[trained.purchases[Columns.TS] >= start]
    return recent.groupby(Columns.ITEM_ID)[Columns.USER_ID].nunique()


def counter(text: str, sample_name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(
                sample.labels.get(key) == value for key, value in labels.items()
            ):
                return sample.value
    return 0.0


def ids(body: dict) -> list[str]:
    return [item["item_id"] for item in body["items"]]


def test_health_endpoints_answer(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").status_code == 200


def test_openapi_lists_every_route(client: httpx.Client) -> None:
    paths = client.get("/docs.json").json()["paths"]

    for route in ("/recommend", "/similar-items", "/events", "/reload"):
        assert route in paths, route
    docs = client.get("/docs", follow_redirects=True)
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


def test_known_user_gets_bundle_ranking(
    client: httpx.Client, server: dict, trained: TrainedBundle, landing_dir: Path
) -> None:
    raw_id, pseudonym = known_raw_user(landing_dir, trained)
    expected = ModelBundle.load(trained.directory).recommend(pd.DataFrame(), 10, user_id=pseudonym)
    bought = set(trained.purchases.loc[trained.purchases[Columns.USER_ID] == pseudonym, "item_id"])

    response = client.post("/recommend", json={"user_id": raw_id, "k": 10})

    body = response.json()
    assert response.status_code == 200
    assert body["cold_start"] is False
    assert body["model_version"] == server["tag"]
    assert ids(body) == expected[Columns.ITEM_ID].tolist()
    assert [item["rank"] for item in body["items"]] == list(range(1, 11))
    assert {item["item_id"] for item in body["items"] if item["source"] == "past"} <= bought


def test_unknown_user_gets_best_sellers(
    client: httpx.Client, server: dict, trained: TrainedBundle
) -> None:
    buyers = recent_buyers(trained)

    response = client.post("/recommend", json={"user_id": "never-seen-shopper", "k": 5})

    body = response.json()
    assert response.status_code == 200
    assert body["cold_start"] is True
    assert body["model_version"] == server["tag"]
    assert [item["source"] for item in body["items"]] == ["popularity"] * 5
    # Equal counts can come in either order, so the counts are compared, not the ids.
    served_counts = [int(buyers[item_id]) for item_id in ids(body)]
    assert served_counts == sorted(buyers, reverse=True)[:5]


def test_purchase_brings_copurchased_items(
    client: httpx.Client, copurchase: tuple[str, set[str]]
) -> None:
    item, copurchased = copurchase
    shopper = "NEW-SHOPPER-COPURCHASE"
    before = client.post("/recommend", json={"user_id": shopper, "k": 10}).json()

    posted = client.post(
        "/events",
        headers=AUTH,
        json={"user_id": shopper, "events": [{"item_id": item, "event_type": "purchase"}]},
    )
    after = client.post("/recommend", json={"user_id": shopper, "k": 10}).json()

    assert posted.status_code == 200
    assert posted.json() == {"accepted": 1, "unknown_items": []}
    assert before["cold_start"] is True
    assert after["cold_start"] is False
    assert ids(after) != ids(before)
    brought_in = (set(ids(after)) - set(ids(before))) & copurchased
    assert brought_in, f"no item co-purchased with {item} ({sorted(copurchased)}) was added"


def test_posted_event_read_by_next_request(client: httpx.Client) -> None:
    before = client.post("/recommend", json={"user_id": RAW_USER, "k": 10}).json()
    bought = [item["item_id"] for item in before["items"][:3]]

    posted = client.post(
        "/events",
        headers=AUTH,
        json={
            "user_id": RAW_USER,
            "events": [{"item_id": item, "event_type": "purchase"} for item in bought],
        },
    )
    after = client.post("/recommend", json={"user_id": RAW_USER, "k": 10}).json()

    assert posted.status_code == 200
    assert posted.json()["accepted"] == 3
    assert after["cold_start"] is False
    assert ids(after) != ids(before)


def test_raw_user_id_not_in_online_store(client: httpx.Client, server: dict) -> None:
    client.post(
        "/events",
        headers=AUTH,
        json={"user_id": RAW_USER, "events": [{"item_id": "85123A", "event_type": "view"}]},
    )

    stored = b"".join(
        path.read_bytes() for path in server["home"].iterdir() if path.name.startswith("online")
    )
    assert len(stored) > 0
    assert RAW_USER.encode() not in stored


def test_unknown_context_items_ignored_and_reported(client: httpx.Client) -> None:
    plain = client.post("/recommend", json={"user_id": "someone", "k": 3}).json()

    response = client.post(
        "/recommend", json={"user_id": "someone", "k": 3, "context_items": ["NO-SUCH-ITEM"]}
    )

    assert response.status_code == 200
    assert response.json()["unknown_context_items"] == ["NO-SUCH-ITEM"]
    assert ids(response.json()) == ids(plain)


def test_events_of_unknown_items_accepted(client: httpx.Client) -> None:
    shopper = "SHOPPER-UNKNOWN-ITEMS"
    events = [
        {"item_id": "NO-SUCH-ITEM", "event_type": "purchase", "quantity": 2, "price": 1.5},
        {"item_id": "NO-SUCH-ITEM-2", "event_type": "return"},
    ]

    posted = client.post("/events", headers=AUTH, json={"user_id": shopper, "events": events})
    response = client.post("/recommend", json={"user_id": shopper, "k": 4})

    assert posted.status_code == 200
    assert posted.json() == {"accepted": 2, "unknown_items": ["NO-SUCH-ITEM", "NO-SUCH-ITEM-2"]}
    assert response.status_code == 200
    assert len(response.json()["items"]) == 4


def test_similar_items_of_known_item(
    client: httpx.Client, copurchase: tuple[str, set[str]]
) -> None:
    item, copurchased = copurchase

    response = client.post("/similar-items", json={"item_id": item, "k": 5})

    body = response.json()
    assert response.status_code == 200
    assert body["item_id"] == item
    assert len(body["items"]) == 5
    assert item not in ids(body)
    assert set(ids(body)) & copurchased


def test_similar_items_of_unknown_item_is_404(client: httpx.Client) -> None:
    response = client.post("/similar-items", json={"item_id": "NO-SUCH-ITEM"})

    assert response.status_code == 404
    assert "'NO-SUCH-ITEM' not found" in response.json()["error"]


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_TOKEN}]
)
def test_events_without_valid_token_is_401(client: httpx.Client, headers: dict) -> None:
    response = client.post(
        "/events",
        headers=headers,
        json={"user_id": "u1", "events": [{"item_id": "85123A", "event_type": "view"}]},
    )

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in response.json()["error"]


def test_reload_without_token_is_401(client: httpx.Client) -> None:
    assert client.post("/reload", json={}).status_code == 401


@pytest.mark.parametrize(
    ("route", "payload", "location"),
    [
        ("/recommend", {"user_id": "u", "k": 0}, ["k"]),
        ("/recommend", {"user_id": "u", "k": 101}, ["k"]),
        ("/recommend", {"user_id": "u", "k": "x"}, ["k"]),
        ("/recommend", {"user_id": ""}, ["user_id"]),
        ("/recommend", {"user_id": ["u"]}, ["user_id"]),
        ("/recommend", {"k": 3}, ["user_id"]),
        ("/similar-items", {"item_id": "A", "k": -1}, ["k"]),
        (
            "/events",
            {"user_id": "u", "events": [{"item_id": "A", "event_type": "click"}]},
            ["events", 0, "event_type"],
        ),
        (
            "/events",
            {"user_id": "u", "events": [{"item_id": "A", "event_type": "view"}] * 501},
            ["events"],
        ),
    ],
)
def test_bad_request_is_400_naming_field(
    client: httpx.Client, route: str, payload: dict, location: list
) -> None:
    response = client.post(route, headers=AUTH, json=payload)

    assert response.status_code == 400
    assert response.json()["detail"][0]["loc"] == location


def test_invalid_json_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/recommend", content=b"{not json", headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 400


def test_oversized_body_is_413(client: httpx.Client) -> None:
    response = client.post("/events", headers=AUTH, content=b"x" * (2 * 1024 * 1024))

    assert response.status_code == 413
    assert "the limit is 1048576 bytes" in response.json()["error"]


def test_oversized_chunked_body_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    response = client.post("/events", headers=AUTH, content=chunks())

    assert response.status_code == 413
    assert "the limit is 1048576 bytes" in response.json()["error"]


def test_chunked_body_within_limit_is_served(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"user_id": "chunked-shopper",'
        yield b' "k": 2}'

    response = client.post(
        "/recommend", content=chunks(), headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 200
    assert len(response.json()["items"]) == 2


def test_metrics_count_requests(client: httpx.Client) -> None:
    first = client.get("/metrics").text

    client.post("/recommend", json={"user_id": "metrics-probe", "k": 2})
    client.post("/recommend", json={"user_id": "metrics-probe", "k": 0})
    client.post("/similar-items", json={"item_id": "NO-SUCH-ITEM"})
    client.post(
        "/events",
        headers=AUTH,
        json={"user_id": "metrics-probe", "events": [{"item_id": "85123A", "event_type": "view"}]},
    )
    second = client.get("/metrics").text

    def increase(name: str, **labels: str) -> float:
        return counter(second, name, **labels) - counter(first, name, **labels)

    assert increase("shoprec_requests_total", endpoint="recommend", outcome="ok") == 1.0
    assert increase("shoprec_requests_total", endpoint="similar_items", outcome="not_found") == 1
    assert increase("shoprec_requests_total", endpoint="events", outcome="ok") == 1.0
    assert increase("shoprec_events_recorded_total", event_type="view") == 1.0
    assert increase("shoprec_cold_start_fallbacks_total") == 1.0
    assert increase("shoprec_stage_latency_seconds_count", endpoint="recommend", stage="total") == 1
    for status in ("200", "400"):
        assert (
            increase(
                "bentoml_service_request_total", endpoint="/recommend", http_response_code=status
            )
            == 1.0
        ), status


def test_reload_switches_to_new_champion(
    client: httpx.Client, server: dict, trained: TrainedBundle
) -> None:
    new_tag = register_champion(trained.directory, server["env"], "second")

    response = client.post("/reload", headers=AUTH, json={})
    served = client.post("/recommend", json={"user_id": "after-reload", "k": 2}).json()

    assert response.status_code == 200
    assert response.json()["reloaded"] is True
    assert response.json()["model_version"] == new_tag
    assert served["model_version"] == new_tag


def test_corrupt_champion_keeps_serving_previous(
    client: httpx.Client, server: dict, trained: TrainedBundle, tmp_path: Path
) -> None:
    serving_tag = client.post("/recommend", json={"user_id": "x", "k": 1}).json()["model_version"]
    corrupt_tag = register_champion(
        corrupt_copy(trained.directory, tmp_path / "corrupt"), server["env"], "corrupt"
    )

    response = client.post("/reload", headers=AUTH, json={})
    served = client.post("/recommend", json={"user_id": "after-corrupt-reload", "k": 3})

    assert response.status_code == 200
    assert response.json()["reloaded"] is False
    assert response.json()["model_version"] == serving_tag
    assert f"reload of {corrupt_tag} failed" in response.json()["detail"]
    assert served.status_code == 200
    assert served.json()["model_version"] == serving_tag
    assert len(served.json()["items"]) == 3
    assert wait_for_log(server["log"], f"Reload of champion {corrupt_tag} failed")


def wait_for_log(log_file: Path, text: str, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log_file.read_text():
            return True
        time.sleep(0.2)
    return False
