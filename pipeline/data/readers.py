"""Readers that turn the many interaction-log formats into one canonical events table.

Canonical events: ``user_id``, ``item_id`` (raw ids: int64 for the MovieLens-style numeric formats, strings
otherwise), ``timestamp`` (int64) and an optional float ``rating``. Formats without timestamps (the SASRec
``user item`` pair format and the S3Rec ``user item item ...`` sequence format) use the position in the file as
the timestamp: in those formats line order *is* time order, and a stable sort keeps it.

Every reader splits its file into fields and hands them to :func:`pipeline.data.events.validate_events`, the one
place that types them, so download and ingest accept and refuse exactly the same rows. Readers are vectorised
(pandas / pyarrow kernels, no Python loop per event on well-formed input) and quarantine malformed rows with a
reason instead of dropping them (see :mod:`pipeline.data.quarantine`). Lines are physical lines: split at ``\\n``
(a trailing ``\\r`` dropped), counted from 1; a line that is not valid text in the file's encoding is quarantined
on its own and the rest of the file is read.

Only complete data is read: a last line without its newline (a write cut short, or a writer still appending) is
quarantined, never an event (nor malformed: see :mod:`pipeline.data.quarantine`), and a file that changes while it is
read is refused. Memory is bounded by the limits below, not by the input: text files are inflated as a stream and
refused past ``data.max_file_mb`` (default ``MAX_FILE_BYTES``; ``JSONL_FACTOR`` times that for JSON lines), lines
over ``MAX_LINE_CHARS`` are quarantined, a CSV header over ``MAX_COLUMNS`` is refused before it is parsed, and a
Parquet file is refused by its metadata, before its data is read (:func:`_parquet_within_limit`). A column named
twice is refused (a JSON record giving a key twice is quarantined); a CSV header's empty names that no mapping uses
(the trailing delimiters of a spreadsheet export) are ignored.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import os
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.data.events import LogTyping, TimestampWindow, bool_mask, timestamp_format_error, validate_events
from pipeline.data.quarantine import INCOMPLETE, BadInputError, ReadResult, bad_rows_frame, empty_bad_rows

log = logging.getLogger(__name__)

UNDECODABLE = "line is not valid {encoding} text"
STRAY_CR = "carriage return inside the line"
OPEN_QUOTE = 'unbalanced double quotes (an odd number of ")'
LINE_COLUMN = "__hymoe_line__"  # the physical line number the CSV reader carries through pyarrow with every row
MAX_SHOWN = 120  # characters of a file's content an error message may quote
# Limits that keep a reader's memory bounded by them, not by its input (documented in the README): a file at the
# default limit is read within a 4 GiB address space (a CSV takes about 20x its size while it is read). A CSV row
# costs far more memory per byte than a JSON record, which repeats its keys (Amazon's Beauty reviews, about 100 MB of
# JSON lines, must fit). The per-file size is the parameter data.max_file_mb; these are its default and ratios.
SIZE_SETTING = "data.max_file_mb"
MAX_FILE_BYTES = 64 * 2**20  # bytes of text per file, after gunzip, at the default data.max_file_mb
JSONL_FACTOR = 4  # a JSON-lines file may hold this many times data.max_file_mb
MAX_JSONL_BYTES = JSONL_FACTOR * MAX_FILE_BYTES
# Parquet is bounded by its footer, before any data is read. Measured on a 3.5 MB log of typical rows (u123,i45,
# unix seconds): the mapped columns hold 0.85x the CSV's bytes uncompressed and reading takes about the same peak
# memory (0.9-1x the CSV's), so the same number of bytes is allowed. A dictionary- or run-length-encoded column is
# tiny uncompressed (two million rows of one id: 17 KB) but decodes to a string per row: rows are capped too, at what
# a CSV file at the limit could hold with its shortest rows.
PARQUET_SIZE_FACTOR = 1  # mapped columns' uncompressed bytes allowed per byte of data.max_file_mb
MIN_ROW_BYTES = 6  # "1,2,3\n": a Parquet file may hold data.max_file_mb / 6 rows
MAX_FOOTER_BYTES = 16 * 2**20  # a Parquet footer (schema and metadata); 1,500 columns take 0.3 MB
MAX_LINE_CHARS = 2**20  # characters per line; a longer line is quarantined
MAX_COLUMNS = 1_000  # columns a CSV header may have (Parquet: only the mapped columns are read)
TOO_LONG = f"line longer than {MAX_LINE_CHARS:,} characters"
OVER_LIMIT_ADVICE = f"split the log into smaller files, convert it to Parquet, or raise {SIZE_SETTING}"
CHANGED = (
    "changed while it was read: a writer is still appending; write the file elsewhere and rename it into place "
    "when complete, and it is read on the next run"
)
GZIP_MAGIC = b"\x1f\x8b"
GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads the gzip header and checks the CRC and length trailer
INFLATE_CHUNK = 1 << 20  # bytes read, and most bytes inflated, per step


# --------------------------------------------------------------------------------------------------- raw text
def read_bytes(path: str | os.PathLike[str], limit: int = MAX_FILE_BYTES) -> bytes | bytearray:
    """The file's bytes, gunzipped when it starts with the gzip magic (not judged by its name).

    Memory stays bounded by the limits, not by the input: a plain file over ``limit`` bytes is refused before
    it is read, and a gzip stream is inflated piece by piece and refused once it passes the same limit (a 3 MB
    gzip bomb never becomes 3 GiB). Only the bytes present at the start are read, and a file whose size or
    modification time differs afterwards is refused: a writer was still at it, and half its data must not be merged.
    """
    with open(path, "rb") as handle:
        before = os.fstat(handle.fileno())
        if before.st_size > limit:
            raise BadInputError(
                f"{path}: {before.st_size:,} bytes, over the limit of {limit:,} per file set by {SIZE_SETTING} "
                f"(JSON lines: {JSONL_FACTOR}x); {OVER_LIMIT_ADVICE}"
            )
        if handle.peek(2)[:2] == GZIP_MAGIC:
            data: bytes | bytearray = _inflate(handle, before.st_size, limit, path)
        else:
            data = handle.read(before.st_size)
        after = os.fstat(handle.fileno())
    _refuse_if_changed(path, before, after)
    return data


def _refuse_if_changed(path: str | os.PathLike[str], before: os.stat_result, after: os.stat_result) -> None:
    """Refuse a file whose size or modification time moved while it was read: a writer was still at it."""
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise BadInputError(f"{path}: {CHANGED}")


def _inflate(handle: BinaryIO, size: int, limit: int, path: str | os.PathLike[str]) -> bytearray:
    """The content of a ``size``-byte gzip file (one or more members), inflated a chunk at a time and refused past
    ``limit`` bytes."""
    inflated = bytearray()
    inflater = zlib.decompressobj(GZIP_WBITS)
    pending = b""
    try:
        while True:
            if not pending:
                pending = handle.read(min(INFLATE_CHUNK, size - handle.tell()))
                if not pending:
                    inflated += inflater.flush()
                    break
            if inflater.eof:  # another member follows (concatenated gzip files), or zero padding
                if not pending.strip(b"\0"):
                    pending = b""
                    continue
                inflater = zlib.decompressobj(GZIP_WBITS)
            inflated += inflater.decompress(pending, INFLATE_CHUNK)
            pending = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
            if len(inflated) > limit:
                raise BadInputError(
                    f"{path}: inflates to more than the limit of {limit:,} bytes per file set by {SIZE_SETTING} "
                    f"(a gzip bomb? else {OVER_LIMIT_ADVICE})"
                )
    except zlib.error as err:
        raise BadInputError(f"{path}: starts like a gzip file but cannot be decompressed ({err})") from err
    if not inflater.eof:
        raise BadInputError(
            f"{path}: starts like a gzip file but cannot be decompressed (the compressed stream ends early: "
            "cut short, or still being written)"
        )
    return inflated


def read_text_lines(
    path: str | os.PathLike[str], encoding: str = "utf-8", limit: int = MAX_FILE_BYTES
) -> tuple[pd.Series, pd.DataFrame]:
    """Physical lines of a plain or gzip text file of at most ``limit`` bytes, and the quarantine rows of lines that
    cannot be read."""
    return split_lines(str(path), read_bytes(path, limit), encoding)


def split_lines(source: str, data: bytes | bytearray, encoding: str = "utf-8") -> tuple[pd.Series, pd.DataFrame]:
    """The physical lines of ``data`` and the quarantine rows of those that cannot be events.

    A line that does not decode, one over ``MAX_LINE_CHARS`` and a last line without its newline (a write cut
    short, or a writer still appending) come back as ``""``, so readers skip them like blank lines, and are
    quarantined with their reason and their text shown shortened. A UTF-8 byte-order mark at the start is dropped.
    """
    if encoding.lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig") and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    end, cut = _complete_end(source, data)
    if end < len(data):
        data = data[:end]
    n_lines = data.count(b"\n")
    try:
        lines = data.decode(encoding).split("\n")[:n_lines]
        unreadable = empty_bad_rows()
    except UnicodeDecodeError:
        lines, unreadable = _decode_line_by_line(source, data.split(b"\n")[:n_lines], encoding)
    if not cut.empty:
        lines.append("")
        cut["line"] = len(lines)
    text = pd.Series(lines, dtype="string").str.removesuffix("\r")
    length = text.str.len().to_numpy(dtype="int64", na_value=0)
    if (length > MAX_LINE_CHARS).any():
        long_at = np.flatnonzero(length > MAX_LINE_CHARS)
        long_rows = bad_rows_frame(
            source,
            pd.Series(long_at + 1),
            pd.Series([TOO_LONG] * len(long_at)),
            pd.Series([f"{text.iloc[i][:MAX_SHOWN]}... ({length[i]:,} characters)" for i in long_at]),
        )
        text.iloc[long_at] = ""
        unreadable = pd.concat([unreadable, long_rows], ignore_index=True)
    return text, pd.concat([unreadable, cut], ignore_index=True).sort_values("line", kind="stable")


def _complete_end(source: str, data: bytes | bytearray) -> tuple[int, pd.DataFrame]:
    """Where the complete lines of ``data`` end, and the quarantine row of a last line without its newline.

    Such a line is never an event: a log written line by line and cut short (or read while a writer is still
    appending) ends exactly like that, and its fields may be cut too (``17044`` of ``1704412800``). The caller
    sets the row's line number; a blank tail (spaces after the last newline) holds nothing and is ignored.
    """
    end = data.rfind(b"\n") + 1
    tail = bytes(data[end:])
    if not tail.strip():
        return end, empty_bad_rows()
    shown = tail[:MAX_SHOWN].decode("utf-8", errors="backslashreplace")
    if len(tail) > MAX_SHOWN:
        shown += f"... ({len(tail):,} bytes)"
    return end, bad_rows_frame(source, pd.Series([0]), pd.Series([INCOMPLETE]), pd.Series([shown]))


def _decode_line_by_line(source: str, chunks: list[bytes], encoding: str) -> tuple[list[str], pd.DataFrame]:
    """Slow path, only for files with broken bytes: each undecodable line is ``""`` and quarantined alone."""
    lines, numbers, raws = [], [], []
    for number, chunk in enumerate(chunks, start=1):
        try:
            lines.append(chunk.decode(encoding))
        except UnicodeDecodeError:
            lines.append("")
            numbers.append(number)
            raws.append(chunk[: 4 * MAX_SHOWN].decode(encoding, errors="backslashreplace")[:MAX_SHOWN])
    reason = UNDECODABLE.format(encoding=encoding)
    return lines, bad_rows_frame(source, pd.Series(numbers), pd.Series([reason] * len(numbers)), pd.Series(raws))


# --------------------------------------------------------------------------------------------------- text formats
def read_delimited(
    path: str | os.PathLike[str],
    fields: list[str],
    sep: str | None,
    *,
    encoding: str = "utf-8",
    integer_ids: bool = True,
    window: TimestampWindow | None = None,
) -> ReadResult:
    """Fixed-field text rows such as ``u.data`` (tab), ``ratings.dat`` (``::``) or SASRec pairs (whitespace).

    ``fields`` names each column in order (``user_id``, ``item_id``, ``rating``, ``timestamp``); ``sep=None``
    splits on runs of white space. Without a ``timestamp`` field the line order gives the time order.
    """
    source = str(path)
    lines, unreadable = read_text_lines(path, encoding)
    line_no = pd.Series(np.arange(1, len(lines) + 1), index=lines.index)
    keep = bool_mask(lines.str.strip() != "")
    lines, line_no = lines[keep], line_no[keep]
    if lines.empty and unreadable.empty:
        raise BadInputError(f"{source} is empty: no interaction rows")
    normalised = lines.str.strip().str.replace(r"\s+", " ", regex=True) if sep is None else lines
    delimiter = " " if sep is None else sep
    n_fields = normalised.str.count(re.escape(delimiter)) + 1
    wrong_count = bool_mask(n_fields != len(fields))
    bad = [
        unreadable,
        bad_rows_frame(
            source,
            line_no[wrong_count],
            "expected " + str(len(fields)) + " fields, got " + n_fields[wrong_count].astype("string"),
            lines[wrong_count],
        ),
    ]
    good_lines = normalised[~wrong_count]
    parts = good_lines.str.split(delimiter, n=len(fields) - 1, expand=True, regex=False)
    parts = parts.reindex(columns=range(len(fields)))  # no good line at all still gives every column
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
        total_rows=len(lines) + len(unreadable),
        window=window,
    )
    result.bad_rows = pd.concat([*bad, result.bad_rows], ignore_index=True).sort_values("line", kind="stable")
    return result


def read_user_sequences(
    path: str | os.PathLike[str],
    timestamps_path: str | os.PathLike[str] | None = None,
    *,
    window: TimestampWindow | None = None,
) -> ReadResult:
    """One user per line, ``user item item ...`` in time order (S3Rec / TiCoSeRec ``*.txt`` format).

    With ``timestamps_path`` (same layout, ``user ts ts ...``, aligned line by line) real timestamps are attached;
    a line whose lengths or user ids disagree between the two files is quarantined whole.
    """
    lines, unreadable = read_text_lines(path)
    ts_lines = None
    if timestamps_path is not None:
        ts_lines, _ = read_text_lines(timestamps_path)
        if len(ts_lines) != len(lines):
            raise BadInputError(
                f"{timestamps_path} has {len(ts_lines)} lines but {path} has {len(lines)}: they must align"
            )
    ts_name = None if timestamps_path is None else Path(timestamps_path).name
    return parse_sequence_lines(str(path), lines, unreadable, ts_lines, ts_name, window=window)


def parse_sequence_lines(
    source: str,
    lines: pd.Series,
    unreadable: pd.DataFrame,
    ts_lines: pd.Series | None = None,
    ts_name: str | None = None,
    *,
    window: TimestampWindow | None = None,
) -> ReadResult:
    """The events of ``user item item ...`` lines (line k of ``lines`` is physical line k + 1 of ``source``)."""
    line_no = pd.Series(np.arange(1, len(lines) + 1), index=lines.index)
    keep = bool_mask(lines.str.strip() != "")
    lines, line_no = lines[keep], line_no[keep]
    if lines.empty and unreadable.empty:
        raise BadInputError(f"{source} is empty: no user sequences")
    tokens = lines.str.strip().str.split()
    reasons = pd.Series(pd.NA, index=lines.index, dtype="string")
    reasons[bool_mask(tokens.str.len() < 2)] = "a sequence line needs a user id and at least one item"
    stamps = None
    if ts_lines is not None:
        stamps = ts_lines[keep].set_axis(lines.index).str.strip().str.split()
        mismatch = bool_mask((stamps.str.len() != tokens.str.len()) | (stamps.str[0] != tokens.str[0]))
        reasons[mismatch & bool_mask(reasons.isna())] = f"length or user differs from {ts_name}"
    ok = bool_mask(reasons.isna())
    bad = bad_rows_frame(source, line_no[~ok], reasons[~ok], lines[~ok])
    users = tokens[ok].str[0]
    items = tokens[ok].str[1:]
    lengths = items.str.len().to_numpy(dtype="int64")
    flat = pd.DataFrame(
        {
            "user_id": np.repeat(users.to_numpy(dtype=object), lengths),
            "item_id": np.concatenate(items.to_numpy()) if len(items) else np.array([], dtype=object),
        }
    )
    if stamps is not None:
        flat["timestamp"] = np.concatenate(stamps[ok].str[1:].to_numpy()) if len(items) else np.array([], dtype=object)
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
        total_rows=int(lengths.sum()) + len(bad) + len(unreadable),
        window=window,
    )
    result.bad_rows = pd.concat([unreadable, bad, result.bad_rows], ignore_index=True)
    return result


def read_gsasrec_prefixes(
    train_input: str | os.PathLike[str],
    val_input: str | os.PathLike[str],
    val_output: str | os.PathLike[str],
    test_output: str | os.PathLike[str],
    *,
    window: TimestampWindow | None = None,
) -> ReadResult:
    """Gapless user sequences from the gSASRec split of SASRec's ``ml-1m.txt`` (one line per user, items only).

    The split keeps ``seq[:-3]`` + ``seq[-3]`` (``val/input``), ``seq[-2]`` (``val/output``) and ``seq[-1]`` for
    its validation users, but only ``seq[:-2]`` and ``seq[-1]`` for everyone else: their ``seq[-2]`` is in no
    file. Gluing ``seq[-1]`` on would put a hole right before every test target (test then scores far below
    validation), so validation users get their whole sequence and the others ``seq[:-2]``, a true prefix.
    Line k of ``train_input`` is user k; a validation line is matched to its user by its first n - 1 items.
    """
    read = [read_text_lines(p) for p in (train_input, val_input, val_output, test_output)]
    for path, (_, unreadable) in zip((train_input, val_input, val_output, test_output), read, strict=True):
        if not unreadable.empty:  # line k is user k: a file with a lost line cannot be lined up at all
            first = unreadable.iloc[0]
            raise BadInputError(f"{path} line {first['line']}: {first['reason']} (split files must be whole)")
    train = read[0][0]
    val_in, val_out, test_out = (lines.str.strip() for lines, _ in read[1:])
    val_in, val_out, test_out = (s[s != ""].reset_index(drop=True) for s in (val_in, val_out, test_out))
    if len(val_in) != len(val_out) or len(test_out) != len(train):
        raise BadInputError(
            f"gSASRec split files do not line up: {len(train)} train lines, {len(val_in)} val inputs, "
            f"{len(val_out)} val outputs, {len(test_out)} test outputs (want train = test, val = val)"
        )
    if (blank := np.flatnonzero((train.str.strip() == "").to_numpy())).size:  # line k is user k: no gap allowed
        raise BadInputError(f"{train_input} line {blank[0] + 1} is empty: every line is one user's items")
    normalised = train.str.split().str.join(" ")
    user_of_line = pd.Series(np.arange(1, len(train) + 1), index=normalised.to_numpy())
    if user_of_line.index.has_duplicates:
        raise BadInputError(f"{train_input}: two users have the same sequence; validation lines cannot be matched")
    val_tokens = val_in.str.split()
    val_users = user_of_line.reindex(val_tokens.str[:-1].str.join(" ").to_numpy())
    if val_users.isna().any():
        first = int(np.flatnonzero(val_users.isna().to_numpy())[0])
        raise BadInputError(f"{val_input} line {first + 1}: its first items are no user's line in {train_input}")
    if val_users.duplicated().any():
        first = int(np.flatnonzero(val_users.duplicated().to_numpy())[0])
        user = int(val_users.iloc[first])
        raise BadInputError(f"{val_input} line {first + 1}: a second validation line of user {user}")
    lines = pd.Series(user_of_line.to_numpy().astype(str), index=train.index) + " " + train.str.strip()
    rows = val_users.to_numpy().astype(np.int64) - 1
    tail = val_tokens.str[-1].to_numpy() + " " + val_out.to_numpy() + " " + test_out.to_numpy()[rows]
    lines.iloc[rows] = lines.iloc[rows].to_numpy() + " " + tail
    return parse_sequence_lines(str(train_input), lines, empty_bad_rows(), window=window)


# --------------------------------------------------------------------------------------------------- JSON lines
ID_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_null)
FIELD_TYPES = {
    "user_id": ID_TYPES,
    "item_id": ID_TYPES,
    "timestamp": (*ID_TYPES, pa.types.is_floating, pa.types.is_timestamp),
    "rating": (*ID_TYPES, pa.types.is_floating),
}


def read_jsonl(
    path: str | os.PathLike[str],
    columns: dict[str, str],
    *,
    integer_ids: bool = False,
    window: TimestampWindow | None = None,
    log_typing: LogTyping | None = None,
    limit: int = MAX_JSONL_BYTES,
) -> ReadResult:
    """JSON lines (plain or gzip) of at most ``limit`` bytes, e.g. Amazon reviews; ``columns`` maps canonical name ->
    JSON key.

    pyarrow parses well-formed files in C; a file with a malformed line, or whose mapped fields pyarrow typed as
    anything but strings and numbers (a boolean id, a list), falls back to a per-line parse so each bad record is
    quarantined with its line number and reason (the slow path only runs on broken input). A record that gives a
    key twice is such a bad record: which of its values is meant cannot be known. The file is read once, so both
    paths see the same bytes. ``log_typing`` types a custom log's fields (:class:`pipeline.data.events.LogTyping`).
    """
    source = str(path)
    data = read_bytes(path, limit)
    fast = _jsonl_fast(source, data, columns)
    if fast is not None:
        (parts, bad), reasons = fast, None
        line_no = pd.Series(np.arange(1, len(parts) + 1))
        raw = pd.Series(["<record>"] * len(parts))
    else:
        parts, line_no, raw, bad, reasons = _jsonl_slow(source, data, columns)
    if len(parts) + len(bad) == 0:
        raise BadInputError(f"{source} is empty: no interaction records")
    result = validate_events(
        source,
        parts,
        line_no,
        raw,
        integer_ids=integer_ids,
        has_timestamps="timestamp" in columns,
        total_rows=len(parts) + len(bad),
        window=window,
        reasons=reasons,
        log_typing=log_typing,
    )
    if fast is not None:  # pyarrow numbered records, skipping blank lines, and kept no text
        result.bad_rows = _locate_bad_rows(source, data, result.bad_rows)
    result.bad_rows = pd.concat([bad, result.bad_rows], ignore_index=True)
    return result


def _jsonl_fast(
    path: str, data: bytes | bytearray, columns: dict[str, str]
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The mapped fields as text, parsed by pyarrow, and the cut last line (if any) quarantined; None when the file
    needs the per-line path.

    Times are kept as the text written: pyarrow reads ISO-like strings as timestamps by a looser rule than ours
    (``2024-01-05T10`` is a time to it), so a file whose times it typed is read again with that key as text, and
    JSON times meet the same rule as CSV's. pyarrow does not check that strings are UTF-8: a mapped column that is
    not sends the file to the per-line path, which quarantines the line."""
    end, cut = _complete_end(path, data)
    if not cut.empty:
        cut["line"] = data.count(b"\n", 0, end) + 1
    body = pa.py_buffer(memoryview(data)[:end])
    try:
        table = pajson.read_json(body)
        time_key = columns.get("timestamp")
        if time_key in table.column_names and _typed_time(table.column(time_key).type):
            as_text = pajson.ParseOptions(explicit_schema=pa.schema([pa.field(time_key, pa.string())]))
            table = pajson.read_json(body, parse_options=as_text)
        for key in set(columns.values()) & set(table.column_names):
            table.column(key).validate(full=True)
    except (pa.ArrowInvalid, OSError):
        return None
    missing = [key for key in columns.values() if key not in table.column_names]
    if missing and table.num_rows:
        raise BadInputError(
            f"{path}: required JSON key(s) {missing} absent from every record; keys seen: "
            f"{_shown(table.column_names)} (set the column names in params.yaml)"
        )
    for canonical, key in columns.items():
        kind = table.column(key).type if key in table.column_names else pa.null()
        if not any(check(kind) for check in FIELD_TYPES.get(canonical, ID_TYPES)):
            return None
    frame = pd.DataFrame(
        {
            canonical: _arrow_to_text(table.column(key)) if key in table.column_names else pd.Series(dtype="string")
            for canonical, key in columns.items()
        }
    )
    return frame, cut


def _jsonl_slow(
    path: str, data: bytes | bytearray, columns: dict[str, str]
) -> tuple[pd.DataFrame, pd.Series, pd.Series, pd.DataFrame, pd.Series]:
    lines, unreadable = split_lines(path, data)
    records, numbers, raws, verdicts, bad_lines, bad_reasons, bad_raw = [], [], [], [], [], [], []
    for number, line in enumerate(lines.fillna(""), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as err:
            bad_lines.append(number)
            bad_reasons.append(str(err) if isinstance(err, _RepeatedKey) else f"unparsable JSON: {str(err)[:80]}")
            bad_raw.append(line)
            continue
        texts = {canonical: _json_field_text(canonical, record.get(key)) for canonical, key in columns.items()}
        verdicts.append(next((t for t in texts.values() if isinstance(t, _WrongType)), None))
        records.append({c: None if isinstance(t, _WrongType) else t for c, t in texts.items()})
        numbers.append(number)
        raws.append(line)
    bad = bad_rows_frame(str(path), pd.Series(bad_lines), pd.Series(bad_reasons), pd.Series(bad_raw))
    frame = pd.DataFrame.from_records(records, columns=list(columns)).astype("string")
    reasons = pd.Series([str(v) if v is not None else pd.NA for v in verdicts], dtype="string")
    return frame, pd.Series(numbers), pd.Series(raws), pd.concat([unreadable, bad], ignore_index=True), reasons


class _RepeatedKey(ValueError):
    """A JSON object gives a key more than once (``json.loads`` would silently keep the last value)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) < len(pairs):
        raise _RepeatedKey(f"a key given more than once in the record: {_shown(_repeated([k for k, _ in pairs]))}")
    return record


class _WrongType(str):
    """A verdict: this JSON field has a type that cannot be the canonical field."""


def _json_field_text(canonical: str, value: Any) -> str | None:
    """A JSON value as the text the shared validation parses; ids must be strings or integers."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and canonical in ("timestamp", "rating"):
        return repr(value)
    wanted = "a string or an integer" if canonical in ("user_id", "item_id") else "a number or a string"
    return _WrongType(f"{canonical} is a JSON {type(value).__name__}, expected {wanted}")


# --------------------------------------------------------------------------------------------------- custom logs
def read_custom(
    path_spec: str,
    columns: dict[str, str],
    *,
    fmt: str = "auto",
    delimiter: str = ",",
    event_col: str | None = None,
    event_types: list[str] | None = None,
    window: TimestampWindow | None = None,
    log_typing: LogTyping | None = None,
    max_file_mb: int = MAX_FILE_BYTES // 2**20,
) -> ReadResult:
    """A user's own logs: one file, a folder or a glob of csv / parquet / jsonl (optionally gzip), each file within
    ``max_file_mb`` (``data.max_file_mb``; see the module docstring for JSON lines and Parquet).

    ``columns`` maps canonical names (``user_id``, ``item_id``, ``timestamp``, optional ``rating``) to the file's
    column names. Ids and times follow ``log_typing`` (``data.custom.id_type`` and ``timestamp_format``, default
    ``auto``), the same in every format, because each reader hands the same text to the same rules:

    - CSV fields are text as written: ``true`` is a string id, ``1.5`` a number that is not a plain integer
      (quarantined under ``auto`` and ``int``);
    - JSON integers are their decimal text and JSON strings their text; a boolean, float, list or object id is
      quarantined per record;
    - Parquet integer columns of any width are their canonical decimal text (a uint64 beyond int64 is quarantined
      per row under ``auto`` and ``int``), string columns their text; an id column of any other type (boolean,
      float, decimal, ...) refuses the file, naming the column and its type. A Parquet timestamp or date column,
      and ISO 8601 strings pyarrow reads as times in JSON, are exact already: the timestamp format does not apply.
    """
    log_typing = log_typing or LogTyping()
    if (problem := timestamp_format_error(log_typing.timestamp_format)) is not None:
        raise BadInputError(f"data.custom.timestamp_format: {problem}")
    files = resolve_files(path_spec)
    wanted = dict(columns)
    if event_col:
        wanted["event"] = event_col
    limit = max_file_mb * 2**20
    results = [_read_custom_file(f, wanted, fmt, delimiter, window, log_typing, limit) for f in files]
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


def _read_custom_file(
    path: Path,
    columns: dict[str, str],
    fmt: str,
    delimiter: str,
    window: TimestampWindow | None,
    log_typing: LogTyping,
    limit: int,
) -> ReadResult:
    kind = _format_of(path) if fmt == "auto" else fmt
    if kind is None:
        raise BadInputError(f"{path}: cannot tell the format from the name; set data.custom.format")
    if kind == "jsonl":
        result = read_jsonl(path, columns, window=window, log_typing=log_typing, limit=JSONL_FACTOR * limit)
    elif kind == "parquet":
        result = _read_parquet(path, columns, window, log_typing, limit)
    else:
        result = _read_csv(path, columns, delimiter, window, log_typing, limit)
    if result.total_rows == 0:
        log.warning("%s holds no rows (a header or schema only): nothing read from it", path)
    return result


def _read_parquet(
    path: Path, columns: dict[str, str], window: TimestampWindow | None, log_typing: LogTyping, limit: int
) -> ReadResult:
    """A Parquet log: only its mapped columns are read, and only once its footer shows they fit ``limit``."""
    wanted = list(dict.fromkeys(columns.values()))
    try:
        before = os.stat(path)
        _refuse_large_footer(path)
        with pq.ParquetFile(path) as parquet:
            schema = parquet.schema_arrow
            _refuse_repeated(path, "the schema", schema.names, wanted)
            _require_columns(path, columns, schema.names)
            _require_id_and_time_types(path, columns, schema)
            _parquet_within_limit(path, parquet.metadata, wanted, limit)
            table = parquet.read(columns=wanted)
        frame = pd.DataFrame({c: _arrow_to_text(table.column(k)) for c, k in columns.items()})
        after = os.stat(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:  # not Parquet, or a column of lists
        raise BadInputError(f"{path} is not a readable Parquet log of ids and times ({_shown(err)})") from err
    _refuse_if_changed(path, before, after)
    if _typed_time(_value_type(table.column(columns["timestamp"]).type)):
        log_typing = log_typing.typed_times()
    return validate_events(
        str(path),
        frame,
        pd.Series(np.arange(1, len(frame) + 1)),
        pd.Series(["<parquet row>"] * len(frame)),
        integer_ids=False,
        has_timestamps=True,
        total_rows=len(frame),
        window=window,
        log_typing=log_typing,
    )


def _read_csv(
    path: Path,
    columns: dict[str, str],
    delimiter: str,
    window: TimestampWindow | None,
    log_typing: LogTyping,
    limit: int,
) -> ReadResult:
    """A CSV log: pyarrow parses it in C, with each row's physical line number carried in an extra first column.

    Numbering the lines ourselves (rather than counting pyarrow's rows) keeps quarantine line numbers right
    whatever the file holds, and the invalid-row callback never raises: a Python exception inside a pyarrow
    callback can abort the whole process.
    """
    if len(delimiter) != 1 or delimiter in '\r\n"':
        raise BadInputError(f"data.custom.csv_delimiter must be one character, not a quote or newline: {delimiter!r}")
    lines, unreadable = read_text_lines(path, limit=limit)
    filled = bool_mask(lines.str.len() > 0)  # pyarrow skips empty lines, so they are not rows
    header_at = int(np.flatnonzero(filled)[0]) if filled.any() else len(lines)
    if not unreadable.empty and int(unreadable["line"].iloc[0]) <= header_at + 1:  # rows are sorted by line
        first = unreadable.iloc[0]
        raise BadInputError(f"{path}: no header can be read: line {first['line']}: {first['reason']}")
    if not filled.any():
        raise BadInputError(f"{path} has no header: it is empty or holds only blank lines")
    if (n_columns := lines.iloc[header_at].count(delimiter) + 1) > MAX_COLUMNS:  # before pyarrow sees them all
        raise BadInputError(
            f"{path}: the header (line {header_at + 1}) has {n_columns:,} columns, more than the limit of "
            f"{MAX_COLUMNS:,}: is this a CSV log, and is data.custom.csv_delimiter right?"
        )
    header = _csv_header(path, lines.iloc[header_at], delimiter)
    wanted = list(dict.fromkeys(columns.values()))
    _refuse_repeated(path, "the header", header, wanted)
    if len(header) == 1 and len(columns) > 1:  # the content is not shown: it may be anything (a passwd file)
        raise BadInputError(
            f"{path}: the header (line {header_at + 1}) has a single column, no {delimiter!r} in it: is "
            "data.custom.csv_delimiter right, and is this a CSV log at all?"
        )
    _require_columns(path, columns, header)
    ignored = sorted(set(header) - set(columns.values()))
    if ignored:
        log.info("%s: ignoring columns %s (not mapped in data.custom)", path, _shown(ignored))
    body = np.flatnonzero(filled)[1:]
    # rows pyarrow would split (a lone \r ends a row) or join with the next line (an open quote): quarantined
    # before parsing, so one broken line never takes a good one with it
    candidates = lines.iloc[body]
    stray = body[bool_mask(candidates.str.contains("\r", regex=False))]
    # a quote opens a quoted field only at the start of a field; elsewhere (it"em) it is a plain character
    field_quote = candidates.str.startswith('"') | candidates.str.contains(delimiter + '"', regex=False)
    open_quote = body[bool_mask((candidates.str.count('"') % 2 == 1) & field_quote)]
    open_quote = np.setdiff1d(open_quote, stray)
    body = np.setdiff1d(body, np.union1d(stray, open_quote))
    invalid: list[tuple[int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        try:
            number = int(row.text.split(delimiter, 1)[0])
            invalid.append((number, f"expected {row.expected_columns - 1} fields, got {row.actual_columns - 1}"))
        except Exception:  # noqa: BLE001 - never raise inside pyarrow's callback
            invalid.append((-1, "unparsable row"))
        return "skip"

    payload = _numbered_csv(lines, header_at, body, delimiter)
    try:
        table = pacsv.read_csv(
            pa.BufferReader(payload),
            read_options=pacsv.ReadOptions(use_threads=False, block_size=max(1 << 20, 2 * _longest(lines))),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={LINE_COLUMN: pa.int64(), **{name: pa.string() for name in header}},
                include_columns=[LINE_COLUMN, *wanted],
                strings_can_be_null=True,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise BadInputError(f"{path} is not a readable CSV log ({_shown(err)})") from err
    del payload  # a copy of the file: freed before the events are typed, which keeps the peak memory down
    frame = pd.DataFrame({c: _arrow_to_text(table.column(k)) for c, k in columns.items()})
    line_no = pd.Series(table.column(LINE_COLUMN).to_numpy())
    del table
    raw = lines.iloc[line_no.to_numpy() - 1].reset_index(drop=True)
    result = validate_events(
        str(path),
        frame,
        line_no,
        raw,
        integer_ids=False,
        has_timestamps=True,
        total_rows=len(frame) + len(invalid) + len(stray) + len(open_quote) + len(unreadable),
        window=window,
        log_typing=log_typing,
    )
    numbers = [n for n, _ in invalid]
    raw_invalid = [lines.iloc[n - 1] if 0 < n <= len(lines) else "" for n in numbers]
    rejected = [
        unreadable,
        bad_rows_frame(str(path), pd.Series(stray + 1), pd.Series([STRAY_CR] * len(stray)), lines.iloc[stray]),
        bad_rows_frame(
            str(path), pd.Series(open_quote + 1), pd.Series([OPEN_QUOTE] * len(open_quote)), lines.iloc[open_quote]
        ),
        bad_rows_frame(str(path), pd.Series(numbers), pd.Series([r for _, r in invalid]), pd.Series(raw_invalid)),
    ]
    result.bad_rows = pd.concat([*rejected, result.bad_rows], ignore_index=True).sort_values("line", kind="stable")
    return result


def _numbered_csv(lines: pd.Series, header_at: int, body: np.ndarray, delimiter: str) -> bytes:
    """The CSV text pyarrow parses: the header and the ``body`` lines, each led by its physical line number."""
    numbered = pd.Series(body + 1).astype("string") + delimiter + lines.iloc[body].reset_index(drop=True)
    return (f'"{LINE_COLUMN}"{delimiter}{lines.iloc[header_at]}\n' + "\n".join(numbered.tolist())).encode()


def _csv_header(path: Path, line: str, delimiter: str) -> list[str]:
    """Column names of a CSV header line, parsed by pyarrow exactly as the rows will be."""
    try:
        table = pacsv.read_csv(
            pa.BufferReader(line.encode() + b"\n"),
            read_options=pacsv.ReadOptions(use_threads=False, block_size=max(1 << 20, 8 * len(line))),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise BadInputError(f"{path}: the header line cannot be parsed as CSV ({_shown(err)})") from err
    return table.column_names


def _locate_bad_rows(path: str, data: bytes | bytearray, bad: pd.DataFrame) -> pd.DataFrame:
    """Turn pyarrow's JSON record numbers into physical line numbers and attach each bad row's raw line.

    pyarrow's JSON reader does not count the whitespace-only lines it skips, so on a file with blank lines its
    numbers point at the wrong line. The text is re-read only when there are bad rows, which keeps clean files on
    the fast path.
    """
    if bad.empty:
        return bad
    lines, _ = split_lines(path, data)
    physical = np.flatnonzero(bool_mask(lines.str.strip() != "")) + 1  # k-th counted record (1-based) -> line number
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


def _refuse_repeated(path: Path, where: str, names: list[str], mapped: list[str]) -> None:
    """Refuse a file that names a column twice: readers would silently pick one of them, each its own way.

    Empty names are the exception while no mapping uses them: a spreadsheet's export ends its header in delimiters
    (``user_id,item_id,timestamp,,``), and columns without a name are never read.
    """
    repeated = _repeated(names)
    if "" in repeated and "" not in mapped:
        repeated.remove("")
    if repeated:
        empty = " ('' is a column without a name: trailing delimiters?)" if "" in repeated else ""
        raise BadInputError(f"{path}: {where} names column(s) {_shown(repeated)} more than once{empty}; rename them")


def _refuse_large_footer(path: Path) -> None:
    """Refuse a Parquet footer over ``MAX_FOOTER_BYTES`` before it is parsed: its schema and metadata are read whole
    (a file of a million columns has a footer of hundreds of megabytes). The length is the 4 bytes before the
    closing ``PAR1``; a file without them is left to pyarrow, which refuses it as no Parquet."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(max(size - 8, 0))
        tail = handle.read(8)
    if len(tail) == 8 and tail[4:] == b"PAR1" and (footer := int.from_bytes(tail[:4], "little")) > MAX_FOOTER_BYTES:
        raise BadInputError(
            f"{path}: a Parquet footer (schema and metadata) of {footer:,} bytes, over the limit of "
            f"{MAX_FOOTER_BYTES:,}: too many columns or row groups; write only the log's columns"
        )


def _parquet_within_limit(path: Path, metadata: pq.FileMetaData, wanted: list[str], limit: int) -> None:
    """Refuse a Parquet file whose mapped columns would not fit the memory that ``limit`` (``data.max_file_mb``)
    allows a CSV file: by their uncompressed size and by the number of rows (see ``PARQUET_SIZE_FACTOR``)."""
    leaves = [
        i
        for i in range(metadata.num_columns)
        if (name := metadata.schema.column(i).path) in wanted or name.split(".", 1)[0] in wanted
    ]
    size = sum(
        metadata.row_group(g).column(i).total_uncompressed_size for g in range(metadata.num_row_groups) for i in leaves
    )
    max_size, max_rows = PARQUET_SIZE_FACTOR * limit, limit // MIN_ROW_BYTES
    if size > max_size or metadata.num_rows > max_rows:
        raise BadInputError(
            f"{path}: {metadata.num_rows:,} rows whose mapped columns hold {size:,} bytes uncompressed, over the "
            f"limit of {max_rows:,} rows and {max_size:,} bytes per Parquet file set by {SIZE_SETTING}; split the "
            f"file into smaller ones, or raise {SIZE_SETTING}"
        )


def _require_id_and_time_types(path: Path, columns: dict[str, str], schema: pa.Schema) -> None:
    """Refuse a Parquet log whose id columns are not integers or strings, or whose time column is no number, text
    or time: a boolean, float or decimal id (``true``, ``1.5``, ``5.00``) has no exact id to become."""
    for canonical, key in columns.items():
        if (index := schema.get_field_index(key)) < 0:  # a name present twice: not this check's business
            continue
        kind = _value_type(schema.field(index).type)
        if canonical in ("user_id", "item_id"):
            allowed, wanted = _id_type(kind), "ids must be integer or string columns (1.0, true or 5.00 is no id)"
        elif canonical == "timestamp":
            allowed = _id_type(kind) or _typed_time(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
            wanted = "times must be timestamp, date, number or string columns"
        else:
            continue
        if not allowed:
            raise BadInputError(f"{path}: column {_shown(key)!r} ({canonical}) has Arrow type {_shown(kind)}; {wanted}")


def _id_type(kind: pa.DataType) -> bool:
    """Arrow types whose values are exact ids: integers of any width, text, or nothing (all missing)."""
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    return text or pa.types.is_integer(kind) or pa.types.is_null(kind)


def _typed_time(kind: pa.DataType) -> bool:
    return pa.types.is_timestamp(kind) or pa.types.is_date(kind)


def _value_type(kind: pa.DataType) -> pa.DataType:
    """The type of the values of a dictionary-encoded column (pandas categoricals), else the type itself."""
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _require_columns(path: Path, columns: dict[str, str], present: list[str]) -> None:
    missing = [f"{key} (for {canonical})" for canonical, key in columns.items() if key not in present]
    if missing:
        raise BadInputError(
            f"{path}: missing column(s) {', '.join(missing)}; columns present: {_shown(present)}. "
            "Map yours with data.custom.user_col / item_col / timestamp_col / rating_col (and csv_delimiter)."
        )


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


def _longest(lines: pd.Series) -> int:
    """An upper bound of the longest line in UTF-8 bytes (pyarrow's block size counts bytes, not characters)."""
    return 4 * int(lines.str.len().max()) if len(lines) else 0


def _repeated(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted."""
    counts = Counter(names)
    return sorted(name for name, count in counts.items() if count > 1)


def _shown(value: object) -> str:
    """``value`` as text short enough for an error message (a file's content is never echoed whole)."""
    text = str(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + f"... ({len(text)} characters)"


def _arrow_to_text(column: pa.ChunkedArray) -> pd.Series:
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_date(column.type):
        column = column.cast(pa.timestamp("s"))
    if pa.types.is_timestamp(column.type):
        # safe=False: sub-second precision (ms, us, ns are the norm in logs) is cut to whole seconds, toward zero,
        # so a moment before 1970 is moved back one second: its whole second is the one it lies in (the floor)
        seconds = column.cast(pa.timestamp("s", tz=column.type.tz), safe=False).cast(pa.int64())
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[column.type.unit]
        behind = pc.less(column.cast(pa.int64()), pc.multiply(seconds, per_second))
        seconds = pc.subtract(seconds, pc.cast(behind, pa.int64()))
        return seconds.cast(pa.string()).to_pandas().astype("string")
    if pa.types.is_floating(column.type):  # NaN is a missing value, not the id or time "nan"
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    # cast in Arrow: via pandas, an integer column with a null becomes float and its ids "1.0" instead of "1"
    return column.cast(pa.string()).to_pandas().astype("string")
