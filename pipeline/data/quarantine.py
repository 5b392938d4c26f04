"""Bad-row bookkeeping shared by every reader.

Rows that cannot be parsed are never dropped silently: each one is kept with its source file, line number, raw text
and a reason, written to a quarantine file, and counted. Past ``max_bad_fraction`` the stage fails, because a file
that is mostly garbage usually means a wrong format or column mapping rather than a few corrupt lines. A last line
without its newline is quarantined but not malformed: a writer cut short or still appending leaves exactly that in a
good log, and one such line must not fail a small file.
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
INCOMPLETE = "incomplete last line: no newline at the end of the file (cut mid-write?)"


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


def malformed_mask(bad_rows: pd.DataFrame) -> pd.Series:
    """Which quarantined rows count toward ``max_bad_fraction``: all but cut last lines (see the module docstring)."""
    return (bad_rows["reason"] != INCOMPLETE).fillna(True).astype(bool)


def enforce_bad_fraction(
    bad_rows: pd.DataFrame,
    total_rows: int,
    max_fraction: float,
    quarantine: str,
    setting: str = "data.max_bad_fraction",
) -> None:
    """Log the counts per reason; raise when malformed rows exceed ``max_fraction`` (the parameter ``setting``).

    A cut last line is quarantined with the rest but is not malformed: it is logged as a warning naming its file.
    """
    if total_rows == 0:
        raise BadInputError("the input holds no rows at all: nothing to build interactions from")
    if bad_rows.empty:
        return
    counted = malformed_mask(bad_rows)
    for source in bad_rows.loc[~counted, "source"].drop_duplicates():
        log.warning(
            "%s: its last line has no newline (a write cut short, or a writer still appending); it is quarantined "
            "to %s, not counted as malformed, and waits for a complete write: read the file again once the line "
            "ends in its newline",
            source,
            quarantine,
        )
    by_reason = bad_rows["reason"].value_counts()
    log.warning(
        "quarantined %d of %d rows (%.3f%%) to %s: %s",
        len(bad_rows),
        total_rows,
        100 * len(bad_rows) / total_rows,
        quarantine,
        ", ".join(f"{reason}: {count}" for reason, count in by_reason.items()),
    )
    malformed = bad_rows[counted]
    fraction = len(malformed) / total_rows
    if fraction > max_fraction:
        examples = "; ".join(
            f"{row.source}:{row.line}: {row.reason}: {str(row.raw)[:60]!r}" for row in malformed.head(5).itertuples()
        )
        raise BadInputError(
            f"{len(malformed)} of {total_rows} rows ({fraction:.1%}) are malformed, above "
            f"{setting}={max_fraction}; all bad rows with reasons are in {quarantine}. First bad rows: {examples}"
        )
