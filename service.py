"""BentoML service of shoprec: HTTP wiring around shoprec.serving.Recommender.

Serve from the project root with ``bentoml serve`` (reads bentofile.yaml), or build a Bento with
``bentoml build``. Both need a model labelled ``stage=champion`` in the BentoML model store,
because the champion is referenced at class scope so that ``bentoml build`` packs it.

Settings come from ``SHOPREC_*`` environment variables: ``SHOPREC_API_TOKEN`` protects /events
and /reload, ``SHOPREC_INSECURE_LOCAL=1`` opens them without a token on a local machine.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import bentoml
from starlette.responses import JSONResponse, RedirectResponse

from shoprec.online_store import OnlineStoreUnavailableError
from shoprec.serving import (
    Recommender,
    ServingSettings,
    UnauthorizedError,
    UnknownItemError,
    WritesDisabledError,
    check_bearer_token,
    find_champion_tag,
    load_bundle,
)
from shoprec.serving_schemas import (
    EventsRequest,
    EventsResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadResponse,
    SimilarItemsRequest,
    SimilarItemsResponse,
)

logger = logging.getLogger(__name__)

# 500 events of a few hundred bytes each fit many times over; larger bodies are refused unread.
MAX_BODY_BYTES = 1024 * 1024

ASGIApp = Callable[..., Awaitable[None]]


class BodySizeLimit:
    """ASGI middleware that responds 413 to a request body larger than `max_bytes`.

    A body with a Content-Length header is judged by the header, unread. A chunked body has
    none, so it is read here up to the limit and then handed on to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await self._too_large(f"{int(length)} bytes", scope, receive, send)
                return
            await self.app(scope, receive, send)
            return

        messages: list[MutableMapping[str, Any]] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(f"more than {size} bytes", scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        buffered = iter(messages)

        async def replay() -> MutableMapping[str, Any]:
            return next(buffered, None) or await receive()

        await self.app(scope, replay, send)

    async def _too_large(
        self, size: str, scope: MutableMapping[str, Any], receive: Any, send: Any
    ) -> None:
        response = error_response(
            413, f"request body is {size}; the limit is {self.max_bytes} bytes"
        )
        await response(scope, receive, send)


class DocsRedirect:
    """ASGI middleware that redirects ``/docs`` to BentoML's Swagger UI, served at ``/``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/") == "/docs":
            await RedirectResponse("/", status_code=307)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def error_response(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    ctx: bentoml.Context | None = None,
) -> Any:
    """Return a JSON error body in the shape BentoML uses for its own 4xx responses.

    BentoML overwrites the status of an API that takes a context with ``ctx.response``'s status,
    so the status is set there too.
    """
    if ctx is not None:
        ctx.response.status_code = status
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def service_workers() -> int | str:
    """Return the worker count from SHOPREC_WORKERS: a number, or ``cpu_count`` (the default).

    BentoML reads the count when it imports this file, so it is an environment variable and not
    a params.yaml key.
    """
    value = os.environ.get("SHOPREC_WORKERS", "cpu_count").strip()
    if value == "cpu_count":
        return value
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"SHOPREC_WORKERS is {value!r}; expected a positive integer or 'cpu_count'"
        )
    return int(value)


@bentoml.service(name="shoprec", workers=service_workers(), traffic={"timeout": 10})
class Shoprec:
    """Recommendations, similar items and shopper events for one shop."""

    # NOTE: the champion is looked up whenever service.py is imported, also when a built Bento
    # starts, so a Bento serves the store's current champion even if bento.yaml lists an older one.
    champion = bentoml.models.BentoModel(find_champion_tag())

    def __init__(self) -> None:
        self.settings = ServingSettings()
        self.api_token = (
            self.settings.api_token.get_secret_value() if self.settings.api_token else None
        )
        if not self.api_token and not self.settings.insecure_local:
            logger.warning(
                "SHOPREC_API_TOKEN is not set: /events and /reload respond 403 until it is set"
            )
        if not self.api_token and self.settings.insecure_local:
            logger.warning("SHOPREC_INSECURE_LOCAL=1: /events and /reload accept any caller")
        tag = str(self.champion.tag)
        self.recommender = Recommender.from_settings(self.settings, load_bundle(tag), tag)
        self.recommender.start_polling()
        # A full garbage collection scans every object of the loaded model (64 ms on the real
        # bundle), so freeze them: later collections then skip them and do not stall requests.
        gc.collect()
        gc.freeze()

    def __is_ready__(self) -> bool:
        return self.recommender.is_ready()

    def _authorize(self, ctx: bentoml.Context) -> Any | None:
        try:
            check_bearer_token(
                ctx.request.headers.get("authorization"),
                self.api_token,
                self.settings.insecure_local,
            )
        except UnauthorizedError as error:
            return error_response(401, str(error), {"WWW-Authenticate": "Bearer"}, ctx)
        except WritesDisabledError as error:
            return error_response(403, str(error), ctx=ctx)
        return None

    @bentoml.api(route="/recommend")
    def recommend(self, request: RecommendRequest, /) -> RecommendResponse:
        """Return the top-k items for a shopper, using the events recorded for them."""
        # Without the online store the response comes from the model's stored history, flagged
        # `degraded` and counted in /metrics.
        return self.recommender.recommend(request)

    @bentoml.api(route="/similar-items")
    def similar_items(self, request: SimilarItemsRequest, /) -> SimilarItemsResponse:
        """Return items similar to one catalogue item."""
        try:
            return self.recommender.similar_items(request)
        except UnknownItemError as error:
            return error_response(404, str(error))

    @bentoml.api(route="/events")
    def events(self, request: EventsRequest, /, ctx: bentoml.Context) -> EventsResponse:
        """Record shopper events; the next /recommend of that user uses them (bearer token)."""
        denied = self._authorize(ctx)
        if denied is not None:
            return denied
        try:
            return self.recommender.record_events(request)
        except OnlineStoreUnavailableError as error:
            logger.error("Online store failed during /events: %s", error)
            return error_response(
                503,
                "online store unavailable; the events were not recorded, retry in a second",
                {"Retry-After": "1"},
                ctx=ctx,
            )

    @bentoml.api(route="/reload")
    def reload(self, ctx: bentoml.Context) -> ReloadResponse:
        """Load the current champion from the model store; keep the old one if that fails."""
        denied = self._authorize(ctx)
        if denied is not None:
            return denied
        # Only the worker that handles this request reloads now; every other worker picks up
        # the champion at its next poll (serving.reload_poll_seconds in params.yaml).
        return self.recommender.reload()


Shoprec.add_asgi_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
Shoprec.add_asgi_middleware(DocsRedirect)
