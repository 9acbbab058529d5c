"""Validation of a normalized batch with Great Expectations (GX Core 1.x).

Row-level expectations decide which rows go to quarantine: each failed row
keeps the rule names of the expectations it broke. Batch-level expectations
(no rows, mostly unparseable timestamps) reject the whole file.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from shoprec.adapters.base import DAY_SECONDS, PARSE_PROBLEM, SOURCE_LINE
from shoprec.columns import EVENT_TYPES
from shoprec.columns import Columns as C

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400
_CONTEXT_LOCK = threading.Lock()
_CONTEXT: dict[str, Any] = {}


class ValidationConfig(BaseModel):
    """Bounds of plausible values (params.yaml: validate)."""

    min_quantity: int = 1
    max_quantity: int = 100_000
    min_price: float = 0.001
    max_price: float = 10_000.0
    min_parsed_ts_share: float = 0.5
    non_product_codes: list[str] = []
    non_product_pattern: str | None = None
    user_id_pattern: str = r"^u[0-9a-f]{16}$"


@dataclass
class ValidationOutcome:
    """Result of one GX validation run, mapped to rows."""

    success: bool
    row_rules: pd.Series  # per row: "rule1; rule2", or None for a valid row
    batch_failures: list[str]
    summary: dict[str, Any]


def _expectations(config: ValidationConfig, with_day: bool) -> list[tuple[str, str, Any]]:
    """Return (level, rule, expectation) triples of the suite."""
    import great_expectations.expectations as gxe

    required = [C.EVENT_ID, C.ITEM_ID, C.EVENT_TYPE, C.QUANTITY, C.PRICE, C.ORDER_ID, C.COUNTRY]
    rules: list[tuple[str, str, Any]] = [
        ("batch", "no_data_rows", gxe.ExpectTableRowCountToBeBetween(min_value=1)),
        ("row", "parse_error", gxe.ExpectColumnValuesToBeNull(column=PARSE_PROBLEM)),
        ("row", "missing_ts", gxe.ExpectColumnValuesToNotBeNull(column=C.TS)),
    ]
    rules += [
        ("row", f"missing_{column}", gxe.ExpectColumnValuesToNotBeNull(column=column))
        for column in required
    ]
    rules += [
        ("row", "duplicate_event_id", gxe.ExpectColumnValuesToBeUnique(column=C.EVENT_ID)),
        (
            "row",
            "unknown_event_type",
            gxe.ExpectColumnValuesToBeInSet(column=C.EVENT_TYPE, value_set=list(EVENT_TYPES)),
        ),
        (
            "row",
            "quantity_out_of_range",
            gxe.ExpectColumnValuesToBeBetween(
                column=C.QUANTITY, min_value=config.min_quantity, max_value=config.max_quantity
            ),
        ),
        (
            "row",
            "price_out_of_range",
            gxe.ExpectColumnValuesToBeBetween(
                column=C.PRICE, min_value=config.min_price, max_value=config.max_price
            ),
        ),
        (
            "row",
            "invalid_user_id",
            gxe.ExpectColumnValuesToMatchRegex(column=C.USER_ID, regex=config.user_id_pattern),
        ),
        (
            "row",
            "non_product_code",
            gxe.ExpectColumnValuesToNotBeInSet(
                column=C.ITEM_ID, value_set=config.non_product_codes or ["\x00"]
            ),
        ),
    ]
    if config.non_product_pattern:
        rules.append(
            (
                "row",
                "non_product_code",
                gxe.ExpectColumnValuesToNotMatchRegex(
                    column=C.ITEM_ID, regex=config.non_product_pattern
                ),
            )
        )
    if with_day:
        rules.append(
            (
                "row",
                "ts_outside_file_day",
                gxe.ExpectColumnValuesToBeBetween(
                    column=DAY_SECONDS, min_value=0, max_value=SECONDS_PER_DAY - 1
                ),
            )
        )
    return rules


def _checkpoint(config: ValidationConfig, with_day: bool, docs_dir: Path | None) -> Any:
    """Build (once per process) the GX context, suite, validation definition and checkpoint.

    With `docs_dir`, every run also updates a GX Data Docs site in that folder.
    """
    # Resolved, so that a relative docs folder of another working directory gets its own site.
    docs_dir = Path(docs_dir).resolve() if docs_dir is not None else None
    key = f"{config.model_dump_json()}|{with_day}|{docs_dir}"
    cached = _CONTEXT.get(key)
    if cached is not None:
        return cached

    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = _CONTEXT.get("context")
    if context is None:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        _CONTEXT["context"] = context
    name = f"events_{len(_CONTEXT)}"
    batch = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset("normalized_batch")
        .add_batch_definition_whole_dataframe("whole_file")
    )
    suite = gx.ExpectationSuite(name=f"{name}_suite")
    for level, rule, expectation in _expectations(config, with_day):
        expectation.meta = {"rule": rule, "level": level}
        suite.add_expectation(expectation)
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite)
    )
    actions = []
    if docs_dir is not None:
        site = f"{name}_docs"
        context.add_data_docs_site(
            site,
            {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(UpdateDataDocsAction(name="update_data_docs", site_names=[site]))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"{name}_checkpoint",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "COMPLETE", "include_unexpected_rows": False},
        )
    )
    _CONTEXT[key] = checkpoint
    return checkpoint


def validate_events(
    events: pd.DataFrame,
    config: ValidationConfig,
    docs_dir: Path | None = None,
    run_name: str | None = None,
) -> ValidationOutcome:
    """Run the expectation suite on a normalized batch and map failures to rows.

    With `docs_dir`, the result is also rendered into the GX Data Docs site there.
    """
    import great_expectations as gx

    frame = events.drop(columns=[SOURCE_LINE], errors="ignore").reset_index(drop=True)
    frame[C.QUANTITY] = frame[C.QUANTITY].astype("float64")
    with_day = DAY_SECONDS in frame.columns

    with _CONTEXT_LOCK:
        checkpoint = _checkpoint(config, with_day, docs_dir)
        run_id = gx.core.run_identifier.RunIdentifier(run_name=run_name or "shoprec-validation")
        checkpoint_result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
    result = next(iter(checkpoint_result.run_results.values()))

    row_rules: list[list[str]] = [[] for _ in range(len(frame))]
    batch_failures: list[str] = []
    expectations = []
    for item in result.results:
        meta = item.expectation_config.meta or {}
        rule = meta.get("rule", item.expectation_config.type)
        details = item.result or {}
        unexpected = details.get("unexpected_count")
        expectations.append(
            {
                "rule": rule,
                "level": meta.get("level"),
                "expectation": item.expectation_config.type,
                "column": item.expectation_config.kwargs.get("column"),
                "success": bool(item.success),
                "unexpected_count": unexpected,
            }
        )
        if item.success:
            continue
        if meta.get("level") == "batch":
            batch_failures.append(rule)
            continue
        for index in details.get("unexpected_index_list") or []:
            row = index if isinstance(index, int) else index.get("index")
            if rule not in row_rules[row]:
                row_rules[row].append(rule)

    rules_series = pd.Series(
        ["; ".join(rules) if rules else None for rules in row_rules], dtype=object
    )
    summary = {
        "success": bool(result.success),
        "rows": len(frame),
        "rows_failed": int(rules_series.notna().sum()),
        "statistics": dict(result.statistics),
        "expectations": expectations,
    }
    logger.debug("validated %d rows: %d failed", len(frame), summary["rows_failed"])
    return ValidationOutcome(bool(result.success), rules_series, batch_failures, summary)
