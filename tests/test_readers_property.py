"""Property: whatever mix of good and bad rows a file holds, every reader keeps exactly the good rows and
quarantines exactly the bad ones, ``kept + quarantined = rows read``, and nothing raises.

Files are generated with Hypothesis (bounded examples, derandomised: CI runs the same cases every time): good rows
of each format, mixed with every kind of bad row (numbers beyond int64, negative and NaN times, wrong types, junk
bytes, missing and extra fields, an unbalanced quote, another delimiter), blank lines, an optional byte-order mark
and CRLF line ends. Each case goes through the format's reader, and the CSV case also through both entry points:
the download stage and the ingest validation.

Parquet logs also get id and time columns of arbitrary Arrow types (integers of every width and signedness,
strings, large and dictionary strings, booleans, floats, decimals, binary, timestamps of every unit with and
without a time zone, dates, all-null columns) under every ``data.custom.id_type`` and several timestamp formats:
each row becomes an exactly typed event or is quarantined with a reason, or the file is refused naming the column,
never a mistyped id.
"""

from __future__ import annotations

import json
import re
import string
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.download import download
from pipeline.data.events import LogTyping, TimestampWindow
from pipeline.data.layout import DownloadOutputs
from pipeline.data.quarantine import BadInputError, ReadResult
from pipeline.data.readers import read_custom, read_delimited, read_jsonl, read_user_sequences
from pipeline.ingest.validate import BatchOutputs, validate_logs
from pipeline.params import CustomSourceParams, DataParams

LATEST = 1_800_000_000
WINDOW = TimestampWindow(0, LATEST)
NOW = LATEST - 86_400  # the ingest check's "now": its window ends at the same second
PROPERTY = settings(
    max_examples=30,
    derandomize=True,  # a fixed seed: the same cases in CI every run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --------------------------------------------------------------------------------------------------- values
ID_ALPHABET = string.ascii_letters + string.digits + "_-."
string_ids = st.text(ID_ALPHABET, max_size=6).map(lambda s: "id" + s)  # "id" keeps clear of CSV null words (NA)
int_ids = st.integers(0, 2**63 - 1)
epoch_seconds = st.integers(0, 1_700_000_000)  # before the wall clock too: the download stage's window ends at now
# custom logs quarantine a bare 4-digit time (a year, or unix seconds?) unless data.custom.timestamp_format says
log_seconds = epoch_seconds.filter(lambda s: not 1000 <= s <= 9999)
days = st.dates(date(1970, 1, 1), date(2026, 1, 1))


def midnight(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


# (text, seconds) of a valid time in a custom log: unix seconds or an ISO date
good_times = st.one_of(log_seconds.map(lambda s: (str(s), s)), days.map(lambda d: (d.isoformat(), midnight(d))))
bad_times = st.one_of(
    st.integers(2**63, 10**30).map(str),  # beyond int64
    st.integers(10**11, 2**63 - 1).map(str),  # far future (milliseconds), whatever the wall clock
    st.integers(-(10**15), -1).map(str),  # before 1970
    st.sampled_from(["1e300", "-1e300", "inf", "-inf", "1.5e9.2", "1700000000.5", "12:30", "Jan", "١٧٠٠٠٠٠٠٠٠"]),
    st.text(string.ascii_letters, min_size=1, max_size=5).map(lambda s: "x" + s),  # not a time
)
# what custom logs refuse besides: times that could mean two moments
log_bad_times = st.one_of(
    bad_times, st.integers(1000, 9999).map(str), st.sampled_from(["05/01/2024", "Jan 5 2024", "2024/01/05 10:00"])
)
bad_int_ids = st.one_of(
    st.integers(2**63, 10**25).map(str),
    st.integers(-(10**25), -(2**63) - 1).map(str),
    st.text(string.ascii_letters, min_size=1, max_size=4),
    st.sampled_from(["1.5", "nan", "inf", "1e300", "١٢", "１２"]),  # digits of other scripts are not numbers
)
junk_bytes = st.binary(min_size=1, max_size=12).map(lambda b: b"\xff" + b.replace(b"\n", b"").replace(b"\r", b""))


@dataclass(frozen=True)
class Case:
    """A file as bytes, and what a correct reader makes of it."""

    data: bytes
    kept: list[tuple]  # the good rows' events, in file order
    bad_lines: list[int]  # physical line numbers of the bad rows


def assemble(lines: list[tuple[bytes, tuple | None]], *, bom: bool, crlf: bool, blank_every: int) -> Case:
    """Join rendered lines (``None`` = a bad row) with optional BOM, CRLF and blank lines; track line numbers."""
    out, kept, bad = [], [], []
    for raw, event in lines:
        if blank_every and len(out) % blank_every == blank_every - 1:
            out.append(b"")
        out.append(raw)
        if event is None:
            bad.append(len(out))
        elif event != ():
            kept.append(event)
    end = b"\r\n" if crlf else b"\n"
    data = end.join(out) + end
    return Case((b"\xef\xbb\xbf" if bom else b"") + data, kept, bad)


layout = st.fixed_dictionaries({"bom": st.booleans(), "crlf": st.booleans(), "blank_every": st.sampled_from([0, 3, 7])})


# --------------------------------------------------------------------------------------------------- CSV logs
@st.composite
def csv_rows(draw: st.DrawFn, delimiter: str) -> tuple[bytes, tuple | None]:
    user, item = draw(string_ids), draw(string_ids)
    text, seconds = draw(good_times)
    d = delimiter
    kinds = ["good", "good", "good", "quoted", "inner", "time", "missing", "few", "extra", "quote", "junk", "delim"]
    kind = draw(st.sampled_from(kinds))
    if kind == "good":
        return d.join([user, item, text]).encode(), (user, item, seconds)
    if kind == "quoted":  # valid quoting
        return d.join([f'"{user}"', item, f'"{text}"']).encode(), (user, item, seconds)
    if kind == "inner":  # a quote inside a field is a plain character
        return d.join([f'{user}"x', item, text]).encode(), (f'{user}"x', item, seconds)
    if kind == "time":
        return d.join([user, item, draw(log_bad_times)]).encode(), None
    if kind == "missing":
        fields = [user, item, text]
        fields[draw(st.integers(0, 2))] = ""
        return d.join(fields).encode(), None
    if kind == "few":
        return d.join([user, item]).encode(), None
    if kind == "extra":
        return d.join([user, item, text, "more"]).encode(), None
    if kind == "quote":
        return d.join([f'"{user}', item, text]).encode(), None
    if kind == "junk":
        return draw(junk_bytes), None
    other = ";" if d != ";" else ","
    return other.join([user, item, text]).encode(), None


@st.composite
def csv_files(draw: st.DrawFn, delimiter: str = ",") -> Case:
    rows = draw(st.lists(csv_rows(delimiter), min_size=1, max_size=25))
    header = (delimiter.join(["user_id", "item_id", "timestamp"]).encode(), ())
    return assemble([header, *rows], **draw(layout))


def events_of(result: ReadResult) -> list[tuple]:
    return list(result.events[["user_id", "item_id", "timestamp"]].itertuples(index=False, name=None))


def assert_exact(result: ReadResult, case: Case) -> None:
    assert events_of(result) == case.kept
    assert sorted(result.bad_rows["line"].tolist()) == case.bad_lines
    assert result.bad_rows["reason"].notna().all() and (result.bad_rows["reason"] != "").all()
    assert len(result.events) + len(result.bad_rows) == result.total_rows


def written(folder: str, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(data)
    return path


@PROPERTY
@given(case=csv_files(","), delimiter=st.just(","))
def test_custom_csv_reader(case: Case, delimiter: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        result = read_custom(
            str(written(folder, "log.csv", case.data)),
            {c: c for c in ("user_id", "item_id", "timestamp")},
            window=WINDOW,
        )
        assert_exact(result, case)


@PROPERTY
@given(case=csv_files("\t"))
def test_custom_tsv_reader(case: Case) -> None:
    with tempfile.TemporaryDirectory() as folder:
        columns = {c: c for c in ("user_id", "item_id", "timestamp")}
        result = read_custom(str(written(folder, "log.tsv", case.data)), columns, delimiter="\t", window=WINDOW)
        assert_exact(result, case)


@PROPERTY
@given(case=csv_files(","))
def test_download_stage_entry_point(case: Case, no_mirror_env: None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = written(folder, "log.csv", case.data)
        data = DataParams(dataset="custom", interim_dir=f"{folder}/interim", max_bad_fraction=1.0)
        data.custom = CustomSourceParams(path=str(path))
        if not case.kept:
            with pytest.raises(ValueError, match="no valid interactions"):
                download(data)
            return
        outputs = DownloadOutputs.under(data.interim_dir)
        download(data)
        kept = pq.read_table(outputs.interactions).to_pandas()
        assert list(kept[["user_id", "item_id", "timestamp"]].itertuples(index=False, name=None)) == case.kept
        assert sorted(pd.read_csv(outputs.quarantine)["line"].tolist()) == case.bad_lines
        rows = json.loads(outputs.manifest.read_text())["rows"]
        assert (rows["kept"], rows["quarantined"]) == (len(case.kept), len(case.bad_lines))
        assert rows["kept"] + rows["quarantined"] == rows["read"]


@PROPERTY
@given(case=csv_files(","))
def test_ingest_entry_point(case: Case) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = written(folder, "2024-01-05.csv", case.data)
        report = validate_logs([path], CustomSourceParams(), 1.0, Path(folder) / "out", now=NOW)
        distinct = list(dict.fromkeys(case.kept))
        assert (report.rows, report.malformed) == (len(case.kept) + len(case.bad_lines), len(case.bad_lines))
        assert (report.events, report.duplicates) == (len(distinct), len(case.kept) - len(distinct))
        batch = pq.read_table(BatchOutputs.under(Path(folder) / "out").batch).to_pandas()
        assert sorted(batch[["user_id", "item_id", "timestamp"]].itertuples(index=False, name=None)) == sorted(distinct)
        quarantine = pd.read_csv(BatchOutputs.under(Path(folder) / "out").quarantine)
        assert sorted(quarantine.loc[quarantine["line"] > 0, "line"].tolist()) == case.bad_lines


# --------------------------------------------------------------------------------------------------- JSON lines
@st.composite
def json_rows(draw: st.DrawFn) -> tuple[bytes, tuple | None]:
    user, item = draw(string_ids), draw(string_ids)
    text, seconds = draw(good_times)
    record: dict = {"user_id": user, "item_id": item, "timestamp": seconds if draw(st.booleans()) else text}
    kind = draw(
        st.sampled_from(["good", "good", "extra", "int_id", "time", "nan", "type", "missing", "broken", "junk"])
    )
    if kind == "good":
        return json.dumps(record).encode(), (user, item, seconds)
    if kind == "extra":  # extra keys are ignored, not an error
        return json.dumps({**record, "note": "x", "n": 1}).encode(), (user, item, seconds)
    if kind == "int_id":  # an integer id is its text
        number = draw(int_ids)
        return json.dumps({**record, "item_id": number}).encode(), (user, str(number), seconds)
    if kind == "time":
        value = draw(log_bad_times)
        return json.dumps({**record, "timestamp": int(value) if value.lstrip("-").isdigit() else value}).encode(), None
    if kind == "nan":
        return json.dumps({**record, "timestamp": float("nan")}).encode(), None  # the JSON extension NaN
    if kind == "type":
        value = draw(st.sampled_from([[1], {"a": 1}, True, 1.5]))
        return json.dumps({**record, draw(st.sampled_from(["user_id", "item_id"])): value}).encode(), None
    if kind == "missing":
        del record[draw(st.sampled_from(["user_id", "item_id", "timestamp"]))]
        return json.dumps(record).encode(), None
    if kind == "broken":
        return json.dumps(record).encode()[:-1], None
    return draw(junk_bytes), None


@PROPERTY
@given(rows=st.lists(json_rows(), min_size=1, max_size=25), shape=layout)
def test_jsonl_reader(rows: list, shape: dict) -> None:
    case = assemble(rows, **{**shape, "bom": False})
    with tempfile.TemporaryDirectory() as folder:
        columns = {c: c for c in ("user_id", "item_id", "timestamp")}
        try:
            result = read_custom(str(written(folder, "log.jsonl", case.data)), columns, window=WINDOW)
        except BadInputError as err:  # a key no record has: the column mapping is wrong, said at once
            assert "absent from every record" in str(err) and not case.kept
            return
        assert_exact(result, case)
        again = read_jsonl(written(folder, "log2.jsonl", case.data), columns, window=WINDOW, log_typing=LogTyping())
        assert_exact(again, case)


# --------------------------------------------------------------------------------------------------- Parquet
@st.composite
def parquet_cases(draw: st.DrawFn) -> tuple[pa.Table, list[tuple], list[int]]:
    n = draw(st.integers(1, 20))
    users, items, times, kept, bad = [], [], [], [], []
    numeric = draw(st.booleans())  # a float64 time column, or text
    for row in range(1, n + 1):
        user, item = draw(string_ids), draw(string_ids)
        _, seconds = draw(good_times)
        kind = draw(st.sampled_from(["good", "good", "time", "missing"]))
        value: object = float(seconds) if numeric else str(seconds)
        if kind == "time":
            wrong = draw(st.sampled_from([float("nan"), float("inf"), -5.0, 1e300, 1.5]) if numeric else log_bad_times)
            value = wrong
        elif kind == "missing":
            user = None
        users.append(user)
        items.append(item)
        times.append(value)
        if kind == "good":
            kept.append((user, item, seconds))
        else:
            bad.append(row)
    kind = pa.float64() if numeric else pa.string()
    return pa.table({"user_id": users, "item_id": items, "timestamp": pa.array(times, kind)}), kept, bad


@PROPERTY
@given(generated=parquet_cases())
def test_parquet_reader(generated: tuple) -> None:
    table, kept, bad = generated
    with tempfile.TemporaryDirectory() as folder:
        pq.write_table(table, Path(folder) / "log.parquet")
        result = read_custom(
            f"{folder}/log.parquet", {c: c for c in ("user_id", "item_id", "timestamp")}, window=WINDOW
        )
        assert_exact(result, Case(b"", kept, bad))


# --------------------------------------------------------------------------------------------------- Parquet, typed
# Every column is drawn with an Arrow type, its values, and what each setting must make of each value (None:
# the row is quarantined); a column of a refused type must refuse the whole file instead.
INT_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()]
TEXT_TYPES = [pa.string(), pa.large_string(), pa.dictionary(pa.int32(), pa.string())]
REFUSED_IDS = [pa.bool_(), pa.float32(), pa.float64(), pa.decimal128(12, 2), pa.binary()]
REFUSED_TIMES = [pa.bool_(), pa.binary()]
TIME_TYPES = [
    *INT_TYPES,
    pa.float64(),
    pa.decimal128(14, 2),
    pa.string(),
    pa.large_string(),
    pa.date32(),
    pa.null(),
    *(pa.timestamp(unit, tz) for unit in ("s", "ms", "us", "ns") for tz in (None, "UTC", "+02:00")),
]
PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
NUMBER_SPELLINGS = ["01", "007", "-0", "+1", " 1", "1 ", "1.0", "1.5", "1e3", ".5", "١", "١٢", "１２"]
INT64 = range(-(2**63), 2**63)


def id_verdicts(text: str | None) -> dict[str, str | None]:
    """What each id_type makes of an id text, worked out without the reader's regular expressions."""
    if text is None or not text.strip():
        return dict.fromkeys(("auto", "int", "string"))
    stripped = text.strip()
    ascii_int = re.fullmatch(r"-?[0-9]+", stripped, re.ASCII) is not None and int(stripped) in INT64
    plain = ascii_int and text == str(int(text))  # the one spelling of that integer
    numeric = any(c.isdecimal() for c in stripped) and all(c.isdecimal() or c in "+-.eE" for c in stripped)
    return {
        "auto": text if plain else None if numeric else stripped,
        "int": str(int(stripped)) if ascii_int else None,
        "string": stripped,
    }


def integer_range(kind: pa.DataType) -> tuple[int, int]:
    bits = kind.bit_width
    return (0, 2**bits - 1) if pa.types.is_unsigned_integer(kind) else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@st.composite
def refused_values(draw: st.DrawFn, kind: pa.DataType, n: int) -> list:
    """Values of a type no id (or time) may have: ``true``, ``1.0``, ``5.00``, bytes."""
    if pa.types.is_boolean(kind):
        return draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if pa.types.is_decimal(kind):
        return [
            Decimal(v) for v in draw(st.lists(st.sampled_from(["5.00", "1", "1700000000"]), min_size=n, max_size=n))
        ]
    if pa.types.is_binary(kind):
        return draw(st.lists(st.binary(max_size=4), min_size=n, max_size=n))
    return [float(v) for v in draw(st.lists(st.integers(0, 2**20), min_size=n, max_size=n))]


@st.composite
def id_column(draw: st.DrawFn, n: int) -> tuple[pa.Array, list[dict] | None]:
    """An id column and each row's verdicts by id_type, or None for a type that refuses the file."""
    kind = draw(st.sampled_from([*INT_TYPES, *TEXT_TYPES, pa.null(), *REFUSED_IDS]))
    if kind in REFUSED_IDS:
        return pa.array(draw(refused_values(kind, n)), kind), None
    values: list = []
    for _ in range(n):
        if kind == pa.null() or draw(st.integers(0, 7)) == 0:
            values.append(None)
        elif kind in INT_TYPES:
            low, high = integer_range(kind)
            values.append(draw(st.one_of(st.integers(low, high), st.sampled_from([low, high, 0]))))
        else:
            texts = st.one_of(
                st.integers(-(2**63), 2**63 - 1).map(str),
                st.integers(2**63, 10**22).map(str),
                st.sampled_from(NUMBER_SPELLINGS),
                string_ids,
                st.sampled_from(["true", "B00123X", "u7", "", "  "]),
            )
            values.append(draw(texts))
    if pa.types.is_dictionary(kind):
        column = pa.array(values, pa.string()).dictionary_encode()
    else:
        column = pa.array(values, kind)
    return column, [id_verdicts(None if v is None else str(v)) for v in values]


def number_time(seconds: int, fmt: str) -> int | None:
    """A time given as a number: unix seconds in the window, except a 4-digit one under auto (a year?)."""
    if fmt == "iso8601" or not 0 <= seconds <= LATEST:
        return None
    return None if fmt == "auto" and 1000 <= seconds <= 9999 else seconds


@st.composite
def time_column(draw: st.DrawFn, n: int, fmt: str) -> tuple[pa.Array, list[int | None] | None]:
    """A time column and each row's unix seconds (None: quarantined), or None for a type that refuses the file."""
    kind = draw(st.sampled_from([*TIME_TYPES, *REFUSED_TIMES]))
    if kind in REFUSED_TIMES:
        return pa.array(draw(refused_values(kind, n)), kind), None
    values: list = []
    expected: list[int | None] = []
    for _ in range(n):
        seconds = draw(st.one_of(log_seconds, st.integers(1000, 9999), st.integers(-(10**6), LATEST + 10**6)))
        if kind == pa.null() or draw(st.integers(0, 7)) == 0:
            values.append(None)
            expected.append(None)
        elif pa.types.is_timestamp(kind):  # typed already: every format takes it, to the second it lies in
            values.append(seconds * PER_SECOND[kind.unit] + draw(st.integers(0, PER_SECOND[kind.unit] - 1)))
            expected.append(seconds if 0 <= seconds <= LATEST else None)
        elif pa.types.is_date(kind):
            day = seconds // 86_400
            values.append(day)
            expected.append(day * 86_400 if 0 <= day * 86_400 <= LATEST else None)
        elif pa.types.is_integer(kind):
            low, high = integer_range(kind)
            values.append(min(max(seconds, low), high))
            expected.append(number_time(values[-1], fmt))
        elif pa.types.is_floating(kind) or pa.types.is_decimal(kind):
            half = draw(st.booleans())
            values.append(seconds + 0.5 if half else float(seconds))
            expected.append(None if half else number_time(seconds, fmt))
            if pa.types.is_decimal(kind):
                values[-1] = Decimal(str(values[-1]))
        else:  # text: unix seconds, ISO 8601, or spellings no format here takes
            day = draw(days)
            choice = draw(st.sampled_from(["unix", "iso", "iso_z", "dmy", "junk"]))
            values.append(
                {
                    "unix": str(seconds),
                    "iso": day.isoformat(),
                    "iso_z": day.isoformat() + "T00:00:00Z",
                    "dmy": day.strftime("%d/%m/%Y"),
                    "junk": f"x{seconds}",
                }[choice]
            )
            iso = midnight(day) if fmt in ("auto", "iso8601") else None
            expected.append({"unix": number_time(seconds, fmt), "iso": iso, "iso_z": iso}.get(choice))
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        column = pa.array(values, pa.int64() if pa.types.is_timestamp(kind) else pa.int32()).cast(kind)
    else:
        column = pa.array(values, kind)
    return column, expected


@PROPERTY
@given(
    data=st.data(),
    n=st.integers(1, 12),
    log_typing=st.builds(
        LogTyping, st.sampled_from(["auto", "int", "string"]), st.sampled_from(["auto", "unix", "iso8601"])
    ),
)
def test_parquet_reader_with_arbitrary_arrow_types(data: st.DataObject, n: int, log_typing: LogTyping) -> None:
    users, items = data.draw(id_column(n)), data.draw(id_column(n))
    times = data.draw(time_column(n, log_typing.timestamp_format))
    columns = {"user_id": users, "item_id": items, "timestamp": times}
    refused = [name for name, (_, verdicts) in columns.items() if verdicts is None]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "log.parquet"
        pq.write_table(pa.table({name: column for name, (column, _) in columns.items()}), path)
        if refused:  # the whole file, naming the first such column and its type
            kind = re.escape(str(columns[refused[0]][0].type))
            with pytest.raises(BadInputError, match=f"column '{refused[0]}' .* has Arrow type {kind}"):
                read_custom(str(path), {c: c for c in columns}, window=WINDOW, log_typing=log_typing)
            return
        result = read_custom(str(path), {c: c for c in columns}, window=WINDOW, log_typing=log_typing)
    kept, bad = [], []
    for row, (user, item, seconds) in enumerate(zip(users[1], items[1], times[1], strict=True), start=1):
        event = (user[log_typing.id_type], item[log_typing.id_type], seconds)
        if None in event:
            bad.append(row)
        else:
            kept.append(event)
    assert_exact(result, Case(b"", kept, bad))
    ids = [*result.events["user_id"].tolist(), *result.events["item_id"].tolist()]
    assert all(type(value) is str for value in ids)  # ids stay text: the store's schema


# --------------------------------------------------------------------------------------------------- MovieLens / SASRec
@st.composite
def movielens_rows(draw: st.DrawFn, sep: str) -> tuple[bytes, tuple | None]:
    user, item, seconds = draw(int_ids), draw(int_ids), draw(epoch_seconds)
    rating = draw(st.integers(1, 5))
    fields = [str(user), str(item), str(rating), str(seconds)]
    kind = draw(st.sampled_from(["good", "good", "good", "id", "time", "rating", "few", "extra", "junk"]))
    if kind == "good":
        return sep.join(fields).encode(), (user, item, seconds)
    if kind == "id":
        fields[draw(st.integers(0, 1))] = draw(bad_int_ids)
    elif kind == "time":
        fields[3] = draw(bad_times)
    elif kind == "rating":
        fields[2] = draw(st.sampled_from(["nan", "inf", "good", "1e300"]))
    elif kind == "few":
        fields = fields[:3]
    elif kind == "extra":
        fields.append("9")
    else:
        return draw(junk_bytes).replace(sep.encode(), b""), None
    return sep.join(fields).encode(), None


@PROPERTY
@given(rows=st.lists(movielens_rows("\t"), min_size=1, max_size=25), shape=layout)
def test_u_data_reader(rows: list, shape: dict) -> None:
    case = assemble(rows, **shape)
    with tempfile.TemporaryDirectory() as folder:
        fields = ["user_id", "item_id", "rating", "timestamp"]
        result = read_delimited(written(folder, "u.data", case.data), fields, "\t", window=WINDOW)
        assert_exact(result, case)


@PROPERTY
@given(rows=st.lists(movielens_rows("::"), min_size=1, max_size=25), shape=layout)
def test_ratings_dat_reader(rows: list, shape: dict) -> None:
    case = assemble(rows, **{**shape, "bom": False})  # latin-1: every byte is text, junk is a row of one field
    with tempfile.TemporaryDirectory() as folder:
        fields = ["user_id", "item_id", "rating", "timestamp"]
        path = written(folder, "ratings.dat", case.data)
        result = read_delimited(path, fields, "::", encoding="latin-1", window=WINDOW)
        assert_exact(result, case)


@st.composite
def sequence_lines(draw: st.DrawFn) -> tuple[bytes, list[tuple | None], bool]:
    """One S3Rec line: ``user item item ...``; returns the line, each token's verdict and whether the line is bad."""
    user = draw(int_ids)
    if draw(st.integers(0, 9)) == 0:
        return str(user).encode(), [], True  # a user without items
    if draw(st.integers(0, 9)) == 0:
        return draw(junk_bytes), [], True
    tokens, verdicts = [str(user)], []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 4)) == 0:
            tokens.append(draw(bad_int_ids))
            verdicts.append(None)
        else:
            item = draw(int_ids)
            tokens.append(str(item))
            verdicts.append((user, item))
    return " ".join(tokens).encode(), verdicts, False


@PROPERTY
@given(lines=st.lists(sequence_lines(), min_size=1, max_size=15), crlf=st.booleans())
def test_sequence_reader(lines: list, crlf: bool) -> None:
    end = b"\r\n" if crlf else b"\n"
    data = end.join(line for line, _, _ in lines) + end
    kept, position, bad_lines = [], 0, []
    for number, (_, verdicts, line_bad) in enumerate(lines, start=1):
        if line_bad:
            bad_lines.append(number)
            continue
        for verdict in verdicts:
            if verdict is None:
                bad_lines.append(number)  # a bad token is quarantined with its line
            else:
                kept.append((*verdict, position))
            position += 1
    with tempfile.TemporaryDirectory() as folder:
        result = read_user_sequences(written(folder, "Beauty.txt", data), window=WINDOW)
    assert events_of(result) == kept
    assert sorted(result.bad_rows["line"].tolist()) == sorted(bad_lines)
    assert len(result.events) + len(result.bad_rows) == result.total_rows


@st.composite
def pair_rows(draw: st.DrawFn) -> tuple[bytes, tuple | None]:
    user, item = draw(int_ids), draw(int_ids)
    kind = draw(st.sampled_from(["good", "good", "good", "id", "few", "extra"]))
    if kind == "good":
        return f"{user} {item}".encode(), (user, item)
    if kind == "id":
        return f"{draw(bad_int_ids).replace(' ', '')} {item}".encode(), None
    if kind == "few":
        return str(user).encode(), None
    return f"{user} {item} 5".encode(), None


@PROPERTY
@given(rows=st.lists(pair_rows(), min_size=1, max_size=25), shape=layout)
def test_sasrec_pairs_reader(rows: list, shape: dict) -> None:
    case = assemble(rows, **shape)
    with tempfile.TemporaryDirectory() as folder:
        result = read_delimited(written(folder, "ml-1m.txt", case.data), ["user_id", "item_id"], None, window=WINDOW)
    assert list(result.events[["user_id", "item_id"]].itertuples(index=False, name=None)) == case.kept
    stamps = result.events["timestamp"]
    assert stamps.is_monotonic_increasing and stamps.is_unique  # line order is time order
    assert sorted(result.bad_rows["line"].tolist()) == case.bad_lines
    assert len(result.events) + len(result.bad_rows) == result.total_rows
