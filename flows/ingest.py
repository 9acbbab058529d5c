"""Prefect flow: ingest new landing files into the DVC-versioned event store.

Run locally (no Prefect server needed)::

    shoprec ingest                      # or: python -m flows.ingest

Each landing file is parsed by its own task on the flow's task runner. Groups of
``ingest.files_per_commit`` files are then validated by one GX run and committed
as one store transaction, in file order. The store gets a new DVC version when it
changed.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from shoprec.adapters.online_retail import file_day
from shoprec.config import Settings, load_params
from shoprec.ingest import (
    FileOutcome,
    IngestConfig,
    build_adapter,
    finalize_batch,
    parse_file,
    validate_files,
)
from shoprec.privacy import Pseudonymizer, load_or_create_key
from shoprec.store import EventIdIndex, EventStore
from shoprec.summary import IngestSummary
from shoprec.validate import ValidationConfig
from shoprec.versioning import push_data, record_data_version


def _retry_on_io_error(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's hook signature
    """Retry a task only when it failed on an I/O error (disk or network)."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - any other failure is final
        return False
    return False


def find_pending_files(
    landing_dir: Path, pattern: str, ingested: dict[str, str], until: date | None = None
) -> list[Path]:
    """Return landing files not ingested yet (new name or changed content), oldest first.

    `until` skips files named after a later day; a file whose name has no date is kept.
    """
    if not landing_dir.is_dir():
        raise FileNotFoundError(
            f"landing folder {landing_dir} not found; set SHOPREC_LANDING_DIR to the folder "
            "that receives the daily exports"
        )
    pending = []
    for path in sorted(landing_dir.glob(pattern)):
        day = file_day(path)
        if until is not None and day is not None and day.date() > until:
            continue
        known = ingested.get(path.name)
        if known is not None and known == hashlib.sha256(path.read_bytes()).hexdigest():
            continue
        pending.append(path)
    return pending


# Task inputs are whole batches and the store: NO_CACHE skips hashing them for a cache key,
# and a cached result must never stand in for a real parse or commit.
@task(
    name="parse-landing-file",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=_retry_on_io_error,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def parse_landing_file(path: Path, adapter: Any, validation: ValidationConfig) -> FileOutcome:
    return parse_file(path, adapter, validation)


@task(name="validate-files", cache_policy=NO_CACHE, persist_result=False)
def validate_chunk(
    outcomes: list[FileOutcome], validation: ValidationConfig, docs_dir: Path
) -> list[FileOutcome]:
    return validate_files(outcomes, validation, docs_dir)


@task(
    name="commit-batches",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=_retry_on_io_error,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def commit_batches(
    store: EventStore, outcomes: list[FileOutcome], known: EventIdIndex
) -> list[dict[str, Any]]:
    """Commit several files' batches as one store transaction; `known` grows with them."""
    batches = []
    added: set[str] = set()
    try:
        for outcome in outcomes:
            known.load_dates(outcome.batch.events["ts"].dt.strftime("%Y-%m-%d").unique())
            batch = finalize_batch(outcome.batch, known)
            new_ids = set(batch.events["event_id"])
            known.update(new_ids)
            added.update(new_ids)
            batches.append(batch)
        return store.commit(batches)
    except BaseException:
        known.difference_update(added)
        raise


@task(
    name="version-store",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_on_io_error,
    cache_policy=NO_CACHE,
)
def version_store(root: Path, data_dir: Path, remote: str | None) -> dict[str, Any]:
    previous, current = record_data_version(root, data_dir)
    pushed = push_data(root, remote)
    return {"previous": previous, "current": current, "pushed": pushed}


def write_validation_results(reports_dir: Path, outcomes: list[FileOutcome]) -> None:
    folder = reports_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for outcome in outcomes:
        record = {
            "source_file": outcome.source_file,
            "rejected": outcome.rejected_reason,
            "message": outcome.rejected_message,
            "counts": outcome.batch.counts if outcome.batch else None,
            "validation": outcome.validation,
        }
        path = folder / f"{Path(outcome.source_file).stem}.json"
        path.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=2))
def ingest(
    landing_dir: str | None = None,
    until: date | None = None,
    limit: int | None = None,
    version: bool | None = None,
) -> dict[str, Any]:
    """Ingest landing files not yet in the store; return the run summary."""
    logger = get_run_logger()
    settings = Settings()
    params = load_params(settings.params_file)
    ingest_config = IngestConfig.model_validate(params.get("ingest", {}))
    validation = ValidationConfig.model_validate(params.get("validate", {}))
    key_value = settings.pseudonym_key.get_secret_value() if settings.pseudonym_key else None
    pseudonymizer = Pseudonymizer(load_or_create_key(key_value, settings.key_file))
    adapter = build_adapter(ingest_config, pseudonymizer)

    # Extract: recover from an interrupted run, then list what is new.
    store = EventStore(settings.data_dir, settings.staging_dir)
    for action in store.recover():
        logger.warning("recovered store: %s", action)
    landing = Path(landing_dir) if landing_dir else settings.landing_dir
    pending = find_pending_files(landing, ingest_config.file_pattern, store.ingested_files(), until)
    if limit is not None:
        pending = pending[:limit]
    logger.info("%d landing file(s) to ingest from %s", len(pending), landing)

    # Transform: parse each file in its own task on the task runner.
    futures = parse_landing_file.map(pending, unmapped(adapter), unmapped(validation))

    # Validate a few files per GX run, then commit them as one store transaction, in file
    # order so that the catalogue's "last seen" follows time.
    summary = IngestSummary()
    docs_dir = settings.reports_dir / "validation" / "data_docs"
    known = store.known_event_ids() if pending else EventIdIndex()
    outcomes: list[FileOutcome] = []
    chunk: list[FileOutcome] = []
    for number, future in enumerate(futures, start=1):
        outcome = future.result()
        if outcome.rejected_reason is not None:
            outcomes.append(outcome)
            summary.add_rejected(outcome.source_file, outcome.rejected_reason)
            logger.error(
                "[%d/%d] %s rejected: %s",
                number,
                len(pending),
                outcome.source_file,
                outcome.rejected_message,
            )
        else:
            chunk.append(outcome)
        if chunk and (len(chunk) >= ingest_config.files_per_commit or number == len(pending)):
            validated = validate_chunk(chunk, validation, docs_dir)
            outcomes.extend(validated)
            for entry in commit_batches(store, validated, known):
                summary.add(entry["source_file"], entry["counts"])
            chunk = []
            totals = summary.totals()
            logger.info(
                "[%d/%d] committed up to %s: read %d, stored %d, quarantined %d, duplicates %d",
                number,
                len(pending),
                outcome.source_file,
                totals["rows_read"],
                totals["stored"],
                totals["quarantined"],
                totals["duplicates"],
            )
    write_validation_results(settings.reports_dir, outcomes)

    use_dvc = settings.dvc_enabled if version is None else version
    if use_dvc and summary.files_committed:
        versions = version_store(Path.cwd(), settings.data_dir, settings.dvc_remote)
        summary.data_version = versions["current"]
        summary.previous_data_version = versions["previous"]
    logger.info("ingest summary\n%s", summary.render_text())
    return summary.to_dict()


if __name__ == "__main__":
    ingest()
