"""The generic adapter: another shop's export described by a column mapping."""

from __future__ import annotations

import pandas as pd
import pytest

from shoprec.exceptions import ConfigError
from shoprec.ingest import IngestConfig, build_adapter, process_file
from shoprec.privacy import Pseudonymizer
from shoprec.validate import ValidationConfig

KEY = b"generic-test-key-0123456789"
MAPPING = {
    "user_id": "customer",
    "item_id": "sku",
    "event_type": "action",
    "quantity": "qty",
    "price": "unit_price",
    "ts": "created_at",
    "order_id": "order",
    "description": "title",
}


def generic_config(fmt: str = "csv") -> IngestConfig:
    return IngestConfig.model_validate(
        {
            "source": "generic",
            "generic": {
                "format": fmt,
                "columns": MAPPING,
                "ts_format": "%Y-%m-%dT%H:%M:%S",
                "event_type_map": {"buy": "purchase", "cart": "add_to_cart", "refund": "return"},
            },
        }
    )


ROWS = pd.DataFrame(
    {
        "customer": ["c-1", "c-1", "", "c-2"],
        "sku": ["A1", "B2", "A1", "C3"],
        "action": ["buy", "cart", "buy", "teleport"],
        "qty": ["2", "1", "1", "1"],
        "unit_price": ["9.5", "3.0", "9.5", "1.0"],
        "created_at": ["2024-05-01T10:00:00"] * 4,
        "order": ["o1", "o1", "o2", "o3"],
        "title": ["Mug", "Tea", "Mug", "Pot"],
    }
)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_generic_export_maps_to_canonical_events(tmp_path, fmt):
    path = tmp_path / f"events.{fmt}"
    if fmt == "csv":
        ROWS.to_csv(path, index=False)
    else:
        ROWS.to_parquet(path, index=False)
    adapter = build_adapter(generic_config(fmt), Pseudonymizer(KEY))

    outcome = process_file(path, adapter, ValidationConfig())

    events = outcome.batch.events
    assert list(events["event_type"]) == ["purchase", "add_to_cart", "purchase"]
    assert events["user_id"].iloc[0] == Pseudonymizer(KEY).user_id("c-1")
    assert events["user_id"].iloc[2] is None
    assert list(events["country"]) == ["unknown"] * 3
    assert list(outcome.batch.quarantine["rule"]) == ["unknown_event_type"]
    assert "c-2" not in outcome.batch.quarantine["source_line"].iloc[0]


def test_generic_mapping_without_item_column_is_rejected():
    with pytest.raises(ValueError, match="must map item_id"):
        IngestConfig.model_validate(
            {"source": "generic", "generic": {"columns": {"ts": "t", "order_id": "o"}}}
        )


def test_generic_source_without_section_names_the_fix():
    with pytest.raises(ConfigError, match="has no ingest.generic section"):
        build_adapter(IngestConfig(source="generic"), Pseudonymizer(KEY))
