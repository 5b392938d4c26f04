"""Atomic file writes and checksums.

Every artefact the pipeline produces is written to a temporary file in the destination folder and renamed into
place, so a crash, a kill or a full disk never leaves a half-written file under its final name (DVC, Airflow
retries and resumed runs all rely on "file exists" meaning "file is complete"). The temporary name is a hidden
``.<final name>.<random><suffix>.tmp`` with the final name cut so that it fits the folder's name limit (255 bytes on
common file systems): any legal final name can be written. A full disk ends in an ``OSError`` naming the file being
written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{_cut(final.name, _name_max(final.parent) - len(os.fsencode(suffix)) - _TMP_EXTRA)}."
    tmp = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix + ".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        # the writer's error names no file, or the temporary one: name the file the user knows
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final)) from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


# bytes of the temporary name besides the cut final name and the suffix: two dots, mkstemp's random part (8
# characters today, 16 kept) and ".tmp"
_TMP_EXTRA = 2 + 16 + len(".tmp")


def _name_max(folder: Path) -> int:
    """The longest file name ``folder``'s file system takes, in bytes (255 where it cannot say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _cut(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes of the file system's encoding, never inside a character."""
    encoded = os.fsencode(name)
    if len(encoded) <= limit:
        return name
    return encoded[: max(limit, 0)].decode(sys.getfilesystemencoding(), errors="ignore")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write pretty, key-sorted JSON (stable diffs for DVC metrics)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_bytes_atomic(path, text.encode())


def write_parquet_atomic(path: str | os.PathLike[str], table: pa.Table, **kwargs: Any) -> None:
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, **kwargs)


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256", chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file, streamed so large archives do not need to fit in memory."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    # numpy scalars and paths show up in stats and manifests; make them plain JSON
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
