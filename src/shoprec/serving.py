"""Online recommendation logic behind the HTTP service, independent of HTTP.

The `Recommender` keeps the loaded champion model, the online store and the pseudonymizer. It
pseudonymizes every incoming user id before anything is stored or logged, reads the user's
online events so the next recommendation reflects them, keeps inactive and unknown items out of
every response, and swaps in a new champion on reload only when it loads cleanly.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from shoprec.bundle import CACHE_HIT_ATTR
from shoprec.bundle import UnknownItemError as BundleUnknownItemError
from shoprec.columns import CatalogueColumns, Columns
from shoprec.config import Settings, load_params, params_section
from shoprec.exceptions import ShoprecError
from shoprec.lru import LruCache
from shoprec.online_store import (
    OnlineStore,
    OnlineStoreUnavailableError,
    create_online_store,
    events_frame,
)
from shoprec.privacy import Pseudonymizer, load_or_create_key
from shoprec.serving_metrics import ServingMetrics, default_metrics
from shoprec.serving_schemas import (
    EventsRequest,
    EventsResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadResponse,
    ScoredItem,
    SimilarItemsRequest,
    SimilarItemsResponse,
)

logger = logging.getLogger(__name__)

# When filters drop items from the bundle's top list, ask again for FETCH_GROWTH times more,
# at most MAX_FETCH_ROUNDS times in all.
MAX_FETCH_ROUNDS = 3
FETCH_GROWTH = 4
# Responses kept per worker, keyed by every input of the response (see Recommender.recommend).
RESPONSE_CACHE_SIZE = 8192


class ServingError(ShoprecError):
    """A serving request cannot be served as requested."""


class UnknownItemError(ServingError):
    """The requested item is not in the served model's catalogue."""


class UnauthorizedError(ServingError):
    """A write request has no bearer token or the wrong one."""


class WritesDisabledError(ServingError):
    """Write endpoints are off because no API token is configured."""


class ModelNotFoundError(ServingError):
    """No champion model is in the BentoML model store."""


class ServingConfig(BaseModel):
    """The ``serving`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    inactive_days: int = Field(
        90, ge=1, description="Items not sold for this many days before the data end are hidden."
    )
    history_limit: int = Field(50, ge=1, description="Online events read per recommendation.")
    max_events_per_user: int = Field(200, ge=1, description="Online events kept per user.")
    cold_start_sources: list[str] = Field(
        default_factory=lambda: ["popularity"],
        description="Candidate sources that make up the cold-start list.",
    )
    reload_poll_seconds: float = Field(
        30.0,
        ge=0,
        description=(
            "Each worker checks the model store for a new champion this often (0: never; "
            "POST /reload still works)."
        ),
    )


class ServingSettings(Settings):
    """Deployment settings of the service: the shared settings plus the insecure local switch."""

    insecure_local: bool = False


class RecommendationModel(Protocol):
    """The part of shoprec.bundle.ModelBundle that serving calls.

    Besides these methods, serving reads the bundle's items from ``catalogue`` or ``item_table``
    (see `item_catalogue`).
    """

    def recommend(
        self,
        user_history: pd.DataFrame,
        k: int,
        context_items: list[str] | None = ...,
        exclude_items: set[str] | None = ...,
        exclude_purchased: bool = ...,
        now: pd.Timestamp | None = ...,
        user_id: str | None = ...,
    ) -> pd.DataFrame: ...

    def similar_items(self, item_id: str, k: int) -> pd.DataFrame: ...


@dataclass(frozen=True)
class ServedModel:
    """A loaded bundle plus the item lookups serving derives from it."""

    bundle: RecommendationModel
    version: str
    servable_items: frozenset[str]
    inactive_items: frozenset[str]
    # item_id -> (description, price), None where unknown; a dict lookup per returned item.
    details_by_item: dict[str, tuple[str | None, float | None]]


def item_catalogue(bundle: Any) -> pd.DataFrame:
    """Return the bundle's items (index item_id) with description, price and days_since_sold.

    ``bundle.catalogue`` (CatalogueColumns) is used when present, and days are counted back from
    its newest ``last_seen``. Otherwise ``bundle.item_table`` is used: ``item_price`` and
    ``item_days_since_sold`` at the training cutoff, with no description.
    """
    # NOTE: two layouts are read because the contract names a catalogue subset, but the bundle
    # currently stores only item_table. Keep the one the bundle settles on.
    catalogue = getattr(bundle, "catalogue", None)
    if catalogue is not None:
        last_seen = pd.to_datetime(catalogue[CatalogueColumns.LAST_SEEN], utc=True)
        description = catalogue.get(CatalogueColumns.DESCRIPTION)
        return pd.DataFrame(
            {
                "description": None if description is None else description.to_numpy(),
                "price": catalogue[CatalogueColumns.LAST_PRICE].to_numpy(dtype=float),
                "days_since_sold": (
                    (last_seen.max() - last_seen) / pd.Timedelta(days=1)
                ).to_numpy(),
            },
            index=pd.Index(catalogue[CatalogueColumns.ITEM_ID].astype(str), name=Columns.ITEM_ID),
        )
    item_table = getattr(bundle, "item_table", None)
    if item_table is not None:
        return pd.DataFrame(
            {
                "description": None,
                "price": item_table["item_price"].to_numpy(dtype=float),
                "days_since_sold": item_table["item_days_since_sold"].to_numpy(dtype=float),
            },
            index=pd.Index(item_table.index.astype(str), name=Columns.ITEM_ID),
        )
    raise ServingError(
        f"model bundle {type(bundle).__name__} has neither 'catalogue' nor 'item_table'; "
        "retrain with the current shoprec version"
    )


def prepare_model(bundle: RecommendationModel, version: str, inactive_days: int) -> ServedModel:
    """Index the bundle's items and split them into servable and inactive ones.

    An item is inactive when its last sale is more than `inactive_days` days before the end of
    the model's data, or when its last sale is unknown.
    """
    details = item_catalogue(bundle)
    active = (details["days_since_sold"] <= inactive_days).to_numpy()
    item_ids = details.index.to_numpy()

    descriptions = details["description"].to_numpy(dtype=object)
    prices = details["price"].to_numpy(dtype=float)
    served = ServedModel(
        bundle=bundle,
        version=version,
        servable_items=frozenset(item_ids[active]),
        inactive_items=frozenset(item_ids[~active]),
        details_by_item={
            str(item): (
                None if pd.isna(description) else str(description),
                None if np.isnan(price) else float(price),
            )
            for item, description, price in zip(item_ids, descriptions, prices, strict=True)
        },
    )
    logger.info(
        "Serving model %s: %d servable items, %d inactive (no sale in the last %d days of data)",
        version,
        len(served.servable_items),
        len(served.inactive_items),
        inactive_days,
    )
    return served


def warn_on_key_mismatch(bundle: Any, version: str, pseudonymizer: Pseudonymizer) -> bool:
    """Log a warning and return True when `bundle` was trained under another pseudonym key.

    With another key every shopper's pseudonym differs from the ones in the model's training
    data, so each known shopper would silently get the cold-start list.
    """
    expected = (getattr(bundle, "metadata", None) or {}).get("pseudonym_key_check")
    if expected is None or expected == pseudonymizer.key_check():
        return False
    logger.warning(
        "Model %s was trained on ids pseudonymized with another key than the one in use: every "
        "known shopper will be treated as unknown. Set SHOPREC_PSEUDONYM_KEY or "
        "SHOPREC_KEY_FILE to the key used at ingestion",
        version,
    )
    return True


def check_bearer_token(authorization: str | None, api_token: str | None, insecure: bool) -> None:
    """Raise unless `authorization` is ``Bearer <api_token>``.

    Without a configured token, writes are allowed only in insecure local mode.
    """
    if not api_token:
        if insecure:
            return
        raise WritesDisabledError(
            "write endpoints are disabled because SHOPREC_API_TOKEN is not set; set it, or set "
            "SHOPREC_INSECURE_LOCAL=1 to accept unauthenticated writes on a local machine"
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("utf-8"), api_token.encode("utf-8")
    ):
        raise UnauthorizedError(
            "missing or invalid bearer token; send the header 'Authorization: Bearer <token>'"
        )


def find_champion_tag() -> str:
    """Return the tag of the model labelled stage=champion in the BentoML model store."""
    from shoprec import registry

    champion = registry.get_champion()
    if champion is None:
        raise ModelNotFoundError(
            f"no model '{registry.MODEL_NAME}' labelled {registry.STAGE_LABEL}={registry.CHAMPION} "
            "in the BentoML model store ($BENTOML_HOME/models); train and promote a model first"
        )
    return str(champion.tag)


def load_bundle(tag: str) -> RecommendationModel:
    """Load the ModelBundle saved in the BentoML model `tag`."""
    import bentoml

    from shoprec import registry
    from shoprec.bundle import ModelBundle

    return ModelBundle.load(registry.bundle_dir(bentoml.models.get(tag)))


class Recommender:
    """Recommendations, similar items and event recording for the online service."""

    def __init__(
        self,
        model: ServedModel,
        store: OnlineStore,
        pseudonymizer: Pseudonymizer,
        config: ServingConfig,
        metrics: ServingMetrics | None = None,
        find_champion: Callable[[], str] = find_champion_tag,
        load_model: Callable[[str], RecommendationModel] = load_bundle,
    ) -> None:
        self._model = model
        self.store = store
        self.pseudonymizer = pseudonymizer
        self.config = config
        self.metrics = metrics or default_metrics()
        self._find_champion = find_champion
        self._load_model = load_model
        self._reload_lock = threading.Lock()
        self._responses: LruCache[RecommendResponse] = LruCache(RESPONSE_CACHE_SIZE)

    @classmethod
    def from_settings(
        cls, settings: ServingSettings, bundle: RecommendationModel, version: str
    ) -> Recommender:
        """Build a recommender from params.yaml, the pseudonym key and the configured store."""
        config = ServingConfig.model_validate(
            params_section(load_params(settings.params_file), "serving")
        )
        secret = settings.pseudonym_key.get_secret_value() if settings.pseudonym_key else None
        if secret is None and not settings.key_file.exists():
            logger.warning(
                "Pseudonym key file %s not found and SHOPREC_PSEUDONYM_KEY not set: a new key "
                "will be generated, so user ids will not match the ids the model was trained on",
                settings.key_file,
            )
        pseudonymizer = Pseudonymizer(load_or_create_key(secret, settings.key_file))
        warn_on_key_mismatch(bundle, version, pseudonymizer)
        store = create_online_store(settings, config.max_events_per_user)
        model = prepare_model(bundle, version, config.inactive_days)
        return cls(model, store, pseudonymizer, config)

    @property
    def model_version(self) -> str:
        return self._model.version

    def start_polling(self) -> threading.Thread | None:
        """Check for a new champion every ``reload_poll_seconds`` in a daemon thread.

        Every worker process polls on its own, so all of them move to a new champion, while
        POST /reload reaches only the worker that handles it.
        """
        interval = self.config.reload_poll_seconds
        if interval <= 0:
            return None
        stop = threading.Event()
        self._stop_polling = stop

        def poll() -> None:
            while not stop.wait(interval):
                try:
                    self.reload()
                except Exception:  # noqa: BLE001 - the poller must outlive any failure
                    logger.exception("Polling for a new champion failed")

        thread = threading.Thread(target=poll, name="champion-poller", daemon=True)
        thread.start()
        logger.info("Polling for a new champion every %.0f s", interval)
        return thread

    def stop_polling(self) -> None:
        stop = getattr(self, "_stop_polling", None)
        if stop is not None:
            stop.set()

    def is_ready(self) -> bool:
        """Return True once a model is loaded.

        The online store is not part of readiness: without it /recommend still responds
        (degraded) and /events responds 503, so a replica should stay in the load balancer.
        """
        return self._model is not None

    @contextmanager
    def _timed(self, endpoint: str, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.stage_latency.labels(endpoint=endpoint, stage=stage).observe(elapsed)

    @contextmanager
    def _outcome(self, endpoint: str) -> Iterator[None]:
        outcome = "error"
        try:
            yield
            outcome = "ok"
        except UnknownItemError:
            outcome = "not_found"
            raise
        except ShoprecError:
            outcome = "unavailable"
            raise
        finally:
            self.metrics.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        """Rank items for one shopper, using the events recorded for them so far."""
        with self._outcome("recommend"), self._timed("recommend", "total"):
            model = self._model
            user_id = self.pseudonymizer.user_id(request.user_id)
            known_context = _unique(i for i in request.context_items if i in model.details_by_item)
            unknown_context = _unique(
                i for i in request.context_items if i not in model.details_by_item
            )

            degraded_reason = None
            with self._timed("recommend", "history"):
                try:
                    rows = self.store.recent_rows(user_id, self.config.history_limit)
                except OnlineStoreUnavailableError as error:
                    # Serve from the history stored in the model rather than fail the shopper.
                    logger.debug("Online store unavailable during /recommend: %s", error)
                    self.metrics.store_errors.labels(operation="read").inc()
                    self.metrics.degraded.labels(reason="online_store_unavailable").inc()
                    degraded_reason = "online store unavailable"
                    rows = []

            # Every input of the response is in the key: a new event has a new event id, and a
            # new model a new version, so a cached response is never stale. Degraded responses
            # are not cached.
            key = (
                model.version,
                user_id,
                tuple(row[Columns.EVENT_ID] for row in rows),
                request.k,
                tuple(request.context_items),
                tuple(request.exclude_items),
                request.exclude_purchased,
            )
            cached = self._responses.get(key) if degraded_reason is None else None
            if cached is not None:
                self.metrics.response_cache.labels(result="hit").inc()
                self._count_recommendation(cached, bool(rows), user_id)
                return cached
            history = events_frame(rows)

            # The inactive set has thousands of ids: copy it only when the request adds some.
            exclude = (
                model.inactive_items | frozenset(request.exclude_items)
                if request.exclude_items
                else model.inactive_items
            )

            def rank_items(fetch_k: int) -> pd.DataFrame:
                with self._timed("recommend", "model"):
                    ranked = model.bundle.recommend(
                        history,
                        fetch_k,
                        context_items=known_context,
                        exclude_items=exclude,
                        exclude_purchased=request.exclude_purchased,
                        user_id=user_id,
                    )
                hit = ranked.attrs.get(CACHE_HIT_ATTR)
                if hit is not None:
                    self.metrics.score_cache.labels(result="hit" if hit else "miss").inc()
                return ranked

            items = self._top_servable(model, rank_items, request.k, request.k, exclude)
            cold_start = (
                history.empty
                and not known_context
                and bool(items)
                and all(item.source in self.config.cold_start_sources for item in items)
            )

        if unknown_context:
            logger.debug("Ignored %d unknown context items for %s", len(unknown_context), user_id)
        response = RecommendResponse(
            items=items,
            model_version=model.version,
            unknown_context_items=unknown_context,
            cold_start=cold_start,
            degraded=degraded_reason is not None,
            degraded_reason=degraded_reason,
        )
        if degraded_reason is None:
            self.metrics.response_cache.labels(result="miss").inc()
            self._responses.put(key, response)
        self._count_recommendation(response, not history.empty, user_id)
        return response

    def _count_recommendation(
        self, response: RecommendResponse, folded_in: bool, user_id: str
    ) -> None:
        if folded_in:
            self.metrics.fold_ins.inc()
        if response.cold_start:
            self.metrics.cold_starts.inc()
            logger.debug("User %s has no history: cold-start list", user_id)

    def similar_items(self, request: SimilarItemsRequest) -> SimilarItemsResponse:
        """Return servable items similar to one catalogue item."""
        with self._outcome("similar_items"), self._timed("similar_items", "total"):
            model = self._model
            if request.item_id not in model.details_by_item:
                raise UnknownItemError(
                    f"item_id {request.item_id!r} not found in the catalogue of model "
                    f"{model.version}; use an item id the shop sold before the model's data end"
                )

            def rank_items(fetch_k: int) -> pd.DataFrame:
                with self._timed("similar_items", "model"):
                    try:
                        return model.bundle.similar_items(request.item_id, fetch_k)
                    except BundleUnknownItemError as error:
                        # An item of the catalogue can be missing from the item factors.
                        raise UnknownItemError(
                            f"item_id {request.item_id!r} has no similar items in model "
                            f"{model.version}: {error}"
                        ) from error

            # One extra item at first, because the bundle may return the item itself.
            items = self._top_servable(
                model, rank_items, request.k + 1, request.k, {request.item_id}
            )
        return SimilarItemsResponse(
            item_id=request.item_id, items=items, model_version=model.version
        )

    def record_events(self, request: EventsRequest) -> EventsResponse:
        """Append a shopper's events to the online store under their pseudonym."""
        with self._outcome("events"), self._timed("events", "total"):
            model = self._model
            user_id = self.pseudonymizer.user_id(request.user_id)
            events = [event.model_dump() for event in request.events]
            with self._timed("events", "store"):
                try:
                    accepted = self.store.append_events(user_id, events)
                except OnlineStoreUnavailableError:
                    self.metrics.store_errors.labels(operation="write").inc()
                    raise
        for event in request.events:
            self.metrics.events.labels(event_type=event.event_type).inc()
        unknown = _unique(
            e.item_id for e in request.events if e.item_id not in model.details_by_item
        )
        logger.debug("Recorded %d events for %s", accepted, user_id)
        return EventsResponse(accepted=accepted, unknown_items=unknown)

    def reload(self) -> ReloadResponse:
        """Swap in the current champion; keep serving the current model if loading fails."""
        with self._reload_lock:
            previous = self._model.version
            tag = "(unknown)"
            try:
                tag = self._find_champion()
                if tag == previous:
                    return ReloadResponse(
                        model_version=previous, reloaded=False, detail="already serving champion"
                    )
                bundle = self._load_model(tag)
                self._model = prepare_model(bundle, tag, self.config.inactive_days)
            except Exception as error:  # any failure must leave the current model in place
                logger.error(
                    "Reload of champion %s failed, still serving %s: %s", tag, previous, error
                )
                self.metrics.reloads.labels(outcome="failed").inc()
                return ReloadResponse(
                    model_version=previous,
                    reloaded=False,
                    detail=f"reload of {tag} failed: {error}",
                )
        logger.info("Reloaded model: %s -> %s", previous, tag)
        self.metrics.reloads.labels(outcome="reloaded").inc()
        return ReloadResponse(model_version=tag, reloaded=True, detail=f"replaced {previous}")

    @classmethod
    def _top_servable(
        cls,
        model: ServedModel,
        rank_items: Callable[[int], pd.DataFrame],
        fetch_k: int,
        k: int,
        exclude: AbstractSet[str],
    ) -> list[ScoredItem]:
        """Return the top `k` servable items, asking the bundle for more when filters drop some."""
        for _ in range(MAX_FETCH_ROUNDS):
            ranked = rank_items(fetch_k)
            items = cls._servable(model, ranked, exclude, k)
            if len(items) >= k or len(ranked) < fetch_k:
                return items
            fetch_k *= FETCH_GROWTH
        return items

    @staticmethod
    def _servable(
        model: ServedModel, ranked: pd.DataFrame, exclude: AbstractSet[str], k: int
    ) -> list[ScoredItem]:
        # Plain Python over a few dozen rows: cheaper than pandas set operations per request.
        items: list[ScoredItem] = []
        seen: set[str] = set()
        columns = (ranked[Columns.ITEM_ID], ranked[Columns.SCORE], ranked[Columns.SOURCE])
        for item, score, source in zip(*(c.tolist() for c in columns), strict=True):
            item_id = str(item)
            if item_id in seen or item_id in exclude or item_id not in model.servable_items:
                continue
            seen.add(item_id)
            description, price = model.details_by_item[item_id]
            items.append(
                ScoredItem(
                    item_id=item_id,
                    score=float(score),
                    rank=len(items) + 1,
                    source=str(source),
                    description=description,
                    price=price,
                )
            )
            if len(items) == k:
                break
        return items


def _unique(values: Iterator[str] | Any) -> list[str]:
    return list(dict.fromkeys(values))
