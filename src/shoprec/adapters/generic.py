"""Adapter for any CSV or Parquet event log described by a column mapping.

Another shop's export is configuration, not code: ``params.yaml`` maps each
canonical column to the source column that contains it (ingest.generic.columns).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, field_validator

from shoprec.adapters.base import (
    DESCRIPTION,
    LINE_NUMBER,
    PARSE_PROBLEM,
    SOURCE_LINE,
    CsvLineRedactor,
    JsonRowRedactor,
    SourceBatch,
    check_header,
    combine_problems,
    decode_text,
    malformed_frame,
    normalize_customer_ids,
    parse_numbers,
    parse_timestamps,
    split_csv,
)
from shoprec.columns import EVENT_TYPES
from shoprec.columns import Columns as C
from shoprec.exceptions import ConfigError
from shoprec.privacy import Pseudonymizer

logger = logging.getLogger(__name__)

REQUIRED_TARGETS = (C.ITEM_ID, C.TS, C.ORDER_ID)


class GenericSourceConfig(BaseModel):
    """Column mapping of a generic event log (params.yaml: ingest.generic)."""

    format: str = "csv"
    encoding: str = "utf-8"
    # canonical column -> source column; optional targets may be left out.
    columns: dict[str, str] = {}
    ts_format: str = "%Y-%m-%d %H:%M:%S"
    timezone: str = "UTC"
    # source event type value -> canonical event type
    event_type_map: dict[str, str] = {}
    default_event_type: str = "purchase"
    default_quantity: int = 1
    default_country: str = "unknown"

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in {"csv", "parquet"}:
            raise ValueError(f"format '{value}' is not supported; use 'csv' or 'parquet'")
        return value

    @field_validator("columns")
    @classmethod
    def _required_targets(cls, value: dict[str, str]) -> dict[str, str]:
        missing = [target for target in REQUIRED_TARGETS if target not in value]
        if missing:
            raise ValueError(
                f"ingest.generic.columns must map {', '.join(missing)} to a source column"
            )
        return value


class GenericAdapter:
    """Map a configured CSV or Parquet event log to canonical events."""

    name = "generic"

    def __init__(self, config: GenericSourceConfig, pseudonymizer: Pseudonymizer) -> None:
        bad_types = set(config.event_type_map.values()) - set(EVENT_TYPES)
        if bad_types or config.default_event_type not in EVENT_TYPES:
            raise ConfigError(
                f"ingest.generic maps to unknown event type(s) "
                f"{sorted(bad_types) or [config.default_event_type]}; expected {EVENT_TYPES}"
            )
        self.config = config
        self.pseudonymizer = pseudonymizer

    def read(self, path: Path) -> SourceBatch:
        """Parse and normalize one event log file."""
        cfg = self.config
        data = path.read_bytes()
        sources = list(cfg.columns.values())
        malformed = malformed_frame(path.name, [], [], [])

        if cfg.format == "parquet":
            raw = pd.read_parquet(path).astype("string").astype(object)
            extra = check_header(path, list(raw.columns), sources)
            raw = raw.where(raw.notna(), None)
            line_numbers = list(range(1, len(raw) + 1))
            raw_lines = [
                json.dumps(row, sort_keys=True, default=str)
                for row in raw[sources].to_dict("records")
            ]
            rows_read = len(raw)
            redact = JsonRowRedactor(cfg.columns.get(C.USER_ID), self.pseudonymizer)
        else:
            lines = split_csv(path, decode_text(path, data, cfg.encoding))
            extra = check_header(path, lines.header, sources)
            width = len(lines.header)
            user_column = cfg.columns.get(C.USER_ID)
            redact = CsvLineRedactor(
                lines.header.index(user_column) if user_column else None, self.pseudonymizer
            )
            good = [i for i, record in enumerate(lines.records) if len(record) == width]
            bad = [i for i, record in enumerate(lines.records) if len(record) != width]
            malformed = malformed_frame(
                path.name,
                [lines.line_numbers[i] for i in bad],
                [redact.redact_record(lines.records[i]) for i in bad],
                [f"expected {width} fields, found {len(lines.records[i])}" for i in bad],
            )
            raw = pd.DataFrame([lines.records[i] for i in good], columns=lines.header, dtype=object)
            line_numbers = [lines.line_numbers[i] for i in good]
            raw_lines = [lines.source_lines[i] for i in good]
            rows_read = len(lines.records)
        if extra:
            logger.warning("%s: ignoring unmapped column(s) %s", path.name, ", ".join(extra))

        keep = ~pd.Series(raw_lines, dtype=object).duplicated().to_numpy()
        duplicates = int((~keep).sum())
        raw = raw[keep].reset_index(drop=True)
        raw_lines = [line for line, kept in zip(raw_lines, keep, strict=True) if kept]
        events = self._normalize(raw, raw_lines)
        events[LINE_NUMBER] = np.asarray(line_numbers, dtype="int64")[keep]
        events[SOURCE_LINE] = raw_lines

        return SourceBatch(
            source_file=path.name,
            file_sha256=hashlib.sha256(data).hexdigest(),
            rows_read=rows_read,
            events=events,
            malformed=malformed,
            redact=redact,
            duplicates=duplicates,
            ignored_columns=extra,
        )

    def _column(self, raw: pd.DataFrame, target: str) -> pd.Series | None:
        source = self.config.columns.get(target)
        return None if source is None else raw[source].astype(object)

    def _normalize(self, raw: pd.DataFrame, raw_lines: list[str]) -> pd.DataFrame:
        cfg = self.config
        index = raw.index

        def text(target: str, default: str | None = None) -> pd.Series:
            column = self._column(raw, target)
            if column is None:
                return pd.Series(default, index=index, dtype=object)
            return column.where(column.notna(), "").astype(str).str.strip().replace("", None)

        event_type = text(C.EVENT_TYPE, cfg.default_event_type)
        event_type = event_type.map(lambda v: cfg.event_type_map.get(v, v) if v else v)

        quantity_raw = text(C.QUANTITY, str(cfg.default_quantity))
        quantity, quantity_problem = parse_numbers(quantity_raw, "quantity")
        price_raw = text(C.PRICE)
        price, price_problem = parse_numbers(price_raw, "price")
        ts, ts_problem = parse_timestamps(text(C.TS), cfg.ts_format, cfg.timezone, "ts")
        users_raw = self._column(raw, C.USER_ID)
        if users_raw is None:
            users_raw = pd.Series(None, index=index, dtype=object)
        customer_ids, customer_problem = normalize_customer_ids(users_raw.astype("string"))
        customer_ids = customer_ids.astype(object).where(customer_ids.notna(), None)

        events = pd.DataFrame(
            {
                C.EVENT_ID: [self.pseudonymizer.digest("event:generic:" + s) for s in raw_lines],
                C.USER_ID: customer_ids.map(
                    lambda v: self.pseudonymizer.user_id(v) if isinstance(v, str) else None
                ),
                C.ITEM_ID: text(C.ITEM_ID),
                C.EVENT_TYPE: event_type,
                C.QUANTITY: quantity.round().astype("Int64"),
                C.PRICE: price.astype("float64"),
                C.TS: ts,
                C.ORDER_ID: text(C.ORDER_ID),
                C.COUNTRY: text(C.COUNTRY, cfg.default_country),
            }
        )
        events[DESCRIPTION] = text(C.DESCRIPTION) if C.DESCRIPTION in cfg.columns else None
        events[PARSE_PROBLEM] = combine_problems(
            quantity_problem, price_problem, ts_problem, customer_problem
        )
        return events
