"""Prefect flow ``replay``: play the landing days after the cutoff one at a time.

Start from an event store holding the data up to ``replay.cutoff`` and a registered champion
trained on it. For each later landing day the flow ingests the day and monitors it against the
model in force. It retrains when the monitor decides so and the retrain budget of params.yaml
allows it. It records the online quality of the model in force and of the initial champion.
Outputs go to reports/replay/. Days already replayed (reports/replay/state.json) are skipped,
so a finished replay run again changes nothing. Run it from the project root.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger

from flows.ingest import ingest
from flows.monitor import DRIFT_DIR, champion_info, load_champion_bundle, run_monitor_day
from flows.train import train
from shoprec.columns import Columns
from shoprec.config import Settings, load_params
from shoprec.ingest import IngestConfig
from shoprec.monitor import MonitorConfig, current_window
from shoprec.monitor_data import score_window
from shoprec.replay import (
    STATE_FILE,
    ReplayConfig,
    landing_days,
    may_retrain,
    read_state,
    write_outputs,
    write_state,
)
from shoprec.store import EventStore, read_events
from shoprec.versioning import record_data_version

REPLAY_DIR = "replay"


@flow(name="replay", log_prints=False)
def replay(
    project_dir: Path = Path("."),
    end: date | None = None,
    repro_cmd: list[str] | None = None,
) -> dict[str, Any]:
    """Replay every landing day after ``replay.cutoff`` (up to ``end``); return the summary.

    ``repro_cmd`` replaces ``dvc repro`` in the training runs (see the ``train`` flow).
    """
    logger = get_run_logger()
    settings = Settings()
    project_dir = project_dir.resolve()
    params = load_params(project_dir / settings.params_file)
    config = ReplayConfig.model_validate(params.get("replay", {}))
    if end is not None:
        config = config.model_copy(update={"end": end})
    monitor_config = MonitorConfig.model_validate(params.get("monitor", {}))
    ingest_config = IngestConfig.model_validate(params.get("ingest", {}))
    out_dir = settings.reports_dir / REPLAY_DIR
    state_file = out_dir / STATE_FILE

    state = read_state(state_file)
    if state["initial_model"] is None:
        state["initial_model"] = champion_info()[0]
    initial_tag = state["initial_model"]
    done = {record["day"] for record in state["days"]}
    days = landing_days(settings.landing_dir, ingest_config.file_pattern, config.cutoff, config.end)
    pending = [day for day in days if day.isoformat() not in done]
    retrain_days = [date.fromisoformat(r["day"]) for r in state["days"] if r["retrained"]]
    logger.info(
        "replay: %d landing days after %s, %d already done, initial champion %s",
        len(days),
        config.cutoff,
        len(days) - len(pending),
        initial_tag,
    )
    if not pending and (out_dir / "summary.json").exists():
        logger.info("replay already complete; nothing to do")
        return write_outputs(state["days"], out_dir, config)

    events = read_events(settings.data_dir)
    store = EventStore(settings.data_dir, settings.staging_dir)
    read_files = set(store.event_files())
    for day in pending:
        ingest(until=day, version=False)
        events, read_files = append_new_events(events, settings, read_files)
        tag, metadata = champion_info()
        summary = run_monitor_day(
            events, tag, metadata, day, monitor_config, settings.reports_dir / DRIFT_DIR
        )
        quality = summary["online_quality"]
        if tag == initial_tag:
            baseline = quality
        else:
            initial = load_champion_bundle(initial_tag)
            _, baseline = score_window(
                initial, events, current_window(day, monitor_config), monitor_config
            )

        retrain, budget_reason = may_retrain(day, summary["decision"], retrain_days, config)
        record = {
            "day": day.isoformat(),
            "model_tag": tag,
            "n_rows": summary["n_rows"],
            "n_users": quality.get("n_users", 0),
            "drift_share": summary["drift_share"],
            "decision": summary["decision"],
            "reasons": summary["reasons"],
            "quality": quality.get(config.metric),
            "quality_without_retraining": baseline.get(config.metric),
            "hit_rate": quality.get("hit_rate@10"),
            "hit_rate_without_retraining": baseline.get("hit_rate@10"),
            "retrained": retrain,
            "retrain_reason": "; ".join(summary["reasons"]) if retrain else budget_reason,
            "promoted": None,
        }
        if retrain:
            record["promoted"] = run_retraining(project_dir, settings, repro_cmd)
            retrain_days.append(day)
        state["days"].append(record)
        write_state(state, state_file)

    if settings.dvc_enabled:
        record_data_version(project_dir, settings.data_dir)
    summary = write_outputs(state["days"], out_dir, config)
    logger.info(
        "replay done: %s with retraining %s, without %s, %d retrains",
        config.metric,
        summary["mean_with_retraining"],
        summary["mean_without_retraining"],
        len(summary["retrains"]),
    )
    return summary


def append_new_events(
    events: pd.DataFrame, settings: Settings, read_files: set[Path]
) -> tuple[pd.DataFrame, set[Path]]:
    """Add the event files committed since ``read_files`` to ``events``.

    Reading only the new day's files keeps a replayed day about two seconds shorter than
    reading the whole store again.
    """
    files = set(EventStore(settings.data_dir, settings.staging_dir).event_files())
    new_files = sorted(files - read_files)
    if not new_files:
        return events, files
    new_events = pd.concat([pd.read_parquet(path) for path in new_files], ignore_index=True)
    new_events[Columns.TS] = new_events[Columns.TS].astype("datetime64[ns, UTC]")
    combined = pd.concat([events, new_events[events.columns]], ignore_index=True)
    combined = combined.sort_values([Columns.TS, Columns.EVENT_ID], kind="stable")
    return combined.reset_index(drop=True), files


def run_retraining(project_dir: Path, settings: Settings, repro_cmd: list[str] | None) -> bool:
    """Version the store, run the training flow as a subflow and return whether it promoted."""
    logger = get_run_logger()
    if settings.dvc_enabled:
        record_data_version(project_dir, settings.data_dir)
    result = train(project_dir=project_dir, repro_cmd=repro_cmd)
    logger.info("retrained: %s promoted=%s", result["model_tag"], result["promoted"])
    return bool(result["promoted"])


if __name__ == "__main__":
    replay()
