"""Readers: every input format on tiny good and malformed files, and the quarantine bookkeeping they share.

The contract under test: each non-blank input row ends up either as an event or as a quarantine row carrying its
source, its 1-based physical line number, a reason and its raw text, so ``events + bad == total`` always holds.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.events import BEFORE_WINDOW
from pipeline.data.quarantine import QUARANTINE_COLUMNS, BadInputError, ReadResult
from pipeline.data.readers import (
    read_custom,
    read_delimited,
    read_gsasrec_prefixes,
    read_jsonl,
    read_user_sequences,
    resolve_files,
)
from tests.conftest import write_text

ML_FIELDS = ["user_id", "item_id", "rating", "timestamp"]
AMAZON = {"user_id": "reviewerID", "item_id": "asin", "rating": "overall", "timestamp": "unixReviewTime"}


def assert_accounted(result: ReadResult) -> None:
    """Nothing silently dropped: every counted row is an event or a quarantine row."""
    assert list(result.bad_rows.columns) == QUARANTINE_COLUMNS
    assert len(result.events) + len(result.bad_rows) == result.total_rows


def bad_by_line(result: ReadResult) -> dict[int, tuple[str, str]]:
    """``{line: (reason, raw)}`` of the quarantined rows."""
    rows = result.bad_rows.sort_values("line")
    return {int(r.line): (str(r.reason), str(r.raw)) for r in rows.itertuples()}


def event_tuples(result: ReadResult, *cols: str) -> list[tuple]:
    return list(result.events[list(cols)].itertuples(index=False, name=None))


# ------------------------------------------------------------------------------------------ read_delimited
def test_ratings_dat_double_colon_latin1(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "ratings.dat",
        "1::1193::5::978300760\n"
        "1::661::3::978302109\n"
        "2::3068::4::978299000::extra\n"  # 3: five fields
        "\n"  # 4: blank, not a row
        "2::x::4::978298709\n"  # 5: item not an integer
        "3::1::2\n"  # 6: three fields
        "Café::1::5::978300000\n"  # 7: latin-1 text in a bad row must come back decoded
        "3::2::4.5::978300001\n",
        encoding="latin-1",
    )
    result = read_delimited(path, ML_FIELDS, "::", encoding="latin-1")

    assert event_tuples(result, "user_id", "item_id", "rating", "timestamp") == [
        (1, 1193, 5.0, 978300760),
        (1, 661, 3.0, 978302109),
        (3, 2, 4.5, 978300001),
    ]
    assert result.events.dtypes.to_dict() == {
        "user_id": np.dtype("int64"),
        "item_id": np.dtype("int64"),
        "timestamp": np.dtype("int64"),
        "rating": np.dtype("float32"),
    }
    assert result.has_timestamps
    assert bad_by_line(result) == {
        3: ("expected 4 fields, got 5", "2::3068::4::978299000::extra"),
        5: ("item_id is not an integer", "2::x::4::978298709"),
        6: ("expected 4 fields, got 3", "3::1::2"),
        7: ("user_id is not an integer", "Café::1::5::978300000"),
    }
    assert set(result.bad_rows["source"]) == {str(path)}
    assert result.total_rows == 7  # the blank line is not a row
    assert_accounted(result)


def test_u_data_tab_separated(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "u.data",
        "196\t242\t3\t881250949\n"
        "186 302 3 891717742\n"  # 2: spaces, not tabs -> one field
        "22\t377\t1\t878887116\n"
        "244\t\t2\t880606923\n"  # 4: empty item
        "166\t346\t1\t-5\n"  # 5: negative time
        "298\t474\t4\t884182806.5\n"  # 6: fractional time
        "115\t265\t2\t881171488  \n",  # trailing blanks are tolerated
    )
    result = read_delimited(path, ML_FIELDS, "\t")
    assert event_tuples(result, "user_id", "item_id", "timestamp") == [
        (196, 242, 881250949),
        (22, 377, 878887116),
        (115, 265, 881171488),
    ]
    assert {line: reason for line, (reason, _) in bad_by_line(result).items()} == {
        2: "expected 4 fields, got 1",
        4: "missing item_id",
        5: BEFORE_WINDOW,
        6: "bad timestamp",
    }
    assert bad_by_line(result)[4][1] == "244\t\t2\t880606923"
    assert_accounted(result)


@pytest.mark.parametrize("name, gz", [("pairs.txt", False), ("pairs.txt.gz", True), ("pairs-no-suffix", True)])
def test_sasrec_pairs_whitespace_line_order_is_time(tmp_path: Path, name: str, gz: bool) -> None:
    text = "1 10\n1   11\n2\t12\n\n1 13\n2 14 99\nx 15\n3 16\n"
    path = write_text(tmp_path / name, text, gz=gz)  # gzip is recognised by its magic bytes, not the name
    result = read_delimited(path, ["user_id", "item_id"], None)

    assert event_tuples(result, "user_id", "item_id") == [(1, 10), (1, 11), (2, 12), (1, 13), (3, 16)]
    ts = result.events["timestamp"].to_numpy()
    assert ts.dtype == np.int64 and (np.diff(ts) > 0).all()  # file order is time order
    assert not result.has_timestamps
    assert bad_by_line(result) == {
        6: ("expected 2 fields, got 3", "2 14 99"),
        7: ("user_id is not an integer", "x 15"),
    }
    assert_accounted(result)


def test_delimited_empty_file_is_an_error(tmp_path: Path) -> None:
    path = write_text(tmp_path / "u.data", "\n  \n")
    with pytest.raises(BadInputError, match="empty"):
        read_delimited(path, ML_FIELDS, "\t")


# ------------------------------------------------------------------------------------------ read_user_sequences
def test_user_sequences_without_timestamps(tmp_path: Path) -> None:
    path = write_text(tmp_path / "Beauty.txt", "1 5 6 7\n2 8\n\n3\n4 9 x 10\n")
    result = read_user_sequences(path)

    assert event_tuples(result, "user_id", "item_id") == [(1, 5), (1, 6), (1, 7), (2, 8), (4, 9), (4, 10)]
    assert (np.diff(result.events["timestamp"].to_numpy()) > 0).all()
    assert not result.has_timestamps
    assert bad_by_line(result) == {
        4: ("a sequence line needs a user id and at least one item", "3"),
        5: ("item_id is not an integer", "4 x"),  # only the bad event of the line, the rest is kept
    }
    assert_accounted(result)


def test_user_sequences_with_aligned_timestamps(tmp_path: Path) -> None:
    items = write_text(tmp_path / "items.txt", "1 5 6 7\n2 8 9\n3 4 5\n4 1 2\n")
    stamps = write_text(
        tmp_path / "times.txt",
        "1 100 200 300\n"
        "2 50 60\n"
        "3 10\n"  # line 3: one stamp for two items
        "9 10 20\n",  # line 4: another user's stamps
    )
    result = read_user_sequences(items, timestamps_path=stamps)

    assert event_tuples(result, "user_id", "item_id", "timestamp") == [
        (1, 5, 100),
        (1, 6, 200),
        (1, 7, 300),
        (2, 8, 50),
        (2, 9, 60),
    ]
    assert result.has_timestamps
    reason = "length or user differs from times.txt"
    assert bad_by_line(result) == {3: (reason, "3 4 5"), 4: (reason, "4 1 2")}  # quarantined whole
    assert_accounted(result)


def test_user_sequences_timestamp_file_with_other_line_count(tmp_path: Path) -> None:
    items = write_text(tmp_path / "items.txt", "1 5 6\n2 8 9\n")
    stamps = write_text(tmp_path / "times.txt", "1 100 200\n")
    with pytest.raises(BadInputError, match="must align"):
        read_user_sequences(items, timestamps_path=stamps)


def test_user_sequences_empty_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="empty"):
        read_user_sequences(write_text(tmp_path / "Beauty.txt", ""))


# ---------------------------------------------------------------------------------------- read_gsasrec_prefixes
def gsasrec_files(folder: Path, val_input: str = "7 8 9\n") -> list[Path]:
    """Three users; user 2 is the validation user (whole sequence 7 8 9 | 4 | 5), users 1 and 3 lack seq[-2]."""
    texts = {
        "train_input": "1 2 3\n7 8\n3 2\n",
        "val_input": val_input,
        "val_output": "4\n",
        "test_output": "6\n5\n1\n",
    }
    return [write_text(folder / f"{name}.txt", text) for name, text in texts.items()]


def test_gsasrec_prefixes_are_whole_for_validation_users_and_gapless_for_the_rest(tmp_path: Path) -> None:
    result = read_gsasrec_prefixes(*gsasrec_files(tmp_path))
    sequences = result.events.groupby("user_id")["item_id"].apply(list).to_dict()
    # user 2: train + val input's last + val output + test output; users 1, 3: their train line only (seq[:-2]),
    # never train + test output, whose history would miss the event right before the target
    assert sequences == {1: [1, 2, 3], 2: [7, 8, 9, 4, 5], 3: [3, 2]}
    assert (np.diff(result.events["timestamp"].to_numpy()) > 0).all() and not result.has_timestamps
    assert_accounted(result)


def test_gsasrec_validation_line_matching_no_user_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"val_input.txt line 1: its first items are no user's line"):
        read_gsasrec_prefixes(*gsasrec_files(tmp_path, val_input="7 9 9\n"))
    with pytest.raises(BadInputError, match="do not line up"):
        read_gsasrec_prefixes(*gsasrec_files(tmp_path, val_input="7 8 9\n1 2 3 4\n"))
    files = gsasrec_files(tmp_path, val_input="7 8 9\n7 8 6\n")
    files[2].write_text("4\n4\n")
    with pytest.raises(BadInputError, match="val_input.txt line 2: a second validation line of user 2"):
        read_gsasrec_prefixes(*files)
    files = gsasrec_files(tmp_path)
    files[3].write_text("6\n\n5\n1\n")  # a blank line in the test outputs is skipped, not taken as user 2's
    sequences = read_gsasrec_prefixes(*files).events.groupby("user_id")["item_id"].apply(list).to_dict()
    assert sequences == {1: [1, 2, 3], 2: [7, 8, 9, 4, 5], 3: [3, 2]}
    files[0].write_text("1 2 3\n\n7 8\n3 2\n")  # a blank train line would renumber every later user
    files[3].write_text("6\n0\n5\n1\n")
    with pytest.raises(BadInputError, match="train_input.txt line 2 is empty"):
        read_gsasrec_prefixes(*files)


def test_gsasrec_prefixes_of_the_real_ml1m_split(real_mirror: Path) -> None:
    folder = real_mirror / "ml-1m" / "gsasrec_splits"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not in this mirror")
    names = ("train_input", "val_input", "val_output", "test_output")
    events = read_gsasrec_prefixes(*(folder / f"{n}.txt" for n in names)).events
    partial = read_delimited(real_mirror / "ml-1m" / "ml-1m_sasrec_format_partial.txt.gz", ["user_id", "item_id"], " ")
    ours = events.groupby("user_id")["item_id"].apply(list)
    glued = partial.events.groupby("user_id")["item_id"].apply(list)
    whole = sum(ours[u] == glued[u] for u in glued.index)
    prefix = sum(ours[u] == glued[u][:-1] for u in glued.index)
    assert (len(events), len(ours), whole, prefix) == (988_555, 6040, 512, 5528)


# ------------------------------------------------------------------------------------------ read_jsonl
def amazon_record(user: str, asin: str, rating: float, ts: int) -> str:
    return json.dumps(
        {
            "reviewerID": user,
            "asin": asin,
            "reviewerName": "Jo",
            "helpful": [0, 1],
            "reviewText": "fine",
            "overall": rating,
            "summary": "ok",
            "unixReviewTime": ts,
            "reviewTime": "06 4, 2013",
        }
    )


def test_jsonl_amazon_reviews_gzip(tmp_path: Path) -> None:
    lines = [
        amazon_record("A1YJEY40YUW4SE", "7806397051", 1.0, 1391040000),
        amazon_record("A60XNB876KYML", "7806397051", 3.0, 1397779200),
        amazon_record("A1YJEY40YUW4SE", "B00004TMFE", 5.0, 1291248000),
    ]
    path = write_text(tmp_path / "reviews_Beauty_5.json.gz", "\n".join(lines) + "\n", gz=True)
    result = read_jsonl(path, AMAZON)

    assert event_tuples(result, "user_id", "item_id", "rating", "timestamp") == [
        ("A1YJEY40YUW4SE", "7806397051", 1.0, 1391040000),
        ("A60XNB876KYML", "7806397051", 3.0, 1397779200),
        ("A1YJEY40YUW4SE", "B00004TMFE", 5.0, 1291248000),
    ]
    assert result.has_timestamps and result.bad_rows.empty
    assert_accounted(result)


def test_jsonl_malformed_lines_quarantined_good_rows_kept(tmp_path: Path) -> None:
    missing_user = json.dumps({"asin": "B3", "overall": 4.0, "unixReviewTime": 3})
    text = "\n".join(
        [
            amazon_record("U1", "B1", 5.0, 1),
            "",  # 2: blank
            '{"reviewerID": "U2", "asin": "B2", "overall": 4.0',  # 3: cut off
            amazon_record("U2", "B2", 4.0, 2),
            "[1, 2]",  # 5: valid JSON, not an object
            missing_user,  # 6
        ]
    )
    path = write_text(tmp_path / "reviews.json", text + "\n")
    result = read_jsonl(path, AMAZON)

    assert event_tuples(result, "user_id", "item_id", "timestamp") == [("U1", "B1", 1), ("U2", "B2", 2)]
    bad = bad_by_line(result)
    assert sorted(bad) == [3, 5, 6]
    assert bad[3][0].startswith("unparsable JSON") and bad[3][1] == '{"reviewerID": "U2", "asin": "B2", "overall": 4.0'
    assert bad[5] == ("unparsable JSON: not a JSON object", "[1, 2]")
    assert bad[6] == ("missing user_id", missing_user)
    assert_accounted(result)


def test_jsonl_well_formed_file_bad_record_gets_physical_line_and_text(tmp_path: Path) -> None:
    # the fast (pyarrow) path: blank lines must not shift the reported line, and the raw text must be the line
    null_user = json.dumps({"reviewerID": None, "asin": "B9", "overall": 1.0, "unixReviewTime": 9})
    text = "\n".join([amazon_record("U1", "B1", 5.0, 1), "", "   ", amazon_record("U2", "B2", 4.0, 2), null_user])
    result = read_jsonl(write_text(tmp_path / "r.jsonl", text + "\n"), AMAZON)
    assert len(result.events) == 2
    assert bad_by_line(result) == {5: ("missing user_id", null_user)}
    assert_accounted(result)


def test_jsonl_required_key_absent_everywhere(tmp_path: Path) -> None:
    records = [json.dumps({"reviewerID": "U1", "asin": "B1", "overall": 5.0}) for _ in range(3)]
    path = write_text(tmp_path / "r.jsonl", "\n".join(records) + "\n")
    with pytest.raises(BadInputError, match="unixReviewTime"):
        read_jsonl(path, AMAZON)


def test_jsonl_empty_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="empty"):
        read_jsonl(write_text(tmp_path / "r.jsonl", ""), AMAZON)


# ------------------------------------------------------------------------------------------ read_custom: csv
CUSTOM_MAP = {"user_id": "customer", "item_id": "product", "timestamp": "when", "rating": "stars"}
CUSTOM_CSV = (
    "customer,product,when,stars,kind,comment\n"
    "c1,p1,1600000000,5,buy,hello\n"  # 2
    "c1,p2,2020-09-13T12:26:40Z,4,view,x\n"  # 3: ISO, UTC -> 1600000000
    "c2,p3,2020-09-13 12:26:41,3,buy,y\n"  # 4: naive date-time is read as UTC
    "\n"  # 5: blank
    "c2,p4,1600000002,4,buy,too,many\n"  # 6: seven fields
    "c3,p5,last tuesday,5,buy,z\n"  # 7
    "c3,,1600000003,5,buy,z\n"  # 8
    "c4,p6,1600000004,abc,buy,z\n"  # 9
    "c4,p7,2020-09-13T14:26:45+02:00,,view,z\n"  # 10: offset -> 1600000005, no rating
)


def test_custom_csv_mapping_dates_and_quarantine(tmp_path: Path) -> None:
    path = write_text(tmp_path / "logs.csv", CUSTOM_CSV)
    result = read_custom(str(path), CUSTOM_MAP)

    assert list(result.events.columns) == ["user_id", "item_id", "timestamp", "rating"]  # kind, comment ignored
    assert event_tuples(result, "user_id", "item_id", "timestamp") == [
        ("c1", "p1", 1600000000),
        ("c1", "p2", 1600000000),
        ("c2", "p3", 1600000001),
        ("c4", "p7", 1600000005),
    ]
    assert result.events["rating"].iloc[:3].tolist() == [5.0, 4.0, 3.0] and np.isnan(result.events["rating"].iloc[3])
    assert bad_by_line(result) == {
        6: ("expected 6 fields, got 7", "c2,p4,1600000002,4,buy,too,many"),
        7: ("bad timestamp", "c3,p5,last tuesday,5,buy,z"),
        8: ("missing item_id", "c3,,1600000003,5,buy,z"),
        9: ("rating is not a number", "c4,p6,1600000004,abc,buy,z"),
    }
    assert set(result.bad_rows["source"]) == {str(path)}
    assert result.total_rows == 8
    assert_accounted(result)


def test_custom_csv_event_type_filter(tmp_path: Path) -> None:
    path = write_text(tmp_path / "logs.csv", CUSTOM_CSV)
    everything = read_custom(str(path), CUSTOM_MAP)
    buys = read_custom(str(path), CUSTOM_MAP, event_col="kind", event_types=["buy"])

    assert list(buys.events.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert event_tuples(buys, "user_id", "item_id") == [("c1", "p1"), ("c2", "p3")]
    # the views are filtered on purpose, not lost: bad rows are the same, the rest is accounted for by the filter
    pd.testing.assert_frame_equal(buys.bad_rows, everything.bad_rows)
    views = [("c1", "p2"), ("c4", "p7")]
    assert set(event_tuples(everything, "user_id", "item_id")) - set(event_tuples(buys, "user_id", "item_id")) == set(
        views
    )
    assert buys.total_rows == len(buys.events) + len(buys.bad_rows) + len(views)


def test_custom_csv_other_delimiter_and_explicit_format(tmp_path: Path) -> None:
    path = write_text(tmp_path / "export.txt", "user_id;item_id;timestamp\n1;2;3\n4;5;6\n")
    with pytest.raises(BadInputError, match="cannot tell the format"):
        read_custom(str(path), {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp"})
    result = read_custom(
        str(path), {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp"}, fmt="csv", delimiter=";"
    )
    assert event_tuples(result, "user_id", "item_id", "timestamp") == [("1", "2", 3), ("4", "5", 6)]
    assert_accounted(result)


def test_custom_csv_missing_mapped_columns_are_named(tmp_path: Path) -> None:
    path = write_text(tmp_path / "logs.csv", "customer,product,time\nc1,p1,1\n")
    with pytest.raises(BadInputError) as err:
        read_custom(str(path), CUSTOM_MAP)
    assert "when (for timestamp)" in str(err.value) and "stars (for rating)" in str(err.value)
    assert "customer (for" not in str(err.value)


@pytest.mark.parametrize("name", ["logs.csv", "logs.jsonl", "logs.parquet"])
def test_custom_empty_file_is_an_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(BadInputError, match=name):
        read_custom(str(path), CUSTOM_MAP)


# ---------------------------------------------------------------------------------------- read_custom: parquet, jsonl
def test_custom_parquet_timestamp_column(tmp_path: Path) -> None:
    base = pd.Timestamp("2020-09-13 12:26:40", tz="UTC")
    table = pa.table(
        {
            "uid": pa.array([1, 2, None, 4], pa.int64()),  # a null must not turn the other ids into "1.0"
            "sku": pa.array(["a", "b", "c", "d"]),
            "at": pa.array(
                [base, base + pd.Timedelta("1500ms"), base, base + pd.Timedelta("3s")], pa.timestamp("ms", tz="UTC")
            ),
            "score": pa.array([4.5, 3.0, 1.0, 2.0]),
            "extra": pa.array([0, 0, 0, 0]),
        }
    )
    path = tmp_path / "logs.parquet"
    pq.write_table(table, path)
    result = read_custom(str(path), {"user_id": "uid", "item_id": "sku", "timestamp": "at", "rating": "score"})

    assert event_tuples(result, "user_id", "item_id", "timestamp", "rating") == [
        ("1", "a", 1600000000, 4.5),
        ("2", "b", 1600000001, 3.0),  # sub-second precision truncated to whole seconds
        ("4", "d", 1600000003, 2.0),
    ]
    assert bad_by_line(result) == {3: ("missing user_id", "<parquet row>")}
    assert_accounted(result)


def test_custom_parquet_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "logs.parquet"
    pq.write_table(pa.table({"customer": ["c"], "product": ["p"]}), path)
    with pytest.raises(BadInputError, match=r"when \(for timestamp\)"):
        read_custom(str(path), CUSTOM_MAP)


def test_custom_jsonl(tmp_path: Path) -> None:
    records = [
        {"customer": "c1", "product": "p1", "when": "2020-09-13T12:26:40Z", "stars": 5},
        {"customer": "c2", "product": "p2", "when": 1600000001, "stars": 4},
    ]
    path = write_text(tmp_path / "logs.jsonl.gz", "".join(json.dumps(r) + "\n" for r in records), gz=True)
    result = read_custom(str(path), CUSTOM_MAP)
    assert event_tuples(result, "user_id", "item_id", "timestamp", "rating") == [
        ("c1", "p1", 1600000000, 5.0),
        ("c2", "p2", 1600000001, 4.0),
    ]
    assert_accounted(result)


@pytest.fixture
def log_folder(tmp_path: Path) -> Path:
    """Three exports in three formats, one bad row in the csv and one in the jsonl."""
    folder = tmp_path / "exports"
    write_text(folder / "a.csv", "customer,product,when,stars\nc1,p1,1,5\nc1,,2,5\n")
    write_text(folder / "b.jsonl", json.dumps({"customer": "c2", "product": "p2", "when": 3, "stars": 4}) + "\n{oops\n")
    write_text(folder / "nested" / "c.csv", "customer,product,when,stars\nc3,p3,4,3\n")
    write_text(folder / "README.md", "not data\n")
    pq.write_table(pa.table({"customer": ["c4"], "product": ["p4"], "when": [5], "stars": [2.0]}), folder / "d.parquet")
    return folder


def test_custom_folder_of_mixed_files(log_folder: Path) -> None:
    files = resolve_files(str(log_folder))
    assert [p.relative_to(log_folder).as_posix() for p in files] == ["a.csv", "b.jsonl", "d.parquet", "nested/c.csv"]
    result = read_custom(str(log_folder), CUSTOM_MAP)
    assert sorted(event_tuples(result, "user_id", "item_id", "timestamp")) == [
        ("c1", "p1", 1),
        ("c2", "p2", 3),
        ("c3", "p3", 4),
        ("c4", "p4", 5),
    ]
    bad = {(Path(r.source).name, int(r.line), str(r.reason).split(":")[0]) for r in result.bad_rows.itertuples()}
    assert bad == {("a.csv", 3, "missing item_id"), ("b.jsonl", 2, "unparsable JSON")}
    assert_accounted(result)


def test_custom_glob(log_folder: Path) -> None:
    result = read_custom(str(log_folder / "**" / "*.csv"), CUSTOM_MAP)
    assert sorted(event_tuples(result, "user_id", "item_id")) == [("c1", "p1"), ("c3", "p3")]
    assert set(result.bad_rows["source"]) == {str(log_folder / "a.csv")}
    assert_accounted(result)


def test_custom_nothing_matches(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no csv, parquet or jsonl files"):
        read_custom(str(tmp_path / "*.csv"), CUSTOM_MAP)


# ------------------------------------------------------------------------------------------ real files
def test_real_ml100k_u_data(real_mirror: Path) -> None:
    path = real_mirror / "ml-100k" / "u.data"
    if not path.is_file():
        pytest.skip(f"{path} not in the mirror")
    result = read_delimited(path, ML_FIELDS, "\t")
    events = result.events
    assert (len(events), len(result.bad_rows), result.total_rows) == (100_000, 0, 100_000)
    assert (events["user_id"].nunique(), events["item_id"].nunique()) == (943, 1682)
    assert (events["timestamp"].min(), events["timestamp"].max()) == (874724710, 893286638)


def test_real_ticoserec_beauty_items_and_days_align(real_mirror: Path) -> None:
    folder = real_mirror / "amazon-beauty" / "ticoserec"
    if not folder.is_dir():
        pytest.skip(f"{folder} not in the mirror")
    result = read_user_sequences(folder / "Beauty_item_org_rank.txt", folder / "Beauty_time_org_rank.txt")
    events = result.events
    assert (len(events), len(result.bad_rows)) == (198_502, 0)
    assert (events["user_id"].nunique(), events["item_id"].nunique()) == (22_363, 12_101)
    assert events["timestamp"].between(1023840000, 1406073600).all()
    assert (events["timestamp"] % 86_400 == 0).all()  # day resolution, as documented


def test_gzip_and_plain_read_identically(tmp_path: Path) -> None:
    text = "1::2::3::4\n5::6::7::8\n"
    plain = read_delimited(write_text(tmp_path / "r.dat", text), ML_FIELDS, "::")
    packed = tmp_path / "r.dat.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    pd.testing.assert_frame_equal(plain.events, read_delimited(packed, ML_FIELDS, "::").events)
