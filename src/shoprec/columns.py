"""Column names and enumerations shared by every stage.

One place for the vocabulary, so a column is spelled the same way in the
event store, the features, the ranker and the service.
"""

from __future__ import annotations


class Columns:
    """Canonical event and modelling column names."""

    EVENT_ID = "event_id"
    USER_ID = "user_id"
    ITEM_ID = "item_id"
    EVENT_TYPE = "event_type"
    QUANTITY = "quantity"
    PRICE = "price"
    TS = "ts"
    ORDER_ID = "order_id"
    COUNTRY = "country"
    BATCH_ID = "batch_id"
    DATE = "date"

    DESCRIPTION = "description"
    WEIGHT = "weight"
    SCORE = "score"
    RANK = "rank"
    LABEL = "label"
    SOURCE = "source"


# Column order of a canonical event, as stored in data/events/.
EVENT_COLUMNS: tuple[str, ...] = (
    Columns.EVENT_ID,
    Columns.USER_ID,
    Columns.ITEM_ID,
    Columns.EVENT_TYPE,
    Columns.QUANTITY,
    Columns.PRICE,
    Columns.TS,
    Columns.ORDER_ID,
    Columns.COUNTRY,
    Columns.BATCH_ID,
)

EVENT_TYPES: tuple[str, ...] = ("view", "add_to_cart", "purchase", "return")


class QuarantineColumns:
    """Columns of a quarantined row in data/quarantine/."""

    SOURCE_FILE = "source_file"
    LINE_NUMBER = "line_number"
    RULE = "rule"
    DETAIL = "detail"
    SOURCE_LINE = "source_line"
    BATCH_ID = "batch_id"


class CatalogueColumns:
    """Columns of the item catalogue in data/catalogue.parquet."""

    ITEM_ID = "item_id"
    DESCRIPTION = "description"
    LAST_PRICE = "last_price"
    FIRST_SEEN = "first_seen"
    LAST_SEEN = "last_seen"
