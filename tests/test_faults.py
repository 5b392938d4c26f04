"""Faults for real: ``kill -9`` in the middle of preprocessing or of a store merge leaves every file either as it was
or as the finished run writes it (never half a file), and running the same step again completes it; two ingests of
overlapping intervals at once store exactly what they store one after the other."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.data.layout import PreprocessOutputs
from pipeline.ingest.replay import replay
from pipeline.ingest.store import merge, partition_files, read_store
from pipeline.io import file_digest
from pipeline.params import load_params
from tests.conftest import REPO_ROOT, tiny_retrain, write_params

pytestmark = pytest.mark.slow

KILL_AFTER_S = (0.8, 1.6, 2.4, 3.2)  # imports take ~0.5 s here, the work 3-5 s: kills land all through it


def killed_after(cmd: list[str], seconds: float) -> bool:
    """Run ``cmd``, SIGKILL it after ``seconds``; whether it was still running (False: it had finished)."""
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def pipeline_cmd(interim: Path, processed: Path, user_min: int) -> list[str]:
    settings = {
        "data.dataset": "synthetic",
        "data.interim_dir": str(interim),
        "preprocess.processed_dir": str(processed),
        "preprocess.user_min": user_min,
    }
    cmd = [sys.executable, "-m", "pipeline", "--params", str(REPO_ROOT / "params.yaml")]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def digests(processed: Path) -> dict[str, str]:
    outputs = PreprocessOutputs.under(processed)
    return {name: file_digest(getattr(outputs, name)) for name in ("train", "valid", "test", "item_map", "stats")}


def test_killed_preprocess_leaves_old_or_new_files_and_a_rerun_completes(tmp_path: Path) -> None:
    interim = tmp_path / "interim"
    big = ["--set", "data.synthetic.n_users=200000", "--set", "data.synthetic.mean_events_per_user=30"]
    download = pipeline_cmd(interim, tmp_path / "unused", 5)
    subprocess.run([*download, *big, "download"], cwd=REPO_ROOT, check=True, capture_output=True)
    old, new = tmp_path / "processed", tmp_path / "reference"
    subprocess.run([*pipeline_cmd(interim, old, 5), "preprocess"], cwd=REPO_ROOT, check=True, capture_output=True)
    subprocess.run([*pipeline_cmd(interim, new, 8), "preprocess"], cwd=REPO_ROOT, check=True, capture_output=True)
    before, after = digests(old), digests(new)
    assert all(before[name] != after[name] for name in ("train", "stats"))  # the two versions differ

    interrupted = 0
    for seconds in KILL_AFTER_S:
        interrupted += killed_after([*pipeline_cmd(interim, old, 8), "preprocess"], seconds)
        now = digests(old)  # every file readable and whole: one version or the other, file by file
        assert all(now[name] in (before[name], after[name]) for name in now), seconds
        for name in ("train", "valid", "test"):
            assert pq.read_metadata(getattr(PreprocessOutputs.under(old), name)).num_rows > 0
        json.loads(PreprocessOutputs.under(old).stats.read_text())
        before = now
    assert interrupted, "preprocess finished before every kill: make the data larger"
    subprocess.run([*pipeline_cmd(interim, old, 8), "preprocess"], cwd=REPO_ROOT, check=True, capture_output=True)
    assert digests(old) == after


MERGE = """
import sys
import pandas as pd
from pipeline.ingest.store import merge
merge(sys.argv[1], pd.read_parquet(sys.argv[2]))
"""


def events(n: int, days: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": rng.integers(0, 5000, n).astype(str),
            "item_id": rng.integers(0, 3000, n).astype(str),
            "timestamp": 1_600_000_000 + rng.integers(0, days * 86_400, n),
        }
    )


def test_killed_merge_loses_no_stored_event_and_a_rerun_completes(tmp_path: Path) -> None:
    history, batch = events(200_000, 400, seed=1), events(400_000, 400, seed=2)
    batch_file = tmp_path / "batch.parquet"
    batch.to_parquet(batch_file)
    reference = tmp_path / "reference"
    merge(reference, history)
    merge(reference, batch)
    expected = read_store(reference).to_pandas()

    store = tmp_path / "store"
    merge(store, history)
    stored = read_store(store).to_pandas()
    key = ["user_id", "item_id", "timestamp"]
    interrupted = 0
    for seconds in KILL_AFTER_S:
        interrupted += killed_after([sys.executable, "-c", MERGE, str(store), str(batch_file)], seconds)
        now = read_store(store).to_pandas()  # every day file whole and readable
        assert len(now.merge(stored, on=key)) == len(stored)  # nothing already stored was lost
        assert len(now) <= len(expected) and not now.duplicated(key).any()
        assert not [p for p in partition_files(store) if p.stat().st_size == 0]
        stored = now
    assert interrupted, "the merge finished before every kill: make the batch larger"
    done = subprocess.run(
        [sys.executable, "-c", MERGE, str(store), str(batch_file)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    final = read_store(store).to_pandas()
    assert final.sort_values(key).reset_index(drop=True).equals(expected.sort_values(key).reset_index(drop=True))


def test_overlapping_ingests_at_once_store_what_they_store_one_after_the_other(tmp_path: Path) -> None:
    """The scheduler runs one retraining at a time (``max_active_runs=1``); a second deployment or a manual run on
    the same store may not. Two ingests (the DAG's collect, validate and merge) whose intervals share five days'
    log files run at once: the store must end as it does when they run one after the other."""
    intervals = [("2021-02-15", "2021-02-25"), ("2021-02-20", "2021-03-02")]

    def world(root: Path) -> tuple[Path, list[list[str]]]:
        params_file = write_params(root / "params.yaml", tiny_retrain(root, **{"data.synthetic.n_users": 3000}))
        replay(load_params(params_file), date(2021, 2, 15), "day")
        base = [sys.executable, "-m", "pipeline", "--params", str(params_file), "ingest"]
        return root / "store", [[*base, "--start", start, "--end", end] for start, end in intervals]

    one_by_one, commands = world(tmp_path / "one-by-one")
    for cmd in commands:
        done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    at_once, commands = world(tmp_path / "at-once")
    before = len(read_store(at_once))
    processes = [subprocess.Popen(cmd, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True) for cmd in commands]
    errors = [process.communicate(timeout=300)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [e[-3000:] for e in errors]

    key = ["user_id", "item_id", "timestamp"]
    expected = read_store(one_by_one).to_pandas().sort_values(key).reset_index(drop=True)
    stored = read_store(at_once).to_pandas().sort_values(key).reset_index(drop=True)
    assert stored.equals(expected)
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "at-once" / "work").glob("*/ingest/merge.json"))]
    assert len(reports) == 2 and sum(r["added"] for r in reports) == len(stored) - before  # the overlap stored once
    assert sum(r["duplicates"] for r in reports) > 0
