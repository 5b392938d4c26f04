"""The one place where raw text columns become typed events: every reader of every source ends here.

A row is kept only when each field parses *exactly* into its type; otherwise it goes to quarantine with the first
reason that applies. Nothing wraps or rounds (only date-time strings lose their fraction of a second):

- integer ids must be whole numbers inside the int64 range (``99999999999999999999`` is quarantined, never
  turned into ``-2**63``); ids of string sources stay strings;
- a timestamp (unix seconds, a whole number, or a date-time string) must lie inside the window
  ``[data.timestamps.earliest, now + data.timestamps.future_tolerance_s]``: ``9223372036854775808``, ``1e300``,
  ``-5`` or milliseconds instead of seconds are quarantined with the bound they break;
- a rating must be a finite number that float32 holds.

Custom logs (:class:`LogTyping`, from ``data.custom.id_type`` and ``data.custom.timestamp_format``) are typed more
strictly, because their producers are unknown: one number must never become several items, and a time must never
be guessed.

- ``id_type: auto``: a canonical integer (``0`` or ``-?[1-9][0-9]*``, ASCII, inside int64) is a number; text that
  only looks like one (``1.0``, ``01``, ``+1``, ``1e3``, ``' 1'``, ``١``, or an integer beyond int64) is quarantined
  with a reason naming ``id_type: string``; any other text (``u7``, ``B00123X``) is a string id.
- ``id_type: int``: ids must be ASCII digits with an optional leading ``-``, inside int64; they are kept in
  canonical decimal, so ``01`` and ``1`` are one item.
- ``id_type: string``: ids are kept as text (``1`` and ``01`` are two items, by the user's choice).
- ``timestamp_format: auto`` accepts whole unix seconds and ISO 8601 / RFC 3339 date-times only; a bare 4-digit
  number (``2024`` or ``2024.0``: a year, or unix second 2024?) and any other date-time spelling (``05/01/2024``:
  which is the day?) are quarantined with a reason naming the setting. ``unix``, ``iso8601`` or a strftime pattern
  accept exactly that.

All ids of custom logs stay text (the store's schema): ``auto`` and ``int`` only decide which texts are kept.
Surrounding white space is trimmed from every id, except that under ``auto`` a padded number is not canonical.
Sources without timestamps (the sequence formats) number their events by position; the window does not apply.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace

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

ID_TYPES = ("auto", "int", "string")
TIMESTAMP_FORMATS = ("auto", "unix", "iso8601")  # or a strftime pattern naming the year
CANONICAL_INT = r"0|-?[1-9][0-9]*"
NUMBER_LIKE = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"  # \d: the digits of every script (١, １)
ISO_8601 = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?(?:[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?)?"
)
TO_KEEP_TEXT = "set data.custom.id_type: string to keep such ids as text"
NOT_CANONICAL = (
    "{col} looks like a number but is no plain integer (1.0, 01, +1, 1e3, padded, non-ASCII); " + TO_KEEP_TEXT
)
BEYOND_INT64 = "{col} is an integer outside the int64 range; " + TO_KEEP_TEXT
NOT_DIGITS = "{col} is not an integer (data.custom.id_type: int wants ASCII digits, optionally a leading -)"
OUTSIDE_INT64 = "{col} is outside the int64 range"
AMBIGUOUS_YEAR = "timestamp is a bare 4-digit number (a year, or unix seconds?): declare data.custom.timestamp_format"
NOT_ISO = (
    "timestamp is a date-time but not ISO 8601 (is 05/01/2024 the 5th of January or of May?): "
    "declare its format in data.custom.timestamp_format"
)
NOT_UNIX = "timestamp is not unix seconds (data.custom.timestamp_format: unix)"
NOT_ISO_DECLARED = "timestamp is not an ISO 8601 date-time (data.custom.timestamp_format: iso8601)"
NOT_DECLARED = "timestamp does not match data.custom.timestamp_format {fmt!r}"


@dataclass(frozen=True)
class LogTyping:
    """How the text fields of a custom log become ids and times: ``data.custom.id_type`` and ``timestamp_format``."""

    id_type: str = "auto"
    timestamp_format: str = "auto"

    def typed_times(self) -> LogTyping:
        """The same rules for a file whose times the format typed already (Parquet/JSON timestamps): unix seconds."""
        return replace(self, timestamp_format="unix")


def timestamp_format_error(fmt: str) -> str | None:
    """Why ``fmt`` cannot be a ``data.custom.timestamp_format`` (None when it can).

    A pattern must name its year (``%Y`` or ``%y``) and be one pandas parses: it is tried on a sample moment.
    """
    if fmt in TIMESTAMP_FORMATS:
        return None
    if "%Y" not in fmt and "%y" not in fmt:
        return f"{fmt!r} is none of {', '.join(TIMESTAMP_FORMATS)} nor a strftime pattern with a year (%Y or %y)"
    sample = datetime.datetime(2024, 1, 5, 13, 45, 30, tzinfo=datetime.UTC)
    try:
        pd.to_datetime(pd.Series([sample.strftime(fmt)]), format=fmt, exact=True, utc=True)
    except (ValueError, TypeError) as err:
        return f"{fmt!r} is not a usable strftime pattern ({' '.join(str(err).split())[:80]})"
    return None


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
    _, within = int64_magnitude(text)
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


def int64_magnitude(text: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """For signed ASCII digit strings: the magnitude without sign and leading zeros (``""`` for zero), and the mask
    of those inside the int64 range, compared as text so nothing wraps on the way."""
    magnitude = text.str.lstrip("+-").str.lstrip("0").fillna("")
    negative = bool_mask(text.str.startswith("-"))
    length = magnitude.str.len().to_numpy(dtype="int64")
    limit = np.where(negative, INT64_MIN_DIGITS, INT64_MAX_DIGITS)
    return magnitude, (length < 19) | ((length == 19) & (magnitude.to_numpy(dtype=object) <= limit))


def typed_ids(values: pd.Series, col: str, id_type: str) -> tuple[pd.Series, list[tuple[np.ndarray, str]]]:
    """A custom log's ``col`` under ``data.custom.id_type``: the ids as text, and (mask, reason) verdicts in order.

    Missing ids are the caller's; the verdicts only judge present ones.
    """
    raw = values.astype("string")
    text = raw.str.strip()
    if id_type == "string":
        return text, []
    if id_type == "int":
        digits = bool_mask(text.str.fullmatch(r"-?[0-9]+"))
        magnitude, within = int64_magnitude(text)
        canonical = magnitude.mask(magnitude == "", "0")
        canonical = canonical.mask(bool_mask(text.str.startswith("-")) & (canonical != "0"), "-" + canonical)
        return canonical, [(~digits, NOT_DIGITS.format(col=col)), (~within, OUTSIDE_INT64.format(col=col))]
    canonical = bool_mask(raw.str.fullmatch(CANONICAL_INT))
    number_like = bool_mask(text.str.fullmatch(NUMBER_LIKE))
    _, within = int64_magnitude(text)
    return text, [
        (canonical & ~within, BEYOND_INT64.format(col=col)),
        (number_like & ~canonical, NOT_CANONICAL.format(col=col)),
    ]


def typed_seconds(text: pd.Series, fmt: str) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """A custom log's timestamps under ``data.custom.timestamp_format``: unix seconds as float64 (NaN where not
    read), and (mask, reason) verdicts for the texts the format refuses. ``text`` is stripped; missing is the
    caller's."""
    seconds = np.full(len(text), np.nan)
    if fmt not in TIMESTAMP_FORMATS:  # a declared strftime pattern, exactly
        parsed = pd.to_datetime(text, format=fmt, exact=True, utc=True, errors="coerce")
        seconds[:] = whole_seconds(parsed)
        return seconds, [(np.isnan(seconds), NOT_DECLARED.format(fmt=fmt))]
    numeric = bool_mask(text.str.fullmatch(ASCII_NUMBER, case=False)) if fmt != "iso8601" else np.zeros(len(text), bool)
    if numeric.any():
        seconds[numeric] = pd.to_numeric(text[numeric], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    if fmt == "unix":
        return seconds, [(~numeric, NOT_UNIX)]
    iso = bool_mask(text.str.fullmatch(ISO_8601))
    if iso.any():
        seconds[iso] = whole_seconds(pd.to_datetime(text[iso], format="ISO8601", utc=True, errors="coerce"))
    if fmt == "iso8601":
        return seconds, [(~iso, NOT_ISO_DECLARED)]
    other = ~numeric & ~iso & bool_mask(text.str.contains(YEAR))  # a date-time spelled some other way?
    if other.any():
        parsed = pd.to_datetime(text[other], errors="coerce", utc=True, format="mixed")
        other[other] = parsed.notna().to_numpy()
    year_like = numeric & (seconds >= 1000) & (seconds <= 9999) & (np.floor(seconds) == seconds)  # 2024, 2024.0
    return seconds, [(year_like, AMBIGUOUS_YEAR), (other, NOT_ISO)]


def whole_seconds(parsed: pd.Series) -> np.ndarray:
    """UTC moments as whole unix seconds in float64 (NaN for NaT).

    Through numpy: pandas 3 keeps years such as 9999 at a coarser unit, and subtracting a nanosecond epoch from
    them would overflow.
    """
    moments = parsed.dt.tz_localize(None).to_numpy().astype("datetime64[s]")
    since_epoch = moments.astype("int64").astype("float64")
    since_epoch[np.isnat(moments)] = np.nan
    return since_epoch


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
        seconds[textual] = whole_seconds(pd.to_datetime(text[textual], errors="coerce", utc=True, format="mixed"))
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
    log_typing: LogTyping | None = None,
) -> ReadResult:
    """Type-check text columns row by row (vectorised) and split them into good events and quarantined rows.

    ``reasons`` carries verdicts a reader reached before (e.g. a JSON id that is a list); ``window`` defaults to
    ``[1970-01-01, now + 1 day]``. ``log_typing`` (custom logs only) replaces ``integer_ids`` and the lenient
    reading of times of the known formats with the stricter rules of ``data.custom`` (see the module docstring).
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
        if log_typing is not None:
            out[col], verdicts = typed_ids(parts[col], col, log_typing.id_type)
            for mask, why in verdicts:
                flag(present & mask, why)
        elif integer_ids:
            numbers, exact, overflow = exact_int64(values)
            flag(present & overflow, f"{col} is outside the int64 range")
            flag(present & ~exact, f"{col} is not an integer")
            out[col] = numbers
        else:
            out[col] = values
    stamps = parts["timestamp"].astype("string").str.strip()
    present = stamps.notna() & (stamps != "")
    flag(~present, "missing timestamp")
    if log_typing is not None:
        seconds, verdicts = typed_seconds(stamps, log_typing.timestamp_format)
        seconds = pd.Series(seconds, index=stamps.index)
        for mask, why in verdicts:
            flag(present & mask, why)
    else:
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
    if integer_ids and log_typing is None:
        events["user_id"] = events["user_id"].astype("int64")
        events["item_id"] = events["item_id"].astype("int64")
    events["timestamp"] = events["timestamp"].astype("int64")
    if "rating" in events:
        events["rating"] = events["rating"].astype("float32")
    for extra in parts.columns.difference([*CANONICAL]):
        events[extra] = parts[extra][good].reset_index(drop=True)
    bad = bad_rows_frame(source, line_no[~good], reason[~good], raw[~good])
    return ReadResult(events, bad, total_rows, has_timestamps)
