"""Tests for the resumable downloader against a real HTTP server on 127.0.0.1 (no HTTP mocking).

The server injects the faults the ``download`` stage meets in practice: dropped connections, 5xx/429 bursts,
404s, corrupted bytes, servers that ignore or botch ``Range``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.data.fetch import ChecksumMismatch, DownloadError, FetchResult, fetch, parse_checksum
from pipeline.local_servers import free_port

CHUNK = 16 * 1024  # small chunks so the ~200 KB archive spans a dozen reads
FAST = {"backoff_s": 0.001, "timeout_s": 5.0, "progress": False, "chunk_size": CHUNK}


@dataclass
class ServerState:
    """What the handler serves and which faults it injects; the tests flip these fields."""

    data: bytes
    corrupt: bool = False  # serve data with one byte flipped
    drop_after: int | None = None  # first request: full Content-Length, only this many body bytes, then close
    fail_first: int = 0  # answer this many requests with fail_status before serving
    fail_status: int = 500
    not_found: bool = False
    ignore_range: bool = False  # always answer 200 with the whole body
    wrong_range_start: bool = False  # answer 206 with a Content-Range that does not start where asked
    ranges: list[str | None] = field(default_factory=list)  # Range header of every request, in order
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def requests(self) -> int:
        return len(self.ranges)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and Content-Length, as real file servers do
    server: _Server

    def do_GET(self) -> None:
        state = self.server.state
        range_header = self.headers.get("Range")
        with state.lock:
            state.ranges.append(range_header)
            first = state.requests == 1
            failing = state.fail_first > 0
            if failing:
                state.fail_first -= 1
        if failing:
            self._empty(state.fail_status, {"Retry-After": "0"} if state.fail_status == 429 else {})
            return
        if state.not_found:
            self._empty(404)
            return

        body = state.data
        if state.corrupt:
            body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and not state.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self._empty(416, {"Content-Range": f"bytes */{len(body)}"})
                return
            claimed = start + 7 if state.wrong_range_start else start
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {claimed}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if first and state.drop_after is not None:
            self.wfile.write(payload[: state.drop_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # mid-body disconnect, headers promised more
            self.close_connection = True
            return
        self.wfile.write(payload)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState


@dataclass
class Served:
    url: str
    state: ServerState

    @property
    def data(self) -> bytes:
        return self.state.data


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real ~200 KB zip of incompressible bytes, like an official dataset archive."""
    path = tmp_path_factory.mktemp("archive") / "ml-tiny.zip"
    rng = random.Random(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("ml-tiny/ratings.dat", rng.randbytes(150_000))
        zf.writestr("ml-tiny/movies.dat", rng.randbytes(50_000))
    return path.read_bytes()


@pytest.fixture
def served(archive: bytes) -> Iterator[Served]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = ServerState(data=archive)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield Served(url=f"http://{host}:{port}/ml-tiny.zip", state=server.state)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- parse_checksum ----------------------------------------------------------------------


def test_parse_checksum_accepts_md5_and_sha256() -> None:
    md5 = "c4d9eecfca2ab87c1945afe126590906"  # the official ml-1m digest
    assert parse_checksum("md5:" + md5.upper()) == ("md5", md5)
    assert parse_checksum(" sha256:" + "ab" * 32) == ("sha256", "ab" * 32)


@pytest.mark.parametrize(
    "spec",
    ["c4d9eecfca2ab87c1945afe126590906", "sha1:" + "a" * 40, "md5:xyz", "md5:abc", "sha256:" + "a" * 40, ""],
)
def test_parse_checksum_rejects_malformed(spec: str) -> None:
    with pytest.raises(ValueError, match="checksum"):
        parse_checksum(spec)


# --- fetch -------------------------------------------------------------------------------


@pytest.mark.parametrize("make_checksum", [_md5, _sha256, lambda _: None], ids=["md5", "sha256", "none"])
def test_full_streamed_download(served: Served, tmp_path: Path, make_checksum) -> None:
    dest = tmp_path / "raw" / "ml-tiny.zip"  # parent does not exist yet
    result = fetch(served.url, dest, checksum=make_checksum(served.data), **FAST)
    assert result == FetchResult(
        path=dest, sha256=hashlib.sha256(served.data).hexdigest(), size=len(served.data), downloaded=True
    )
    assert dest.read_bytes() == served.data
    assert zipfile.ZipFile(dest).testzip() is None
    assert not dest.with_name("ml-tiny.zip.part").exists()
    assert served.state.ranges == [None]


def test_progress_bar_path(served: Served, tmp_path: Path) -> None:
    result = fetch(served.url, tmp_path / "a.zip", **{**FAST, "progress": True})
    assert result.size == len(served.data)


def test_resume_after_dropped_connection(served: Served, tmp_path: Path, caplog) -> None:
    served.state.drop_after = 50_000
    dest = tmp_path / "ml-tiny.zip"
    with caplog.at_level(logging.WARNING, logger="pipeline.data.fetch"):
        result = fetch(served.url, dest, checksum=_md5(served.data), **FAST)
    assert result.downloaded and dest.read_bytes() == served.data
    assert served.state.requests == 2
    first, second = served.state.ranges
    assert first is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second).group(1))
    assert 0 < resumed_at <= 50_000  # whatever arrived before the drop was kept, not fetched again
    assert "retry 1/5" in caplog.text and served.url in caplog.text


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retries_transient_statuses(served: Served, tmp_path: Path, caplog, status: int) -> None:
    served.state.fail_first, served.state.fail_status = 2, status
    with caplog.at_level(logging.WARNING, logger="pipeline.data.fetch"):
        result = fetch(served.url, tmp_path / "a.zip", checksum=_sha256(served.data), **FAST)
    assert result.downloaded and result.path.read_bytes() == served.data
    assert served.state.requests == 3
    assert caplog.text.count(f"HTTP {status}") == 2


def test_gives_up_after_last_retry(served: Served, tmp_path: Path) -> None:
    served.state.fail_first = 100
    with pytest.raises(DownloadError, match=re.escape(served.url)) as info:
        fetch(served.url, tmp_path / "a.zip", **{**FAST, "retries": 2})
    assert "HTTP 500" in str(info.value)
    assert served.state.requests == 3
    assert not (tmp_path / "a.zip").exists()


def test_404_fails_fast(served: Served, tmp_path: Path) -> None:
    served.state.not_found = True
    with pytest.raises(DownloadError, match=re.escape(served.url)) as info:
        fetch(served.url, tmp_path / "a.zip", **FAST)
    assert not isinstance(info.value, ChecksumMismatch)
    assert "404" in str(info.value)
    assert served.state.requests == 1
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_leaves_nothing(served: Served, tmp_path: Path) -> None:
    served.state.corrupt = True
    dest = tmp_path / "ml-tiny.zip"
    want = hashlib.md5(served.data).hexdigest()
    with pytest.raises(ChecksumMismatch) as info:
        fetch(served.url, dest, checksum="md5:" + want, **FAST)
    message = str(info.value)
    assert served.url in message and want in message
    corrupt = served.data[:1000] + bytes([served.data[1000] ^ 0xFF]) + served.data[1001:]
    assert hashlib.md5(corrupt).hexdigest() in message
    assert not dest.exists() and not dest.with_name("ml-tiny.zip.part").exists()
    assert served.state.requests == 1  # a download from byte 0 would only repeat the same bytes


def test_no_redownload_when_valid_copy_exists(served: Served, tmp_path: Path) -> None:
    dest = tmp_path / "ml-tiny.zip"
    fetch(served.url, dest, checksum=_md5(served.data), **FAST)
    mtime = dest.stat().st_mtime_ns
    for checksum in (_md5(served.data), _sha256(served.data), None):
        result = fetch(served.url, dest, checksum=checksum, **FAST)
        assert result == FetchResult(dest, hashlib.sha256(served.data).hexdigest(), len(served.data), False)
    assert served.state.requests == 1
    assert dest.stat().st_mtime_ns == mtime


def test_existing_copy_with_wrong_checksum_is_replaced(served: Served, tmp_path: Path) -> None:
    dest = tmp_path / "ml-tiny.zip"
    dest.write_bytes(b"an older release")
    result = fetch(served.url, dest, checksum=_md5(served.data), **FAST)
    assert result.downloaded and dest.read_bytes() == served.data
    assert served.state.ranges == [None]


def test_connection_refused_names_url(tmp_path: Path, caplog) -> None:
    url = f"http://127.0.0.1:{free_port()}/ml-tiny.zip"
    with caplog.at_level(logging.WARNING, logger="pipeline.data.fetch"), pytest.raises(DownloadError) as info:
        fetch(url, tmp_path / "a.zip", **{**FAST, "retries": 2})
    assert url in str(info.value) and "ConnectionError" in str(info.value)
    assert caplog.text.count("retry ") == 2
    assert list(tmp_path.iterdir()) == []


def test_leftover_part_from_killed_run_is_resumed(served: Served, tmp_path: Path) -> None:
    dest = tmp_path / "ml-tiny.zip"
    dest.with_name("ml-tiny.zip.part").write_bytes(served.data[:70_000])
    result = fetch(served.url, dest, checksum=_sha256(served.data), **FAST)
    assert result.downloaded and dest.read_bytes() == served.data
    assert served.state.ranges == ["bytes=70000-"]


def test_complete_part_killed_before_rename(served: Served, tmp_path: Path) -> None:
    dest = tmp_path / "ml-tiny.zip"
    dest.with_name("ml-tiny.zip.part").write_bytes(served.data)
    result = fetch(served.url, dest, checksum=_md5(served.data), **FAST)  # server answers 416
    assert result.downloaded and dest.read_bytes() == served.data
    assert served.state.ranges == [f"bytes={len(served.data)}-"]


def test_stale_part_mismatch_gets_one_fresh_download(served: Served, tmp_path: Path) -> None:
    dest = tmp_path / "ml-tiny.zip"
    dest.with_name("ml-tiny.zip.part").write_bytes(b"\0" * 70_000)  # left by a different upstream version
    result = fetch(served.url, dest, checksum=_md5(served.data), **FAST)
    assert dest.read_bytes() == served.data and result.size == len(served.data)
    assert served.state.ranges == ["bytes=70000-", None]


def test_stale_part_without_checksum_is_trusted(served: Served, tmp_path: Path) -> None:
    # Documents the limit of resuming without an official checksum: the stale prefix cannot be detected.
    dest = tmp_path / "ml-tiny.zip"
    dest.with_name("ml-tiny.zip.part").write_bytes(b"\0" * 70_000)
    result = fetch(served.url, dest, **FAST)
    assert result.size == len(served.data) and dest.read_bytes() != served.data


def test_server_ignoring_range_restarts_from_zero(served: Served, tmp_path: Path) -> None:
    served.state.ignore_range = True
    dest = tmp_path / "ml-tiny.zip"
    dest.with_name("ml-tiny.zip.part").write_bytes(served.data[:70_000])
    result = fetch(served.url, dest, checksum=_md5(served.data), **FAST)
    assert result.downloaded and dest.read_bytes() == served.data  # truncated, not appended
    assert served.state.ranges == ["bytes=70000-"]


def test_wrong_content_range_start_is_not_appended(served: Served, tmp_path: Path) -> None:
    served.state.wrong_range_start = True
    dest = tmp_path / "ml-tiny.zip"
    dest.with_name("ml-tiny.zip.part").write_bytes(served.data[:70_000])
    result = fetch(served.url, dest, checksum=_md5(served.data), **FAST)
    assert dest.read_bytes() == served.data and result.size == len(served.data)
    assert served.state.ranges == ["bytes=70000-", None]  # discarded the .part, fetched from zero


def test_invalid_url_fails_without_retry(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="not-a-url"):
        fetch("not-a-url", tmp_path / "a.zip", **FAST)


def test_rejects_bad_checksum_before_any_request(served: Served, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        fetch(served.url, tmp_path / "a.zip", checksum="crc32:1234", **FAST)
    assert served.state.requests == 0
