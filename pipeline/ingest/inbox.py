"""Collect the log files of one data interval from an inbox: a local folder or any fsspec URL.

A log file belongs to a day named in its path: ``2024-01-05.csv``, ``events_20240105.jsonl.gz`` or a Hive-style
folder ``date=2024-01-05/part-0.parquet`` (the first valid date in the path relative to the inbox). A file belongs to
the interval ``[start, end)`` when midnight (UTC) of its day lies in it, so a daily interval takes one day's files and
a weekly interval seven days'. The inbox path is taken literally (an inbox named ``inbox[1]`` is that folder, not
a glob pattern); ``retrain.file_pattern`` is a glob applied to paths relative to it. Files without a date in their
path, hidden files (a writer's ``.name.tmp``), files of other formats and, in a local inbox, anything that is not a
regular file (a FIFO, socket or device: never opened, since opening a FIFO waits for a writer) are listed in the log
with the reason and left alone: the choice never depends on modification times, so re-running an interval collects
exactly the same files. A local inbox reads only files of its own, each once: a link out of it is never followed,
and a hard link (a file with more than one name, one of which may be outside the inbox) of the interval fails the
collection.

Collected files are copied into a local staging folder (readers need local files, and the copy is what the
interval was trained on even if the inbox changes later). A file that changes while it is copied (its size or
modification time, or the number of bytes copied) fails the collection before anything is merged: a writer is still
appending to it, and the run's retry collects it once the writer is done.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

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
    the link and nothing of what it points to; so does a hard link of the interval, whose other name may be outside.
    Nothing is copied when the collection fails.
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
    selected, hard_links, skipped, elsewhere = [], [], defaultdict(list), 0
    read: set[tuple[int, int]] = set()  # (device, inode) of the files selected: each is read once
    if set(outside) - set(refused):
        skipped["a link out of the inbox that this interval would not read anyway"] = sorted(
            set(outside) - set(refused)
        )
    wanted = re.compile(glob_translate(pattern))
    for path in sorted(fs.find(root, withdirs=False)):  # the root literally: never a glob pattern
        relative = path[len(root) :].lstrip("/")
        if not wanted.match(relative) or (local and not _inside(path, root)):  # a link out: logged above
            continue
        status = _local_status(path) if local else None
        if local and status is not None and stat.S_ISDIR(status.st_mode):
            continue  # a link to a folder of the inbox: its files are listed under their own paths
        reason = _type_reason(status) if local else None
        reason = reason or _skip_reason(relative)
        day = file_day(relative)
        if reason is None and day is None:
            reason = "no date (YYYY-MM-DD or YYYYMMDD) in its path"
        if reason is not None:
            skipped[reason].append(relative)
            continue
        if not in_interval(day, start, end):
            elsewhere += 1
            continue
        if status is not None:
            if status.st_nlink > 1:
                hard_links.append(relative)
                continue
            if (status.st_dev, status.st_ino) in read:
                skipped["another name (a link inside the inbox) of a file collected already"].append(relative)
                continue
            read.add((status.st_dev, status.st_ino))
        selected.append((path, relative, day, status))
    if hard_links:
        raise BadInputError(
            f"inbox {inbox}: {len(hard_links)} hard link(s) (files with more than one name, which may be a file "
            f"outside the inbox) were not read: {hard_links}. The inbox reads only files of its own: copy the logs "
            "in (cp, not ln), or remove the other names."
        )
    collected = [_stage(fs, path, status, staging / relative, day) for path, relative, day, status in selected]
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


def _stage(
    fs: fsspec.AbstractFileSystem, path: str, status: os.stat_result | None, copy: Path, day: date
) -> CollectedFile:
    """Copy one inbox file to ``copy``, failing when it changes meanwhile (a writer still appending)."""
    source = fs.unstrip_protocol(path)
    copy.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(copy) as tmp:
        if status is not None:
            before, after = _copy_local(path, status, tmp)
        else:
            before = _remote_state(fs, path)
            fs.get_file(path, str(tmp))
            after = _remote_state(fs, path)
        check_unchanged(source, before, after, tmp.stat().st_size)
    return CollectedFile(
        source=source, local=str(copy), day=day.isoformat(), size=copy.stat().st_size, sha256=file_digest(copy)
    )


def _skip_reason(relative: str) -> str | None:
    """Why a listed file is not a log of the inbox, or None when it is one."""
    if any(part.startswith(".") for part in relative.split("/")):
        return "name starting with '.' (a writer's temporary or hidden file)"
    if _format_of(Path(relative)) is None:
        return "not a csv, tsv, parquet or json(l) file"
    return None


def _local_status(path: str) -> os.stat_result | None:
    """The status of what ``path`` names (links inside the inbox followed; no file opened), None for a broken link."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _type_reason(status: os.stat_result | None) -> str | None:
    """Why a local inbox entry is not read as a file (None: a regular file); stat only, never opened."""
    if status is None:
        return "a broken link"
    if stat.S_ISREG(status.st_mode):
        return None
    if stat.S_ISFIFO(status.st_mode):
        return "a FIFO (named pipe), never opened: reading one waits for a writer"
    if stat.S_ISSOCK(status.st_mode):
        return "a socket, not a file"
    if stat.S_ISCHR(status.st_mode) or stat.S_ISBLK(status.st_mode):
        return "a device, not a file"
    return "not a regular file"


FileState = tuple[int, str | None, int | None]  # size in bytes, modification time and inode, where known
GONE: FileState = (-1, None, None)  # renamed away, removed or replaced by something that is not a regular file


def _state(status: os.stat_result) -> FileState:
    return status.st_size, str(status.st_mtime_ns), status.st_ino


def _copy_local(path: str, status: os.stat_result, target: Path) -> tuple[FileState, FileState]:
    """Copy the regular file ``path`` listed with ``status``; returns its states when listed and after the copy.

    Opened without blocking, then checked to be the very file that was listed: a FIFO swapped in meanwhile is never
    read. A writer holding a lease on the file makes the non-blocking open fail; the copy then waits for it like
    any reader does (the kernel asks the writer to let go).
    """
    before = _state(status)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except BlockingIOError:  # a writer's lease: wait for it to let go, unless the file changed already
        if _current(path) != before:
            return before, _current(path)
        fd = os.open(path, os.O_RDONLY)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return before, GONE
    with os.fdopen(fd, "rb") as handle, open(target, "wb") as out:
        opened = _state(os.fstat(handle.fileno()))
        shutil.copyfileobj(handle, out)
        read = _state(os.fstat(handle.fileno()))
    return before, next((state for state in (opened, read, _current(path)) if state != before), before)


def _current(path: str) -> FileState:
    try:
        return _state(os.stat(path))
    except FileNotFoundError:
        return GONE


def _remote_state(fs: fsspec.AbstractFileSystem, path: str) -> FileState:
    info = fs.info(path)
    mtime = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    return int(info["size"]), None if mtime is None else str(mtime), None


def check_unchanged(source: str, before: FileState, after: FileState, copied: int) -> None:
    """Fail when the inbox file ``source`` changed while it was copied: a writer is still appending to it.

    Nothing is merged then; the run's retry (Airflow's, or running the interval again) collects the file once the
    writer is done. Writers should write elsewhere and rename into the inbox, which is atomic.
    """
    if before == after and copied == before[0]:
        return
    now = "gone" if after == GONE else f"{after[0]} bytes"
    raise BadInputError(
        f"inbox file {source} changed while it was copied ({before[0]} bytes when listed, {copied} copied, now "
        f"{now}): a writer is still appending to it. Nothing of this interval was merged; run it again (Airflow "
        "retries) once the writer is done, and have writers write elsewhere and then rename into the inbox."
    )


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
