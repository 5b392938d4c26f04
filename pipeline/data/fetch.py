"""Resumable, verified download of official dataset archives.

The ``download`` stage must survive flaky networks and killed runs without ever leaving a half archive under
its final name: later stages (and DVC) treat "file exists" as "file is complete". So bytes go to
``<dest>.part`` beside the destination, an interrupted transfer resumes from the end of that file with an
HTTP ``Range`` request, and only a complete (and, when an official checksum is known, verified) file is
renamed into place with :func:`os.replace`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.io import file_digest

logger = logging.getLogger(__name__)

SUPPORTED_ALGORITHMS = ("md5", "sha256")
MAX_BACKOFF_S = 60.0  # cap on a single back-off sleep, so retries=10 does not mean waiting for hours

# Connection and read failures are worth retrying; URL or scheme mistakes (also RequestException) are not.
_TRANSIENT_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


class DownloadError(PipelineError, RuntimeError):
    """A download failed; the message names the URL and the cause."""


class ChecksumMismatch(DownloadError):
    """The downloaded bytes do not match the official checksum (message names URL, expected and actual)."""


@dataclass(frozen=True)
class FetchResult:
    path: Path  # final file
    sha256: str  # always computed: the data manifest records it when no official checksum exists
    size: int  # bytes
    downloaded: bool  # False when a valid copy already existed and nothing was fetched


class _Transient(Exception):
    """Internal: an attempt failed in a way a later attempt may not (network, 5xx, 429, short body)."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


def parse_checksum(spec: str) -> tuple[str, str]:
    """Split ``"md5:<hex>"`` / ``"sha256:<hex>"`` into ``(algorithm, lowercase hex)``.

    Validated up front so a typo in ``params.yaml`` fails before minutes of downloading, not after.
    """
    algorithm, sep, hexdigest = spec.strip().partition(":")
    algorithm = algorithm.strip().lower()
    hexdigest = hexdigest.strip().lower()
    if not sep or algorithm not in SUPPORTED_ALGORITHMS:
        raise ValueError(
            f"checksum {spec!r} must look like 'md5:<hex>' or 'sha256:<hex>' "
            f"(supported algorithms: {', '.join(SUPPORTED_ALGORITHMS)})"
        )
    expected_len = 2 * hashlib.new(algorithm).digest_size
    if len(hexdigest) != expected_len or not re.fullmatch(r"[0-9a-f]+", hexdigest):
        raise ValueError(f"checksum {spec!r}: {algorithm} digest must be {expected_len} hex characters")
    return algorithm, hexdigest


def fetch(
    url: str,
    dest: str | os.PathLike[str],
    *,
    checksum: str | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    progress: bool = True,
    chunk_size: int = 1 << 20,
) -> FetchResult:
    """Download ``url`` to ``dest`` (resuming, retrying, verifying) unless a valid copy is already there.

    Parameters
    ----------
    url
        HTTP(S) address of the file.
    dest
        Final path; the transfer is staged in ``<dest>.part`` beside it.
    checksum
        Official digest as ``"md5:<hex>"`` or ``"sha256:<hex>"``; ``None`` when the publisher gives none.
    retries
        Retries after the first attempt on connection errors, timeouts, short bodies, HTTP 5xx and 429.
    backoff_s
        First back-off sleep; attempt ``i`` sleeps ``backoff_s * 2**i`` (at most ``MAX_BACKOFF_S``).
    timeout_s
        Connect and per-read timeout (not a limit on the whole transfer, which may legitimately be long).
    progress
        Show a tqdm bar on stderr.
    chunk_size
        Bytes per read and write.

    Raises
    ------
    DownloadError
        Any failure: HTTP 4xx other than 429 (at once), or the last cause once retries are spent.
    ChecksumMismatch
        The bytes do not match ``checksum``; neither ``dest`` nor the ``.part`` is left behind.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    expected = parse_checksum(checksum) if checksum is not None else None
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")

    if dest.is_file():
        existing = _existing_copy(dest, expected)
        if existing is not None:
            return existing
        logger.warning("%s exists but does not match %s; downloading it again", dest, checksum)

    dest.parent.mkdir(parents=True, exist_ok=True)
    fresh_retry_used = False
    with requests.Session() as session:
        while True:
            resumed = _download_with_retries(
                session,
                url,
                part,
                retries=retries,
                backoff_s=backoff_s,
                timeout_s=timeout_s,
                progress=progress,
                chunk_size=chunk_size,
                desc=dest.name,
            )
            if expected is None:
                break
            algorithm, want = expected
            got = file_digest(part, algorithm)
            if got == want:
                break
            part.unlink(missing_ok=True)
            # A file stitched from an older .part (perhaps of another upstream version) deserves one clean
            # download; a mismatch on a download made from byte zero would only repeat, so raise at once.
            if resumed and not fresh_retry_used:
                fresh_retry_used = True
                logger.warning(
                    "%s checksum mismatch on a resumed download of %s (expected %s, got %s); "
                    "downloading once more from scratch",
                    algorithm,
                    url,
                    want,
                    got,
                )
                continue
            raise ChecksumMismatch(f"checksum mismatch for {url}: expected {algorithm}:{want}, got {algorithm}:{got}")

    sha256 = expected[1] if expected is not None and expected[0] == "sha256" else file_digest(part, "sha256")
    size = part.stat().st_size
    os.replace(part, dest)
    logger.info("downloaded %s -> %s (%d bytes, sha256 %s)", url, dest, size, sha256)
    return FetchResult(path=dest, sha256=sha256, size=size, downloaded=True)


def _existing_copy(dest: Path, expected: tuple[str, str] | None) -> FetchResult | None:
    """Result for an already present ``dest`` if it can be trusted, else ``None`` (download again)."""
    # Without an official checksum the file is still trusted: it only ever appears through os.replace of a
    # complete transfer, so its presence means it is whole.
    if expected is not None:
        algorithm, want = expected
        if file_digest(dest, algorithm) != want:
            return None
    sha256 = expected[1] if expected is not None and expected[0] == "sha256" else file_digest(dest, "sha256")
    logger.info("%s already present and valid; not downloading", dest)
    return FetchResult(path=dest, sha256=sha256, size=dest.stat().st_size, downloaded=False)


def _download_with_retries(
    session: requests.Session,
    url: str,
    part: Path,
    *,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    progress: bool,
    chunk_size: int,
    desc: str,
) -> bool:
    """Bring ``part`` to the whole body of ``url``; return whether it kept bytes from an earlier attempt.

    Retries (tenacity) only ``_Transient`` failures, ``retries`` times, sleeping ``backoff_s * 2**i`` or the
    server's ``Retry-After`` when longer, at most ``MAX_BACKOFF_S``; each attempt resumes what the last one kept.
    """

    def wait(state: RetryCallState) -> float:
        delay = min(backoff_s * 2 ** (state.attempt_number - 1), MAX_BACKOFF_S)
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, _Transient) and failure.retry_after_s is not None:
            delay = min(max(delay, failure.retry_after_s), MAX_BACKOFF_S)
        return delay

    def announce(state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome is not None else None
        wait_s = state.next_action.sleep if state.next_action is not None else 0.0
        logger.warning(
            "download of %s failed (%s); retry %d/%d in %.2f s", url, failure, state.attempt_number, retries, wait_s
        )

    retrying = Retrying(
        stop=stop_after_attempt(retries + 1),
        wait=wait,
        retry=retry_if_exception_type(_Transient),
        before_sleep=announce,
        reraise=True,
    )
    try:
        return retrying(
            _attempt, session, url, part, timeout_s=timeout_s, progress=progress, chunk_size=chunk_size, desc=desc
        )
    except _Transient as exc:
        raise DownloadError(f"download of {url} failed after {retries + 1} attempts: {exc}") from exc


def _attempt(
    session: requests.Session,
    url: str,
    part: Path,
    *,
    timeout_s: float,
    progress: bool,
    chunk_size: int,
    desc: str,
) -> bool:
    """One HTTP request: resume or restart ``part``; raise ``_Transient`` for anything worth retrying."""
    offset = part.stat().st_size if part.is_file() else 0
    # identity: byte offsets in Range and Content-Length must refer to the archive itself, not a gzip of it
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
            start = _check_status(response, url, part, offset)
            if start is None:  # 416 for a .part that already holds the whole file
                return True
            return _write_body(response, part, start, progress=progress, chunk_size=chunk_size, desc=desc)
    except _TRANSIENT_ERRORS as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc
    except requests.RequestException as exc:  # invalid URL, missing schema, too many redirects...
        raise DownloadError(f"download of {url} failed: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:  # local disk: full, read-only, permissions; retrying would not help
        raise DownloadError(f"download of {url} failed writing {part}: {exc}") from exc


def _check_status(response: requests.Response, url: str, part: Path, offset: int) -> int | None:
    """Offset in the file at which the response body starts, or ``None`` when ``part`` is already whole."""
    status = response.status_code
    if status == 200:
        if offset:
            logger.info("%s ignored the Range request; restarting %s from byte 0", url, part.name)
        return 0
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != offset:
            # appending at the wrong offset would corrupt the file silently; start over instead
            part.unlink(missing_ok=True)
            raise _Transient(
                f"206 with Content-Range {response.headers.get('Content-Range')!r}, expected start {offset}; "
                "discarded partial file"
            )
        return offset
    if status == 416 and offset:
        match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is not None and int(match.group(1)) == offset:
            return None  # killed after the last byte but before the rename
        part.unlink(missing_ok=True)
        raise _Transient(f"HTTP 416 for Range bytes={offset}- (partial file longer than remote); discarded it")
    if status >= 500 or status == 429:
        raise _Transient(f"HTTP {status} {response.reason}", _retry_after(response))
    raise DownloadError(f"download of {url} failed: HTTP {status} {response.reason}")


def _write_body(
    response: requests.Response, part: Path, start: int, *, progress: bool, chunk_size: int, desc: str
) -> bool:
    """Stream the body into ``part`` from ``start``; raise ``_Transient`` if it ends before Content-Length."""
    length = response.headers.get("Content-Length")
    expected_len = int(length) if length is not None and length.isdigit() else None
    total = start + expected_len if expected_len is not None else None
    written = 0
    with (
        open(part, "ab" if start else "wb") as handle,
        tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=None if progress else True,  # None: only on a terminal, never as noise in a captured log
            leave=False,
        ) as bar,
    ):
        for chunk in response.iter_content(chunk_size=chunk_size):
            handle.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    # urllib3 2 already raises on a short body; this guards other transports and urllib3 1.x
    if expected_len is not None and written < expected_len:
        raise _Transient(f"incomplete body: got {written} of {expected_len} bytes")
    return start > 0


def _retry_after(response: requests.Response) -> float | None:
    """Seconds from a numeric Retry-After header (HTTP-date form is rare for files; ignored)."""
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None
