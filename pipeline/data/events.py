"""The one place where raw text columns become typed events: every reader of every source ends here.

A row is kept only when each field parses *exactly* into its type; otherwise it goes to quarantine with the first
reason that applies. Nothing wraps or rounds (only date-time strings lose their fraction of a second):

- integer ids must be whole numbers inside the int64 range (``99999999999999999999`` is quarantined, never
  turned into ``-2**63``); ids of string sources stay strings;
- a timestamp (unix seconds, a whole number, or a date-time string) must lie inside the window
  ``[data.timestamps.earliest, now + data.timestamps.future_tolerance_s]``: ``9223372036854775808``, ``1e300``,
  ``-5`` or milliseconds instead of seconds are quarantined with the bound they break;
- a rating must be a finite number that float32 holds.

Sources without timestamps (the sequence formats) number their events by position; the window does not apply.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.data.quarantine import ReadResult, bad_rows_frame

CANONICAL = ["user_id", "item_id", "timestamp", "rating"]
INT64_MAX_DIGITS = "9223372036854775807"  # 2**63 - 1
INT64_MIN_DIGITS = "9223372036854775808"  # the magnitude of -2**63
ASCII_NUMBER = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)"
YEAR = r"(?<![0-9])[0-9]{4}(?![0-9])"  # a date-time text must name its year: "12:30" or "Jan" is not a moment
FLOAT_EXACT = 2.0**53  # a float at or below this is an exact integer; above, "1e17"-style ids could be rounded
FLOAT32_MAX = float(np.finfo(np.float32).max)

BEFORE_WINDOW = "timestamp before data.timestamps.earliest"
AFTER_WINDOW = "timestamp after now + data.timestamps.future_tolerance_s (milliseconds instead of seconds?)"


@dataclass(frozen=True)
class TimestampWindow:
    """Valid event times in unix seconds, both ends included."""

    earliest: int = 0
    latest: int = 2**62

    @classmethod
    def until_now(cls, tolerance_s: float = 86_400.0, earliest: int = 0, now: float | None = None) -> TimestampWindow:
        """``[earliest, now + tolerance_s]``; ``now`` defaults to the wall clock."""
        now = datetime.datetime.now(datetime.UTC).timestamp() if now is None else now
        return cls(earliest, int(now + tolerance_s))


def exact_int64(text: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Whole numbers in ``text`` as exact int64 values, the mask of entries that are such numbers, and the mask of
    plain integers outside the int64 range.

    Plain ASCII digit strings are range-checked as text (so ``9223372036854775808`` is refused rather than
    wrapped); other ASCII numeric spellings (``5.0``, ``1e3``) are accepted only where a float holds them exactly.
    Digits of other scripts (``١٢``) are not numbers here.
    """
    text = text.astype("string").str.strip()
    digits = bool_mask(text.str.fullmatch(r"[+-]?[0-9]+"))
    magnitude = text.str.lstrip("+-").str.lstrip("0").fillna("")
    negative = bool_mask(text.str.startswith("-"))
    length = magnitude.str.len().to_numpy(dtype="int64")
    limit = np.where(negative, INT64_MIN_DIGITS, INT64_MAX_DIGITS)
    within = (length < 19) | ((length == 19) & (magnitude.to_numpy(dtype=object) <= limit))
    exact = digits & within
    values = np.zeros(len(text), dtype="int64")
    if exact.any():
        values[exact] = pd.to_numeric(text[exact], errors="coerce").to_numpy(dtype="int64")
    other = ~digits & bool_mask(text.str.fullmatch(ASCII_NUMBER))
    if other.any():
        number = pd.to_numeric(text[other], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        whole = np.isfinite(number) & (np.mod(number, 1, where=np.isfinite(number), out=np.ones_like(number)) == 0)
        whole &= np.abs(number, where=whole, out=np.full_like(number, np.inf)) <= FLOAT_EXACT
        positions = np.flatnonzero(other)
        values[positions[whole]] = number[whole].astype("int64")
        exact[positions[whole]] = True
    return pd.Series(values, index=text.index), exact, digits & ~within


def bool_mask(values: pd.Series) -> np.ndarray:
    """A nullable boolean Series as a plain numpy mask (missing = False)."""
    return values.astype("boolean").fillna(False).to_numpy(dtype=bool)


def unix_seconds(text: pd.Series) -> pd.Series:
    """Seconds since the epoch as float64 (NaN where unparsable): numbers as they are, date-time strings in UTC.

    Float64 is exact for every value inside any sane window (< 2**53), and out-of-window values, however large,
    only need their side of the window.
    """
    text = text.astype("string").str.strip()
    numeric = bool_mask(text.str.fullmatch(ASCII_NUMBER, case=False))
    seconds = np.full(len(text), np.nan)
    if numeric.any():
        seconds[numeric] = pd.to_numeric(text[numeric], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    textual = ~numeric & bool_mask(text.str.contains(YEAR))
    if textual.any():
        parsed = pd.to_datetime(text[textual], errors="coerce", utc=True, format="mixed")
        # whole seconds through numpy: pandas 3 keeps years such as 9999 at a coarser unit, and subtracting a
        # nanosecond epoch from them would overflow
        moments = parsed.dt.tz_localize(None).to_numpy().astype("datetime64[s]")
        since_epoch = moments.astype("int64").astype("float64")
        since_epoch[np.isnat(moments)] = np.nan
        seconds[textual] = since_epoch
    return pd.Series(seconds, index=text.index)


def validate_events(
    source: str,
    parts: pd.DataFrame,
    line_no: pd.Series,
    raw: pd.Series,
    *,
    integer_ids: bool,
    has_timestamps: bool,
    total_rows: int,
    window: TimestampWindow | None = None,
    reasons: pd.Series | None = None,
) -> ReadResult:
    """Type-check text columns row by row (vectorised) and split them into good events and quarantined rows.

    ``reasons`` carries verdicts a reader reached before (e.g. a JSON id that is a list); ``window`` defaults to
    ``[1970-01-01, now + 1 day]``.
    """
    window = window or TimestampWindow.until_now()
    parts = parts.reset_index(drop=True)
    line_no = pd.Series(np.asarray(line_no), dtype="int64")
    raw = pd.Series(np.asarray(raw, dtype=object), dtype="string")
    reason = pd.Series(pd.NA, index=parts.index, dtype="string")
    if reasons is not None:
        reason[:] = np.asarray(reasons, dtype=object)

    def flag(mask: pd.Series | np.ndarray, text: str) -> None:
        mask = np.asarray(pd.Series(mask).fillna(False), dtype=bool)
        reason[mask & reason.isna().to_numpy()] = text

    out: dict[str, pd.Series] = {}
    for col in ("user_id", "item_id"):
        values = parts[col].astype("string").str.strip()
        present = values.notna() & (values != "")
        flag(~present, f"missing {col}")
        if integer_ids:
            numbers, exact, overflow = exact_int64(values)
            flag(present & overflow, f"{col} is outside the int64 range")
            flag(present & ~exact, f"{col} is not an integer")
            out[col] = numbers
        else:
            out[col] = values
    stamps = parts["timestamp"].astype("string").str.strip()
    present = stamps.notna() & (stamps != "")
    flag(~present, "missing timestamp")
    seconds = unix_seconds(stamps)
    flag(present & (~np.isfinite(seconds) | (seconds % 1 != 0)), "bad timestamp")
    if has_timestamps:
        flag(seconds < window.earliest, BEFORE_WINDOW)
        flag(seconds > window.latest, AFTER_WINDOW)
    out["timestamp"] = seconds
    if "rating" in parts:
        rating_text = parts["rating"].astype("string").str.strip()
        rating = pd.to_numeric(rating_text, errors="coerce").astype("float64")
        given = rating_text.notna() & (rating_text != "")
        flag(given & rating.isna(), "rating is not a number")
        flag(given & ~(rating.abs() <= FLOAT32_MAX), "rating is not finite (or beyond float32)")
        out["rating"] = rating
    good = reason.isna().to_numpy()
    events = pd.DataFrame({name: values[good] for name, values in out.items()}).reset_index(drop=True)
    if integer_ids:
        events["user_id"] = events["user_id"].astype("int64")
        events["item_id"] = events["item_id"].astype("int64")
    events["timestamp"] = events["timestamp"].astype("int64")
    if "rating" in events:
        events["rating"] = events["rating"].astype("float32")
    for extra in parts.columns.difference([*CANONICAL]):
        events[extra] = parts[extra][good].reset_index(drop=True)
    bad = bad_rows_frame(source, line_no[~good], reason[~good], raw[~good])
    return ReadResult(events, bad, total_rows, has_timestamps)
