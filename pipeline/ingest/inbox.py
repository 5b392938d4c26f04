"""Collect the log files of one data interval from an inbox: a local folder or any fsspec URL.

A log file belongs to a day named in its path: ``2024-01-05.csv``, ``events_20240105.jsonl.gz`` or a Hive-style
folder ``date=2024-01-05/part-0.parquet`` (the first valid date in the path relative to the inbox). A file belongs to
the interval ``[start, end)`` when midnight (UTC) of its day lies in it, so a daily interval takes one day's files and
a weekly interval seven days'. Files without a date in their path are listed in the log and left alone: the choice
never depends on modification times, so re-running an interval collects exactly the same files.

Collected files are copied into a local staging folder (readers need local files, and the copy is what the
interval was trained on even if the inbox changes later).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import fsspec

from pipeline.data.readers import _format_of
from pipeline.io import atomic_path, file_digest

log = logging.getLogger(__name__)

_DATE = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?!\d)")


@dataclass(frozen=True)
class CollectedFile:
    source: str  # URL or path in the inbox
    local: str  # staged copy
    day: str  # ISO date the file belongs to
    size: int
    sha256: str


def file_day(relative_path: str) -> date | None:
    """The first valid calendar date written in ``relative_path`` (``YYYY-MM-DD`` or ``YYYYMMDD``), else None."""
    for match in _DATE.finditer(relative_path):
        try:
            return date(*(int(part) for part in match.groups()))
        except ValueError:
            continue
    return None


def in_interval(day: date, start: datetime, end: datetime) -> bool:
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return to_utc(start) <= midnight < to_utc(end)


def collect(inbox: str, pattern: str, start: datetime, end: datetime, staging: str | Path) -> list[CollectedFile]:
    """Copy the inbox's log files of ``[start, end)`` into ``staging`` (emptied first); returns them sorted by path."""
    fs, root = fsspec.core.url_to_fs(inbox)
    root = root.rstrip("/")
    staging = Path(staging)
    if staging.exists():
        shutil.rmtree(staging)  # a retry must not see files an earlier attempt staged
    staging.mkdir(parents=True)
    if not fs.exists(root):
        log.warning("inbox %s does not exist: no log files", inbox)
        return []
    collected, undated = [], []
    for path in sorted(fs.glob(f"{root}/{pattern}")):
        relative = path[len(root) :].lstrip("/")
        hidden = any(part.startswith(".") for part in relative.split("/"))  # writers' temporary files
        if hidden or fs.isdir(path) or _format_of(Path(relative)) is None:
            continue
        day = file_day(relative)
        if day is None:
            undated.append(relative)
            continue
        if not in_interval(day, start, end):
            continue
        local = staging / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(local) as tmp:
            fs.get_file(path, str(tmp))
        collected.append(
            CollectedFile(
                source=fs.unstrip_protocol(path),
                local=str(local),
                day=day.isoformat(),
                size=local.stat().st_size,
                sha256=file_digest(local),
            )
        )
    if undated:
        log.warning("inbox %s: %d file(s) without a date in their name were skipped: %s", inbox, len(undated), undated)
    log.info("collected %d log file(s) for [%s, %s) from %s", len(collected), start, end, inbox)
    return collected


def to_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
