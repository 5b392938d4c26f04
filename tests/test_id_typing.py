"""One typing of ids and times for every reader of custom logs (``data.custom.id_type``, ``timestamp_format``).

Each test pins a case a new user once saw kept as wrong data: ``1``, ``1.0``, ``01`` and ``١`` stored as four items,
integers beyond int64 kept as text, boolean, float and decimal Parquet ids turned into ids, ``2024`` kept as unix
second 2024 and ``05/01/2024`` as the 1st of May. Files are real, and the inbox case runs the real CLI.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.data.download import download, read_custom_source
from pipeline.data.events import TimestampWindow
from pipeline.data.quarantine import BadInputError, ReadResult
from pipeline.ingest.replay import replay
from pipeline.ingest.retrain import Interval, training_overrides
from pipeline.ingest.store import read_store
from pipeline.ingest.validate import BatchOutputs, validate_logs
from pipeline.params import CustomSourceParams, load_params
from tests.conftest import REPO_ROOT, tiny_retrain, write_text
from tests.conftest import pipeline_cli as cli

T0 = int(datetime(2024, 1, 19, 12, tzinfo=UTC).timestamp())
START = "2024-01-19"
WINDOW = TimestampWindow(0, 1_800_000_000)
SPELLINGS = ["1", "1.0", "01", "١"]  # one number, four spellings: 1.0 from a float export, 01 zero-padded, Arabic-Indic


def csv_log(path: Path, rows: list[tuple[str, str, object]]) -> Path:
    return write_text(path, "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))


def read(path: Path, **custom: str) -> ReadResult:
    """``path`` through the custom reader exactly as the download stage and the inbox read it."""
    return read_custom_source(CustomSourceParams(path=str(path), **custom), window=WINDOW)


def reasons(result: ReadResult) -> dict[int, str]:
    return dict(zip(result.bad_rows["line"], result.bad_rows["reason"], strict=True))


# ----------------------------------------------------------------------------------------------- one number, one item
def test_auto_keeps_one_number_as_one_item_and_quarantines_other_spellings(tmp_path: Path) -> None:
    path = csv_log(tmp_path / "log.csv", [("u1", item, T0 + n) for n, item in enumerate(SPELLINGS)])
    result = read(path)
    assert result.events["item_id"].tolist() == ["1"]  # was: four items
    assert sorted(reasons(result)) == [3, 4, 5]
    assert all("data.custom.id_type: string" in why for why in reasons(result).values())


def test_string_ids_keep_every_spelling_when_the_user_chooses_them(tmp_path: Path) -> None:
    path = csv_log(tmp_path / "log.csv", [("u1", item, T0 + n) for n, item in enumerate(SPELLINGS)])
    result = read(path, id_type="string")
    assert result.events["item_id"].tolist() == SPELLINGS and result.bad_rows.empty


def test_int_ids_are_stored_canonically(tmp_path: Path) -> None:
    items = [*SPELLINGS, "-7", "007", "u7"]
    path = csv_log(tmp_path / "log.csv", [("42", item, T0 + n) for n, item in enumerate(items)])
    result = read(path, id_type="int")
    assert result.events["item_id"].tolist() == ["1", "1", "-7", "7"]  # 01 and 1 are one item
    assert sorted(reasons(result)) == [3, 5, 8]  # 1.0, ١ and u7 are no integers
    assert all("data.custom.id_type: int" in why for why in reasons(result).values())


# ----------------------------------------------------------------------------------------------- beyond int64
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_integers_beyond_int64_are_quarantined_in_every_format(tmp_path: Path, fmt: str) -> None:
    huge = [2**63, 2**64 - 1]  # the first integer past int64, and the largest uint64
    path = tmp_path / f"log.{fmt}"
    if fmt == "csv":
        csv_log(path, [("u1", "5", T0), *(("u1", str(h), T0) for h in huge)])
    elif fmt == "jsonl":
        records = [{"user_id": "u1", "item_id": item, "timestamp": T0} for item in (5, *huge)]
        write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    else:
        items = pa.array([5, *huge], pa.uint64())
        pq.write_table(pa.table({"user_id": ["u1"] * 3, "item_id": items, "timestamp": [T0] * 3}), path)
    result = read(path)
    assert result.events["item_id"].tolist() == ["5"]  # was: the two huge ones kept as text
    assert sorted(reasons(result)) == [2, 3] if fmt != "csv" else [3, 4]
    assert all("outside the int64 range" in why for why in reasons(result).values())
    assert read(path, id_type="string").events["item_id"].tolist() == ["5", *map(str, huge)]  # text, by choice


# ----------------------------------------------------------------------------------------------- no id of a number type
@pytest.mark.parametrize(
    ("kind", "values"),
    [(pa.bool_(), [True, False]), (pa.float64(), [1.5, 2.0]), (pa.decimal128(5, 2), [Decimal("5.00"), Decimal("1")])],
)
def test_parquet_boolean_float_and_decimal_id_columns_are_refused(
    tmp_path: Path, kind: pa.DataType, values: list
) -> None:
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "item_id": pa.array(values, kind), "timestamp": [T0, T0]}), path)
    with pytest.raises(BadInputError) as caught:  # was: ids "true", "1.5", "5.00"
        read(path)
    assert f"column 'item_id' (item_id) has Arrow type {kind}" in str(caught.value)


def test_a_refused_parquet_log_ends_the_download_stage_in_one_line(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": [True], "item_id": ["i1"], "timestamp": [T0]}), log)
    params = {"data": {"dataset": "custom", "custom": {"path": str(log)}, "interim_dir": str(tmp_path / "interim")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = cli(tmp_path / "params.yaml", "download")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: download: {log}: column 'user_id' (user_id) has Arrow type bool; "
        "ids must be integer or string columns (1.0, true or 5.00 is no id)"
    )


def test_text_that_is_no_integer_follows_one_rule_in_csv_and_json(tmp_path: Path) -> None:
    csv = csv_log(tmp_path / "log.csv", [("u1", "true", T0), ("u1", "1.5", T0 + 1), ("u1", "2", T0 + 2)])
    records = [{"user_id": "u1", "item_id": item, "timestamp": T0} for item in (True, 1.5, 2)]
    jsonl = write_text(tmp_path / "log.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    from_csv, from_json = read(csv), read(jsonl)
    assert from_csv.events["item_id"].tolist() == ["true", "2"]  # a CSV field is text: "true" is a string id
    assert list(reasons(from_csv)) == [3]  # was: item "1.5"
    assert from_json.events["item_id"].tolist() == ["2"]  # a JSON boolean or float is no id at all
    assert sorted(reasons(from_json)) == [1, 2]


# ----------------------------------------------------------------------------------------------- ambiguous times
AMBIGUOUS = [("u1", "i1", "2024"), ("u2", "i2", "05/01/2024"), ("u3", "i3", "Jan 5 2024"), ("u4", "i4", T0)]


def test_a_bare_year_and_a_day_month_date_are_refused_with_the_reason(tmp_path: Path) -> None:
    result = read(csv_log(tmp_path / "log.csv", AMBIGUOUS))
    assert result.events["timestamp"].tolist() == [T0]  # was: unix second 2024, and the 1st of May
    assert sorted(reasons(result)) == [2, 3, 4]
    assert "a year, or unix seconds?" in reasons(result)[2]
    assert all("data.custom.timestamp_format" in why for why in reasons(result).values())


@pytest.mark.parametrize(
    ("fmt", "kept"),
    [
        ("%d/%m/%Y", [("u2", int(datetime(2024, 1, 5, tzinfo=UTC).timestamp()))]),  # the 5th of January
        ("%Y", [("u1", int(datetime(2024, 1, 1, tzinfo=UTC).timestamp()))]),
        ("%b %d %Y", [("u3", int(datetime(2024, 1, 5, tzinfo=UTC).timestamp()))]),
        ("unix", [("u1", 2024), ("u4", T0)]),
    ],
)
def test_a_declared_timestamp_format_reads_them(tmp_path: Path, fmt: str, kept: list[tuple[str, int]]) -> None:
    result = read(csv_log(tmp_path / "log.csv", AMBIGUOUS), timestamp_format=fmt)
    assert list(zip(result.events["user_id"], result.events["timestamp"], strict=True)) == kept
    assert len(result.bad_rows) == len(AMBIGUOUS) - len(kept)  # every other row is quarantined, none guessed


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_times_that_do_not_match_a_declared_format_are_quarantined(tmp_path: Path, fmt: str) -> None:
    times = ["05/01/2024 10:30", "2024-01-05T10:30:00Z", "2024-01-05", "05/01/2024"]
    path = tmp_path / f"log.{fmt}"
    if fmt == "csv":
        csv_log(path, [("u1", "i1", t) for t in times])
    else:  # pyarrow reads ISO strings as times on its own: they must still meet the declared format
        write_text(path, "".join(json.dumps({"user_id": "u1", "item_id": "i1", "timestamp": t}) + "\n" for t in times))
    result = read(path, timestamp_format="%d/%m/%Y %H:%M")
    assert result.events["timestamp"].tolist() == [int(datetime(2024, 1, 5, 10, 30, tzinfo=UTC).timestamp())]
    first = 2 if fmt == "csv" else 1
    assert sorted(reasons(result)) == [first + 1, first + 2, first + 3]
    assert set(reasons(result).values()) == {"timestamp does not match data.custom.timestamp_format '%d/%m/%Y %H:%M'"}


def test_json_times_meet_the_rule_csv_times_meet(tmp_path: Path) -> None:
    """pyarrow reads ``2024-01-05T10`` as a time on its own; the JSON reader must type it by our rule, as CSV does."""
    times = ["2024-01-05T10:30:00Z", "2024-01-05T10", "2024-01-05"]
    rows = [("u1", "i1", t) for t in times]
    jsonl = write_text(
        tmp_path / "log.jsonl",
        "".join(json.dumps(dict(zip(["user_id", "item_id", "timestamp"], r, strict=True))) + "\n" for r in rows),
    )
    from_csv, from_json = read(csv_log(tmp_path / "log.csv", rows)), read(jsonl)
    assert from_json.events["timestamp"].tolist() == from_csv.events["timestamp"].tolist()
    assert sorted(reasons(from_json)) == [n - 1 for n in sorted(reasons(from_csv))]  # CSV counts its header line
    assert len(from_json.events) == 2  # was: 3, "2024-01-05T10" kept by pyarrow's looser rule


def test_a_json_string_that_is_not_utf8_is_quarantined_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    good = [json.dumps({"user_id": "u1", "item_id": f"i{n}", "timestamp": T0 + n}).encode() for n in range(3)]
    path.write_bytes(b"\n".join([good[0], b'{"user_id": "u1", "item_id": "\xff3", "timestamp": 1}', *good[1:]]) + b"\n")
    result = read(path)  # was: pyarrow.lib.ArrowInvalid: Invalid UTF8 sequence, raised from the typing
    assert result.events["item_id"].tolist() == ["i0", "i1", "i2"]
    assert list(reasons(result)) == [2]


def test_parquet_time_columns_stay_exact_whatever_the_declared_format(tmp_path: Path) -> None:
    moments = pa.array([T0 * 1000 + 999, -500], pa.int64()).cast(pa.timestamp("ms", "UTC"))  # -0.5 s: 1969
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "timestamp": moments}), path)
    result = read(path, timestamp_format="%d/%m/%Y")
    assert result.events["timestamp"].tolist() == [T0]  # typed already: the format is for text
    assert list(reasons(result)) == [2]  # was: moved to 1970-01-01 00:00:00 and kept


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("data.custom.id_type=float", "data.custom.id_type: 'float' is not one of 'auto', 'int', 'string'"),
        ("data.custom.timestamp_format=dd/mm/yyyy", "nor a strftime pattern with a year (%Y or %y)"),
        ("data.custom.timestamp_format='%Q %Y'", "data.custom.timestamp_format: '%Q %Y' is not a usable strftime"),
    ],
)
def test_bad_typing_settings_are_one_line_and_exit_2(tmp_path: Path, setting: str, expected: str) -> None:
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n")
    done = cli(tmp_path / "params.yaml", "--set", setting, "download")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr[-3000:]
    assert expected in done.stderr


# ----------------------------------------------------------------------------------------------- the inbox
@pytest.mark.parametrize(
    ("id_type", "stored"), [("auto", ["1", "1"]), ("int", ["1", "1", "1"]), ("string", [*SPELLINGS, "1"])]
)
def test_the_inbox_types_ids_and_the_retraining_run_reads_them_back_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, id_type: str, stored: list[str]
) -> None:
    params = {
        "retrain": {"inbox": "inbox", "store_dir": "store", "work_dir": "work"},
        "data": {"custom": {"id_type": id_type}},
    }
    project = tmp_path / "params.yaml"
    project.write_text(yaml.safe_dump(params))
    items = [*SPELLINGS, "1"]
    csv_log(tmp_path / "inbox" / f"{START}.csv", [(str(n), item, T0 + n) for n, item in enumerate(items)])
    done = cli(project, "--set", "retrain.max_bad_fraction=1.0", "ingest", "--start", START)
    assert done.returncode == 0, done.stderr[-3000:]
    store = read_store(tmp_path / "store").to_pandas().sort_values("timestamp")
    assert store["item_id"].tolist() == stored  # was: 1, 1.0, 01 and ١ as four items whatever the setting
    monkeypatch.chdir(tmp_path)  # the store is read back by the interval's download stage, as ids it holds already
    loaded = load_params(project)
    run = load_params(project, training_overrides(loaded, Interval.parse(START)))
    interactions = pd.read_parquet(download(run.data).interactions).sort_values("timestamp")
    assert interactions["item_id"].tolist() == stored


@pytest.mark.parametrize(("fmt", "first_time"), [("%d/%m/%Y %H:%M:%S", "15/02/2021 "), ("iso8601", "2021-02-15T")])
def test_replayed_logs_spell_times_as_declared_and_ingest_keeps_them_all(
    tmp_path: Path, fmt: str, first_time: str
) -> None:
    params = load_params(REPO_ROOT / "params.yaml", {**tiny_retrain(tmp_path), "data.custom.timestamp_format": fmt})
    result = replay(params, date(2021, 2, 15), "day")
    first, count = result.files[0], result.events_per_file[0]
    assert pd.read_csv(first)["timestamp"].str.startswith(first_time).all()
    report = validate_logs([first], params.data.custom, 0.0, tmp_path / "out")
    assert (report.rows, report.malformed) == (count, 0)  # was: unix seconds, which a declared format refuses
    stamps = pq.read_table(BatchOutputs.under(tmp_path / "out").batch).column("timestamp").to_pylist()
    day = int(datetime(2021, 2, 15, tzinfo=UTC).timestamp())
    assert all(day <= t < day + 86_400 for t in stamps)
