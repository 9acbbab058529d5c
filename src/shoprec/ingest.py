"""Turn one landing file into a batch for the event store.

``process_file`` is the pure part of ingestion: parse with a source adapter,
validate with GX, split rows into events to store and rows to quarantine, and
count everything so that rows read = stored + quarantined + duplicates.
``finalize_batch`` removes events already in the store just before commit.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from shoprec.adapters import (
    GenericAdapter,
    GenericSourceConfig,
    OnlineRetailAdapter,
    OnlineRetailConfig,
    SourceBatch,
)
from shoprec.adapters.base import DESCRIPTION, LINE_NUMBER, PARSE_PROBLEM, SOURCE_LINE
from shoprec.columns import EVENT_COLUMNS
from shoprec.columns import Columns as C
from shoprec.columns import QuarantineColumns as Q
from shoprec.exceptions import BatchRejectedError, ConfigError, StoreError
from shoprec.privacy import Pseudonymizer
from shoprec.store import BatchToCommit
from shoprec.validate import ValidationConfig, validate_events

logger = logging.getLogger(__name__)

SOURCE_FILE = "_source_file"


class IngestConfig(BaseModel):
    """Source adapter and landing-file settings (params.yaml: ingest)."""

    source: str = "online_retail"
    file_pattern: str = "*.csv"
    files_per_commit: int = Field(default=25, ge=1)
    online_retail: OnlineRetailConfig = OnlineRetailConfig()
    generic: GenericSourceConfig | None = None


class SourceAdapter(Protocol):
    name: str

    def read(self, path: Path) -> SourceBatch: ...


@dataclass
class FileOutcome:
    """Result of processing one landing file, before it is committed."""

    source_file: str
    batch: BatchToCommit | None
    rejected_reason: str | None = None
    rejected_message: str | None = None
    validation: dict[str, Any] | None = None
    source: SourceBatch | None = None


def build_adapter(config: IngestConfig, pseudonymizer: Pseudonymizer) -> SourceAdapter:
    """Return the adapter named by ingest.source."""
    if config.source == "online_retail":
        return OnlineRetailAdapter(config.online_retail, pseudonymizer)
    if config.source == "generic":
        if config.generic is None:
            raise ConfigError(
                "ingest.source is 'generic' but params.yaml has no ingest.generic section; "
                "add one with at least columns: {item_id: ..., ts: ..., order_id: ...}"
            )
        return GenericAdapter(config.generic, pseudonymizer)
    raise ConfigError(
        f"ingest.source '{config.source}' is unknown; expected 'online_retail' or 'generic'"
    )


def _rule_detail(rule: str, row: pd.Series) -> str:
    if rule == "parse_error":
        return str(row[PARSE_PROBLEM])
    if rule == "quantity_out_of_range":
        return f"quantity {row[C.QUANTITY]} on {row[C.EVENT_TYPE]} order {row[C.ORDER_ID]}"
    if rule == "price_out_of_range":
        return f"price {row[C.PRICE]}"
    if rule == "non_product_code":
        return f"item_id '{row[C.ITEM_ID]}' is not a product"
    if rule == "ts_outside_file_day":
        return f"ts {row[C.TS]} is outside the file's day"
    if rule == "unknown_event_type":
        return f"event_type '{row[C.EVENT_TYPE]}'"
    if rule.startswith("missing_"):
        return f"{rule.removeprefix('missing_')} is empty"
    return rule


def _check_batch(source: SourceBatch, validation: ValidationConfig) -> None:
    """Reject a file with no data rows or with mostly unparseable timestamps."""
    if source.rows_read == 0:
        raise BatchRejectedError(
            source.source_file,
            "no_data_rows",
            f"{source.source_file} has no data rows (only a header); nothing was written. "
            "Check that the export finished before the file was dropped.",
        )
    events = source.events
    if len(events) == 0:
        return
    parsed_share = float(events[C.TS].notna().mean())
    if parsed_share < validation.min_parsed_ts_share:
        problems = events[PARSE_PROBLEM].dropna()
        example = problems.iloc[0] if len(problems) else "no timestamps"
        raise BatchRejectedError(
            source.source_file,
            "timestamps_unparseable",
            f"only {parsed_share:.0%} of the timestamps of {source.source_file} can be parsed "
            f"(first problem: {example}); nothing was written. Fix the export or set the date "
            "format in params.yaml (ingest.online_retail.date_format or ingest.generic.ts_format).",
        )


def parse_file(path: Path, adapter: SourceAdapter, validation: ValidationConfig) -> FileOutcome:
    """Parse one landing file; a file that fails a batch-level check becomes a rejection."""
    try:
        source = adapter.read(path)
        _check_batch(source, validation)
    except BatchRejectedError as error:
        logger.error("rejected %s (%s): %s", error.source_file, error.reason, error)
        return FileOutcome(path.name, None, error.reason, str(error))
    return FileOutcome(path.name, None, source=source)


def validate_files(
    outcomes: list[FileOutcome], validation: ValidationConfig, docs_dir: Path | None = None
) -> list[FileOutcome]:
    """Validate the parsed files together in one GX run and split each into a batch.

    With `docs_dir`, the GX run is also rendered into the Data Docs site there.
    """
    parsed = [o for o in outcomes if o.source is not None]
    if not parsed:
        return outcomes
    frames = [o.source.events.assign(**{SOURCE_FILE: o.source_file}) for o in parsed]
    events = pd.concat(frames, ignore_index=True)
    run_name = f"{parsed[0].source_file}..{parsed[-1].source_file}"
    result = validate_events(events, validation, docs_dir, run_name)
    if result.batch_failures:
        raise BatchRejectedError(
            ", ".join(o.source_file for o in parsed),
            result.batch_failures[0],
            f"batch-level expectation(s) {result.batch_failures} failed on "
            f"{len(parsed)} file(s); nothing was written",
        )

    start = 0
    for outcome in parsed:
        size = len(outcome.source.events)
        rules = result.row_rules.iloc[start : start + size].reset_index(drop=True)
        start += size
        outcome.batch = _split_batch(outcome.source, rules)
        failed = rules.dropna()
        outcome.validation = {
            "gx_run": {k: v for k, v in result.summary.items() if k != "expectations"},
            "expectations": result.summary["expectations"],
            "rows": size,
            "rows_failed": len(failed),
            "failed_by_rule": dict(Counter(r for rs in failed for r in rs.split("; "))),
        }
        outcome.source = None
    return outcomes


def process_file(path: Path, adapter: SourceAdapter, validation: ValidationConfig) -> FileOutcome:
    """Parse, validate and split one landing file."""
    return validate_files([parse_file(path, adapter, validation)], validation)[0]


def _split_batch(source: SourceBatch, row_rules: pd.Series) -> BatchToCommit:
    events = source.events.reset_index(drop=True)
    failed = row_rules.notna().to_numpy()
    bad = events[failed]
    rules = row_rules[failed]
    quarantine = pd.DataFrame(
        {
            Q.SOURCE_FILE: source.source_file,
            Q.LINE_NUMBER: bad[LINE_NUMBER].to_numpy(),
            Q.RULE: rules.to_numpy(),
            Q.DETAIL: [
                "; ".join(_rule_detail(rule, row) for rule in row_rules.split("; "))
                for (_, row), row_rules in zip(bad.iterrows(), rules, strict=True)
            ],
            Q.SOURCE_LINE: [source.redact(line) for line in bad[SOURCE_LINE]],
        }
    )
    quarantine = pd.concat([source.malformed, quarantine], ignore_index=True)
    quarantine = quarantine.sort_values(Q.LINE_NUMBER, kind="stable").reset_index(drop=True)

    good = events[~failed]
    stored = good[list(EVENT_COLUMNS[:-1])].copy()
    stored[C.QUANTITY] = stored[C.QUANTITY].astype("int64")
    primary_rules = Counter(rule.split("; ")[0] for rule in quarantine[Q.RULE])
    counts = {
        "rows_read": source.rows_read,
        "stored": len(stored),
        "quarantined": len(quarantine),
        "quarantined_by_rule": dict(sorted(primary_rules.items())),
        "duplicates": source.duplicates,
        "ignored_columns": source.ignored_columns,
    }
    if len(quarantine):
        logger.warning(
            "%s: %d of %d rows quarantined %s",
            source.source_file,
            len(quarantine),
            source.rows_read,
            dict(primary_rules),
        )
    return BatchToCommit(
        batch_id=f"{Path(source.source_file).stem}-{source.file_sha256[:12]}",
        source_file=source.source_file,
        file_sha256=source.file_sha256,
        events=stored.reset_index(drop=True),
        descriptions=good[DESCRIPTION].reset_index(drop=True),
        quarantine=quarantine,
        counts=counts,
    )


def finalize_batch(batch: BatchToCommit, known_event_ids: Container[str]) -> BatchToCommit:
    """Drop events whose event_id is already stored, counting them as duplicates."""
    seen = np.fromiter(
        (event_id in known_event_ids for event_id in batch.events[C.EVENT_ID]),
        dtype=bool,
        count=len(batch.events),
    )
    if seen.any():
        batch.events = batch.events[~seen].reset_index(drop=True)
        batch.descriptions = batch.descriptions[~seen].reset_index(drop=True)
        batch.counts["duplicates"] += int(seen.sum())
        batch.counts["already_stored"] = int(seen.sum())
        batch.counts["stored"] = len(batch.events)
    counts = batch.counts
    if counts["rows_read"] != counts["stored"] + counts["quarantined"] + counts["duplicates"]:
        raise StoreError(f"row counts of {batch.source_file} are not conserved: {counts}")
    return batch
