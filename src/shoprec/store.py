"""The event store in ``data/``: partitioned events, item catalogue, quarantine.

Layout::

    data/manifest.json                              committed batches (the source of truth)
    data/events/date=YYYY-MM-DD/<batch_id>.parquet  canonical events, by event date (UTC)
    data/catalogue.parquet                          item_id, description, price, seen dates
    data/quarantine/<batch_id>.parquet              rejected rows with the rule they broke

A batch is committed in steps, and a crash can interrupt any of them. Every file
is first written to a staging folder. New event and quarantine files get
names that no reader uses until the manifest lists them, and replacing
``manifest.json`` (one atomic rename) is the commit point. ``recover`` runs
before every ingest: it deletes what an interrupted batch left before its
commit point and finishes the catalogue of a batch that passed it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shoprec.columns import EVENT_COLUMNS
from shoprec.columns import CatalogueColumns as K
from shoprec.columns import Columns as C
from shoprec.columns import QuarantineColumns as Q
from shoprec.exceptions import StoreError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CATALOGUE = "catalogue.parquet"
EVENTS_DIR = "events"
QUARANTINE_DIR = "quarantine"
MANIFEST_FORMAT = 1
TXN_FILE = "batch_ids.json"
COMMIT_STEPS = ("staged", "partitions_written", "manifest_committed")

# Test-only fault injection, off unless FAULT_PAUSE_ENV is set to "<commit step>" or
# "<commit step>:<n>". The n-th commit of an EventStore (the first when n is left out) then
# writes the file named by FAULT_MARKER_ENV and blocks at that step until the process is
# killed, so a test can SIGKILL it at a known point. Never set these in a deployment.
FAULT_PAUSE_ENV = "SHOPREC_FAULT_PAUSE_AT"
FAULT_MARKER_ENV = "SHOPREC_FAULT_PAUSE_MARKER"

EVENT_SCHEMA = pa.schema(
    [
        (C.EVENT_ID, pa.string()),
        (C.USER_ID, pa.string()),
        (C.ITEM_ID, pa.string()),
        (C.EVENT_TYPE, pa.string()),
        (C.QUANTITY, pa.int64()),
        (C.PRICE, pa.float64()),
        (C.TS, pa.timestamp("us", tz="UTC")),
        (C.ORDER_ID, pa.string()),
        (C.COUNTRY, pa.string()),
        (C.BATCH_ID, pa.string()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        (Q.SOURCE_FILE, pa.string()),
        (Q.LINE_NUMBER, pa.int64()),
        (Q.RULE, pa.string()),
        (Q.DETAIL, pa.string()),
        (Q.SOURCE_LINE, pa.string()),
        (Q.BATCH_ID, pa.string()),
    ]
)
CATALOGUE_SCHEMA = pa.schema(
    [
        (K.ITEM_ID, pa.string()),
        (K.DESCRIPTION, pa.string()),
        (K.LAST_PRICE, pa.float64()),
        (K.FIRST_SEEN, pa.timestamp("us", tz="UTC")),
        (K.LAST_SEEN, pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass
class BatchToCommit:
    """Everything one landing file adds to the store."""

    batch_id: str
    source_file: str
    file_sha256: str
    events: pd.DataFrame  # canonical columns
    descriptions: pd.Series  # description per event row, for the catalogue
    quarantine: pd.DataFrame  # quarantine columns
    counts: dict[str, Any] = field(default_factory=dict)


class EventIdIndex:
    """Stored event ids, read one date partition at a time when first needed.

    An event id hashes the source line, which contains the event's timestamp. A line seen
    before can therefore only be in the partition of its own date, so deduplicating a batch
    needs the ids of the dates it touches, not of the whole store.

    A plain class on purpose: Prefect walks lists, sets and dataclasses passed to a task to
    find upstream results, which for half a million ids took seconds per task call.
    """

    def __init__(
        self, ids: Iterable[str] = (), loader: Callable[[str], Iterable[str]] | None = None
    ) -> None:
        self._ids: set[str] = set(ids)
        self._loader = loader
        self._loaded_dates: set[str] = set()

    def load_dates(self, dates: Iterable[str]) -> None:
        """Read the stored ids of these dates (YYYY-MM-DD) unless read already."""
        if self._loader is None:
            return
        for date in sorted(set(dates) - self._loaded_dates):
            self._ids.update(self._loader(date))
            self._loaded_dates.add(date)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def update(self, ids: Iterable[str]) -> None:
        self._ids.update(ids)

    def difference_update(self, ids: Iterable[str]) -> None:
        self._ids.difference_update(ids)


class CrashInjected(RuntimeError):
    """Raised by tests to simulate a process dying at a given commit step."""


def _write_parquet(frame: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    pq.write_table(table, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_staged_batch_ids(path: Path) -> list[str]:
    """Return the batch ids of a staging folder, or [] when the file is missing or truncated.

    A transaction writes this file before anything else, so a process killed while writing
    it never reached the commit point.
    """
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return []


class EventStore:
    """Read and append to the event store under `data_dir`."""

    def __init__(self, data_dir: Path, staging_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.staging_dir = Path(staging_dir)
        self.crash_at: str | None = None  # test hook: name of a commit step
        self._steps_reached: Counter[str] = Counter()
        self._manifest: dict[str, Any] | None = None
        self._catalogue: pd.DataFrame | None = None

    # -- reading ---------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """Return the committed manifest (read once, then kept up to date by commit)."""
        if self._manifest is None:
            self._manifest = self._read_manifest()
        return self._manifest

    def _read_manifest(self) -> dict[str, Any]:
        path = self.data_dir / MANIFEST
        if not path.exists():
            return {"format": MANIFEST_FORMAT, "batches": {}}
        with path.open(encoding="utf-8") as handle:
            manifest = json.load(handle)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise StoreError(
                f"{path} has format {manifest.get('format')!r}; this shoprec reads format "
                f"{MANIFEST_FORMAT}. Re-ingest into an empty data directory."
            )
        return manifest

    def ingested_files(self) -> dict[str, str]:
        """Return {source file name: sha256} of every committed batch."""
        batches = self.manifest()["batches"]
        return {b["source_file"]: b["file_sha256"] for b in batches.values()}

    def event_files(self) -> list[Path]:
        files = []
        for batch in self.manifest()["batches"].values():
            files.extend(self.data_dir / name for name in batch["event_files"])
        return sorted(files)

    def read_events(self, columns: list[str] | None = None) -> pd.DataFrame:
        """Return every committed event, sorted by ts then event_id."""
        files = self.event_files()
        if not files:
            return EVENT_SCHEMA.empty_table().to_pandas()[columns or list(EVENT_COLUMNS)]
        table = pq.ParquetDataset([str(f) for f in files], schema=EVENT_SCHEMA).read(
            columns=columns
        )
        frame = table.to_pandas()
        if C.TS in frame.columns:
            frame[C.TS] = frame[C.TS].astype("datetime64[ns, UTC]")
            sort_by = [C.TS, C.EVENT_ID] if C.EVENT_ID in frame.columns else [C.TS]
            frame = frame.sort_values(sort_by, kind="stable").reset_index(drop=True)
        return frame

    def read_catalogue(self) -> pd.DataFrame:
        """Return the item catalogue (read once, then kept up to date by commit)."""
        if self._catalogue is None:
            path = self.data_dir / CATALOGUE
            if not path.exists():
                frame = CATALOGUE_SCHEMA.empty_table().to_pandas()
            else:
                frame = pq.read_table(path).to_pandas()
            for column in (K.FIRST_SEEN, K.LAST_SEEN):
                frame[column] = frame[column].astype("datetime64[ns, UTC]")
            self._catalogue = frame
        return self._catalogue.copy()

    def read_quarantine(self) -> pd.DataFrame:
        files = [
            self.data_dir / b["quarantine_file"]
            for b in self.manifest()["batches"].values()
            if b.get("quarantine_file")
        ]
        if not files:
            return QUARANTINE_SCHEMA.empty_table().to_pandas()
        return pd.concat([pq.read_table(f).to_pandas() for f in sorted(files)], ignore_index=True)

    def known_event_ids(self) -> EventIdIndex:
        """Return an index of committed event ids that reads each date when first needed."""
        return EventIdIndex(loader=self.event_ids_on)

    def event_ids_on(self, date: str) -> list[str]:
        """Return the ids of the committed events of one date partition (YYYY-MM-DD)."""
        prefix = f"{EVENTS_DIR}/date={date}/"
        files = [
            self.data_dir / name
            for batch in self.manifest()["batches"].values()
            for name in batch["event_files"]
            if name.startswith(prefix)
        ]
        ids: list[str] = []
        for path in files:
            ids.extend(pq.read_table(path, columns=[C.EVENT_ID]).column(0).to_pylist())
        return ids

    # -- recovery --------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Undo or finish a batch interrupted by a crash; return what was done."""
        self._manifest = None
        self._catalogue = None
        actions: list[str] = []
        manifest = self.manifest()
        committed = set(manifest["batches"])

        if self.staging_dir.exists():
            for staged in sorted(self.staging_dir.iterdir()):
                catalogue = staged / CATALOGUE
                batch_ids = _read_staged_batch_ids(staged / TXN_FILE)
                if batch_ids and set(batch_ids) <= committed and catalogue.exists():
                    os.replace(catalogue, self.data_dir / CATALOGUE)
                    actions.append(f"finished catalogue of committed batch {staged.name}")
                else:
                    actions.append(f"discarded uncommitted batch {staged.name}")
                shutil.rmtree(staged)

        referenced = {MANIFEST, CATALOGUE}
        for batch in manifest["batches"].values():
            referenced.update(batch["event_files"])
            if batch.get("quarantine_file"):
                referenced.add(batch["quarantine_file"])
        for folder in (EVENTS_DIR, QUARANTINE_DIR):
            root = self.data_dir / folder
            if not root.exists():
                continue
            for path in sorted(root.rglob("*.parquet")):
                relative = path.relative_to(self.data_dir).as_posix()
                if relative not in referenced:
                    path.unlink()
                    actions.append(f"removed orphan file {relative}")
            for directory in sorted(root.glob("*"), reverse=True):
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()

        for action in actions:
            logger.warning("store recovery: %s", action)
        return actions

    # -- writing ---------------------------------------------------------------------------

    def _maybe_crash(self, step: str) -> None:
        if self.crash_at == step:
            raise CrashInjected(f"crash injected at step '{step}'")
        self._steps_reached[step] += 1
        spec = os.environ.get(FAULT_PAUSE_ENV)
        if spec and _fault_pause_point(spec) == (step, self._steps_reached[step]):
            _pause_forever(spec)

    def commit(self, batches: list[BatchToCommit]) -> list[dict[str, Any]]:
        """Append batches in one atomic transaction; return their manifest entries."""
        manifest = json.loads(json.dumps(self.manifest()))
        new = [b for b in batches if b.batch_id not in manifest["batches"]]
        for batch in batches:
            if batch.batch_id in manifest["batches"]:
                logger.info("batch %s already committed; nothing to do", batch.batch_id)
        if not new:
            return [manifest["batches"][b.batch_id] for b in batches]

        staging = self.staging_dir / f"txn-{new[0].batch_id}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        (staging / TXN_FILE).write_text(json.dumps([b.batch_id for b in new]), encoding="utf-8")

        # 1. Stage every new file.
        moves: list[str] = []
        for batch in new:
            entry, files = self._stage_batch(batch, staging)
            manifest["batches"][batch.batch_id] = entry
            moves.extend(files)
        catalogue = update_catalogue(
            self.read_catalogue(),
            pd.concat([b.events for b in new], ignore_index=True),
            pd.concat([b.descriptions for b in new], ignore_index=True),
        )
        _write_parquet(catalogue, CATALOGUE_SCHEMA, staging / CATALOGUE)
        manifest["batches"] = dict(sorted(manifest["batches"].items()))
        with (staging / MANIFEST).open("w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        self._maybe_crash("staged")

        # 2. Move event and quarantine files in; no reader sees them before the manifest does.
        for relative in moves:
            target = self.data_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, target)
        self._maybe_crash("partitions_written")

        # 3. Commit point: the manifest now lists the batches.
        os.replace(staging / MANIFEST, self.data_dir / MANIFEST)
        _fsync_dir(self.data_dir)
        self._manifest = manifest
        self._maybe_crash("manifest_committed")

        # 4. Catalogue, then clean up; recover() finishes these after a crash.
        os.replace(staging / CATALOGUE, self.data_dir / CATALOGUE)
        shutil.rmtree(staging)
        self._catalogue = catalogue
        return [manifest["batches"][b.batch_id] for b in batches]

    def _stage_batch(self, batch: BatchToCommit, staging: Path) -> tuple[dict[str, Any], list[str]]:
        events = batch.events.copy()
        events[C.BATCH_ID] = batch.batch_id
        dates = events[C.TS].dt.strftime("%Y-%m-%d")
        event_files: list[str] = []
        for date, part in events.groupby(dates, sort=True):
            relative = f"{EVENTS_DIR}/date={date}/{batch.batch_id}.parquet"
            _write_parquet(part[list(EVENT_COLUMNS)], EVENT_SCHEMA, staging / relative)
            event_files.append(relative)
        quarantine_file = None
        if len(batch.quarantine):
            quarantine_file = f"{QUARANTINE_DIR}/{batch.batch_id}.parquet"
            rows = batch.quarantine.assign(**{Q.BATCH_ID: batch.batch_id})
            _write_parquet(rows, QUARANTINE_SCHEMA, staging / quarantine_file)
        entry = {
            "batch_id": batch.batch_id,
            "source_file": batch.source_file,
            "file_sha256": batch.file_sha256,
            "event_files": event_files,
            "quarantine_file": quarantine_file,
            "counts": batch.counts,
        }
        files = [*event_files, *([quarantine_file] if quarantine_file else [])]
        return entry, files


def _fault_pause_point(spec: str) -> tuple[str, int]:
    """Parse a FAULT_PAUSE_ENV value into (commit step, 1-based commit number)."""
    step, _, number = spec.partition(":")
    if step not in COMMIT_STEPS or not (number or "1").isdigit() or int(number or "1") < 1:
        raise StoreError(
            f"{FAULT_PAUSE_ENV}={spec!r} is invalid; expected <step> or <step>:<n> with a step "
            f"in {COMMIT_STEPS} and n >= 1, or unset the variable (it is a test-only hook)"
        )
    return step, int(number or "1")


def _pause_forever(spec: str) -> None:
    """Write the fault marker file, then block until the process is killed."""
    marker = os.environ.get(FAULT_MARKER_ENV)
    if not marker:
        raise StoreError(
            f"{FAULT_PAUSE_ENV} is set but {FAULT_MARKER_ENV} is not; set it to the path of "
            "the file to write when the commit pauses"
        )
    partial = Path(f"{marker}.partial")
    partial.write_text(f"{spec} {os.getpid()}\n", encoding="utf-8")
    os.replace(partial, marker)
    logger.warning("fault injection: commit paused at %s until the process is killed", spec)
    threading.Event().wait()


def update_catalogue(
    catalogue: pd.DataFrame, events: pd.DataFrame, descriptions: pd.Series
) -> pd.DataFrame:
    """Merge a batch's items into the catalogue (latest description and price win)."""
    purchases = events.assign(**{K.DESCRIPTION: descriptions.to_numpy()})
    purchases = purchases.sort_values([C.TS, C.EVENT_ID], kind="stable")
    if purchases.empty:
        return catalogue
    grouped = purchases.groupby(C.ITEM_ID, sort=True)
    described = purchases[purchases[K.DESCRIPTION].fillna("") != ""]
    batch_items = pd.DataFrame(
        {
            K.DESCRIPTION: described.groupby(C.ITEM_ID)[K.DESCRIPTION].last(),
            K.LAST_PRICE: grouped[C.PRICE].last(),
            K.FIRST_SEEN: grouped[C.TS].min(),
            K.LAST_SEEN: grouped[C.TS].max(),
        }
    )
    batch_items.index.name = K.ITEM_ID
    batch_items = batch_items.reset_index()
    if catalogue.empty:
        merged = batch_items
    else:
        merged = pd.concat([catalogue, batch_items], ignore_index=True)
        merged = merged.sort_values([K.ITEM_ID, K.LAST_SEEN], kind="stable")
        # GroupBy.last skips nulls, so an item keeps its latest known description.
        merged = (
            merged.groupby(K.ITEM_ID, sort=True)
            .agg(
                **{
                    K.DESCRIPTION: (K.DESCRIPTION, "last"),
                    K.LAST_PRICE: (K.LAST_PRICE, "last"),
                    K.FIRST_SEEN: (K.FIRST_SEEN, "min"),
                    K.LAST_SEEN: (K.LAST_SEEN, "max"),
                }
            )
            .reset_index()
        )
    return merged[[K.ITEM_ID, K.DESCRIPTION, K.LAST_PRICE, K.FIRST_SEEN, K.LAST_SEEN]]


def read_events(data_dir: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Return every committed event of the store in `data_dir`."""
    return EventStore(data_dir, Path(data_dir) / ".staging").read_events(columns)


def read_catalogue(data_dir: Path) -> pd.DataFrame:
    """Return the item catalogue of the store in `data_dir`."""
    return EventStore(data_dir, Path(data_dir) / ".staging").read_catalogue()
