"""A BentoML service that returns fixed 10 items: the latency floor of the framework itself.

bench/serve_bench.py --floor-service serves this file instead of service.py, with the same
request and response schemas, worker count and load, so the difference between the two runs is
the work of the recommender itself.
"""

from __future__ import annotations

import os

import bentoml

from shoprec.serving_schemas import RecommendRequest, RecommendResponse, ScoredItem

FIXED_ITEMS = [
    ScoredItem(item_id=f"item-{rank}", score=1.0 / rank, rank=rank, source="als", price=1.0)
    for rank in range(1, 11)
]


WORKERS = os.environ.get("SHOPREC_WORKERS", "cpu_count")


@bentoml.service(name="shoprec-floor", workers=WORKERS if WORKERS == "cpu_count" else int(WORKERS))
class FixedAnswer:
    """Returns the same ten items from /recommend, whatever the request."""

    @bentoml.api(route="/recommend")
    def recommend(self, request: RecommendRequest, /) -> RecommendResponse:
        return RecommendResponse(
            items=FIXED_ITEMS[: request.k], model_version="fixed", cold_start=False
        )
