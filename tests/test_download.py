"""The download stage end to end: mirror layouts, checksums, manifest, quarantine, offline errors, a real local
HTTP server and the command line. No HTTP mocking: downloads go through a real server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.download import DatasetUnavailable, download, obtain
from pipeline.data.fetch import ChecksumMismatch
from pipeline.data.quarantine import QUARANTINE_COLUMNS, BadInputError
from pipeline.data.registry import REGISTRY
from pipeline.params import (
    DATASETS,
    MIRROR_ENV,
    CustomSourceParams,
    DataParams,
    DownloadParams,
    ParamsError,
    SyntheticParams,
    load_params,
)
from tests.conftest import REPO_ROOT, free_port, write_text

FAST = DownloadParams(retries=0, backoff_s=0.01, timeout_s=5.0)


def u_data(n: int = 120, bad_lines: tuple[int, ...] = ()) -> str:
    """A small MovieLens-100K ``u.data``: 12 users, 15 items; the listed 1-based lines are malformed."""
    lines = []
    for k in range(1, n + 1):
        if k in bad_lines:
            lines.append(f"{k}\tnot-an-item\t3\t880000000")
        else:
            lines.append(f"{k % 12 + 1}\t{k % 15 + 1}\t{k % 5 + 1}\t{880000000 + 60 * k}")
    return "\n".join(lines) + "\n"


def ml100k_zip(text: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ml-100k/u.data", text)
        zf.writestr("ml-100k/README", "test fixture\n")
    return buffer.getvalue()


def params_for(tmp_path: Path, dataset: str, mirror: Path | None = None, **kwargs) -> DataParams:
    return DataParams(
        dataset=dataset,
        mirror=str(mirror) if mirror else None,
        cache_dir=str(tmp_path / "cache"),
        interim_dir=str(tmp_path / "interim"),
        download=FAST,
        **kwargs,
    )


def read_quarantine(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ mirror layouts
@pytest.mark.parametrize("where", ["ml-100k.zip", "ml-100k/ml-100k.zip"])
def test_mirror_archive_with_wrong_checksum_is_refused(tmp_path: Path, no_mirror_env: None, where: str) -> None:
    mirror = tmp_path / "mirror"
    archive = mirror / where
    archive.parent.mkdir(parents=True)
    archive.write_bytes(ml100k_zip(u_data()))  # right layout, but not GroupLens' bytes
    write_text(mirror / "ml-100k" / "u.data", u_data())  # a usable copy must not paper over a corrupt archive
    data = params_for(tmp_path, "ml-100k", mirror)

    with pytest.raises(BadInputError) as err:
        download(data)
    message = str(err.value)
    assert "checksum mismatch" in message and str(archive) in message
    assert REGISTRY["ml-100k"].checksum in message
    assert not (tmp_path / "interim" / "interactions.parquet").exists()


def test_mirror_u_data_happy_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    source = write_text(mirror / "ml-100k" / "u.data", u_data(120))
    monkeypatch.setenv(MIRROR_ENV, str(mirror))  # the environment variable alone is enough
    out = download(params_for(tmp_path, "ml-100k"))

    events = pq.read_table(out.interactions)
    assert events.schema.field("user_id").type == pa.int64() and events.schema.field("timestamp").type == pa.int64()
    expected = pd.read_csv(source, sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    got = events.to_pandas()
    assert got[["user_id", "item_id", "timestamp"]].equals(expected[["user_id", "item_id", "timestamp"]])
    assert got["rating"].tolist() == expected["rating"].astype(float).tolist()

    manifest = json.loads(out.manifest.read_text())
    assert manifest == {
        "dataset": "ml-100k",
        "source": {
            "kind": "mirror",
            "layout": "u.data",
            "complete": True,
            "note": "",
            "files": [{"name": "u.data", "size": source.stat().st_size, "sha256": sha256(source)}],
        },
        "has_timestamps": True,
        "timestamp_meaning": "unix seconds",
        "rows": {"read": 120, "quarantined": 0, "kept": 120},
        "users": 12,
        "items": 15,
        "columns": ["user_id", "item_id", "timestamp", "rating"],
    }
    quarantine = read_quarantine(out.quarantine)
    assert list(quarantine.columns) == QUARANTINE_COLUMNS and quarantine.empty  # written even when clean


def test_quarantine_written_with_reasons_under_the_limit(tmp_path: Path, no_mirror_env: None) -> None:
    mirror = tmp_path / "mirror"
    source = write_text(mirror / "ml-100k" / "u.data", u_data(200, bad_lines=(7,)))
    out = download(params_for(tmp_path, "ml-100k", mirror, max_bad_fraction=0.01))

    quarantine = read_quarantine(out.quarantine)
    assert quarantine.to_dict("records") == [
        {
            "source": str(source),
            "line": "7",
            "reason": "item_id is not an integer",
            "raw": "7\tnot-an-item\t3\t880000000",
        }
    ]
    manifest = json.loads(out.manifest.read_text())
    assert manifest["rows"] == {"read": 200, "quarantined": 1, "kept": 199}
    assert pq.read_metadata(out.interactions).num_rows == 199


def test_too_many_bad_rows_fail_and_keep_the_quarantine(tmp_path: Path, no_mirror_env: None) -> None:
    mirror = tmp_path / "mirror"
    bad = (3, 10, 11, 40, 41, 42, 70, 80, 90, 99)
    write_text(mirror / "ml-100k" / "u.data", u_data(100, bad_lines=bad))
    data = params_for(tmp_path, "ml-100k", mirror, max_bad_fraction=0.05)
    quarantine_path = tmp_path / "interim" / "quarantine.csv"

    with pytest.raises(BadInputError) as err:
        download(data)
    message = str(err.value)
    assert "10 of 100 rows" in message and "max_bad_fraction=0.05" in message
    assert str(quarantine_path) in message
    assert "u.data:3: item_id is not an integer: '3\\tnot-an-item\\t3\\t880000000'" in message  # first bad rows
    assert "u.data:41:" in message and "u.data:42:" not in message  # the first five only

    quarantine = read_quarantine(quarantine_path)  # nothing lost: every bad row is there
    assert quarantine["line"].astype(int).tolist() == list(bad)
    assert set(quarantine["reason"]) == {"item_id is not an integer"}
    assert not (tmp_path / "interim" / "interactions.parquet").exists()
    assert not (tmp_path / "interim" / "manifest.json").exists()


def test_partial_layout_is_flagged_and_the_full_copy_preferred(tmp_path: Path, no_mirror_env: None) -> None:
    mirror = tmp_path / "mirror"
    write_text(mirror / "ml-1m" / "ml-1m_sasrec_format_partial.txt.gz", "1 3\n1 2\n2 3\n1 1\n", gz=True)
    out = download(params_for(tmp_path, "ml-1m", mirror))
    manifest = json.loads(out.manifest.read_text())
    assert manifest["source"]["layout"] == "sasrec-partial" and manifest["source"]["complete"] is False
    assert "994,083" in manifest["source"]["note"]
    assert not manifest["has_timestamps"] and manifest["timestamp_meaning"] == "position in source order"
    events = pq.read_table(out.interactions).to_pandas()
    assert list(zip(events["user_id"], events["item_id"], strict=True)) == [(1, 3), (1, 2), (2, 3), (1, 1)]

    split = {"train_input": "3 2\n3\n", "val_input": "3 4\n", "val_output": "2\n", "test_output": "1\n5\n"}
    for name, text in split.items():
        write_text(mirror / "ml-1m" / "gsasrec_splits" / f"{name}.txt", text)
    manifest = json.loads(download(params_for(tmp_path, "ml-1m", mirror)).manifest.read_text())
    assert (manifest["source"]["layout"], manifest["source"]["complete"]) == ("gsasrec-prefixes", False)
    assert "gapless" in manifest["source"]["note"] and manifest["rows"]["kept"] == 6  # 3 2 | 3 4 2 5

    write_text(mirror / "ml-1m" / "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n", encoding="latin-1")
    manifest = json.loads(download(params_for(tmp_path, "ml-1m", mirror)).manifest.read_text())
    assert (manifest["source"]["layout"], manifest["source"]["complete"]) == ("ratings.dat", True)
    assert manifest["rows"]["kept"] == 2 and manifest["has_timestamps"]


def test_custom_logs_through_the_stage(tmp_path: Path, no_mirror_env: None) -> None:
    logs = write_text(tmp_path / "logs" / "events.csv", "who,what,when\na,x,1\nb,y,2\nc,,3\n" + "d,z,4\n" * 37)
    data = params_for(
        tmp_path,
        "custom",
        max_bad_fraction=0.05,
        custom=CustomSourceParams(path=str(tmp_path / "logs"), user_col="who", item_col="what", timestamp_col="when"),
    )
    out = download(data)
    manifest = json.loads(out.manifest.read_text())
    assert manifest["source"]["kind"] == "custom"
    assert manifest["source"]["files"] == [{"name": "events.csv", "size": logs.stat().st_size, "sha256": sha256(logs)}]
    assert manifest["rows"] == {"read": 40, "quarantined": 1, "kept": 39}
    assert read_quarantine(out.quarantine)[["line", "reason", "raw"]].values.tolist() == [
        ["4", "missing item_id", "c,,3"]
    ]


# ------------------------------------------------------------------------------------------ offline behaviour
def test_synthetic_needs_no_network(tmp_path: Path, no_mirror_env: None) -> None:
    config = SyntheticParams(n_users=40, n_items=30, mean_events_per_user=8.0, n_categories=3, seed=4)
    data = params_for(tmp_path, "synthetic", synthetic=config)
    out = download(data)
    manifest = json.loads(out.manifest.read_text())
    assert (manifest["source"]["kind"], manifest["source"]["layout"]) == ("generated", "synthetic")
    assert manifest["source"]["config"]["n_users"] == 40 and manifest["source"]["config"]["seed"] == 4
    assert manifest["users"] == 40 and manifest["rows"]["quarantined"] == 0
    first = pq.read_table(out.interactions)
    assert first.num_rows == manifest["rows"]["kept"] >= 40 * 5
    assert not (tmp_path / "cache").exists()  # nothing fetched, nothing cached
    assert pq.read_table(download(data).interactions).equals(first)  # seeded: reruns are identical


def test_unreachable_source_without_mirror_fails_fast_and_helpfully(tmp_path: Path, no_mirror_env: None) -> None:
    url = f"http://127.0.0.1:{free_port()}/ml-100k.zip"
    spec = dataclasses.replace(REGISTRY["ml-100k"], url=url)
    (tmp_path / "cache").mkdir()
    data = DataParams(dataset="ml-100k", cache_dir=str(tmp_path / "cache"))  # default retries and back-off
    assert data.download.retries > 0 and data.download.backoff_s >= 1.0

    start = time.monotonic()
    with pytest.raises(DatasetUnavailable) as err:
        obtain(spec, data)
    assert time.monotonic() - start < 5.0  # no retry loop against a host that refuses connections
    message = str(err.value)
    assert url in message and MIRROR_ENV in message and "synthetic" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_local_only_beauty_forms_need_a_mirror(tmp_path: Path, no_mirror_env: None) -> None:
    with pytest.raises(DatasetUnavailable, match=rf"amazon-beauty/s3rec/Beauty.txt.*\${MIRROR_ENV}"):
        download(params_for(tmp_path, "beauty", beauty_source="s3rec"))


def test_mirror_that_is_not_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetUnavailable, match="not a folder"):
        download(params_for(tmp_path, "ml-100k"))


# ------------------------------------------------------------------------------------------ real HTTP server
class _ArchiveServer(ThreadingHTTPServer):
    daemon_threads = True
    body: bytes
    gets: int


class _Handler(BaseHTTPRequestHandler):
    server: _ArchiveServer

    def do_GET(self) -> None:
        self.server.gets += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def archive_server() -> Iterator[_ArchiveServer]:
    server = _ArchiveServer(("127.0.0.1", 0), _Handler)
    server.body = ml100k_zip(u_data(150, bad_lines=(5,)))
    server.gets = 0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_official_archive_from_a_real_http_server_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_mirror_env: None, archive_server: _ArchiveServer
) -> None:
    host, port = archive_server.server_address[:2]
    url = f"http://{host}:{port}/ml-100k.zip"
    md5 = hashlib.md5(archive_server.body).hexdigest()
    spec = dataclasses.replace(REGISTRY["ml-100k"], url=url, checksum=f"md5:{md5}")
    data = params_for(tmp_path, "ml-100k", max_bad_fraction=0.01)

    result, source = obtain(spec, data)
    assert archive_server.gets == 1
    archive = tmp_path / "cache" / "ml-100k.zip"
    assert archive.read_bytes() == archive_server.body
    assert source == {
        "kind": "download",
        "url": url,
        "layout": "official",
        "complete": True,
        "files": [
            {
                "name": "ml-100k.zip",
                "size": len(archive_server.body),
                "sha256": hashlib.sha256(archive_server.body).hexdigest(),
                "official_checksum": f"md5:{md5}",
                "checksum_verified": True,
            }
        ],
    }
    assert (len(result.events), len(result.bad_rows), result.total_rows) == (149, 1, 150)

    again, source_again = obtain(spec, data)
    assert archive_server.gets == 1  # the verified cache copy is used, nothing re-downloaded
    assert source_again["kind"] == "cache" and source_again["files"] == source["files"]
    pd.testing.assert_frame_equal(again.events, result.events)

    monkeypatch.setitem(REGISTRY, "ml-100k", spec)  # the whole stage, same cache
    manifest = json.loads(download(data).manifest.read_text())
    assert archive_server.gets == 1
    assert manifest["source"]["kind"] == "cache" and manifest["rows"] == {"read": 150, "quarantined": 1, "kept": 149}


def test_served_bytes_not_matching_the_checksum_are_rejected(
    tmp_path: Path, no_mirror_env: None, archive_server: _ArchiveServer
) -> None:
    host, port = archive_server.server_address[:2]
    url = f"http://{host}:{port}/ml-100k.zip"
    spec = dataclasses.replace(REGISTRY["ml-100k"], url=url)  # the real GroupLens md5
    with pytest.raises(ChecksumMismatch, match=url):
        obtain(spec, params_for(tmp_path, "ml-100k"))
    assert list((tmp_path / "cache").iterdir()) == []  # no archive and no .part left behind


# ------------------------------------------------------------------------------------------ parameters and CLI
def test_unknown_dataset_is_a_params_error(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("data:\n  dataset: ml-1m\n")
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path / "params.yaml", {"data.dataset": "nope"})
    assert "unknown dataset 'nope'" in str(err.value)
    assert all(name in str(err.value) for name in DATASETS)


@pytest.mark.parametrize(
    "dotted, where, valid",
    [
        ("data.datset", "data.datset", [f.name for f in dataclasses.fields(DataParams)]),
        ("data.download.retry", "data.download.retry", [f.name for f in dataclasses.fields(DownloadParams)]),
    ],
)
def test_unknown_params_key_lists_valid_keys(tmp_path: Path, dotted: str, where: str, valid: list[str]) -> None:
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path / "params.yaml", {dotted: "x"})
    message = str(err.value)
    assert f"unknown key(s) {where}" in message
    assert f"valid keys under {where.rsplit('.', 1)[0]}: {', '.join(sorted(valid))}" in message


def run_cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != MIRROR_ENV}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_unknown_dataset_exits_2() -> None:
    done = run_cli("--set", "data.dataset=nope", "download")
    assert done.returncode == 2
    assert "error: download: data.dataset: unknown dataset 'nope'; choose one of " + ", ".join(DATASETS) in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_stage_failure_exits_1(tmp_path: Path) -> None:
    done = run_cli(
        "--set",
        "data.dataset=ml-100k",
        "--set",
        f"data.mirror={tmp_path / 'nowhere'}",
        "--set",
        f"data.interim_dir={tmp_path / 'interim'}",
        "download",
    )
    assert done.returncode == 1
    assert f"error: download: the data mirror {tmp_path / 'nowhere'}" in done.stderr
    assert "Traceback" not in done.stderr
