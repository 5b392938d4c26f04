"""Collect the log files of one data interval from an inbox: a local folder or any fsspec URL.

A log file belongs to a day named in its path: ``2024-01-05.csv``, ``events_20240105.jsonl.gz`` or a Hive-style
folder ``date=2024-01-05/part-0.parquet`` (the first valid date in the path relative to the inbox). A file belongs to
the interval ``[start, end)`` when midnight (UTC) of its day lies in it, so a daily interval takes one day's files and
a weekly interval seven days'. Files without a date in their path, hidden files (a writer's ``.name.tmp``) and
files of other formats are listed in the log with the reason and left alone: the choice never depends on
modification times, so re-running an interval collects exactly the same files. A link out of a local inbox is never
followed.

Collected files are copied into a local staging folder (readers need local files, and the copy is what the
interval was trained on even if the inbox changes later).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.data.readers import _format_of
from pipeline.errors import BadInputError
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
    """Copy the inbox's log files of ``[start, end)`` into ``staging`` (emptied first); returns them sorted by path.

    Every file left alone is logged with the reason. A local inbox never follows a link out of itself: a link (to a
    file or a folder) that resolves outside the inbox and may belong to the interval fails the collection, naming
    the link and nothing of what it points to.
    """
    fs, root = fsspec.core.url_to_fs(inbox)
    root = root.rstrip("/")
    staging = Path(staging)
    if staging.exists():
        shutil.rmtree(staging)  # a retry must not see files an earlier attempt staged
    staging.mkdir(parents=True)
    if not fs.exists(root):
        log.warning("inbox %s does not exist: no log files", inbox)
        return []
    local = isinstance(fs, LocalFileSystem)
    outside = _links_outside(root) if local else []
    refused = [link for link in outside if _may_belong(root, link, start, end)]
    if refused:
        raise BadInputError(
            f"inbox {inbox}: {len(refused)} link(s) point outside the inbox and were not read: {refused}. The inbox "
            "reads only files inside it: copy the logs in, or remove the links."
        )
    collected, skipped, elsewhere = [], defaultdict(list), 0
    if set(outside) - set(refused):
        skipped["a link out of the inbox that this interval would not read anyway"] = sorted(
            set(outside) - set(refused)
        )
    for path in sorted(fs.glob(f"{root}/{pattern}")):
        relative = path[len(root) :].lstrip("/")
        if fs.isdir(path) or (local and not _inside(path, root)):  # a link out: logged above
            continue
        reason = _skip_reason(relative)
        if reason is None and (local and not Path(path).exists()):
            reason = "a broken link"
        day = file_day(relative)
        if reason is None and day is None:
            reason = "no date (YYYY-MM-DD or YYYYMMDD) in its path"
        if reason is not None:
            skipped[reason].append(relative)
            continue
        if not in_interval(day, start, end):
            elsewhere += 1
            continue
        local_copy = staging / relative
        local_copy.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(local_copy) as tmp:
            fs.get_file(path, str(tmp))
        collected.append(
            CollectedFile(
                source=fs.unstrip_protocol(path),
                local=str(local_copy),
                day=day.isoformat(),
                size=local_copy.stat().st_size,
                sha256=file_digest(local_copy),
            )
        )
    for reason, names in skipped.items():
        log.warning("inbox %s: skipped %d file(s), %s: %s", inbox, len(names), reason, names)
    log.info(
        "collected %d log file(s) for [%s, %s) from %s (%d dated file(s) of other days left for their intervals)",
        len(collected),
        start,
        end,
        inbox,
        elsewhere,
    )
    return collected


def _skip_reason(relative: str) -> str | None:
    """Why a listed file is not a log of the inbox, or None when it is one."""
    if any(part.startswith(".") for part in relative.split("/")):
        return "name starting with '.' (a writer's temporary or hidden file)"
    if _format_of(Path(relative)) is None:
        return "not a csv, tsv, parquet or json(l) file"
    return None


def _links_outside(root: str) -> list[str]:
    """Relative paths of the links under a local ``root`` (files or folders) that resolve outside it."""
    real_root = os.path.realpath(root)
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not _inside(path, real_root):
                found.append(os.path.relpath(path, root))
    return sorted(found)


def _inside(path: str, root: str) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), real_root]) == real_root


def _may_belong(root: str, relative: str, start: datetime, end: datetime) -> bool:
    """Whether this interval would read the link: a log file dated inside it, or a folder that may hold one."""
    day = file_day(relative)
    if os.path.isdir(os.path.join(root, relative)):
        hidden = any(part.startswith(".") for part in relative.split("/"))
        return not hidden and (day is None or in_interval(day, start, end))
    return _skip_reason(relative) is None and day is not None and in_interval(day, start, end)


def to_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
