"""Bad-row bookkeeping shared by every reader.

Rows that cannot be parsed are never dropped silently: each one is kept with its source file, line number, raw text
and a reason, written to a quarantine file, and counted. Past ``max_bad_fraction`` the stage fails, because a file
that is mostly garbage usually means a wrong format or column mapping rather than a few corrupt lines.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pandas as pd

from pipeline.errors import BadInputError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

QUARANTINE_COLUMNS = ["source", "line", "reason", "raw"]


@dataclass
class ReadResult:
    """Good events of one source plus its quarantined rows."""

    events: pd.DataFrame  # user_id, item_id, timestamp (int64), optional rating
    bad_rows: pd.DataFrame  # QUARANTINE_COLUMNS
    total_rows: int
    has_timestamps: bool  # False: timestamp is the position in the file (sequence formats)


def empty_bad_rows() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "line" else "string") for c in QUARANTINE_COLUMNS})


def bad_rows_frame(source: str, lines: pd.Series, reasons: pd.Series, raw: pd.Series) -> pd.DataFrame:
    """Build quarantine rows; ``lines`` are 1-based line (or record) numbers in ``source``."""
    return pd.DataFrame(
        {
            "source": pd.Series([source] * len(lines), dtype="string"),
            "line": lines.to_numpy(dtype="int64"),
            "reason": reasons.astype("string").to_numpy(),
            "raw": raw.astype("string").to_numpy(),
        }
    )


def write_quarantine(path: str | os.PathLike[str], bad_rows: pd.DataFrame) -> None:
    """Always written (header only when clean) so the file is a stable DVC output."""
    with atomic_path(path, suffix=".csv") as tmp:
        bad_rows.reindex(columns=QUARANTINE_COLUMNS).to_csv(tmp, index=False)


def enforce_bad_fraction(
    bad_rows: pd.DataFrame,
    total_rows: int,
    max_fraction: float,
    quarantine: str,
    setting: str = "data.max_bad_fraction",
) -> None:
    """Log the counts per reason; raise when bad rows exceed ``max_fraction`` (the parameter ``setting``)."""
    if total_rows == 0:
        raise BadInputError("the input holds no rows at all: nothing to build interactions from")
    if bad_rows.empty:
        return
    by_reason = bad_rows["reason"].value_counts()
    log.warning(
        "quarantined %d of %d rows (%.3f%%) to %s: %s",
        len(bad_rows),
        total_rows,
        100 * len(bad_rows) / total_rows,
        quarantine,
        ", ".join(f"{reason}: {count}" for reason, count in by_reason.items()),
    )
    fraction = len(bad_rows) / total_rows
    if fraction > max_fraction:
        examples = "; ".join(
            f"{row.source}:{row.line}: {row.reason}: {str(row.raw)[:60]!r}" for row in bad_rows.head(5).itertuples()
        )
        raise BadInputError(
            f"{len(bad_rows)} of {total_rows} rows ({fraction:.1%}) are malformed, above "
            f"{setting}={max_fraction}; all bad rows with reasons are in {quarantine}. First bad rows: {examples}"
        )
