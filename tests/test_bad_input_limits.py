"""Only complete data is read, and memory stays bounded by the readers' limits, not by the input (issue 27).

Each test names the case it pins down: a line cut mid-write stored as an event, a file read while a writer still
appends, a gzip bomb or a million-column header exhausting memory, an over-long line, a column named twice. The
review of those changes added: the size limit as a parameter (data.max_file_mb), Parquet bounded by its metadata,
a spreadsheet's trailing delimiters, and a cut last line that is quarantined without failing a small file.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.quarantine import BadInputError
from pipeline.data.readers import (
    CHANGED,
    INCOMPLETE,
    MAX_COLUMNS,
    MAX_FILE_BYTES,
    MAX_FOOTER_BYTES,
    MAX_JSONL_BYTES,
    MAX_LINE_CHARS,
    MIN_ROW_BYTES,
    TOO_LONG,
    read_custom,
    read_delimited,
    read_user_sequences,
)
from tests.conftest import REPO_ROOT, pipeline_cli, write_text
from tests.test_bad_input import COLUMNS, T0, assert_one_line_error, good_rows, log_csv

ADDRESS_SPACE = 4 * 2**30  # `ulimit -v 4G`: the bound for a gzip bomb and a million-column header
CUT = "u7,i12,17044"  # the start of u7,i12,1704412800: written, but not yet its newline


def download_cli(root: Path, log: Path, *, address_space: int | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline download`` of ``log`` as custom data in a fresh process, optionally under ``ulimit -v``."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HYMOE_DATA_MIRROR", None)
    params = root / "params.yaml"
    params.write_text(f"data:\n  dataset: custom\n  custom:\n    path: {json.dumps(str(log))}\n")

    def limit_memory() -> None:
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.run(
        [sys.executable, "-m", "pipeline", "--params", str(params), "download"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_memory,
    )


# ----------------------------------------------------------------------------------------------- a cut last line
@pytest.mark.parametrize("gz", [False, True])
def test_a_csv_line_cut_mid_write_is_quarantined_not_stored(tmp_path: Path, gz: bool) -> None:
    path = write_text(tmp_path / "log.csv", log_csv(good_rows(5)) + CUT, gz=gz)
    result = read_custom(str(path), COLUMNS)
    assert result.events["user_id"].tolist() == [f"u{i}" for i in range(5)]  # was: u7 at 1970-01-01
    assert result.bad_rows[["line", "reason", "raw"]].values.tolist() == [[7, INCOMPLETE, CUT]]
    if gz:  # a gzip stream cut short is still a clear error, not a shorter log
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(BadInputError, match=r"log\.csv: starts like a gzip file but cannot be decompressed"):
            read_custom(str(path), COLUMNS)


@pytest.mark.parametrize("broken", [False, True], ids=["fast-path", "slow-path"])
def test_a_jsonl_record_without_its_newline_is_quarantined_not_stored(tmp_path: Path, broken: bool) -> None:
    """A record whose newline is not written yet is held back on pyarrow's path and on the per-line one."""
    records = [json.dumps({"user_id": f"u{i}", "item_id": f"i{i}", "timestamp": T0 + i}) for i in range(4)]
    if broken:  # an unparsable line sends the whole file down the per-line path
        records[1] = '{"user_id": "u1", "item_id"'
    last = json.dumps({"user_id": "u7", "item_id": "i12", "timestamp": T0})  # valid JSON, but its line is open
    path = write_text(tmp_path / "log.jsonl", "\n".join(records) + "\n" + last)
    result = read_custom(str(path), COLUMNS)
    assert "u7" not in result.events["user_id"].tolist()
    assert len(result.events) == (3 if broken else 4)
    assert [5, INCOMPLETE, last] in result.bad_rows[["line", "reason", "raw"]].values.tolist()


def test_the_download_stage_does_not_store_a_cut_line_of_a_custom_log(tmp_path: Path) -> None:
    log = write_text(tmp_path / "logs" / "events.csv", log_csv(good_rows(200)) + CUT)
    done = download_cli(tmp_path, log)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = pq.read_table(tmp_path / "data" / "interim" / "interactions.parquet").to_pandas()
    assert len(stored) == 200 and stored["timestamp"].min() == T0  # was: a 201st event, u7 at 1970-01-01
    quarantine = pd.read_csv(tmp_path / "data" / "interim" / "quarantine.csv")
    assert quarantine[["line", "reason", "raw"]].values.tolist() == [[202, INCOMPLETE, CUT]]


@pytest.mark.parametrize(
    ("name", "text", "read"),
    [
        ("u.data", f"1\t2\t3\t{T0}\n1\t3\t4\t{T0 + 1}\n7\t12\t5\t17044", "tab"),
        ("ml-1m.txt", "1 2\n1 3\n7 1", "pairs"),
        ("Beauty.txt", "1 2 3 4\n2 5 6\n7 1", "sequences"),
    ],
)
def test_the_benchmark_formats_do_not_keep_a_cut_last_line(tmp_path: Path, name: str, text: str, read: str) -> None:
    path = write_text(tmp_path / name, text)
    if read == "sequences":
        result = read_user_sequences(path)
    else:
        fields = ["user_id", "item_id", "rating", "timestamp"] if read == "tab" else ["user_id", "item_id"]
        result = read_delimited(path, fields, "\t" if read == "tab" else None)
    assert 7 not in result.events["user_id"].tolist()  # user 7's line was never finished
    assert result.bad_rows[["line", "reason"]].values.tolist() == [[3, INCOMPLETE]]


# ----------------------------------------------------------------------------------------------- a growing file
def test_a_file_that_grows_while_it_is_read_is_refused(tmp_path: Path) -> None:
    """A writer appends whole gzip members the whole time: the reader sees the file change and merges nothing."""
    path = tmp_path / "growing.csv.gz"
    rows = "".join(f"u{i % 997},i{i % 89},{T0 + i}\n" for i in range(100_000))
    with gzip.open(path, "wt", compresslevel=1) as handle:  # about 40 MB to inflate: the read takes a while
        handle.write("user_id,item_id,timestamp\n" + rows * 20)
    member = gzip.compress(f"u1,i1,{T0}\n".encode())
    append = (
        f"import time\nwhile True:\n    with open({str(path)!r}, 'ab') as f: f.write({member!r})\n    time.sleep(0.001)"
    )
    writer = subprocess.Popen([sys.executable, "-c", append])
    try:
        size = path.stat().st_size
        while path.stat().st_size == size:  # the writer is appending
            time.sleep(0.01)
        with pytest.raises(BadInputError) as caught:
            read_custom(str(path), COLUMNS)
    finally:
        writer.kill()
        writer.wait()
    assert str(caught.value) == f"{path}: {CHANGED}"


# ----------------------------------------------------------------------------------------------- bounded memory
@pytest.mark.parametrize(("name", "limit"), [("bomb.csv.gz", MAX_FILE_BYTES), ("bomb.jsonl.gz", MAX_JSONL_BYTES)])
def test_a_gzip_bomb_ends_in_one_line_under_a_4_gib_address_space(tmp_path: Path, name: str, limit: int) -> None:
    """A small gzip of well-formed rows that inflates past the limit (was: inflated whole, MemoryError)."""
    bomb = tmp_path / "logs" / name
    bomb.parent.mkdir()
    if name.endswith(".csv.gz"):
        head, row = b"user_id,item_id,timestamp\n", f"u1,i1,{T0}\n".encode()
    else:
        head, row = b"", (json.dumps({"user_id": "u1", "item_id": "i1", "timestamp": T0}) + "\n").encode()
    rows = row * (2**20 // len(row))
    with gzip.open(bomb, "wb", compresslevel=9) as handle:  # streamed: never held in memory whole
        handle.write(head)
        written = 0
        while written <= limit:
            handle.write(rows)
            written += len(rows)
    assert bomb.stat().st_size < limit // 100
    done = download_cli(tmp_path, bomb.parent, address_space=ADDRESS_SPACE)
    line = assert_one_line_error(done, "download", 1)
    assert f"{bomb}: inflates to more than the limit of {limit:,} bytes per file set by data.max_file_mb" in line
    assert "(a gzip bomb? else split the log into smaller files, convert it to Parquet" in line


def test_a_million_column_header_ends_in_one_line_under_a_4_gib_address_space(tmp_path: Path) -> None:
    """A 7 MB CSV whose header names a million columns (was: std::bad_alloc, exit 134, or 8 GB resident)."""
    header = ",".join(f"c{i}" for i in range(1_000_000))
    log = write_text(tmp_path / "logs" / "wide.csv", header + "\n" + "\n".join(good_rows(3)) + "\n")
    done = download_cli(tmp_path, log, address_space=ADDRESS_SPACE)
    line = assert_one_line_error(done, "download", 1)
    assert "wide.csv: no header can be read: line 1: " + TOO_LONG in line
    assert len(line) < 500


def test_a_header_over_the_column_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    names = ["user_id", "item_id", "timestamp", *(f"extra{i}" for i in range(MAX_COLUMNS - 2))]
    log = write_text(
        tmp_path / "wide.csv", log_csv([",".join(["u1", "i1", str(T0)] + ["x"] * (len(names) - 3))], ",".join(names))
    )
    with pytest.raises(BadInputError, match=f"wide.csv: the header \\(line 1\\) has {MAX_COLUMNS + 1:,} columns"):
        read_custom(str(log), COLUMNS)


def test_a_plain_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    log = tmp_path / "huge.csv"
    with open(log, "wb") as handle:  # sparse: no disk or time spent
        handle.write(log_csv(good_rows(3)).encode())
        handle.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(BadInputError, match=f"huge.csv: {MAX_FILE_BYTES + 1:,} bytes, over the"):
        read_custom(str(log), COLUMNS)


def test_a_line_over_the_length_limit_is_quarantined_shortened(tmp_path: Path) -> None:
    long_item = "i" * (MAX_LINE_CHARS + 1)
    path = write_text(tmp_path / "log.csv", log_csv([*good_rows(3), f"u9,{long_item},{T0}", f"u4,i4,{T0}"]))
    result = read_custom(str(path), COLUMNS)
    assert result.events["user_id"].tolist() == ["u0", "u1", "u2", "u4"]  # was: an item id of a million characters
    assert result.bad_rows[["line", "reason"]].values.tolist() == [[5, TOO_LONG]]
    assert result.bad_rows["raw"].iloc[0].startswith("u9,iii") and len(result.bad_rows["raw"].iloc[0]) < 200


# ----------------------------------------------------------------------------------------------- a name given twice
def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    path = write_text(tmp_path / "log.csv", log_csv([f"u1,i1,{T0},i2"], "user_id,item_id,timestamp,item_id"))
    with pytest.raises(BadInputError, match=r"log\.csv: the header names column\(s\) \['item_id'\] more than once"):
        read_custom(str(path), COLUMNS)  # was: the first item_id kept silently


def test_a_parquet_schema_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    columns = [pa.array(["u1"]), pa.array(["i1"]), pa.array([T0]), pa.array(["i2"])]
    path = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_arrays(columns, names=["user_id", "item_id", "timestamp", "item_id"]), path)
    with pytest.raises(BadInputError, match=r"log\.parquet: the schema names column\(s\) \['item_id'\] more than once"):
        read_custom(str(path), COLUMNS)


def test_a_json_record_giving_a_key_twice_is_quarantined(tmp_path: Path) -> None:
    """Each JSON line is its own record, so only the ambiguous record is held back (JSON's own rule: keep the last)."""
    twice = f'{{"user_id": "u9", "item_id": "i1", "item_id": "i2", "timestamp": {T0}}}'
    good = [json.dumps({"user_id": f"u{i}", "item_id": f"i{i}", "timestamp": T0 + i}) for i in range(3)]
    path = write_text(tmp_path / "log.jsonl", "\n".join([*good, twice]) + "\n")
    result = read_custom(str(path), COLUMNS)
    assert result.events["user_id"].tolist() == ["u0", "u1", "u2"]  # was: u9 with item i2
    assert result.bad_rows[["line", "reason", "raw"]].values.tolist() == [
        [4, "a key given more than once in the record: ['item_id']", twice]
    ]


# ----------------------------------------------------------------------------------------------- review of issue 27
def test_the_file_size_limit_is_the_parameter_data_max_file_mb(tmp_path: Path) -> None:
    """A log over a lowered limit is refused naming the parameter; a raised limit reads it (was: 64 MiB, fixed)."""
    log = write_text(tmp_path / "logs" / "big.csv", log_csv(good_rows(60_000)))  # about 1.5 MiB
    assert 2**20 < log.stat().st_size < 2 * 2**20
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  dataset: custom\n  custom:\n    path: {json.dumps(str(log))}\n")
    done = pipeline_cli(params, "--set", "data.max_file_mb=1", "download")
    line = assert_one_line_error(done, "download", 1)
    size = log.stat().st_size
    assert f"big.csv: {size:,} bytes, over the limit of {2**20:,} per file set by data.max_file_mb" in line
    assert "convert it to Parquet" in line and "split the log" in line
    done = pipeline_cli(params, "--set", "data.max_file_mb=2", "download")
    assert done.returncode == 0, done.stderr[-3000:]
    assert pq.read_metadata(tmp_path / "data" / "interim" / "interactions.parquet").num_rows == 60_000
    refused = pipeline_cli(params, "--set", "data.max_file_mb=0", "download")
    assert "data.max_file_mb must lie in [1, 4096], got 0" in assert_one_line_error(refused, "download", 2)


@pytest.mark.parametrize("bound", ["bytes", "rows"])
def test_a_parquet_file_over_the_limit_is_refused_by_its_metadata(tmp_path: Path, bound: str) -> None:
    """Distinct ids over the limit uncompressed, or a run of one id (17 KB on disk, a string per row once read):
    both are refused from the footer, before a column is read (was: pq.read_table of the whole file, no cap)."""
    path = tmp_path / "log.parquet"
    if bound == "bytes":  # 60,000 rows (under the row cap) of about 40 bytes each
        n = 60_000
        users = pa.array([f"user-{i:035d}" for i in range(n)])
    else:  # one id repeated: dictionary- and run-length-encoded to almost nothing
        n = 2**20 // MIN_ROW_BYTES + 1
        users = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array(["u1"]))
    items = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array(["i1"]))
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": pa.array(np.full(n, T0))}), path)
    assert path.stat().st_size < 2**20
    with pytest.raises(BadInputError) as caught:
        read_custom(str(path), COLUMNS, max_file_mb=1)
    message = str(caught.value)
    assert message.startswith(f"{path}: {n:,} rows whose mapped columns hold ")
    assert f"over the limit of {2**20 // MIN_ROW_BYTES:,} rows and {2**20:,} bytes per Parquet file" in message
    assert "set by data.max_file_mb" in message
    assert len(read_custom(str(path), COLUMNS, max_file_mb=64).events) == n  # within the default limit: read


def test_a_parquet_footer_over_its_limit_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """The footer (schema and metadata) is parsed whole: its length, in the file's last 8 bytes, is checked first."""
    path = tmp_path / "log.parquet"
    footer = MAX_FOOTER_BYTES + 1
    path.write_bytes(b"PAR1" + b"\0" * 64 + footer.to_bytes(4, "little") + b"PAR1")
    with pytest.raises(
        BadInputError, match=f"log.parquet: a Parquet footer \\(schema and metadata\\) of {footer:,} bytes"
    ):
        read_custom(str(path), COLUMNS)  # was: handed to pyarrow, whatever its size


def test_a_wide_parquet_file_is_read_when_only_its_mapped_columns_are(tmp_path: Path) -> None:
    """1,500 columns, three mapped (was: refused by the CSV header's limit of 1,000 columns)."""
    names = ["user_id", "item_id", "timestamp", *(f"extra{i}" for i in range(1_497))]
    arrays = [pa.array(["u1", "u2"]), pa.array(["i1", "i2"]), pa.array([T0, T0 + 1])]
    arrays += [pa.array([0.5, 1.5])] * 1_497
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.Table.from_arrays(arrays, names=names), path)
    result = read_custom(str(path), COLUMNS)
    assert result.events.values.tolist() == [["u1", "i1", T0], ["u2", "i2", T0 + 1]]


def test_a_csv_header_ending_in_delimiters_reads_as_before(tmp_path: Path) -> None:
    """A spreadsheet's export: ``user_id,item_id,timestamp,,`` (was: refused as a column named twice, [''])."""
    rows = [f"u1,i1,{T0},,", f"u2,i2,{T0 + 1},,"]
    path = write_text(tmp_path / "log.csv", log_csv(rows, "user_id,item_id,timestamp,,"))
    result = read_custom(str(path), COLUMNS)
    assert result.events.values.tolist() == [["u1", "i1", T0], ["u2", "i2", T0 + 1]] and result.bad_rows.empty
    with pytest.raises(BadInputError, match=r"names column\(s\) \[''\] more than once \('' is a column without"):
        read_custom(str(path), {**COLUMNS, "rating": ""})  # a mapped name without a name: which column is meant?


def test_a_cut_last_line_is_quarantined_without_failing_a_small_download(tmp_path: Path) -> None:
    """Three rows, the last without its newline, as "\\n".join writers and spreadsheet exports leave them: one
    quarantined row of three was 33% malformed, over data.max_bad_fraction=0.01, and failed the stage."""
    log = write_text(tmp_path / "logs" / "events.csv", "user_id,item_id,timestamp\n" + "\n".join(good_rows(3)))
    done = download_cli(tmp_path, log)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{log}: its last line has no newline" in done.stderr and "waits for a complete write" in done.stderr
    stored = pq.read_table(tmp_path / "data" / "interim" / "interactions.parquet").to_pandas()
    assert stored["user_id"].tolist() == ["u0", "u1"]
    quarantine = pd.read_csv(tmp_path / "data" / "interim" / "quarantine.csv")
    assert quarantine[["line", "reason", "raw"]].values.tolist() == [[4, INCOMPLETE, good_rows(3)[2]]]


def test_a_cut_last_line_is_quarantined_without_failing_a_small_inbox_interval(tmp_path: Path) -> None:
    """The same through ``ingest`` (retrain.max_bad_fraction=0.05); report.json counts the line apart."""
    (tmp_path / "inbox").mkdir()
    params = tmp_path / "params.yaml"
    params.write_text("retrain:\n  inbox: inbox\n  store_dir: store\n  work_dir: work\n")
    day = "2024-01-19"
    (tmp_path / "inbox" / f"{day}.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(good_rows(3)))
    done = pipeline_cli(params, "ingest", "--start", day)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{day}.csv: its last line has no newline" in done.stderr
    ingest = tmp_path / "work" / "20240119T000000_20240120T000000" / "ingest"
    report = json.loads((ingest / "report.json").read_text())
    assert (report["events"], report["malformed"], report["incomplete"], report["rows"]) == (2, 0, 1, 3)
    quarantine = pd.read_csv(ingest / "quarantine.csv")
    assert quarantine[["line", "reason", "raw"]].values.tolist() == [[4, INCOMPLETE, good_rows(3)[2]]]
