"""The batch type every source adapter returns, and the parsing helpers they share.

An adapter turns one landing file into a `SourceBatch`: canonical event
columns (typed, possibly with nulls where a value could not be parsed), plus
per-row bookkeeping (line number, source line, parse problems) that
validation and quarantine need. Rows an adapter cannot split into fields at
all are returned separately as malformed.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shoprec.columns import QuarantineColumns as Q
from shoprec.exceptions import BatchRejectedError
from shoprec.privacy import Pseudonymizer

# Bookkeeping columns carried next to the canonical ones until the store write.
LINE_NUMBER = "_line_number"
SOURCE_LINE = "_source_line"
PARSE_PROBLEM = "_parse_problem"
DESCRIPTION = "_description"
DAY_SECONDS = "ts_seconds_into_day"


class CsvLineRedactor:
    """Replace the customer id field of a raw CSV line by its pseudonym."""

    def __init__(self, field_index: int | None, pseudonymizer: Pseudonymizer) -> None:
        self.field_index = field_index
        self.pseudonymizer = pseudonymizer

    def redact_record(self, record: list[str]) -> str:
        fields = list(record)
        index = self.field_index
        if index is not None and index < len(fields):
            raw = re.sub(r"\.0+$", "", fields[index].strip())
            fields[index] = self.pseudonymizer.user_id(raw) if raw else ""
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="").writerow(fields)
        return buffer.getvalue()

    def __call__(self, line: str) -> str:
        return self.redact_record(next(csv.reader([line]), []))


class JsonRowRedactor:
    """Replace the customer id of a row serialized as JSON by its pseudonym."""

    def __init__(self, column: str | None, pseudonymizer: Pseudonymizer) -> None:
        self.column = column
        self.pseudonymizer = pseudonymizer

    def __call__(self, line: str) -> str:
        row = json.loads(line)
        if self.column is not None and row.get(self.column):
            raw_id = str(row[self.column]).strip().removesuffix(".0")
            row[self.column] = self.pseudonymizer.user_id(raw_id)
        return json.dumps(row, sort_keys=True, default=str)


@dataclass
class SourceBatch:
    """One landing file after parsing and normalization, before validation.

    ``events[SOURCE_LINE]`` contains the raw source line, which may contain a raw
    customer id: it is never written. Quarantine stores ``redact(line)`` instead.
    """

    source_file: str
    file_sha256: str
    rows_read: int
    events: pd.DataFrame
    malformed: pd.DataFrame
    redact: CsvLineRedactor | JsonRowRedactor
    duplicates: int = 0
    file_day: pd.Timestamp | None = None
    ignored_columns: list[str] = field(default_factory=list)


@dataclass
class CsvLines:
    """Data records of a CSV file with the line they came from."""

    header: list[str]
    records: list[list[str]]
    line_numbers: list[int]
    source_lines: list[str]


def decode_text(path: Path, data: bytes, encoding: str) -> str:
    """Decode a landing file, rejecting it whole when the bytes do not match `encoding`."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise BatchRejectedError(
            path.name,
            "unreadable_encoding",
            f"{path.name}: byte 0x{data[error.start]:02x} at offset {error.start} (line {line}) "
            f"is not valid {encoding}; re-export the file as {encoding} or set "
            "ingest.encoding in params.yaml to the file's encoding (e.g. latin-1)",
        ) from error


def split_csv(path: Path, text: str) -> CsvLines:
    """Split CSV text into records, keeping each record's line number and text."""
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise BatchRejectedError(
            path.name,
            "empty_file",
            f"{path.name} is empty: expected a header line and at least one data line",
        )

    reader = csv.reader(lines)
    header = [name.strip() for name in next(reader)]
    records: list[list[str]] = []
    line_numbers: list[int] = []
    source_lines: list[str] = []
    start = reader.line_num
    for record in reader:
        end = reader.line_num
        if record:
            records.append(record)
            line_numbers.append(start + 1)
            source_lines.append("\n".join(lines[start:end]))
        start = end
    return CsvLines(header, records, line_numbers, source_lines)


def check_header(path: Path, header: list[str], required: list[str]) -> list[str]:
    """Reject a file missing a required column; return the extra columns it has."""
    missing = [name for name in required if name not in header]
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, header, n=1, cutoff=0.6)
            if close:
                hints.append(f"'{close[0]}' looks like a renamed '{name}'")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise BatchRejectedError(
            path.name,
            "missing_column",
            f"column(s) {', '.join(repr(m) for m in missing)} missing from {path.name}{hint}; "
            f"expected {','.join(required)}, found {','.join(header)}. Fix the export or map "
            "the columns in params.yaml (ingest.generic.columns)",
        )
    return [name for name in header if name not in required]


def parse_numbers(values: pd.Series, name: str) -> tuple[pd.Series, pd.Series]:
    """Parse decimal strings; return the numbers and a problem text per unparseable value."""
    numbers = pd.to_numeric(values.str.strip(), errors="coerce")
    bad = numbers.isna() & values.notna()
    problems = pd.Series(None, index=values.index, dtype=object)
    problems[bad] = f"{name} is not a number: '" + values[bad].astype(str) + "'"
    return numbers, problems


def parse_timestamps(
    values: pd.Series, fmt: str, timezone: str, name: str
) -> tuple[pd.Series, pd.Series]:
    """Parse timestamps with an explicit format, localize them and convert to UTC."""
    parsed = pd.to_datetime(values.str.strip(), format=fmt, errors="coerce")
    problems = pd.Series(None, index=values.index, dtype=object)
    bad = parsed.isna() & values.notna()
    problems[bad] = f"{name} '" + values[bad].astype(str) + f"' does not match format '{fmt}'"
    if parsed.dt.tz is None:
        parsed = parsed.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
        ambiguous = parsed.isna() & ~bad & values.notna()
        problems[ambiguous] = f"{name} is ambiguous or does not exist in {timezone}"
    return parsed.dt.tz_convert("UTC"), problems


def normalize_customer_ids(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Turn ids such as '17850.0' into '17850'; empty means an unidentified shopper."""
    stripped = values.fillna("").str.strip()
    integral = stripped.str.replace(r"\.0+$", "", regex=True)
    ids = integral.where(integral != "", None)
    problems = pd.Series(None, index=values.index, dtype=object)
    fractional = stripped.str.fullmatch(r"\d+\.\d*[1-9]\d*")
    problems[fractional] = "customer id is not an integer"
    return ids, problems


def combine_problems(*problems: pd.Series) -> pd.Series:
    """Join per-row problem texts with '; ', keeping None where a row has none."""
    result = pd.Series(None, index=problems[0].index, dtype=object)
    for problem in problems:
        has = problem.notna()
        both = has & result.notna()
        only = has & result.isna()
        result[both] = result[both] + "; " + problem[both]
        result[only] = problem[only]
    return result


def malformed_frame(
    source_file: str, line_numbers: list[int], source_lines: list[str], details: list[str]
) -> pd.DataFrame:
    """Build quarantine rows for lines that could not be split into the expected fields."""
    return pd.DataFrame(
        {
            Q.SOURCE_FILE: source_file,
            Q.LINE_NUMBER: np.asarray(line_numbers, dtype="int64"),
            Q.RULE: "malformed_line",
            Q.DETAIL: details,
            Q.SOURCE_LINE: source_lines,
        }
    )
