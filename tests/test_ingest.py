"""Ingestion of small hand-made landing files: parse, validate, quarantine, count."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from shoprec.config import load_params
from shoprec.ingest import IngestConfig, build_adapter, finalize_batch, process_file
from shoprec.privacy import Pseudonymizer
from shoprec.store import EventStore
from shoprec.validate import ValidationConfig

HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
GOOD = [
    "536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-01 08:26:00,2.55,17850.0,"
    "United Kingdom",
    "536365,71053,WHITE METAL LANTERN,6,2010-12-01 08:26:00,3.39,17850.0,United Kingdom",
    "536366,22633,HAND WARMER UNION JACK,6,2010-12-01 08:28:00,1.85,,United Kingdom",
]
KEY = b"test-key-0123456789abcdef"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def adapter():
    params = load_params(REPO_ROOT / "params.yaml")
    return build_adapter(IngestConfig.model_validate(params["ingest"]), Pseudonymizer(KEY))


@pytest.fixture
def validation() -> ValidationConfig:
    return ValidationConfig.model_validate(load_params(REPO_ROOT / "params.yaml")["validate"])


def write_day(
    tmp_path: Path,
    lines: list[str],
    name: str = "2010-12-01.csv",
    header: str = HEADER,
    encoding: str = "utf-8",
) -> Path:
    path = tmp_path / name
    path.write_bytes(("\n".join([header, *lines]) + "\n").encode(encoding))
    return path


def test_clean_file_stores_every_row(tmp_path, adapter, validation):
    outcome = process_file(write_day(tmp_path, GOOD), adapter, validation)

    assert outcome.rejected_reason is None
    assert outcome.batch.counts["stored"] == 3
    assert outcome.batch.counts["quarantined"] == 0
    assert list(outcome.batch.events["event_type"]) == ["purchase"] * 3
    assert outcome.batch.events["ts"].iloc[0] == pd.Timestamp("2010-12-01 08:26", tz="UTC")


def test_header_only_file_is_rejected(tmp_path, adapter, validation):
    outcome = process_file(write_day(tmp_path, []), adapter, validation)

    assert outcome.batch is None
    assert outcome.rejected_reason == "no_data_rows"
    assert "has no data rows" in outcome.rejected_message


def test_empty_file_is_rejected(tmp_path, adapter, validation):
    path = tmp_path / "2010-12-01.csv"
    path.write_bytes(b"")

    outcome = process_file(path, adapter, validation)

    assert outcome.rejected_reason == "empty_file"


def test_missing_column_is_rejected_with_its_name(tmp_path, adapter, validation):
    header = HEADER.replace(",Country", "")
    lines = [line.rsplit(",", 1)[0] for line in GOOD]

    outcome = process_file(write_day(tmp_path, lines, header=header), adapter, validation)

    assert outcome.rejected_reason == "missing_column"
    assert "'Country' missing from 2010-12-01.csv" in outcome.rejected_message


def test_renamed_column_is_rejected_with_a_hint(tmp_path, adapter, validation):
    header = HEADER.replace("CustomerID", "Customer ID")

    outcome = process_file(write_day(tmp_path, GOOD, header=header), adapter, validation)

    assert outcome.rejected_reason == "missing_column"
    assert "'Customer ID' looks like a renamed 'CustomerID'" in outcome.rejected_message


def test_latin1_bytes_are_rejected_naming_the_offset(tmp_path, adapter, validation):
    line = (
        "536367,84879,ASSORTED BIRD ORNAMENT £2,32,2010-12-01 08:34:00,1.69,13047.0,United Kingdom"
    )

    outcome = process_file(write_day(tmp_path, [line], encoding="latin-1"), adapter, validation)

    assert outcome.rejected_reason == "unreadable_encoding"
    assert "byte 0xa3" in outcome.rejected_message
    assert "ingest.encoding" in outcome.rejected_message


def test_day_first_dates_reject_the_file(tmp_path, adapter, validation):
    lines = [line.replace("2010-12-01 08:26:00", "01/12/2010 08:26") for line in GOOD]
    lines = [line.replace("2010-12-01 08:28:00", "01/12/2010 08:28") for line in lines]

    outcome = process_file(write_day(tmp_path, lines), adapter, validation)

    assert outcome.rejected_reason == "timestamps_unparseable"
    assert "'01/12/2010 08:26' does not match format '%Y-%m-%d %H:%M:%S'" in (
        outcome.rejected_message
    )


def test_one_day_first_date_is_quarantined(tmp_path, adapter, validation):
    lines = [*GOOD, GOOD[0].replace("2010-12-01 08:26:00", "01/12/2010 09:00")]

    outcome = process_file(write_day(tmp_path, lines), adapter, validation)

    quarantine = outcome.batch.quarantine
    assert outcome.batch.counts["stored"] == 3
    assert list(quarantine["rule"]) == ["parse_error; missing_ts"]
    assert "does not match format" in quarantine["detail"].iloc[0]
    assert quarantine["line_number"].iloc[0] == 5


def test_float_customer_ids_become_integer_pseudonyms(tmp_path, adapter, validation):
    outcome = process_file(write_day(tmp_path, GOOD), adapter, validation)

    users = outcome.batch.events["user_id"]
    assert users.iloc[0] == Pseudonymizer(KEY).user_id("17850")
    assert users.iloc[2] is None


def test_fractional_customer_id_is_quarantined(tmp_path, adapter, validation):
    lines = [GOOD[0].replace("17850.0", "17850.5")]

    outcome = process_file(write_day(tmp_path, lines), adapter, validation)

    assert list(outcome.batch.quarantine["rule"]) == ["parse_error"]
    assert outcome.batch.quarantine["detail"].iloc[0] == "customer id is not an integer"


def test_negative_quantity_and_zero_price_are_quarantined(tmp_path, adapter, validation):
    lines = [
        "536368,22960,JAM MAKING SET WITH JARS,-6,2010-12-01 08:34:00,4.25,13047.0,United Kingdom",
        "536369,21756,BATH BUILDING BLOCK WORD,3,2010-12-01 08:35:00,0.0,13047.0,United Kingdom",
        *GOOD,
    ]

    outcome = process_file(write_day(tmp_path, lines), adapter, validation)

    quarantine = outcome.batch.quarantine.set_index("line_number")
    assert quarantine.loc[2, "rule"] == "quantity_out_of_range"
    assert "quantity -6 on purchase order 536368" in quarantine.loc[2, "detail"]
    assert quarantine.loc[3, "rule"] == "price_out_of_range"
    assert outcome.batch.counts["stored"] == 3


def test_cancelled_invoice_becomes_a_return(tmp_path, adapter, validation):
    lines = [
        "C536379,22556,PLASTERS IN TIN CIRCUS PARADE,-12,2010-12-01 09:41:00,1.65,14527.0,"
        "United Kingdom"
    ]

    outcome = process_file(write_day(tmp_path, lines), adapter, validation)

    event = outcome.batch.events.iloc[0]
    assert event["event_type"] == "return"
    assert event["quantity"] == 12
    assert event["order_id"] == "C536379"


def test_duplicate_lines_are_counted_not_stored_twice(tmp_path, adapter, validation):
    outcome = process_file(write_day(tmp_path, [*GOOD, GOOD[1]]), adapter, validation)

    counts = outcome.batch.counts
    assert counts["rows_read"] == 4
    assert counts["stored"] == 3
    assert counts["duplicates"] == 1


def test_unknown_extra_column_is_ignored_and_reported(tmp_path, adapter, validation):
    lines = [line + ",web" for line in GOOD]

    outcome = process_file(
        write_day(tmp_path, lines, header=HEADER + ",Channel"), adapter, validation
    )

    assert outcome.batch.counts["stored"] == 3
    assert outcome.batch.counts["ignored_columns"] == ["Channel"]
    assert "Channel" not in outcome.batch.events.columns


def test_truncated_last_line_is_quarantined_as_malformed(tmp_path, adapter, validation):
    lines = [*GOOD, "536370,22728,ALARM CLOCK BAKELIKE PI"]

    outcome = process_file(write_day(tmp_path, lines), adapter, validation)

    quarantine = outcome.batch.quarantine
    assert list(quarantine["rule"]) == ["malformed_line"]
    assert quarantine["detail"].iloc[0] == "expected 8 fields, found 3"
    assert outcome.batch.counts["stored"] == 3


def test_dates_outside_the_file_day_are_quarantined(tmp_path, adapter, validation):
    lines = [line.replace("2010-12-01", "2010-12-02") for line in GOOD[:2]] + [GOOD[2]]

    outcome = process_file(write_day(tmp_path, lines), adapter, validation)

    rules = outcome.batch.quarantine["rule"]
    assert list(rules) == ["ts_outside_file_day", "ts_outside_file_day"]
    assert outcome.batch.counts["stored"] == 1


def test_non_product_codes_are_quarantined(tmp_path, adapter, validation):
    lines = [
        "536370,POST,POSTAGE,3,2010-12-01 08:45:00,18.0,12583.0,France",
        "536371,gift_0001_20,Dotcomgiftshop Gift Voucher,1,2010-12-01 09:00:00,17.02,,"
        "United Kingdom",
        *GOOD,
    ]

    outcome = process_file(write_day(tmp_path, lines), adapter, validation)

    assert list(outcome.batch.quarantine["rule"]) == ["non_product_code", "non_product_code"]
    assert "POST" not in set(outcome.batch.events["item_id"])


def test_quarantined_line_holds_pseudonym_not_raw_id(tmp_path, adapter, validation):
    lines = [GOOD[0].replace(",6,", ",-6,")]

    outcome = process_file(write_day(tmp_path, lines), adapter, validation)

    source_line = outcome.batch.quarantine["source_line"].iloc[0]
    assert "17850" not in source_line
    assert Pseudonymizer(KEY).user_id("17850") in source_line


def test_rows_already_stored_count_as_duplicates(tmp_path, adapter, validation):
    outcome = process_file(write_day(tmp_path, GOOD), adapter, validation)
    known = {outcome.batch.events["event_id"].iloc[0]}

    batch = finalize_batch(outcome.batch, known)

    assert batch.counts["stored"] == 2
    assert batch.counts["duplicates"] == 1
    assert batch.counts["already_stored"] == 1


def test_corrected_file_adds_only_new_lines(tmp_path, adapter, validation):
    store = EventStore(tmp_path / "data", tmp_path / "staging")
    first = process_file(write_day(tmp_path, GOOD[:2]), adapter, validation)
    store.commit([finalize_batch(first.batch, store.known_event_ids())])
    corrected = process_file(write_day(tmp_path, GOOD), adapter, validation)
    known = store.known_event_ids()

    known.load_dates(["2010-12-01"])
    batch = finalize_batch(corrected.batch, known)

    assert batch.counts["stored"] == 1
    assert batch.counts["already_stored"] == 2
    assert batch.counts["rows_read"] == 3
    assert len(known) == 2


def test_pending_files_filter_dated_names_only(tmp_path):
    from flows.ingest import find_pending_files

    for name in ("2011-03-04.csv", "2011-03-06.csv", "export.csv"):
        (tmp_path / name).write_text(HEADER + "\n")

    pending = find_pending_files(tmp_path, "*.csv", {}, until=date(2011, 3, 5))

    assert [p.name for p in pending] == ["2011-03-04.csv", "export.csv"]
