"""Hostile and broken input, as a new user meets it: each case was once kept as wrong data, a traceback or a leak.

Every test names the failure it pins down. The contract: a bad row is quarantined with its reason (never wrapped,
never a crash), a bad file or parameter ends in one line ``error: <stage>: ...`` with exit code 1 (2 for
parameters), and the inbox never reads through a link out of itself.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.data.events import AFTER_WINDOW, BEFORE_WINDOW
from pipeline.data.quarantine import BadInputError
from pipeline.data.readers import TOO_LONG, read_custom, read_delimited
from pipeline.ingest.retrain import run_overrides
from pipeline.ingest.store import partition_files, read_store
from pipeline.params import ParamsError, load_params
from tests.conftest import REPO_ROOT, write_text
from tests.conftest import pipeline_cli as cli

DAY = 86_400
START = "2024-01-19"
T0 = int(datetime(2024, 1, 19, 12, tzinfo=UTC).timestamp())
COLUMNS = {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp"}
HUGE_TIMES = ["9223372036854775808", "99999999999999999999999", "1e300", "18446744073709551615"]
PASSWD = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A params file whose inbox, store and work folders live under ``tmp_path``; returns the params file."""
    params = {"retrain": {"inbox": "inbox", "store_dir": "store", "work_dir": "work"}, "train": {"epochs": 3}}
    (tmp_path / "inbox").mkdir()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def assert_one_line_error(done: subprocess.CompletedProcess[str], stage: str, code: int) -> str:
    """Exit ``code``, no traceback, and stderr ending in exactly one ``error: <stage>: ...`` line; returns it."""
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {stage}: "), done.stderr[-3000:]
    return last


def log_csv(rows: list[str], header: str = "user_id,item_id,timestamp") -> str:
    return "\n".join([header, *rows]) + "\n"


def good_rows(n: int = 30) -> list[str]:
    return [f"u{i},i{i % 7},{T0 + i}" for i in range(n)]


# ----------------------------------------------------------------------------------------------- numbers past int64
@pytest.mark.parametrize("stamp", HUGE_TIMES)
def test_a_timestamp_beyond_int64_is_quarantined_not_wrapped(tmp_path: Path, stamp: str) -> None:
    path = write_text(tmp_path / "log.csv", log_csv([f"u1,i1,{T0}", f"u2,i2,{stamp}", f"u3,i3,{T0 + 1}"]))
    result = read_custom(str(path), COLUMNS)
    assert result.events["timestamp"].tolist() == [T0, T0 + 1]  # was: a third event at -2**63
    assert result.bad_rows[["line", "reason"]].values.tolist() == [[3, AFTER_WINDOW]]


def test_integer_ids_beyond_int64_are_quarantined_not_wrapped(tmp_path: Path) -> None:
    path = write_text(
        tmp_path / "u.data",
        "1\t2\t3\t881250949\n"
        "99999999999999999999\t2\t3\t881250949\n"  # was user -2**63
        "1\t18446744073709551615\t3\t881250949\n"  # was item -1
        "-9223372036854775809\t2\t3\t881250949\n"
        "9223372036854775807\t5\t3\t881250950\n",  # the largest int64 is a valid id
    )
    result = read_delimited(path, ["user_id", "item_id", "rating", "timestamp"], "\t")
    assert result.events[["user_id", "item_id"]].values.tolist() == [[1, 2], [2**63 - 1, 5]]
    assert result.bad_rows[["line", "reason"]].values.tolist() == [
        [2, "user_id is outside the int64 range"],
        [3, "item_id is outside the int64 range"],
        [4, "user_id is outside the int64 range"],
    ]


def test_timestamps_outside_the_window_are_quarantined_with_the_bound_they_break(tmp_path: Path) -> None:
    rows = [f"u1,i1,{T0}", "u2,i2,-5", "u3,i3,1969-12-31", f"u4,i4,{T0 * 1000}", "u5,i5,9999-12-31", "u6,i6,nan"]
    rows += ["u7,i7,12:30", "u8,i8,١٧٠٠٠٠٠٠٠٠"]  # a time without a date; digits of another script
    path = write_text(tmp_path / "log.csv", log_csv(rows))
    result = read_custom(str(path), COLUMNS)
    assert result.events["user_id"].tolist() == ["u1"]
    reasons = dict(zip(result.bad_rows["line"], result.bad_rows["reason"], strict=True))
    expected = {
        3: BEFORE_WINDOW,
        4: BEFORE_WINDOW,
        5: AFTER_WINDOW,
        6: AFTER_WINDOW,
        7: "missing timestamp",
    }  # nan: null
    assert reasons == {**expected, 8: "bad timestamp", 9: "bad timestamp"}


def test_an_inbox_parquet_uint64_timestamp_never_lands_in_1969(project: Path) -> None:
    inbox = project.parent / "inbox"
    times = pa.array([T0, 2**64 - 1, T0 + 1], pa.uint64())
    pq.write_table(
        pa.table({"user_id": ["a", "b", "c"], "item_id": ["x", "y", "z"], "timestamp": times}),
        inbox / f"{START}.parquet",
    )
    load_params(project)  # the params file is valid
    done = cli(project, "--set", "retrain.max_bad_fraction=0.5", "ingest", "--start", START)
    assert done.returncode == 0, done.stderr[-3000:]
    store = project.parent / "store"
    assert [p.parent.name for p in partition_files(store)] == [f"date={START}"]  # was also date=1969-12-31
    assert sorted(read_store(store).column("timestamp").to_pylist()) == [T0, T0 + 1]
    quarantine = pd.read_csv(project.parent / "work" / "20240119T000000_20240120T000000" / "ingest" / "quarantine.csv")
    assert quarantine[["line", "reason"]].values.tolist() == [[2, AFTER_WINDOW]]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_ingest_quarantines_one_huge_timestamp_and_merges_the_rest(project: Path, fmt: str) -> None:
    rows = [{"user_id": f"u{i}", "item_id": f"i{i}", "timestamp": T0 + i} for i in range(40)]
    inbox = project.parent / "inbox"
    if fmt == "csv":
        lines = [f"{r['user_id']},{r['item_id']},{r['timestamp']}" for r in rows] + ["u9,i9,9223372036854775808"]
        (inbox / f"{START}.csv").write_text(log_csv(lines))
    else:  # was: an OverflowError traceback in the store merge, and the whole interval lost
        lines = [json.dumps(r) for r in rows] + ['{"user_id": "u9", "item_id": "i9", "timestamp": 9223372036854775808}']
        (inbox / f"{START}.jsonl").write_text("\n".join(lines) + "\n")
    done = cli(project, "ingest", "--start", START)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert read_store(project.parent / "store").num_rows == 40
    quarantine = pd.read_csv(project.parent / "work" / "20240119T000000_20240120T000000" / "ingest" / "quarantine.csv")
    assert quarantine[["line", "reason"]].values.tolist() == [[42 if fmt == "csv" else 41, AFTER_WINDOW]]


# ----------------------------------------------------------------------------------------------- junk files
JUNK = {
    "junk": bytes(range(256)) * 40 + b"\n\xff\xfe\x00garbage\n",
    "semicolon": log_csv([f"u{i};i{i};{T0 + i}" for i in range(20)], "user_id;item_id;timestamp").encode(),
    "passwd": PASSWD.encode() * 10,
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(JUNK))
def test_a_junk_log_ends_in_one_clear_line_fifty_times_out_of_fifty(project: Path, kind: str) -> None:
    """Was: an "Exception ignored ... UnicodeDecodeError" from pyarrow's callback, and sometimes exit 134 (abort)."""
    (project.parent / "inbox" / f"{START}.csv").write_bytes(JUNK[kind])
    with ThreadPoolExecutor(max_workers=2) as pool:
        # each run in its own work folder: two runs of one interval at once would race on its staging folder
        runs = list(
            pool.map(
                lambda i: cli(project, "--set", f"retrain.work_dir=work{i}", "ingest", "--start", START), range(50)
            )
        )
    codes = [done.returncode for done in runs]
    assert codes == [1] * 50, sorted(set(codes))
    for done in runs:
        line = assert_one_line_error(done, "ingest", 1)
        assert f"inbox/{START}.csv" in line  # names the inbox file
        assert "root:x" not in done.stderr and "garbage" not in done.stderr  # and never echoes its content


def test_junk_bytes_in_some_rows_quarantine_those_rows_only(tmp_path: Path) -> None:
    data = log_csv(good_rows(3)).encode() + b"u9,\xff\xfe,1\n" + f"u4,i4,{T0 + 4}\n".encode()
    path = tmp_path / "log.csv"
    path.write_bytes(data)
    result = read_custom(str(path), COLUMNS)
    assert result.events["user_id"].tolist() == ["u0", "u1", "u2", "u4"]
    assert result.bad_rows[["line", "reason"]].values.tolist() == [[5, "line is not valid utf-8 text"]]


def test_blank_and_one_long_line_files_are_named_or_quarantined(tmp_path: Path) -> None:
    blank = write_text(tmp_path / "blank.csv", "\n\n   \n" * 5)
    with pytest.raises(BadInputError, match="blank.csv"):
        read_custom(str(blank), COLUMNS)
    long_line = write_text(tmp_path / "long.csv", log_csv([*good_rows(2), "x" * 10_000_000, f"u7,i7,{T0}"]))
    result = read_custom(str(long_line), COLUMNS)  # was: a pyarrow block-size error without the file's name
    assert len(result.events) == 3
    assert result.bad_rows[["line", "reason"]].values.tolist() == [[4, TOO_LONG]]  # over the line limit
    long_header = write_text(tmp_path / "header.csv", "h" * 10_000_000 + "\n" + "\n".join(good_rows(2)))
    with pytest.raises(BadInputError, match="header.csv") as caught:
        read_custom(str(long_header), COLUMNS)
    assert len(str(caught.value)) < 1000  # the file's content is never echoed whole


def test_a_header_only_inbox_file_is_reported(project: Path) -> None:
    (project.parent / "inbox" / f"{START}.csv").write_text("user_id,item_id,timestamp\n")
    done = cli(project, "ingest", "--start", START)
    assert done.returncode == 0
    assert f"{START}.csv holds no rows" in done.stderr  # was: "0 rows" and no warning


# ----------------------------------------------------------------------------------------------- the inbox
def test_a_link_out_of_the_inbox_is_refused_without_echoing_its_content(project: Path, tmp_path: Path) -> None:
    secret = write_text(tmp_path / "outside" / "secret.csv", PASSWD)
    (project.parent / "inbox" / f"{START}.csv").symlink_to(secret)
    done = cli(project, "ingest", "--start", START)
    line = assert_one_line_error(done, "ingest", 1)
    assert "link(s) point outside the inbox" in line and f"{START}.csv" in line
    assert "root:x" not in done.stderr and "daemon" not in done.stderr  # was: the first line in the message
    staged = project.parent / "work" / "20240119T000000_20240120T000000" / "logs"
    assert not staged.exists() or not any(staged.iterdir())  # nothing copied into staging


def test_a_linked_date_folder_pointing_outside_is_refused(project: Path, tmp_path: Path) -> None:
    outside = write_text(tmp_path / "elsewhere" / "part-0.csv", log_csv(good_rows(5))).parent
    (project.parent / "inbox" / f"date={START}").symlink_to(outside, target_is_directory=True)
    done = cli(project, "ingest", "--start", START)  # was: skipped silently
    line = assert_one_line_error(done, "ingest", 1)
    assert f"date={START}" in line


def test_links_inside_the_inbox_are_followed_and_other_skips_are_logged(project: Path) -> None:
    inbox = project.parent / "inbox"
    write_text(inbox / "real" / "events.csv", log_csv(good_rows(5)))
    (inbox / f"{START}.csv").symlink_to(inbox / "real" / "events.csv")  # inside: fine
    write_text(inbox / f"..{START}.csv", log_csv(good_rows(2)))  # was: skipped silently
    write_text(inbox / f"{START}.txt", "notes")
    done = cli(project, "ingest", "--start", START)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_store(project.parent / "store").num_rows == 5
    assert f"['..{START}.csv']" in done.stderr and "starting with '.'" in done.stderr
    assert f"['{START}.txt']" in done.stderr and "not a csv" in done.stderr
    assert "['real/events.csv']" in done.stderr and "no date" in done.stderr


# ----------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochs.x=1", "train.epochs is a value, not a section"),
        ("train.epochs=[1", "is not a YAML value"),
        ("train.lr=.nan", "train.lr: expected a finite number"),
        ("train.lr=.inf", "train.lr: expected a finite number"),
        ("data.timestamps.earliest=1960-01-01", "1970-01-01 or later"),
    ],
)
def test_bad_overrides_end_in_one_line_and_exit_2(project: Path, override: str, expected: str) -> None:
    done = cli(project, "--set", override, "train")
    line = assert_one_line_error(done, "train", 2)
    assert expected in line
    assert done.stderr.strip().count("\n") == 0  # nothing else printed: no run started, no log lines


def test_bad_cli_arguments_and_yaml_exit_2(project: Path) -> None:
    assert_one_line_error(cli(project, "ingest", "--start", "19/01/2024"), "ingest", 2)
    missing = project.parent / "nope.yaml"
    assert "cannot read the parameters file" in assert_one_line_error(cli(missing, "train"), "train", 2)
    project.write_text("retrain: [unclosed\n")
    assert "is not valid YAML" in assert_one_line_error(cli(project, "download"), "download", 2)


def test_non_finite_floats_fail_validation() -> None:
    with pytest.raises(ParamsError, match="finite"):
        load_params(REPO_ROOT / "params.yaml", {"model.moe.lb_weight": float("nan")})


# ----------------------------------------------------------------------------------------------- DAG run conf
def test_run_conf_may_change_hyperparameters_only() -> None:
    allowed = {"train.epochs": 3, "model.moe.top_k": 1, "retrain.min_new_events": 0}
    assert run_overrides({"overrides": allowed}) == allowed
    assert run_overrides({}) == {} and run_overrides(None) == {}
    for key in (
        "retrain.store_dir",
        "train.model_dir",
        "train.warm_start_from",
        "data.custom.path",
        "mlflow.store_dir",
    ):
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            run_overrides({"overrides": {"train.epochs": 1, key: "/tmp/elsewhere"}})
    with pytest.raises(ParamsError, match="not allowed"):
        run_overrides({"overrides": {"train": {"model_dir": "/tmp"}}})  # a whole section is not a hyperparameter


def test_a_real_bug_keeps_its_traceback(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only input, parameter and environment errors become one line: a bug must not be hidden behind one."""
    from pipeline import cli
    from pipeline.stages import Stage

    def broken(params: object) -> object:
        raise KeyError("a bug")

    monkeypatch.setitem(cli.STAGES, "download", Stage("download", "help", broken))
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["--params", str(project), "download"])
