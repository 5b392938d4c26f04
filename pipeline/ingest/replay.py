"""Replay a dataset with real timestamps as fresh logs: history into the store, each later day or week into the inbox.

``python -m pipeline --set data.dataset=ml-100k replay --cut 1998-03-01`` obtains the dataset through the download
stage (mirror, cache or official source; ``synthetic`` needs nothing), merges every event before the cut into the
interaction store and writes each later period as one log file named by the period's first day
(``<inbox>/1998-03-01.csv``, ``1998-03-02.csv``, ...) in the format that ``data.custom`` describes (column names,
delimiter, csv / jsonl / parquet, unix seconds or the declared ``timestamp_format``). Those files are what a log
shipper would have delivered, so the retraining DAG picks them up interval by interval: trigger it for a replayed
date or backfill a range of them.

Weekly periods start on the cut date (files ``<cut>``, ``<cut + 7 days>``, ...). Datasets without real
timestamps (the SASRec / S3Rec sequence formats, whose "timestamps" are line positions) are refused. Replaying again
is harmless: the store de-duplicates and each log file is rewritten whole.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Literal

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.data.download import download
from pipeline.errors import BadInputError
from pipeline.ingest.store import merge
from pipeline.io import write_bytes_atomic
from pipeline.params import CustomSourceParams, Params, ParamsError

log = logging.getLogger(__name__)

PERIOD_DAYS = {"day": 1, "week": 7}


@dataclass
class ReplayResult:
    store_events: int = 0  # events before the cut, added to the store
    files: list[str] = field(default_factory=list)  # log files written, oldest first
    events_per_file: list[int] = field(default_factory=list)


def replay(
    params: Params,
    cut: date,
    period: Literal["day", "week"] = "day",
    until: date | None = None,
) -> ReplayResult:
    """Split ``params.data.dataset`` at ``cut`` (UTC midnight): before -> store, ``[cut, until)`` -> inbox files."""
    if period not in PERIOD_DAYS:
        raise ParamsError(f"period must be one of {', '.join(PERIOD_DAYS)}, got {period!r}")
    scratch = Path(params.retrain.work_dir) / "replay" / params.data.dataset
    outputs = download(dataclasses.replace(params.data, interim_dir=str(scratch)))
    manifest = json.loads(outputs.manifest.read_text())
    if not manifest["has_timestamps"]:
        raise BadInputError(
            f"{params.data.dataset}: this copy has no real timestamps (its order comes from line positions), so it "
            "cannot be replayed by date; use a source with timestamps (ml-100k, ml-1m, synthetic, raw Beauty reviews)"
        )
    events = pq.read_table(outputs.interactions).to_pandas()
    cut_s = _midnight(cut)
    timestamps = events["timestamp"].to_numpy()
    result = ReplayResult(store_events=merge(params.retrain.store_dir, events[timestamps < cut_s]).added)
    later = events[timestamps >= cut_s]
    if until is not None:
        later = later[later["timestamp"].to_numpy() < _midnight(until)]
    length = PERIOD_DAYS[period] * 86_400
    index = (later["timestamp"].to_numpy() - cut_s) // length
    fs, root = fsspec.core.url_to_fs(params.retrain.inbox)
    for k in np.unique(index):
        first_day = cut + timedelta(days=int(k) * PERIOD_DAYS[period])
        chunk = later[index == k]
        name = _write_log(fs, root.rstrip("/"), first_day, chunk, params.data.custom)
        result.files.append(name)
        result.events_per_file.append(len(chunk))
    log.info(
        "replayed %s: %d events before %s into %s; %d %s file(s) (%d events) into %s",
        params.data.dataset,
        result.store_events,
        cut,
        params.retrain.store_dir,
        len(result.files),
        period,
        sum(result.events_per_file),
        params.retrain.inbox,
    )
    return result


def _write_log(
    fs: fsspec.AbstractFileSystem, root: str, day: date, events: pd.DataFrame, custom: CustomSourceParams
) -> str:
    """Write one period's events as the log format of ``data.custom``; returns the file's path."""
    columns = {canonical: name for canonical, name in custom.columns().items() if canonical in events}
    frame = events[list(columns)].rename(columns=columns)
    if custom.timestamp_format not in ("auto", "unix"):  # the times as data.custom.timestamp_format spells them
        moments = pd.to_datetime(frame[custom.timestamp_col], unit="s", utc=True)
        iso = custom.timestamp_format == "iso8601"
        frame[custom.timestamp_col] = moments.dt.strftime("%Y-%m-%dT%H:%M:%SZ" if iso else custom.timestamp_format)
    fmt = "csv" if custom.format == "auto" else custom.format
    buffer = io.BytesIO()
    if fmt == "csv":
        frame.to_csv(buffer, index=False, sep=custom.csv_delimiter)
    elif fmt == "jsonl":
        frame.to_json(buffer, orient="records", lines=True)
    else:
        frame.to_parquet(buffer, index=False)
    path = f"{root}/{day.isoformat()}.{fmt}"
    if "file" in _protocols(fs):
        write_bytes_atomic(path, buffer.getvalue())  # readers of a local inbox never see half a file
    else:
        fs.pipe_file(path, buffer.getvalue())  # object stores publish an object whole
    return path


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _midnight(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
