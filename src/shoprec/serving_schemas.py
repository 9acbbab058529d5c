"""Request and response models of the HTTP API (pydantic), validated before any work is done.

Every limit here is part of the API contract: a request outside it gets a 400 response that
names the field, before the model or the online store is touched.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from shoprec.columns import EVENT_TYPES

MAX_K = 100
MAX_CONTEXT_ITEMS = 100
MAX_EXCLUDE_ITEMS = 1000
MAX_EVENTS_PER_REQUEST = 500
MAX_USER_ID_LENGTH = 128
MAX_ITEM_ID_LENGTH = 64

UserId = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_USER_ID_LENGTH)
]
ItemId = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_ITEM_ID_LENGTH)
]
EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]


class _Request(BaseModel):
    # Unknown fields are rejected, so a misspelt option fails instead of being ignored.
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Request):
    """Ask for the top-k items for one shopper."""

    user_id: UserId = Field(description="The shop's own customer id; pseudonymized on arrival.")
    k: int = Field(10, ge=1, le=MAX_K, description="Number of items to return.")
    context_items: list[ItemId] = Field(
        default_factory=list,
        max_length=MAX_CONTEXT_ITEMS,
        description="Items the shopper is looking at now, e.g. the cart; unknown ids are ignored.",
    )
    exclude_purchased: bool = Field(False, description="Leave out items the user bought before.")
    exclude_items: list[ItemId] = Field(
        default_factory=list, max_length=MAX_EXCLUDE_ITEMS, description="Items never to return."
    )


class ScoredItem(BaseModel):
    """One recommended item with its catalogue details."""

    item_id: str
    score: float
    rank: int
    source: str = Field(description="Candidate generator that proposed the item.")
    description: str | None = None
    price: float | None = Field(None, description="Last known unit price.")


class RecommendResponse(BaseModel):
    """Ranked items for one shopper."""

    items: list[ScoredItem]
    model_version: str
    unknown_context_items: list[str] = Field(
        default_factory=list, description="Context item ids not in the model's catalogue."
    )
    cold_start: bool = Field(
        description="True when the user had no history and got the cold-start list."
    )
    degraded: bool = Field(
        False,
        description=(
            "True when the online store did not answer: the list uses only the history "
            "stored in the model, without the shopper's recent events."
        ),
    )
    degraded_reason: str | None = Field(
        None, description="Why the response is degraded, e.g. 'online store unavailable'."
    )


class SimilarItemsRequest(_Request):
    """Ask for items similar to one item."""

    item_id: ItemId
    k: int = Field(10, ge=1, le=MAX_K)


class SimilarItemsResponse(BaseModel):
    """Items similar to the requested item."""

    item_id: str
    items: list[ScoredItem]
    model_version: str


class ShopperEvent(_Request):
    """One thing a shopper did."""

    item_id: ItemId
    event_type: EventType
    quantity: int = Field(1, ge=1)
    price: float | None = Field(None, gt=0, description="Unit price, when known.")
    ts: datetime | None = Field(None, description="Event time; UTC when no offset is given.")


class EventsRequest(_Request):
    """Shopper events to record for one user."""

    user_id: UserId
    events: list[ShopperEvent] = Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)


class EventsResponse(BaseModel):
    """Outcome of recording events."""

    accepted: int
    unknown_items: list[str] = Field(
        default_factory=list,
        description="Recorded item ids the current model does not know; retraining adds them.",
    )


class ReloadResponse(BaseModel):
    """Outcome of a model reload."""

    model_version: str = Field(description="Version served after the reload attempt.")
    reloaded: bool
    detail: str
