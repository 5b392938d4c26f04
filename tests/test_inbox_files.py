"""What the inbox reads: only regular files of its own, each once, under any legal name, and only once complete.

Each test is one case of issue 27 a new user found, driven through ``python -m pipeline ingest`` where the user sees
the outcome: a hard link, a FIFO or a socket in the inbox, an inbox folder whose name holds glob characters, a
250-byte file name, a file still being appended to while it is staged, and the error lines of too many bad rows and
of a full disk, which name the inbox file and the file being written.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.ingest.store import read_store
from pipeline.io import write_bytes_atomic
from tests import test_bad_input
from tests.conftest import REPO_ROOT, write_text
from tests.test_bad_input import START, assert_one_line_error, cli, good_rows, log_csv

project = test_bad_input.project  # the fixture: a params file whose inbox, store and work folders are under tmp_path
STAGED = Path("work") / "20240119T000000_20240120T000000" / "logs"


def stored(params_file: Path) -> int:
    return read_store(params_file.parent / "store").num_rows


# ----------------------------------------------------------------------------------------------- not a file of its own
def test_a_hard_link_to_a_file_outside_the_inbox_is_refused_and_not_merged(project: Path, tmp_path: Path) -> None:
    outside = write_text(tmp_path / "elsewhere" / "events.csv", log_csv(good_rows(5)))
    os.link(outside, project.parent / "inbox" / f"{START}.csv")  # was: read and merged
    done = cli(project, "ingest", "--start", START)
    line = assert_one_line_error(done, "ingest", 1)
    assert "hard link" in line and f"['{START}.csv']" in line
    assert "u0" not in done.stderr  # nothing of the content is shown
    assert stored(project) == 0
    assert not any((project.parent / STAGED).iterdir())  # nothing copied into staging


def test_a_fifo_in_the_inbox_is_skipped_with_the_reason_and_never_opened(project: Path) -> None:
    inbox = project.parent / "inbox"
    write_text(inbox / f"{START}.csv", log_csv(good_rows(5)))
    os.mkfifo(inbox / f"{START}-pipe.csv")  # opening it for reading would wait for a writer forever
    done = cli(project, "ingest", "--start", START)  # cli() times out rather than hang
    assert done.returncode == 0, done.stderr[-3000:]  # was: the interval failed with the FIFO's path as message
    assert f"a FIFO (named pipe), never opened: reading one waits for a writer: ['{START}-pipe.csv']" in done.stderr
    assert stored(project) == 5


def test_a_unix_socket_in_the_inbox_is_skipped_with_the_reason(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox = project.parent / "inbox"
    write_text(inbox / f"{START}.csv", log_csv(good_rows(5)))
    monkeypatch.chdir(inbox)  # a relative name: socket paths are limited to 107 bytes
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(f"{START}-socket.csv")
        done = cli(project, "ingest", "--start", START)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"a socket, not a file: ['{START}-socket.csv']" in done.stderr
    assert stored(project) == 5


def test_a_file_with_two_names_in_the_inbox_is_read_once(project: Path) -> None:
    inbox = project.parent / "inbox"
    write_text(inbox / "shipper" / f"{START}.csv", log_csv(good_rows(5)))
    (inbox / f"{START}.csv").symlink_to(inbox / "shipper" / f"{START}.csv")  # a link inside: followed, but once
    done = cli(project, "ingest", "--start", START)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"of a file collected already: ['shipper/{START}.csv']" in done.stderr
    report = yaml.safe_load((project.parent / STAGED.parent / "ingest" / "report.json").read_text())
    assert (report["files"], report["rows"], report["duplicates"]) == (1, 5, 0)  # was: 2 files, 5 duplicates
    assert stored(project) == 5


# ----------------------------------------------------------------------------------------------- names
def test_an_inbox_path_with_glob_characters_is_taken_literally(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"retrain": {"inbox": "inbox[1]", "store_dir": "store", "work_dir": "work"}}))
    write_text(tmp_path / "inbox[1]" / f"{START}.csv", log_csv(good_rows(5)))
    done = cli(params, "ingest", "--start", START)
    assert done.returncode == 0, done.stderr[-3000:]
    assert stored(params) == 5  # was: nothing collected, exit 0


def test_a_250_byte_file_name_collects_and_validates(project: Path) -> None:
    name = f"{START}{'x' * 236}.csv"
    assert len(name.encode()) == 250
    write_text(project.parent / "inbox" / name, log_csv([*good_rows(30), "u1,,bad"]))
    done = cli(project, "ingest", "--start", START)
    assert done.returncode == 0, done.stderr[-3000:]  # was: the staging name grew past 255 bytes
    assert stored(project) == 30
    assert (project.parent / STAGED / name).is_file()
    quarantine = (project.parent / STAGED).parent / "ingest" / "quarantine.csv"
    assert f"inbox/{name}" in quarantine.read_text()


def test_an_atomic_write_takes_any_legal_name(tmp_path: Path) -> None:
    for name in ("é" * 127 + "x", "y" * 255):  # 255 bytes each, the first with two-byte characters
        write_bytes_atomic(tmp_path / name, b"data")  # was: OSError, file name too long
        assert (tmp_path / name).read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["é" * 127 + "x", "y" * 255])  # no leftovers


# ----------------------------------------------------------------------------------------------- a writer appending
def test_a_file_appended_to_while_it_is_staged_is_not_merged(project: Path) -> None:
    """A real writer appends between the collector's listing and its read, made deterministic with a kernel lease.

    The test holds a write lease on the inbox file: the collector's open of the file is held back by the kernel,
    which tells the test (the lease breaks); the test appends a row and lets go; only then does the collector read.
    """
    if not hasattr(fcntl, "F_SETLEASE"):
        pytest.skip("file leases are Linux-only")
    inbox_file = write_text(project.parent / "inbox" / f"{START}.csv", log_csv(good_rows(5)))
    previous = signal.signal(signal.SIGIO, lambda *_: None)  # the kernel signals the lease holder on a break
    writer = os.open(inbox_file, os.O_WRONLY | os.O_APPEND)
    try:
        try:
            fcntl.fcntl(writer, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as err:
            pytest.skip(f"this file system grants no lease: {err}")
        ingest = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--params", str(project), "ingest", "--start", START],
            cwd=project.parent,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 240
        while fcntl.fcntl(writer, fcntl.F_GETLEASE) == fcntl.F_WRLCK:  # until the collector opens the file
            assert ingest.poll() is None and time.monotonic() < deadline, "the collector never opened the file"
            time.sleep(0.01)
        os.write(writer, f"u9,i9,{1705665600 + 9}\n".encode())
        fcntl.fcntl(writer, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        _, stderr = ingest.communicate(timeout=240)
    finally:
        os.close(writer)
        signal.signal(signal.SIGIO, previous)
    line = assert_one_line_error(subprocess.CompletedProcess(ingest.args, ingest.returncode, "", stderr), "ingest", 1)
    assert f"inbox file file://{inbox_file} changed while it was copied" in line and "still appending" in line
    assert not (project.parent / "store").exists()  # nothing merged
    done = cli(project, "ingest", "--start", START)  # the retry, once the writer is done: nothing lost
    assert done.returncode == 0, done.stderr[-3000:]
    assert stored(project) == 6


# ----------------------------------------------------------------------------------------------- error lines
def test_the_too_many_bad_rows_error_names_the_inbox_file(project: Path) -> None:
    write_text(project.parent / "inbox" / f"{START}.csv", log_csv([*good_rows(5), "u1,,x", "u2,,y"]))
    line = assert_one_line_error(cli(project, "ingest", "--start", START), "ingest", 1)
    assert "retrain.max_bad_fraction" in line
    assert f"inbox/{START}.csv:7: " in line  # the first bad row, in the file the user wrote
    assert f"{STAGED}/" not in line  # was: the staged copy


def test_a_full_disk_names_the_file_being_written(project: Path) -> None:
    """A real full disk: a 64 KiB tmpfs mounted over the work folder in a private mount namespace."""
    work = project.parent / "work"
    work.mkdir()
    mount = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"']
    if shutil.which("unshare") is None or subprocess.run([*mount, str(work)], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (unshare --user --mount refused)")
    write_text(project.parent / "inbox" / f"{START}.csv", log_csv(good_rows(4000)))  # about 100 KB
    command = [sys.executable, "-m", "pipeline", "--params", str(project), "ingest", "--start", START]
    done = subprocess.run(
        [*mount[:-1], mount[-1] + ' && shift && exec "$@"', str(work), "_", *command],
        cwd=project.parent,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = assert_one_line_error(done, "ingest", 1)
    assert line == (
        f"error: ingest: no space left on device writing {work / STAGED.relative_to('work')}/{START}.csv: free space "
        "on its disk, then run again"
    )  # was: "[Errno 28] No space left on device", no path
