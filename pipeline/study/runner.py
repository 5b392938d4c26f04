"""Run the study: train and evaluate each planned run with the pipeline's own stages, resumably, and record it.

* **Resumable.** A run trains with ``train.resume`` into its own folder under ``data/study/``; killed at any point,
  the next invocation continues from its last epoch checkpoint. A run whose record exists is skipped.
* **Parallel without coordination.** Each run is claimed with an exclusive, non-blocking file lock, so starting the
  same command twice (one torch thread each: the fastest use of two cores) splits the plan between two workers.
* **Interim results.** A run longer than the time a machine is held (ML-1M's slow baselines on two cores) can be
  evaluated from its last checkpoint's best weights: ``<variant>-seed<k>.interim.json``, marked as unfinished in the
  report, superseded by the run's record once it finishes.
* **Nothing lost with a machine.** A finished run writes ``results/<dataset>/<variant>-seed<k>.json`` (committed):
  settings, timings, all metrics and the per-user test NDCG@10 that the significance tests pair. The same record
  is attached to the run's MLflow run (experiment ``study-<dataset>``), which the report reads.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from filelock import FileLock, Timeout

from pipeline.io import write_json_atomic
from pipeline.model.train_log import read_log
from pipeline.params import Params
from pipeline.study.plan import RECORDS_DIR, WORK_DIR, Run, config_digest, data_dirs, resolved_settings, run_params
from pipeline.tracking.runs import git_commit, read_pointer

log = logging.getLogger(__name__)

RECORD_VERSION = 1


@contextlib.contextmanager
def claimed(lock_path: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path`` for the block; yields False (at once) if another process holds it
    and ``wait`` is off. The OS drops the lock when the holder dies, so a killed worker never blocks a run."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(blocking=wait)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def prepare_data(run: Run, params_file: str | Path, work_dir: Path = WORK_DIR) -> None:
    """Download and preprocess a dataset once for all its runs (the pipeline's own stages; a mirror from
    ``$HYMOE_DATA_MIRROR`` or ``data.mirror`` is used when set)."""
    from pipeline.data.layout import PreprocessOutputs
    from pipeline.stages import download, preprocess

    params = run_params(run, params_file, work_dir)
    splits = PreprocessOutputs.under(data_dirs(run.dataset, work_dir)["preprocess.processed_dir"])
    with claimed(work_dir / run.dataset / "data.lock", wait=True):
        if splits.stats.exists():
            return
        log.info("study: preparing %s under %s", run.dataset, work_dir / run.dataset / "data")
        download(params)
        preprocess(params)


def execute(
    run: Run, params_file: str | Path = "params.yaml", work_dir: Path = WORK_DIR, records_dir: Path = RECORDS_DIR
) -> Path | None:
    """Train, evaluate and record one run; None when another worker holds it. Returns the record's path."""
    from pipeline.stages import evaluate, train

    record_path = run.record_path(records_dir)
    with claimed(run.folder(work_dir).with_suffix(".lock"), wait=False) as mine:
        if not mine:
            return None
        if record_path.exists():  # finished by another worker meanwhile
            run.interim_record_path(records_dir).unlink(missing_ok=True)
            return record_path
        prepare_data(run, params_file, work_dir)
        params = run_params(run, params_file, work_dir)
        log.info("study: %s / %s (%s)", run.dataset, run.name, ", ".join(f"{k}={v}" for k, v in run.overrides.items()))
        started = time.perf_counter()
        train(params)
        evaluate(params)
        record = make_record(run, params, wall_seconds=time.perf_counter() - started)
        write_json_atomic(record_path, record)
        run.interim_record_path(records_dir).unlink(missing_ok=True)  # superseded
        attach_to_mlflow(params, record)
        return record_path


def record_interim(
    run: Run, params_file: str | Path = "params.yaml", work_dir: Path = WORK_DIR, records_dir: Path = RECORDS_DIR
) -> Path | None:
    """Evaluate an unfinished run's best weights so far and record them as an interim result; returns its path.

    None, with nothing done, when the run has finished, has no checkpoint here, is training in another process (stop
    its worker first: the next ``run`` resumes from the same checkpoint) or has an interim record of its last epoch.
    """
    from pipeline.stages import evaluate
    from pipeline.training.train import TrainOutputs, write_best_so_far

    path = run.interim_record_path(records_dir)
    with claimed(run.folder(work_dir).with_suffix(".lock"), wait=False) as mine:
        if not mine:
            log.warning("study: %s / %s is training in another process: stop it first", run.dataset, run.name)
            return None
        params = run_params(run, params_file, work_dir)
        trained_so_far = TrainOutputs.under(params.train.model_dir)
        if run.record_path(records_dir).exists() or not trained_so_far.checkpoint.exists():
            return None
        if path.exists() and json.loads(path.read_text())["epochs_run"] == len(read_log(trained_so_far.log)):
            log.info("study: %s / %s: the interim result of its last epoch is recorded already", run.dataset, run.name)
            return None
        started = time.perf_counter()
        trained = write_best_so_far(params)
        evaluate(params)
        record = make_record(run, params, wall_seconds=time.perf_counter() - started)
        # torch_threads would be this evaluation's, not the training's (unknown here)
        record.update(interim=True, torch_threads=None)
        write_json_atomic(path, record)
        attach_to_mlflow(params, record)
        log.info(
            "study: %s / %s: interim result after %d epochs (best %d)",
            run.dataset,
            run.name,
            trained.epochs_run,
            trained.best_epoch,
        )
        return path


def make_record(run: Run, params: Params, wall_seconds: float) -> dict[str, Any]:
    """Everything the report needs from one run, small enough to commit (~15 kB on Beauty): a finished one, or an
    interim result of an unfinished one (then ``finished`` is when it was recorded)."""
    from pipeline.data.layout import DownloadOutputs
    from pipeline.evaluation.evaluate import EvaluateOutputs
    from pipeline.training.train import TrainOutputs

    trained = TrainOutputs.under(params.train.model_dir)
    reports = EvaluateOutputs.under(params.evaluate.report_dir)
    manifest = DownloadOutputs.under(params.data.interim_dir).manifest
    model_json = json.loads(trained.config.read_text())
    epochs = read_log(trained.log)
    best_epoch = int(model_json["best_epoch"])
    per_user = pq.read_table(reports.per_user, columns=["user_id", "ndcg@10"])
    commit = git_commit()
    return {
        "version": RECORD_VERSION,
        "dataset": run.dataset,
        "variant": run.variant,
        "group": run.group,
        "seed": run.seed,
        "overrides": run.overrides,
        "config_digest": config_digest(params),
        "settings": resolved_settings(params),
        "git_commit": None if commit is None else commit[0] + ("-dirty" if commit[1] else ""),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": model_json.get("device", "unknown"),
        "torch_threads": torch.get_num_threads(),
        "epochs_run": len(epochs),
        "best_epoch": best_epoch,
        "epoch_seconds": [round(row["epoch_seconds"], 2) for row in epochs],
        # absent from rows trained before the column existed (a run resumed across that change has a shorter list)
        "epoch_cpu_seconds": [round(row["epoch_cpu_seconds"], 2) for row in epochs if "epoch_cpu_seconds" in row],
        "valid_ndcg@10_by_epoch": [round(row["valid_ndcg@10"], 5) for row in epochs],
        "seconds_to_best": round(sum(row["epoch_seconds"] for row in epochs[:best_epoch]), 1),
        "wall_seconds": round(wall_seconds, 1),  # this invocation only (a resumed run's earlier part is not in it)
        "data_source": json.loads(manifest.read_text())["source"]["layout"],
        "metrics": json.loads(reports.metrics.read_text()),
        "expert_load": json.loads(reports.expert_load.read_text()),
        "per_user_test": encode_per_user(
            per_user.column("user_id").to_numpy(zero_copy_only=False), per_user.column("ndcg@10").to_numpy()
        ),
        "mlflow_run_id": read_pointer(Path(params.evaluate.report_dir) / "mlflow_run.json").get("run_id"),
    }


def encode_per_user(users: np.ndarray, ndcg: np.ndarray) -> dict[str, Any]:
    """Per-user test NDCG@10 as zlib-compressed little-endian float32 (most users score 0: it packs well)."""
    return {
        "metric": "ndcg@10",
        "users": len(users),
        "users_sha256": users_digest(users),
        "encoding": "base64(zlib(float32 little-endian))",
        "data": base64.b64encode(zlib.compress(ndcg.astype("<f4").tobytes(), 9)).decode(),
    }


def decode_per_user(block: dict[str, Any]) -> np.ndarray:
    values = np.frombuffer(zlib.decompress(base64.b64decode(block["data"])), dtype="<f4").astype(np.float64)
    if len(values) != block["users"]:
        raise ValueError(f"per-user block holds {len(values)} values, says {block['users']}")
    return values


def users_digest(users: np.ndarray) -> str:
    """Order-sensitive digest of the test users: two runs' per-user arrays pair only if it matches."""
    return hashlib.sha256("\n".join(map(str, users.tolist())).encode()).hexdigest()[:16]


def attach_to_mlflow(params: Params, record: dict[str, Any]) -> None:
    """Tag the run's MLflow run with its study coordinates and attach the record (what the report reads)."""
    if not params.mlflow.enabled or not record.get("mlflow_run_id"):
        return
    from pipeline.tracking.runs import RunLogger
    from pipeline.tracking.store import Tracking

    tracking = Tracking.from_params(params)
    run = RunLogger(tracking, record["mlflow_run_id"])
    run.set_tags(study_tags(record))
    tracking.call("upload study record", tracking.client.log_dict, run.run_id, record, "study/record.json")


def study_tags(record: dict[str, Any]) -> dict[str, str]:
    return {
        "study.dataset": record["dataset"],
        "study.variant": record["variant"],
        "study.group": record["group"],
        "study.seed": str(record["seed"]),
        "study.config_digest": record["config_digest"],
        "study.interim": str(bool(record.get("interim"))).lower(),  # an interim result, told apart in the MLflow UI
    }
