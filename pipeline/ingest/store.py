"""The interaction store: every ingested event, Parquet partitioned by event date (UTC), de-duplicated.

Layout: ``<store>/date=YYYY-MM-DD/part-0.parquet``, one file per day with ``user_id`` (string), ``item_id`` (string),
``timestamp`` (int64, unix seconds) and ``rating`` (float32, null when the logs carry none), rows sorted by
(timestamp, user_id, item_id). The retraining run reads it back through the ``download`` stage as a ``custom``
Parquet source, so the store needs no reader of its own.

Guarantees:

- an event is the triple (user_id, item_id, timestamp): merging events that are already stored changes nothing, so
  re-running an interval (an Airflow retry, a cleared run, a repeated replay) never double counts; an event already
  stored keeps its stored rating;
- the content does not depend on arrival order (rows are sorted, duplicates dropped);
- each day is rewritten whole into a temporary file and renamed into place, so a reader sees the old or the new day,
  never half of one; a merge killed between days leaves some days merged and a re-run completes the rest;
- merges serialise on an exclusive lock file (``<store>/.lock``), waiting at most ``lock_timeout_s``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from pipeline.io import write_parquet_atomic

log = logging.getLogger(__name__)

KEY = ["user_id", "item_id", "timestamp"]
STORE_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()), ("rating", pa.float32())]
)
SECONDS_PER_DAY = 86_400
EPOCH = date(1970, 1, 1)
PART_FILE = "part-0.parquet"


@dataclass
class MergeResult:
    added: int = 0  # events new to the store
    duplicates: int = 0  # events of the batch that the store (or the batch itself) already held
    days: list[str] = field(default_factory=list)  # partitions rewritten


def store_table(events: pd.DataFrame | pa.Table) -> pa.Table:
    """Canonical events (any id type, optional rating) as a table of :data:`STORE_SCHEMA`."""
    table = events if isinstance(events, pa.Table) else pa.Table.from_pandas(events, preserve_index=False)
    missing = set(KEY) - set(table.column_names)
    if missing:
        raise ValueError(f"events lack column(s) {sorted(missing)}")
    columns = {name: table[name].cast(STORE_SCHEMA.field(name).type) for name in KEY}
    if "rating" in table.column_names:
        columns["rating"] = table["rating"].cast(pa.float32())
    else:
        columns["rating"] = pa.nulls(table.num_rows, pa.float32())
    return pa.table(columns, schema=STORE_SCHEMA)


def event_days(timestamps: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 (UTC) of unix-second timestamps."""
    return np.asarray(timestamps, dtype=np.int64) // SECONDS_PER_DAY


def partition_file(store_dir: str | Path, day: date) -> Path:
    return Path(store_dir) / f"date={day.isoformat()}" / PART_FILE


def merge(store_dir: str | Path, events: pd.DataFrame | pa.Table, lock_timeout_s: float = 600.0) -> MergeResult:
    """Add ``events`` to the store; events it already holds are counted, not added (idempotent)."""
    batch = store_table(events).to_pandas()
    root = Path(store_dir)
    root.mkdir(parents=True, exist_ok=True)
    result = MergeResult()
    if batch.empty:
        return result
    batch_days = event_days(batch["timestamp"].to_numpy())
    with _locked(root / ".lock", lock_timeout_s):
        for day_number in np.unique(batch_days):
            day = EPOCH + timedelta(days=int(day_number))
            path = partition_file(root, day)
            new = batch[batch_days == day_number]
            old = pq.read_table(path).to_pandas() if path.exists() else new.iloc[:0]
            combined = pd.concat([old, new], ignore_index=True).drop_duplicates(KEY, keep="first")
            added = len(combined) - len(old)
            result.added += added
            result.duplicates += len(new) - added
            if added:
                combined = combined.sort_values(["timestamp", "user_id", "item_id"], kind="stable")
                write_parquet_atomic(path, pa.Table.from_pandas(combined, schema=STORE_SCHEMA, preserve_index=False))
                result.days.append(day.isoformat())
    log.info(
        "store %s: %d events added, %d already present, %d day(s) rewritten",
        root,
        result.added,
        result.duplicates,
        len(result.days),
    )
    return result


def partition_files(store_dir: str | Path) -> list[Path]:
    return sorted(Path(store_dir).glob(f"date=*/{PART_FILE}"))


def read_store(store_dir: str | Path) -> pa.Table:
    """All stored events, oldest day first (an empty table when the store is empty or absent)."""
    tables = [pq.read_table(path, schema=STORE_SCHEMA) for path in partition_files(store_dir)]
    return pa.concat_tables(tables) if tables else STORE_SCHEMA.empty_table()


def count_events(store_dir: str | Path) -> int:
    """Number of stored events, from the Parquet footers (no data read)."""
    return sum(pq.ParquetFile(path).metadata.num_rows for path in partition_files(store_dir))


@contextlib.contextmanager
def _locked(path: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive lock on ``path`` (filelock: released by the OS if the holder dies), waited for ``timeout_s``."""
    lock = FileLock(path)
    try:
        lock.acquire(timeout=timeout_s, poll_interval=0.2)
    except Timeout:
        raise TimeoutError(f"{path} stayed locked for {timeout_s:.0f}s: another merge is running") from None
    try:
        yield
    finally:
        lock.release()
