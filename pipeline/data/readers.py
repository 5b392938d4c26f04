"""Readers that turn the many interaction-log formats into one canonical events table.

Canonical events: ``user_id``, ``item_id`` (raw ids: int64 for the MovieLens-style numeric formats, strings
otherwise), ``timestamp`` (int64) and an optional float ``rating``. Formats without timestamps (the SASRec
``user item`` pair format and the S3Rec ``user item item ...`` sequence format) use the position in the file as
the timestamp: in those formats line order *is* time order, and a stable sort keeps it.

Every reader is vectorised (pandas / pyarrow string kernels, no Python loop per event) and quarantines malformed
rows with a reason instead of dropping them (see :mod:`pipeline.data.quarantine`).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.data.quarantine import BadInputError, ReadResult, bad_rows_frame, empty_bad_rows

log = logging.getLogger(__name__)

CANONICAL = ["user_id", "item_id", "timestamp", "rating"]


# --------------------------------------------------------------------------------------------------- text formats
def read_lines(path: str | os.PathLike[str], encoding: str = "utf-8") -> pd.Series:
    """All lines of a plain or gzip text file (gzip detected by magic bytes, not by name)."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as handle:
        text = handle.read().decode(encoding)
    return pd.Series(text.splitlines(), dtype="string")


def read_delimited(
    path: str | os.PathLike[str],
    fields: list[str],
    sep: str | None,
    *,
    encoding: str = "utf-8",
    integer_ids: bool = True,
) -> ReadResult:
    """Fixed-field text rows such as ``u.data`` (tab), ``ratings.dat`` (``::``) or SASRec pairs (whitespace).

    ``fields`` names each column in order (``user_id``, ``item_id``, ``rating``, ``timestamp``); ``sep=None``
    splits on runs of white space. Without a ``timestamp`` field the line order gives the time order.
    """
    source = str(path)
    lines = read_lines(path, encoding)
    line_no = pd.Series(np.arange(1, len(lines) + 1), index=lines.index)
    keep = lines.str.strip() != ""
    lines, line_no = lines[keep], line_no[keep]
    if lines.empty:
        raise BadInputError(f"{source} is empty: no interaction rows")
    normalised = lines.str.strip().str.replace(r"\s+", " ", regex=True) if sep is None else lines
    delimiter = " " if sep is None else sep
    n_fields = normalised.str.count(re.escape(delimiter)) + 1
    wrong_count = n_fields != len(fields)
    bad = [
        bad_rows_frame(
            source,
            line_no[wrong_count],
            "expected " + str(len(fields)) + " fields, got " + n_fields[wrong_count].astype("string"),
            lines[wrong_count],
        )
    ]
    good_lines = normalised[~wrong_count]
    parts = good_lines.str.split(delimiter, n=len(fields) - 1, expand=True, regex=False)
    parts.columns = fields
    if "timestamp" not in fields:
        parts["timestamp"] = pd.Series(np.arange(len(parts)), index=parts.index).astype("string")
    result = validate_events(
        source,
        parts,
        line_no[~wrong_count],
        lines[~wrong_count],
        integer_ids=integer_ids,
        has_timestamps="timestamp" in fields,
        total_rows=len(lines),
    )
    result.bad_rows = pd.concat([*bad, result.bad_rows], ignore_index=True).sort_values("line", kind="stable")
    return result


def read_user_sequences(
    path: str | os.PathLike[str], timestamps_path: str | os.PathLike[str] | None = None
) -> ReadResult:
    """One user per line, ``user item item ...`` in time order (S3Rec / TiCoSeRec ``*.txt`` format).

    With ``timestamps_path`` (same layout, ``user ts ts ...``, aligned line by line) real timestamps are attached;
    a line whose lengths or user ids disagree between the two files is quarantined whole.
    """
    source = str(path)
    lines = read_lines(path)
    line_no = pd.Series(np.arange(1, len(lines) + 1), index=lines.index)
    keep = lines.str.strip() != ""
    lines, line_no = lines[keep], line_no[keep]
    if lines.empty:
        raise BadInputError(f"{source} is empty: no user sequences")
    tokens = lines.str.strip().str.split()
    reasons = pd.Series(pd.NA, index=lines.index, dtype="string")
    reasons[tokens.str.len() < 2] = "a sequence line needs a user id and at least one item"
    stamps = None
    if timestamps_path is not None:
        ts_lines = read_lines(timestamps_path)
        if len(ts_lines) != len(line_no) + (~keep).sum():
            raise BadInputError(
                f"{timestamps_path} has {len(ts_lines)} lines but {source} has {len(keep)}: they must align"
            )
        stamps = ts_lines[keep.to_numpy()].set_axis(lines.index).str.strip().str.split()
        mismatch = (stamps.str.len() != tokens.str.len()) | (stamps.str[0] != tokens.str[0])
        reasons[mismatch & reasons.isna()] = f"length or user differs from {Path(timestamps_path).name}"
    ok = reasons.isna()
    bad = bad_rows_frame(source, line_no[~ok], reasons[~ok], lines[~ok])
    users = tokens[ok].str[0]
    items = tokens[ok].str[1:]
    lengths = items.str.len().to_numpy()
    flat = pd.DataFrame(
        {
            "user_id": np.repeat(users.to_numpy(dtype=object), lengths),
            "item_id": np.concatenate(items.to_numpy()) if len(items) else np.array([], dtype=object),
        }
    )
    if stamps is not None:
        flat["timestamp"] = np.concatenate(stamps[ok].str[1:].to_numpy())
    else:
        flat["timestamp"] = np.arange(len(flat))
    flat = flat.astype("string")
    flat_line = pd.Series(np.repeat(line_no[ok].to_numpy(), lengths))
    flat_raw = flat["user_id"] + " " + flat["item_id"]
    result = validate_events(
        source,
        flat,
        flat_line,
        flat_raw,
        integer_ids=True,
        has_timestamps=stamps is not None,
        total_rows=int(lengths.sum()) + len(bad),
    )
    result.bad_rows = pd.concat([bad, result.bad_rows], ignore_index=True)
    return result


# --------------------------------------------------------------------------------------------------- JSON lines
def read_jsonl(path: str | os.PathLike[str], columns: dict[str, str], *, integer_ids: bool = False) -> ReadResult:
    """JSON lines (plain or gzip), e.g. Amazon reviews; ``columns`` maps canonical name -> JSON key.

    pyarrow parses well-formed files in C; a file with a malformed line falls back to a per-line parse so the
    bad lines can be quarantined with their numbers (the slow path only runs on broken input).
    """
    source = str(path)
    fast = True
    try:
        with pa.input_stream(str(path), compression=_compression(path)) as stream:
            table = pajson.read_json(stream)
        frame = table.to_pandas()
        missing = [key for key in columns.values() if key not in frame.columns]
        if missing:
            raise BadInputError(
                f"{source}: required JSON key(s) {missing} absent from every record; keys seen: "
                f"{sorted(frame.columns)} (set the column names in params.yaml)"
            )
        line_no = pd.Series(np.arange(1, len(frame) + 1))
        raw = pd.Series(["<record>"] * len(frame))
        parts = pd.DataFrame({canonical: frame[key] for canonical, key in columns.items()})
        bad = empty_bad_rows()
    except pa.ArrowInvalid:
        fast = False
        parts, line_no, raw, bad = _jsonl_slow(path, columns)
    if len(parts) + len(bad) == 0:
        raise BadInputError(f"{source} is empty: no interaction records")
    result = validate_events(
        source,
        _as_text(parts),
        line_no,
        raw,
        integer_ids=integer_ids,
        has_timestamps="timestamp" in columns,
        total_rows=len(parts) + len(bad),
    )
    if fast:  # pyarrow numbered records, skipping blank lines, and kept no text
        result.bad_rows = _locate_bad_rows(path, result.bad_rows, blank="whitespace")
    result.bad_rows = pd.concat([bad, result.bad_rows], ignore_index=True)
    return result


def _jsonl_slow(
    path: str | os.PathLike[str], columns: dict[str, str]
) -> tuple[pd.DataFrame, pd.Series, pd.Series, pd.DataFrame]:
    lines = read_lines(path)
    records, numbers, raws, bad_lines, bad_reasons, bad_raw = [], [], [], [], [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            bad_lines.append(number)
            bad_reasons.append(f"unparsable JSON: {str(err)[:80]}")
            bad_raw.append(line)
            continue
        records.append({canonical: record.get(key) for canonical, key in columns.items()})
        numbers.append(number)
        raws.append(line)
    bad = bad_rows_frame(str(path), pd.Series(bad_lines), pd.Series(bad_reasons), pd.Series(bad_raw))
    frame = pd.DataFrame.from_records(records, columns=list(columns))
    return frame, pd.Series(numbers), pd.Series(raws), bad


# --------------------------------------------------------------------------------------------------- custom logs
def read_custom(
    path_spec: str,
    columns: dict[str, str],
    *,
    fmt: str = "auto",
    delimiter: str = ",",
    event_col: str | None = None,
    event_types: list[str] | None = None,
) -> ReadResult:
    """A user's own logs: one file, a folder or a glob of csv / parquet / jsonl (optionally gzip).

    ``columns`` maps canonical names (``user_id``, ``item_id``, ``timestamp``, optional ``rating``) to the file's
    column names. Timestamps may be unix seconds or any date-time string pandas parses (converted to UTC seconds).
    """
    files = resolve_files(path_spec)
    wanted = dict(columns)
    if event_col:
        wanted["event"] = event_col
    results = [_read_custom_file(f, wanted, fmt, delimiter) for f in files]
    events = pd.concat([r.events for r in results], ignore_index=True)
    bad = pd.concat([r.bad_rows for r in results], ignore_index=True)
    total = sum(r.total_rows for r in results)
    if event_col and event_types:
        keep = events["event"].isin(event_types)
        log.info("kept %d of %d events whose %s is one of %s", keep.sum(), len(events), event_col, event_types)
        events = events[keep].reset_index(drop=True)
    events = events.drop(columns=["event"], errors="ignore")
    return ReadResult(events, bad, total, has_timestamps=True)


def resolve_files(path_spec: str) -> list[Path]:
    """Expand a file, a folder (every supported file inside, sorted) or a glob into a sorted file list."""
    path = Path(path_spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p) is not None)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise BadInputError(f"no csv, parquet or jsonl files found at {path_spec!r}")
    return files


def _read_custom_file(path: Path, columns: dict[str, str], fmt: str, delimiter: str) -> ReadResult:
    kind = _format_of(path) if fmt == "auto" else fmt
    if kind is None:
        raise BadInputError(f"{path}: cannot tell the format from the name; set data.custom.format")
    if kind == "jsonl":
        return read_jsonl(path, columns, integer_ids=False)
    if kind == "parquet":
        try:
            schema = pq.read_schema(path)
        except pa.ArrowInvalid as err:  # e.g. an empty file: say which one
            raise BadInputError(f"{path} is not a readable Parquet file ({err})") from err
        _require_columns(path, columns, schema.names)
        table = pq.read_table(path, columns=list(dict.fromkeys(columns.values())))
        frame = pd.DataFrame({c: _arrow_to_text(table.column(k)) for c, k in columns.items()})
        line_no = pd.Series(np.arange(1, len(frame) + 1))
        return validate_events(
            str(path),
            frame,
            line_no,
            pd.Series(["<parquet row>"] * len(frame)),
            integer_ids=False,
            has_timestamps=True,
            total_rows=len(frame),
        )
    return _read_csv(path, columns, delimiter)


def _read_csv(path: Path, columns: dict[str, str], delimiter: str) -> ReadResult:
    invalid: list[tuple[int, str, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        reason = f"expected {row.expected_columns} fields, got {row.actual_columns}"
        invalid.append((row.number or -1, reason, row.text))
        return "skip"

    if path.stat().st_size == 0:
        raise BadInputError(f"{path} is empty: no header and no rows")
    skip_all = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=lambda row: "skip")
    with pacsv.open_csv(path, parse_options=skip_all) as stream:
        header = stream.schema.names
    _require_columns(path, columns, header)
    ignored = sorted(set(header) - set(columns.values()))
    if ignored:
        log.info("%s: ignoring columns %s (not mapped in data.custom)", path, ignored)
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in header},
            include_columns=list(dict.fromkeys(columns.values())),
            strings_can_be_null=True,
        ),
    )
    frame = pd.DataFrame({c: table.column(k).to_pandas().astype("string") for c, k in columns.items()})
    # line numbers: header is line 1; skipped invalid rows shift the good rows after them
    line_no = np.arange(len(frame)) + 2
    for number in sorted(n for n, _, _ in invalid if n > 0):
        line_no[line_no >= number] += 1
    raw = frame.fillna("").agg(delimiter.join, axis=1) if len(frame) else pd.Series([], dtype="string")
    result = validate_events(
        str(path),
        frame,
        pd.Series(line_no),
        raw,
        integer_ids=False,
        has_timestamps=True,
        total_rows=len(frame) + len(invalid),
    )
    if invalid:
        numbers, reasons, texts = zip(*invalid, strict=True)
        bad = bad_rows_frame(str(path), pd.Series(numbers), pd.Series(reasons), pd.Series(texts))
        result.bad_rows = pd.concat([bad, result.bad_rows], ignore_index=True).sort_values("line", kind="stable")
    result.bad_rows = _locate_bad_rows(path, result.bad_rows, blank="empty")
    return result


def _locate_bad_rows(path: str | os.PathLike[str], bad: pd.DataFrame, blank: str) -> pd.DataFrame:
    """Turn pyarrow's row numbers into physical line numbers and attach each bad row's raw line.

    pyarrow's CSV and JSON readers do not count the blank lines they skip (``blank``: ``"empty"`` lines for CSV,
    ``"whitespace"``-only lines for JSON), so on a file with blank lines their numbers point at the wrong line.
    The text is re-read only when there are bad rows, which keeps clean files on the fast path.
    """
    if bad.empty:
        return bad
    lines = read_lines(path)
    skipped = (lines.str.len() == 0) if blank == "empty" else (lines.str.strip() == "")
    physical = np.flatnonzero(~skipped.to_numpy()) + 1  # k-th counted row (1-based) -> line number
    counted = bad["line"].to_numpy(dtype="int64")
    known = (counted >= 1) & (counted <= len(physical))
    bad = bad.copy()
    line = counted.copy()
    line[known] = physical[counted[known] - 1]
    bad["line"] = line
    raw = bad["raw"].to_numpy(dtype=object)
    raw[known] = lines.to_numpy(dtype=object)[line[known] - 1]
    bad["raw"] = pd.Series(raw, index=bad.index, dtype="string")
    return bad


def _require_columns(path: Path, columns: dict[str, str], present: list[str]) -> None:
    missing = [f"{key} (for {canonical})" for canonical, key in columns.items() if key not in present]
    if missing:
        raise BadInputError(
            f"{path}: missing column(s) {', '.join(missing)}; columns present: {present}. "
            "Map yours with data.custom.user_col / item_col / timestamp_col / rating_col."
        )


# --------------------------------------------------------------------------------------------------- validation
def validate_events(
    source: str,
    parts: pd.DataFrame,
    line_no: pd.Series,
    raw: pd.Series,
    *,
    integer_ids: bool,
    has_timestamps: bool,
    total_rows: int,
) -> ReadResult:
    """Type-check text columns row by row (vectorised) and split them into good events and quarantined rows."""
    parts = parts.reset_index(drop=True)
    line_no = pd.Series(np.asarray(line_no), dtype="int64")
    raw = pd.Series(np.asarray(raw, dtype=object), dtype="string")
    reason = pd.Series(pd.NA, index=parts.index, dtype="string")

    def flag(mask: pd.Series, text: str) -> None:
        reason[mask.fillna(False).to_numpy() & reason.isna().to_numpy()] = text

    out: dict[str, pd.Series] = {}
    for col in ("user_id", "item_id"):
        values = parts[col].astype("string").str.strip()
        flag(values.isna() | (values == ""), f"missing {col}")
        if integer_ids:
            numeric = pd.to_numeric(values, errors="coerce")
            flag(
                values.notna() & (values != "") & (numeric.isna() | (numeric % 1 != 0)),
                f"{col} is not an integer",
            )
            out[col] = numeric
        else:
            out[col] = values
    stamps = parts["timestamp"].astype("string").str.strip()
    flag(stamps.isna() | (stamps == ""), "missing timestamp")
    seconds = pd.to_numeric(stamps, errors="coerce")
    textual = seconds.isna() & stamps.notna() & (stamps != "")
    if textual.any():
        parsed = pd.to_datetime(stamps[textual], errors="coerce", utc=True, format="mixed")
        seconds[textual] = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    flag(stamps.notna() & (stamps != "") & (seconds.isna() | (seconds % 1 != 0)), "bad timestamp")
    flag(seconds < 0, "bad timestamp (negative)")
    out["timestamp"] = seconds
    if "rating" in parts:
        rating_text = parts["rating"].astype("string").str.strip()
        rating = pd.to_numeric(rating_text, errors="coerce")
        flag(rating_text.notna() & (rating_text != "") & rating.isna(), "rating is not a number")
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


# --------------------------------------------------------------------------------------------------- helpers
def _format_of(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    for ext, kind in (
        (".csv", "csv"),
        (".tsv", "csv"),
        (".parquet", "parquet"),
        (".jsonl", "jsonl"),
        (".json", "jsonl"),
        (".ndjson", "jsonl"),
    ):
        if name.endswith(ext):
            return kind
    return None


def _compression(path: str | os.PathLike[str]) -> str | None:
    with open(path, "rb") as handle:
        return "gzip" if handle.read(2) == b"\x1f\x8b" else None


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.apply(lambda col: col.astype("string"))


def _arrow_to_text(column: pa.ChunkedArray) -> pd.Series:
    if pa.types.is_timestamp(column.type):
        # safe=False: sub-second precision (ms, us, ns are the norm in logs) is truncated to whole seconds
        seconds = column.cast(pa.timestamp("s", tz=column.type.tz), safe=False).cast(pa.int64())
        return seconds.to_pandas().astype("string")
    # cast in Arrow: via pandas, an integer column with a null becomes float and its ids "1.0" instead of "1"
    return column.cast(pa.string()).to_pandas().astype("string")
