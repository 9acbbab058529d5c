"""Locust load for POST /recommend: a mix of known, recently active and unknown shoppers.

bench/serve_bench.py starts the server and runs this file headless. It passes comma-separated
raw customer ids in BENCH_KNOWN_IDS and BENCH_ACTIVE_IDS. Active shoppers have online events, so
the service folds in their ALS vector. BENCH_MIX gives the shares of known, active and unknown
requests, e.g. "0.6,0.2,0.2".
"""

from __future__ import annotations

import os
import random
import uuid

from locust import HttpUser, constant, task

KNOWN_IDS = [raw for raw in os.environ.get("BENCH_KNOWN_IDS", "").split(",") if raw]
ACTIVE_IDS = [raw for raw in os.environ.get("BENCH_ACTIVE_IDS", "").split(",") if raw]
MIX = [float(share) for share in os.environ.get("BENCH_MIX", "0.6,0.2,0.2").split(",")]
K = int(os.environ.get("BENCH_K", "10"))


class Shopper(HttpUser):
    """One client that asks for recommendations back to back (closed loop, no think time)."""

    wait_time = constant(0)

    @task
    def recommend(self) -> None:
        kind = random.choices(["known", "active", "unknown"], weights=MIX)[0]
        if kind == "known" and KNOWN_IDS:
            user_id = random.choice(KNOWN_IDS)
        elif kind == "active" and ACTIVE_IDS:
            user_id = random.choice(ACTIVE_IDS)
        else:
            kind, user_id = "unknown", f"bench-unknown-{uuid.uuid4().hex[:12]}"
        with self.client.post(
            "/recommend",
            json={"user_id": user_id, "k": K},
            name=f"/recommend [{kind}]",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif len(response.json().get("items", [])) != K:
                response.failure(f"expected {K} items, got {len(response.json()['items'])}")
