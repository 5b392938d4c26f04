"""The ``download`` stage: obtain a dataset and write the canonical interactions table plus a manifest.

Where the bytes come from, in order: a local mirror folder (``$HYMOE_DATA_MIRROR`` or ``data.mirror``), then the
download cache, then the official URL. Whatever the source, the output is the same: ``interactions.parquet``
(``user_id``, ``item_id``, ``timestamp`` int64, optional ``rating``, rows in source order so ties keep their
original order), ``manifest.json`` (source, checksums, row counts) and ``quarantine.csv`` (bad rows with reasons).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa

from pipeline.data.events import TimestampWindow
from pipeline.data.fetch import fetch, parse_checksum
from pipeline.data.layout import DownloadOutputs
from pipeline.data.quarantine import (
    BadInputError,
    ReadResult,
    empty_bad_rows,
    enforce_bad_fraction,
    write_quarantine,
)
from pipeline.data.readers import read_custom, resolve_files
from pipeline.data.registry import DatasetSpec, Layout, get_spec
from pipeline.errors import PipelineError
from pipeline.io import file_digest, write_json_atomic, write_parquet_atomic
from pipeline.params import MIRROR_ENV, CustomSourceParams, DataParams

log = logging.getLogger(__name__)


class DatasetUnavailable(PipelineError, RuntimeError):
    """No mirror copy and the official source cannot be reached."""


def download(data: DataParams) -> DownloadOutputs:
    """Run the stage for ``data.dataset``; the same function backs ``dvc repro`` and the Airflow task."""
    outputs = DownloadOutputs.under(data.interim_dir)
    if data.dataset == "synthetic":
        result, source = _synthetic(data)
    elif data.dataset == "custom":
        result, source = _custom(data)
    else:
        result, source = obtain(get_spec(data.dataset), data)
    write_quarantine(outputs.quarantine, result.bad_rows)
    enforce_bad_fraction(result.bad_rows, result.total_rows, data.max_bad_fraction, str(outputs.quarantine))
    events = result.events
    if events.empty:
        raise BadInputError(f"{data.dataset}: no valid interactions were read")
    write_parquet_atomic(outputs.interactions, _to_arrow(events))
    manifest = {
        "dataset": data.dataset,
        "source": source,
        "has_timestamps": result.has_timestamps,
        "timestamp_meaning": "unix seconds" if result.has_timestamps else "position in source order",
        "rows": {"read": result.total_rows, "quarantined": len(result.bad_rows), "kept": len(events)},
        "users": int(events["user_id"].nunique()),
        "items": int(events["item_id"].nunique()),
        "columns": list(events.columns),
    }
    write_json_atomic(outputs.manifest, manifest)
    log.info(
        "%s: %d interactions, %d users, %d items from %s",
        data.dataset,
        len(events),
        manifest["users"],
        manifest["items"],
        source["kind"],
    )
    return outputs


def obtain(spec: DatasetSpec, data: DataParams) -> tuple[ReadResult, dict[str, Any]]:
    """Read ``spec`` from the mirror if it holds a copy, else from the cache or the official URL."""
    layouts = _allowed_layouts(spec, data)
    mirror = data.resolved_mirror()
    if mirror is not None:
        if not mirror.is_dir():
            raise DatasetUnavailable(f"the data mirror {mirror} (from ${MIRROR_ENV} or data.mirror) is not a folder")
        found = _from_mirror(spec, mirror, layouts, data)
        if found is not None:
            return found
        log.info("mirror %s holds no copy of %s; trying the official source", mirror, spec.name)
    if spec.url is None or (spec.name == "beauty" and data.beauty_source in ("s3rec", "ticoserec")):
        wanted = ", ".join(f for layout in layouts for f in layout.files)
        raise DatasetUnavailable(
            f"{spec.name}: the {data.beauty_source!r} form exists only as a local copy; put {wanted} under a mirror "
            f"folder and set ${MIRROR_ENV} (or data.mirror)"
        )
    dest = Path(data.cache_dir) / spec.archive
    if not dest.exists():
        _require_reachable(spec.url, spec.name)
    fetched = fetch(
        spec.url,
        dest,
        checksum=spec.checksum,
        retries=data.download.retries,
        backoff_s=data.download.backoff_s,
        timeout_s=data.download.timeout_s,
    )
    result = spec.read_archive([fetched.path], data.timestamps.window())
    files = [_file_record(fetched.path, spec.checksum, sha256=fetched.sha256)]
    kind = "download" if fetched.downloaded else "cache"
    return result, {"kind": kind, "url": spec.url, "layout": "official", "complete": True, "files": files}


def _allowed_layouts(spec: DatasetSpec, data: DataParams) -> tuple[Layout, ...]:
    if spec.name != "beauty" or data.beauty_source == "auto":
        return spec.mirror_layouts
    return tuple(layout for layout in spec.mirror_layouts if layout.name == data.beauty_source)


def _from_mirror(
    spec: DatasetSpec, mirror: Path, layouts: tuple[Layout, ...], data: DataParams
) -> tuple[ReadResult, dict[str, Any]] | None:
    if data.beauty_source in ("auto", "raw") and spec.archive:
        for candidate in (mirror / spec.archive, mirror / spec.name / spec.archive):
            if candidate.is_file():
                record = _file_record(candidate, spec.checksum)
                if spec.checksum and not record["checksum_verified"]:
                    raise BadInputError(
                        f"{candidate}: checksum mismatch (expected {spec.checksum}); the mirror copy is corrupt"
                    )
                log.info("using the official archive from the mirror: %s", candidate)
                source = {"kind": "mirror", "layout": "official", "complete": True, "files": [record]}
                return spec.read_archive([candidate], data.timestamps.window()), source
    for layout in layouts:
        paths = [mirror / f for f in layout.files]
        if all(p.is_file() for p in paths):
            if not layout.complete:
                log.warning("%s: using %s — %s", spec.name, paths[0], layout.note)
            else:
                log.info("%s: using the mirror copy %s (%s)", spec.name, paths[0], layout.name)
            source = {
                "kind": "mirror",
                "layout": layout.name,
                "complete": layout.complete,
                "note": layout.note,
                "files": [_file_record(p, None) for p in paths],
            }
            return layout.read(paths, data.timestamps.window()), source
    return None


def _require_reachable(url: str, dataset: str) -> None:
    """Fail at once (no retry loop) when the host cannot even be resolved or connected to."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as err:
        raise DatasetUnavailable(
            f"cannot reach {url} ({err.__class__.__name__}: {err}) to download {dataset!r}. Either point "
            f"${MIRROR_ENV} (or data.mirror in params.yaml) at a folder holding a copy, or pick a dataset that "
            "needs no download: data.dataset=synthetic (e.g. `dvc exp run -S data.dataset=synthetic`)."
        ) from err


def _file_record(path: Path, checksum: str | None, sha256: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": path.name,
        "size": path.stat().st_size,
        "sha256": sha256 or file_digest(path, "sha256"),
    }
    if checksum:
        algorithm, expected = parse_checksum(checksum)
        actual = record["sha256"] if algorithm == "sha256" else file_digest(path, algorithm)
        record["official_checksum"] = checksum
        record["checksum_verified"] = actual == expected
    return record


def read_custom_source(
    custom: CustomSourceParams,
    path: str | None = None,
    window: TimestampWindow | None = None,
    *,
    max_file_mb: int = DataParams.max_file_mb,
) -> ReadResult:
    """Read ``path`` (default ``data.custom.path``) with the column mapping and event filter of ``data.custom``,
    each file within ``data.max_file_mb``."""
    return read_custom(
        path or custom.path,
        custom.columns(),
        fmt=custom.format,
        delimiter=custom.csv_delimiter,
        event_col=custom.event_col,
        event_types=custom.event_types,
        window=window,
        log_typing=custom.log_typing(),
        max_file_mb=max_file_mb,
    )


def _custom(data: DataParams) -> tuple[ReadResult, dict[str, Any]]:
    custom = data.custom
    result = read_custom_source(custom, window=data.timestamps.window(), max_file_mb=data.max_file_mb)
    if custom.until is not None:
        # e.g. a retraining interval: events merged later (by later intervals) must not leak into this one
        later = result.events["timestamp"] >= custom.until
        log.info("kept %d events before %d; left out %d later ones", (~later).sum(), custom.until, later.sum())
        result.events = result.events[~later].reset_index(drop=True)
    files = [_file_record(p, None) for p in resolve_files(custom.path)]
    source = {"kind": "custom", "layout": custom.format, "complete": True, "files": files, "until": custom.until}
    return result, source


def _synthetic(data: DataParams) -> tuple[ReadResult, dict[str, Any]]:
    from pipeline.data.synthetic import SyntheticConfig, generate_interactions

    config = SyntheticConfig(**asdict(data.synthetic))
    events, _segments = generate_interactions(config)
    frame = events.to_pandas()
    result = ReadResult(frame, empty_bad_rows(), len(frame), has_timestamps=True)
    return result, {"kind": "generated", "layout": "synthetic", "complete": True, "config": asdict(config)}


def _to_arrow(events: pd.DataFrame) -> pa.Table:
    table = pa.Table.from_pandas(events, preserve_index=False)
    # pandas' string dtype maps to large_string; plain string keeps files small and readers simple
    fields = [pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) else f for f in table.schema]
    return table.cast(pa.schema(fields))
