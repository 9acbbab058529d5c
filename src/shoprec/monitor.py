"""Drift and online-quality monitoring of the champion: frames, Evidently report, retrain rule.

The monitor compares one day of the event store (the current window) with the end of the
window the champion was trained on (the reference window). Features of three granularities
are stacked into one frame, each column being non-null only on rows of its own granularity:

- event rows: ``price``, ``quantity``, ``event_type``, ``item_is_new`` (the item's first event
  in the store is on that day) and ``item_popularity`` (log1p of the item's buyers in the
  reference window, 0 for items unseen there);
- basket rows, one per purchase invoice: ``basket_size`` (distinct items), ``basket_value``,
  ``country`` and ``customer`` (new, returning or anonymous);
- prediction rows, the champion's top-k for sampled returning users: ``score`` and ``source``.

Evidently's drift tests drop missing values, so each column is tested on its own rows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from shoprec.columns import Columns
from shoprec.exceptions import ShoprecError
from shoprec.monitor_data import (
    Recommends,
    Window,
    active_users,
    build_feature_frame,
    in_window,
    item_popularity,
    prediction_rows,
    reference_predictions,
    score_window,
)

logger = logging.getLogger(__name__)

NUMERICAL_COLUMNS: tuple[str, ...] = (
    "price",
    "quantity",
    "item_popularity",
    "basket_size",
    "basket_value",
    "score",
)
CATEGORICAL_COLUMNS: tuple[str, ...] = (
    "event_type",
    "item_is_new",
    "country",
    "customer",
    "source",
)

RETRAIN = "retrain"
KEEP = "keep"
SKIP = "skip"


class MonitorError(ShoprecError):
    """Monitoring inputs are missing or invalid."""


class MonitorConfig(BaseModel):
    """The ``monitor`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    window_days: int = Field(default=1, ge=1)
    reference_days: int = Field(default=60, ge=1)
    max_reference_rows: int = Field(default=40000, ge=100)
    num_method: str = "wasserstein"
    cat_method: str = "jensenshannon"
    threshold: float = Field(default=0.1, gt=0)
    per_column_threshold: dict[str, float] = Field(default_factory=dict)
    max_drift_share: float = Field(default=0.5, gt=0, le=1)
    critical_columns: list[str] = Field(default_factory=lambda: ["price"])
    quality_metric: str = "ndcg@10"
    max_quality_drop: float = Field(default=0.5, ge=0, le=1)
    quality_window_days: int = Field(default=7, ge=1)
    max_model_age_days: int = Field(default=60, ge=1)
    min_rows: int = Field(default=200, ge=1)
    min_users: int = Field(default=20, ge=1)
    max_users: int = Field(default=120, ge=1)
    reference_users: int = Field(default=80, ge=1)
    k: int = Field(default=10, ge=1)
    seed: int = 42


@dataclass
class DriftResult:
    """Outcome of the Evidently drift report over the tested columns."""

    drift_share: float | None
    columns: dict[str, dict[str, Any]]
    snapshot: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def drifted_columns(self) -> list[str]:
        return sorted(name for name, info in self.columns.items() if info.get("drifted"))


@dataclass(frozen=True)
class Decision:
    """The retrain decision of one monitored day with one reason per rule that fired."""

    action: str
    reasons: list[str]


def _utc(day: date | pd.Timestamp | str) -> pd.Timestamp:
    stamp = pd.Timestamp(day)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def current_window(day: date, config: MonitorConfig) -> Window:
    """Return the window of ``config.window_days`` days ending with ``day``."""
    end = _utc(day) + pd.Timedelta(days=1)
    return Window(end - pd.Timedelta(days=config.window_days), end)


def reference_window(
    training_window: dict[str, str] | None, current: Window, config: MonitorConfig
) -> Window:
    """Return the last ``reference_days`` of the training window.

    Without a training window (a model registered without one), the ``reference_days`` days
    before the current window are the reference.
    """
    if training_window and training_window.get("end"):
        end = min(_utc(training_window["end"]), current.start)
        start = end - pd.Timedelta(days=config.reference_days)
        if training_window.get("start"):
            start = max(start, _utc(training_window["start"]))
    else:
        logger.warning("champion has no training window; using the days before the current one")
        end = current.start
        start = end - pd.Timedelta(days=config.reference_days)
    if start >= end:
        raise MonitorError(
            f"reference window [{start}, {end}) is empty; the training window {training_window} "
            "must end after it starts"
        )
    return Window(start, end)


def describe_columns(reference: pd.DataFrame, current: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Describe each monitored column; ``tested`` is False when a side has no value.

    Constant columns and categories missing from the reference are noted, not excluded.
    """
    info: dict[str, dict[str, Any]] = {}
    for name in (*NUMERICAL_COLUMNS, *CATEGORICAL_COLUMNS):
        ref = reference[name].dropna() if name in reference else pd.Series(dtype=object)
        cur = current[name].dropna() if name in current else pd.Series(dtype=object)
        entry: dict[str, Any] = {
            "kind": "numerical" if name in NUMERICAL_COLUMNS else "categorical",
            "n_reference": int(len(ref)),
            "n_current": int(len(cur)),
            "tested": bool(len(ref) and len(cur)),
            "notes": [],
        }
        if not len(cur):
            entry["notes"].append("empty in the current window: not tested")
        elif not len(ref):
            entry["notes"].append("empty in the reference window: not tested")
        elif cur.nunique() == 1:
            entry["notes"].append(f"constant in the current window ({cur.iloc[0]})")
        if entry["tested"] and entry["kind"] == "categorical":
            unseen = cur[~cur.isin(set(ref))]
            if len(unseen):
                counts = unseen.value_counts().head(5)
                listed = ", ".join(f"{value} ({count} rows)" for value, count in counts.items())
                entry["unseen"] = {str(k): int(v) for k, v in unseen.value_counts().items()}
                entry["notes"].append(f"categories unseen in the reference: {listed}")
        info[name] = entry
    return info


def run_drift_report(
    reference: pd.DataFrame, current: pd.DataFrame, config: MonitorConfig
) -> DriftResult:
    """Run Evidently's DataDriftPreset on every column with values on both sides."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = describe_columns(reference, current)
    tested = [name for name, info in columns.items() if info["tested"]]
    notes = [f"{name}: {note}" for name, info in columns.items() for note in info["notes"]]
    if not tested:
        return DriftResult(None, columns, None, [*notes, "no column has values on both sides"])

    numerical = [c for c in tested if c in NUMERICAL_COLUMNS]
    categorical = [c for c in tested if c in CATEGORICAL_COLUMNS]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    preset = DataDriftPreset(
        columns=tested,
        num_method=config.num_method,
        cat_method=config.cat_method,
        threshold=config.threshold,
        per_column_threshold={k: v for k, v in config.per_column_threshold.items() if k in tested}
        or None,
        drift_share=config.max_drift_share,
    )
    report = Report([preset], include_tests=True)
    snapshot = report.run(
        Dataset.from_pandas(current[tested].reset_index(drop=True), data_definition=definition),
        Dataset.from_pandas(reference[tested].reset_index(drop=True), data_definition=definition),
    )

    content = snapshot.dict()
    share = None
    for metric in content["metrics"]:
        kind = metric["config"]["type"]
        if kind.endswith("DriftedColumnsCount"):
            share = float(metric["value"]["share"])
        elif kind.endswith("ValueDrift"):
            name = metric["config"]["column"]
            columns[name]["score"] = round(float(metric["value"]), 6)
            columns[name]["method"] = metric["config"].get("method")
            columns[name]["threshold"] = metric["config"].get("threshold")
    for test in content["tests"]:
        params = test["metric_config"]["params"]
        if params["type"].endswith("ValueDrift"):
            columns[params["column"]]["drifted"] = test["status"] == "FAIL"
    return DriftResult(share, columns, snapshot, notes)


def model_age_days(training_window: dict[str, str] | None, day: date) -> int | None:
    """Return the days from the end of the training window to ``day``, or None when unknown."""
    if not training_window or not training_window.get("end"):
        return None
    return int((_utc(day) - _utc(training_window["end"]).floor("D")).days)


def training_quality(metrics: dict[str, Any] | None, metric: str) -> float | None:
    """Return the two-stage ``metric`` of variant ``all`` from a model's metrics, if present."""
    value = ((metrics or {}).get("all") or {}).get("two_stage", {}).get(metric)
    return None if value is None or math.isnan(float(value)) else float(value)


def decide_retraining(
    *,
    n_rows: int,
    n_buyers: int,
    drift: DriftResult,
    recent_quality: list[float],
    reference_quality: float | None,
    age_days: int | None,
    config: MonitorConfig,
) -> Decision:
    """Apply the retrain rule of params.yaml ``monitor`` to one day's measurements.

    A day with fewer than ``min_rows`` events or ``min_users`` identified buyers is skipped, so
    nothing measured on it can trigger a retrain. On other days each of these rules triggers it:
    - the drift share reaches ``max_drift_share``, or a critical column drifted;
    - the mean online quality of the last ``quality_window_days`` monitored days is more than
      ``max_quality_drop`` (relative) below the training-time value;
    - the model's training data ended more than ``max_model_age_days`` days ago.
    """
    if n_rows < config.min_rows or n_buyers < config.min_users:
        return Decision(
            SKIP,
            [
                f"day too small to judge: {n_rows} events (min {config.min_rows}), "
                f"{n_buyers} identified buyers (min {config.min_users})"
            ],
        )

    reasons = []
    if drift.drift_share is not None and drift.drift_share >= config.max_drift_share:
        reasons.append(
            f"drift share {drift.drift_share:.2f} >= {config.max_drift_share} "
            f"(drifted: {', '.join(drift.drifted_columns)})"
        )
    critical = [c for c in config.critical_columns if c in drift.drifted_columns]
    if critical:
        reasons.append(f"critical column(s) drifted: {', '.join(critical)}")
    if recent_quality and reference_quality:
        mean_quality = float(np.mean(recent_quality))
        floor = reference_quality * (1 - config.max_quality_drop)
        if mean_quality < floor:
            reasons.append(
                f"online {config.quality_metric} {mean_quality:.4f} (mean of last "
                f"{len(recent_quality)} days) < {floor:.4f}, i.e. more than "
                f"{config.max_quality_drop:.0%} below training-time {reference_quality:.4f}"
            )
    if age_days is not None and age_days > config.max_model_age_days:
        reasons.append(f"model data ends {age_days} days ago (max {config.max_model_age_days})")

    if reasons:
        return Decision(RETRAIN, reasons)
    share = "n/a" if drift.drift_share is None else f"{drift.drift_share:.2f}"
    return Decision(KEEP, [f"no retrain rule fired (drift share {share})"])


@dataclass
class DayResult:
    """Everything measured on one monitored window, and the decision taken."""

    day: date
    current: Window
    reference: Window
    n_rows: int
    n_buyers: int
    n_returning: int
    quality: dict[str, float | int]
    drift: DriftResult
    decision: Decision
    age_days: int | None
    reference_quality: float | None
    recent_quality: list[float]

    def to_summary(self) -> dict[str, Any]:
        """Return the JSON-ready summary written to reports/drift/<date>.json."""
        return {
            "day": self.day.isoformat(),
            "current_window": self.current.to_dict(),
            "reference_window": self.reference.to_dict(),
            "n_rows": self.n_rows,
            "n_buyers": self.n_buyers,
            "n_returning_buyers": self.n_returning,
            "drift_share": self.drift.drift_share,
            "drifted_columns": self.drift.drifted_columns,
            "columns": self.drift.columns,
            "notes": self.drift.notes,
            "online_quality": self.quality,
            "training_quality": self.reference_quality,
            "recent_quality": self.recent_quality,
            "model_age_days": self.age_days,
            "decision": self.decision.action,
            "reasons": self.decision.reasons,
        }


def monitor_day(
    events: pd.DataFrame,
    model: Recommends,
    day: date,
    *,
    training_window: dict[str, str] | None,
    model_metrics: dict[str, Any] | None,
    previous_quality: list[float],
    config: MonitorConfig,
    reference_predictions_frame: pd.DataFrame | None = None,
) -> DayResult:
    """Measure drift and online quality of ``day`` and decide whether to retrain.

    ``events`` is the store up to at least the end of ``day``; ``previous_quality`` contains
    the online ``quality_metric`` of the model's earlier monitored days, oldest first.
    """
    current = current_window(day, config)
    reference = reference_window(training_window, current, config)
    history = events[events[Columns.TS] < current.end]

    # Data: stacked event and basket rows of both windows.
    popularity = item_popularity(history, reference)
    reference_frame = build_feature_frame(history, reference, popularity)
    if len(reference_frame) > config.max_reference_rows:
        reference_frame = reference_frame.sample(
            config.max_reference_rows, random_state=config.seed
        )
    current_frame = build_feature_frame(history, current, popularity)

    # Predictions and online quality: the champion's top-k made before the window.
    returning, new = active_users(history, current)
    recommendations, quality = score_window(model, history, current, config)
    inside = in_window(history, current)
    if reference_predictions_frame is None:
        reference_predictions_frame = reference_predictions(model, history, reference, config)
    reference_frame = pd.concat([reference_frame, reference_predictions_frame], ignore_index=True)
    current_frame = pd.concat([current_frame, prediction_rows(recommendations)], ignore_index=True)

    drift = run_drift_report(reference_frame, current_frame, config)
    recent = list(previous_quality)
    if config.quality_metric in quality:
        recent.append(float(quality[config.quality_metric]))
    recent = recent[-config.quality_window_days :]
    reference_quality = training_quality(model_metrics, config.quality_metric)
    age = model_age_days(training_window, day)
    decision = decide_retraining(
        n_rows=int(len(inside)),
        n_buyers=int(len(returning) + len(new)),
        drift=drift,
        recent_quality=recent,
        reference_quality=reference_quality,
        age_days=age,
        config=config,
    )
    logger.info(
        "monitor %s: %d events, %d buyers, drift share %s, %s %s -> %s",
        day,
        len(inside),
        len(returning) + len(new),
        drift.drift_share,
        config.quality_metric,
        quality.get(config.quality_metric),
        decision.action,
    )
    return DayResult(
        day=day,
        current=current,
        reference=reference,
        n_rows=int(len(inside)),
        n_buyers=int(len(returning) + len(new)),
        n_returning=int(len(returning)),
        quality=quality,
        drift=drift,
        decision=decision,
        age_days=age,
        reference_quality=reference_quality,
        recent_quality=recent,
    )
