"""Locust load for POST /recommend: a mix of known, recently active, buying and unknown shoppers.

bench/serve_bench.py starts the server(s) and runs this file headless. It passes comma-separated
raw customer ids in BENCH_KNOWN_IDS and BENCH_ACTIVE_IDS. Active shoppers have online events, so
the service folds in their ALS vector. A buying shopper is a known one who buys an item (POST
/events with BENCH_TOKEN, an item of BENCH_ITEMS) right before asking. The model reads
purchases, so the service cannot reuse cached scores for that request. BENCH_MIX gives the
shares of known, active, buying and unknown requests, e.g. "0.5,0.2,0.1,0.2". BENCH_HOSTS lists
base URLs of several replicas; each client sends its requests to them in turn (no load balancer
in between). With BENCH_LATENCY_FILE set, every request's name, time in ms and success are
written there as CSV when Locust quits.
"""

from __future__ import annotations

import csv
import itertools
import os
import random
import uuid

from locust import FastHttpUser, constant, events, task

KNOWN_IDS = [raw for raw in os.environ.get("BENCH_KNOWN_IDS", "").split(",") if raw]
ACTIVE_IDS = [raw for raw in os.environ.get("BENCH_ACTIVE_IDS", "").split(",") if raw]
ITEMS = [item for item in os.environ.get("BENCH_ITEMS", "").split(",") if item]
TOKEN = os.environ.get("BENCH_TOKEN", "")
KINDS = ["known", "active", "buying", "unknown"]
MIX = [float(share) for share in os.environ.get("BENCH_MIX", "0.6,0.2,0,0.2").split(",")]
K = int(os.environ.get("BENCH_K", "10"))
HOSTS = [host for host in os.environ.get("BENCH_HOSTS", "").split(",") if host]


LATENCIES: list[tuple[str, float, bool]] = []


@events.request.add_listener
def record_latency(name: str, response_time: float, exception: object, **_: object) -> None:
    LATENCIES.append((name, response_time, exception is None))


@events.quitting.add_listener
def write_latencies(**_: object) -> None:
    path = os.environ.get("BENCH_LATENCY_FILE")
    if path:
        with open(path, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["name", "ms", "ok"])
            writer.writerows(LATENCIES)


class Shopper(FastHttpUser):
    """One client that asks for recommendations back to back (closed loop, no think time)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        start = random.randrange(len(HOSTS)) if HOSTS else 0
        self.targets = itertools.cycle(HOSTS[start:] + HOSTS[:start]) if HOSTS else None

    @task
    def recommend(self) -> None:
        kind = random.choices(KINDS, weights=MIX)[0]
        if kind in ("known", "buying") and KNOWN_IDS:
            user_id = random.choice(KNOWN_IDS)
        elif kind == "active" and ACTIVE_IDS:
            user_id = random.choice(ACTIVE_IDS)
        else:
            kind, user_id = "unknown", f"bench-unknown-{uuid.uuid4().hex[:12]}"
        host = next(self.targets) if self.targets else ""
        if kind == "buying":
            event = {"item_id": random.choice(ITEMS), "event_type": "purchase"}
            self.client.post(
                f"{host}/events",
                json={"user_id": user_id, "events": [event]},
                headers={"Authorization": f"Bearer {TOKEN}"},
                name="/events [buying]",
            )
        with self.client.post(
            f"{host}/recommend",
            json={"user_id": user_id, "k": K},
            name=f"/recommend [{kind}]",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
            elif len(response.json().get("items", [])) != K:
                response.failure(f"expected {K} items, got {len(response.json()['items'])}")
