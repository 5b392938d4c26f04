"""Validate one interval's log files: the download stage's readers and quarantine, plus checks only fresh logs need.

Each file goes through :func:`pipeline.data.download.read_custom_source` with the ``data.custom`` column mapping, which
quarantines rows with a missing or mistyped field or a timestamp that is unparsable or outside the window of
``data.timestamps`` (before ``earliest``; after now + ``future_tolerance_s``, as a log in milliseconds instead of
seconds or a broken clock gives) with file, line, reason and raw text. One check follows on the parsed events: an
exact repeat of an earlier event of the batch (same user_id, item_id, timestamp: a shipper that sent a line or a file
twice) is quarantined for the record but is not malformed: it does not count toward the bad-row fraction. Those rows
were parsed already, so their quarantine entry carries line 0 and the parsed values as text. A last line without its
newline (a writer cut short or still appending) is quarantined the same way, and counted apart, as ``incomplete``: a
warning names the file. Files over ``data.max_file_mb`` are refused (see :mod:`pipeline.data.readers`). A file that
cannot be read at all (no header, missing columns, not Parquet) fails the interval with the file named: that is a
producer changing its format, which a person should look at. Above ``retrain.max_bad_fraction`` malformed rows the
interval fails after writing the quarantine file; below it the good rows go on.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.data.download import read_custom_source
from pipeline.data.quarantine import (
    BadInputError,
    bad_rows_frame,
    empty_bad_rows,
    enforce_bad_fraction,
    malformed_mask,
    write_quarantine,
)
from pipeline.ingest.store import KEY, store_table
from pipeline.io import write_json_atomic, write_parquet_atomic
from pipeline.params import CustomSourceParams, DataParams, TimestampParams

log = logging.getLogger(__name__)

DUPLICATE_REASON = "duplicate event (same user_id, item_id and timestamp as an earlier row of this batch)"


@dataclass(frozen=True)
class BatchOutputs:
    batch: Path  # valid, de-duplicated events in the store schema
    quarantine: Path  # every rejected row with its reason
    report: Path  # the counts below, as JSON

    @classmethod
    def under(cls, folder: str | Path) -> BatchOutputs:
        folder = Path(folder)
        return cls(folder / "batch.parquet", folder / "quarantine.csv", folder / "report.json")


@dataclass
class BatchReport:
    files: int = 0
    rows: int = 0  # rows read, good or bad
    malformed: int = 0  # quarantined rows that count toward max_bad_fraction
    incomplete: int = 0  # last lines without their newline (quarantined, not malformed)
    duplicates: int = 0  # repeats inside the batch (quarantined, not malformed)
    events: int = 0  # valid distinct events in the batch
    reasons: dict[str, int] = field(default_factory=dict)  # quarantined rows per reason


def validate_logs(
    files: list[str | Path],
    custom: CustomSourceParams,
    max_bad_fraction: float,
    out_dir: str | Path,
    now: float | None = None,
    sources: dict[str, str] | None = None,
    timestamps: TimestampParams | None = None,
    max_file_mb: int = DataParams.max_file_mb,
) -> BatchReport:
    """Check ``files`` and write ``batch.parquet``, ``quarantine.csv`` and ``report.json`` under ``out_dir``.

    ``now`` (unix seconds, default the wall clock) is the reference of the future end of the ``timestamps``
    window; ``sources`` maps a file to the name the quarantine should show (the inbox URL of a staged copy);
    ``max_file_mb`` is ``data.max_file_mb``, the readers' size limit per file.
    """
    outputs = BatchOutputs.under(out_dir)
    outputs.batch.unlink(missing_ok=True)  # a failed attempt must not leave an earlier attempt's batch behind
    window = (timestamps or TimestampParams()).window(now)
    events, malformed, total = [], [empty_bad_rows()], 0
    for path in sorted(map(str, files)):
        try:
            result = read_custom_source(custom, path, window, max_file_mb=max_file_mb)
        except BadInputError as err:  # name the inbox file, not its staged copy
            shown = (sources or {}).get(path)
            if shown is None:
                raise
            raise BadInputError(str(err).replace(path, shown)) from err
        total += result.total_rows
        malformed.append(result.bad_rows)
        events.append(result.events.assign(_source=path))
    frame = pd.concat(events, ignore_index=True) if events else pd.DataFrame(columns=[*KEY, "_source"])
    repeated = frame.duplicated(KEY, keep="first")
    duplicates = [_parsed_rows(src, rows, DUPLICATE_REASON) for src, rows in frame[repeated].groupby("_source")]
    malformed_rows = pd.concat(malformed, ignore_index=True)
    counted = malformed_mask(malformed_rows)
    quarantined = pd.concat([malformed_rows, *duplicates], ignore_index=True)
    if sources:  # the quarantine and the too-many-bad-rows error name the inbox file, not its staged copy
        malformed_rows["source"] = _shown(malformed_rows["source"], sources)
        quarantined["source"] = _shown(quarantined["source"], sources)
    write_quarantine(outputs.quarantine, quarantined)
    report = BatchReport(
        files=len(files),
        rows=total,
        malformed=int(counted.sum()),
        incomplete=int((~counted).sum()),
        duplicates=int(repeated.sum()),
        events=int((~repeated).sum()),
        reasons={str(k): int(v) for k, v in quarantined["reason"].value_counts().items()},
    )
    write_json_atomic(outputs.report, asdict(report))
    if total:
        enforce_bad_fraction(
            malformed_rows, total, max_bad_fraction, str(outputs.quarantine), setting="retrain.max_bad_fraction"
        )
    good = frame[~repeated].drop(columns="_source")
    write_parquet_atomic(outputs.batch, store_table(good.sort_values(KEY, kind="stable")))
    log.info(
        "validated %d file(s): %d rows, %d valid events, %d malformed, %d incomplete last lines, %d duplicates",
        report.files,
        report.rows,
        report.events,
        report.malformed,
        report.incomplete,
        report.duplicates,
    )
    return report


def _shown(names: pd.Series, sources: dict[str, str]) -> pd.Series:
    return names.map(lambda name: sources.get(name, name)).astype("string")


def _parsed_rows(source: str, events: pd.DataFrame, reason: str) -> pd.DataFrame:
    if events.empty:
        return empty_bad_rows()
    raw = events["user_id"].astype("string") + "," + events["item_id"].astype("string") + ","
    raw = raw + events["timestamp"].astype("string")
    return bad_rows_frame(
        source,
        pd.Series([0] * len(events)),
        pd.Series([reason] * len(events)),
        raw.reset_index(drop=True),
    )
