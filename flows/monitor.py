"""Prefect flow ``monitor``: drift and online quality of the newest day, and the retrain decision.

Run it with ``shoprec monitor``, ``python flows/monitor.py`` or the ``monitor`` deployment of
prefect.yaml. It writes reports/drift/<date>.json and .html and reports/drift/index.html. When
the decision is "retrain" it emits the event ``shoprec.monitor.retrain-requested`` and, when
``start_training`` is set, starts the training flow itself: as a subflow in a local run, through
the ``train/train`` deployment when it runs inside a deployment.
"""

from __future__ import annotations

import functools
from datetime import date
from pathlib import Path
from typing import Any

import bentoml
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shoprec import registry
from shoprec.bundle import ModelBundle
from shoprec.columns import Columns
from shoprec.config import Settings, load_params
from shoprec.monitor import (
    RETRAIN,
    DayResult,
    MonitorConfig,
    MonitorError,
    current_window,
    monitor_day,
    reference_window,
)
from shoprec.monitor_data import reference_predictions
from shoprec.monitor_report import (
    previous_quality,
    read_day_summaries,
    write_day_report,
    write_index,
)
from shoprec.store import read_events

RETRAIN_EVENT = "shoprec.monitor.retrain-requested"
TRAIN_DEPLOYMENT = "train/train"
DRIFT_DIR = "drift"
# Label of the emitted event: "automation" when the prefect.yaml trigger is to start training,
# "flow" when the monitor flow starts it itself.
ROUTE_LABEL = "shoprec.retrain.route"


@functools.lru_cache(maxsize=4)
def load_champion_bundle(tag: str) -> ModelBundle:
    """Load a registered model's bundle once per process (the replay monitors many days)."""
    return ModelBundle.load(registry.bundle_dir(bentoml.models.get(tag)))


def champion_info() -> tuple[str, dict[str, Any]]:
    """Return the champion's tag and metadata, or raise when there is none."""
    champion = registry.get_champion()
    if champion is None:
        raise registry.RegistryError(
            "no champion model in the BentoML store; run 'shoprec train' before monitoring"
        )
    return str(champion.tag), dict(champion.info.metadata)


@task(name="monitor-day", cache_policy=NO_CACHE)
def run_monitor_day(
    events: pd.DataFrame,
    tag: str,
    metadata: dict[str, Any],
    day: date,
    config: MonitorConfig,
    drift_dir: Path,
) -> dict[str, Any]:
    """Measure one day against the champion and write its reports; return its summary."""
    bundle = load_champion_bundle(tag)
    summaries = read_day_summaries(drift_dir)
    earlier = previous_quality(summaries, tag, day.isoformat(), config.quality_metric)
    training_window = metadata.get("training_window") or bundle.metadata.get("training_window")
    result: DayResult = monitor_day(
        events,
        bundle,
        day,
        training_window=training_window,
        model_metrics=metadata.get("metrics"),
        previous_quality=earlier,
        config=config,
        reference_predictions_frame=reference_predictions_cache(
            tag, events, bundle, training_window, day, config
        ),
    )
    summary = {"model_tag": tag, **result.to_summary()}
    write_day_report(result, summary, drift_dir)
    write_index(drift_dir)
    return summary


_REFERENCE_PREDICTIONS: dict[str, pd.DataFrame] = {}


def reference_predictions_cache(
    tag: str,
    events: pd.DataFrame,
    bundle: ModelBundle,
    training_window: dict[str, str] | None,
    day: date,
    config: MonitorConfig,
) -> pd.DataFrame:
    """Return the model's reference predictions, computed once per model and process."""
    if tag not in _REFERENCE_PREDICTIONS:
        reference = reference_window(training_window, current_window(day, config), config)
        _REFERENCE_PREDICTIONS[tag] = reference_predictions(bundle, events, reference, config)
    return _REFERENCE_PREDICTIONS[tag]


def request_retraining(
    tag: str,
    summary: dict[str, Any],
    start_training: bool,
    project_dir: Path,
    repro_cmd: list[str] | None,
) -> dict[str, Any] | None:
    """Emit the retrain event and, with ``start_training``, run the training flow."""
    from prefect.events import emit_event
    from prefect.runtime import deployment

    logger = get_run_logger()
    in_deployment = deployment.id is not None
    emit_event(
        event=RETRAIN_EVENT,
        resource={
            "prefect.resource.id": f"shoprec.model.{tag}",
            ROUTE_LABEL: "flow" if start_training else "automation",
        },
        payload={"day": summary["day"], "reasons": summary["reasons"]},
    )
    logger.info("emitted %s for %s: %s", RETRAIN_EVENT, tag, "; ".join(summary["reasons"]))
    if not start_training:
        return None

    if in_deployment:
        from prefect.deployments import run_deployment

        # timeout=0 returns once the run is scheduled, so this worker does not wait for training.
        run = run_deployment(
            TRAIN_DEPLOYMENT, parameters={"project_dir": str(project_dir)}, timeout=0
        )
        logger.info("scheduled deployment %s: flow run %s", TRAIN_DEPLOYMENT, run.id)
        return {"flow_run_id": str(run.id), "state": run.state_name}

    from flows.train import train

    return train(project_dir=project_dir, repro_cmd=repro_cmd)


@flow(name="monitor", log_prints=False)
def monitor(
    day: date | None = None,
    project_dir: Path = Path("."),
    start_training: bool = True,
    repro_cmd: list[str] | None = None,
) -> dict[str, Any]:
    """Monitor ``day`` (default: the newest day in the store) and retrain when the rule fires.

    ``repro_cmd`` is passed to the training flow of a local run (default ``dvc repro``).
    """
    logger = get_run_logger()
    settings = Settings()
    project_dir = project_dir.resolve()
    params = load_params(project_dir / settings.params_file)
    config = MonitorConfig.model_validate(params.get("monitor", {}))
    data_dir = (
        settings.data_dir if settings.data_dir.is_absolute() else project_dir / settings.data_dir
    )
    reports_dir = (
        settings.reports_dir
        if settings.reports_dir.is_absolute()
        else project_dir / settings.reports_dir
    )

    events = read_events(data_dir)
    if events.empty:
        raise MonitorError(f"event store {data_dir} contains no events; run 'shoprec ingest' first")
    if day is None:
        day = events[Columns.TS].max().date()
    tag, metadata = champion_info()
    logger.info("monitoring %s against champion %s", day, tag)

    summary = run_monitor_day(events, tag, metadata, day, config, reports_dir / DRIFT_DIR)
    logger.info("decision for %s: %s (%s)", day, summary["decision"], "; ".join(summary["reasons"]))
    if summary["decision"] == RETRAIN:
        summary["training"] = request_retraining(
            tag, summary, start_training, project_dir, repro_cmd
        )
    return summary


if __name__ == "__main__":
    monitor()
