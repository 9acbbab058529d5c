"""Adapter for the UCI Online Retail daily exports (one CSV per trading day).

Facts of this source that the adapter relies on:
- ``CustomerID`` is exported as a float (``17850.0``). It is empty for shoppers
  who did not log in, and those lines are real purchases without a user.
- An ``InvoiceNo`` starting with ``C`` is a cancellation: its quantity is
  negative and it becomes a ``return`` event with the positive quantity.
- ``InvoiceDate`` is UK local time in ``%Y-%m-%d %H:%M:%S``.
- A file is named after its trading day (``2011-03-04.csv``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from shoprec.adapters.base import (
    DAY_SECONDS,
    DESCRIPTION,
    LINE_NUMBER,
    PARSE_PROBLEM,
    SOURCE_LINE,
    CsvLineRedactor,
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
from shoprec.columns import Columns as C
from shoprec.privacy import Pseudonymizer

logger = logging.getLogger(__name__)

FILE_DAY_PATTERN = re.compile(r"(\d{4}-\d{2}-\d{2})")


class OnlineRetailConfig(BaseModel):
    """How to read an Online Retail export (params.yaml: ingest.online_retail)."""

    encoding: str = "utf-8"
    date_format: str = "%Y-%m-%d %H:%M:%S"
    timezone: str = "Europe/London"
    cancellation_prefix: str = "C"
    columns: list[str] = [
        "InvoiceNo",
        "StockCode",
        "Description",
        "Quantity",
        "InvoiceDate",
        "UnitPrice",
        "CustomerID",
        "Country",
    ]


def file_day(path: Path) -> pd.Timestamp | None:
    """Return the trading day a landing file is named after, if its name contains one."""
    match = FILE_DAY_PATTERN.search(path.name)
    if match is None:
        return None
    return pd.Timestamp(match.group(1))


class OnlineRetailAdapter:
    """Map Online Retail columns to canonical events."""

    name = "online_retail"

    def __init__(self, config: OnlineRetailConfig, pseudonymizer: Pseudonymizer) -> None:
        self.config = config
        self.pseudonymizer = pseudonymizer

    def read(self, path: Path) -> SourceBatch:
        """Parse and normalize one landing file; raise BatchRejectedError for a bad file."""
        cfg = self.config
        data = path.read_bytes()
        text = decode_text(path, data, cfg.encoding)
        lines = split_csv(path, text)
        extra = check_header(path, lines.header, cfg.columns)
        if extra:
            logger.warning("%s: ignoring unknown column(s) %s", path.name, ", ".join(extra))

        # Exact duplicate lines are counted once and the copies dropped.
        seen: set[str] = set()
        unique_index: list[int] = []
        for i, line in enumerate(lines.source_lines):
            if line not in seen:
                seen.add(line)
                unique_index.append(i)
        duplicates = len(lines.records) - len(unique_index)

        width = len(lines.header)
        customer_index = lines.header.index("CustomerID")
        redact = CsvLineRedactor(customer_index, self.pseudonymizer)
        good = [i for i in unique_index if len(lines.records[i]) == width]
        bad = [i for i in unique_index if len(lines.records[i]) != width]
        malformed = malformed_frame(
            path.name,
            [lines.line_numbers[i] for i in bad],
            [redact.redact_record(lines.records[i]) for i in bad],
            [f"expected {width} fields, found {len(lines.records[i])}" for i in bad],
        )

        raw = pd.DataFrame([lines.records[i] for i in good], columns=lines.header, dtype=object)
        raw_lines = pd.Series([lines.source_lines[i] for i in good], dtype=object)
        events = self._normalize(raw, raw_lines, path)
        events[LINE_NUMBER] = np.asarray([lines.line_numbers[i] for i in good], dtype="int64")
        events[SOURCE_LINE] = raw_lines.to_numpy()

        return SourceBatch(
            source_file=path.name,
            file_sha256=hashlib.sha256(data).hexdigest(),
            rows_read=len(lines.records),
            events=events,
            malformed=malformed,
            redact=redact,
            duplicates=duplicates,
            file_day=file_day(path),
            ignored_columns=extra,
        )

    def _normalize(self, raw: pd.DataFrame, raw_lines: pd.Series, path: Path) -> pd.DataFrame:
        cfg = self.config
        order_id = raw["InvoiceNo"].str.strip()
        is_return = order_id.str.startswith(cfg.cancellation_prefix)

        quantity, quantity_problem = parse_numbers(raw["Quantity"], "Quantity")
        fractional = quantity.notna() & (quantity % 1 != 0)
        quantity_problem[fractional] = "Quantity is not an integer"
        quantity = quantity.where(~is_return, quantity.abs())

        price, price_problem = parse_numbers(raw["UnitPrice"], "UnitPrice")
        local_ts = pd.to_datetime(
            raw["InvoiceDate"].str.strip(), format=cfg.date_format, errors="coerce"
        )
        ts, ts_problem = parse_timestamps(
            raw["InvoiceDate"], cfg.date_format, cfg.timezone, "InvoiceDate"
        )
        customer_ids, customer_problem = normalize_customer_ids(raw["CustomerID"])
        unique_ids = customer_ids.dropna().unique()
        pseudonyms = {raw_id: self.pseudonymizer.user_id(raw_id) for raw_id in unique_ids}

        events = pd.DataFrame(
            {
                C.EVENT_ID: [
                    self.pseudonymizer.digest("event:" + self.name + ":" + line)
                    for line in raw_lines
                ],
                C.USER_ID: customer_ids.map(pseudonyms).astype(object),
                C.ITEM_ID: raw["StockCode"].str.strip(),
                C.EVENT_TYPE: np.where(is_return, "return", "purchase"),
                C.QUANTITY: quantity.round().astype("Int64"),
                C.PRICE: price.astype("float64"),
                C.TS: ts,
                C.ORDER_ID: order_id,
                C.COUNTRY: raw["Country"].str.strip(),
            }
        )
        users = events[C.USER_ID]
        events[C.USER_ID] = users.where(users.notna() & customer_problem.isna(), None)
        events[DESCRIPTION] = raw["Description"].str.strip()
        day = file_day(path)
        if day is not None:
            events[DAY_SECONDS] = (local_ts - day).dt.total_seconds()
        events[PARSE_PROBLEM] = combine_problems(
            quantity_problem, price_problem, ts_problem, customer_problem
        )
        for column in (C.ITEM_ID, C.ORDER_ID, C.COUNTRY):
            events.loc[events[column] == "", column] = None
        return events
