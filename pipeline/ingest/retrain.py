"""One data interval of the retraining flow, step by step: the functions behind the Airflow tasks and the CLI.

The DAG (``dags/retrain.py``) is wiring only: each task calls one function below with the params file, the run's
data interval and the run's overrides (``--set``-style dotted keys). Each function builds its :class:`Params` with
:func:`load_params` and calls the function DVC's stage calls (download, preprocess, train, evaluate; register is
the second half of DVC's ``evaluate`` stage, a task of its own here); the training stages read the interaction store
through the ``download`` stage as a ``custom`` Parquet source.

Every interval works in its own folder, ``<retrain.work_dir>/<start>_<end>/``, so runs never share outputs:

- ``logs/``: the interval's log files, copied from the inbox;
- ``ingest/``: ``collected.json``, ``batch.parquet`` + ``quarantine.csv`` + ``report.json`` (validation),
  ``merge.json``;
- ``interim/``, ``processed/``, ``models/``, ``reports/``: download, preprocess, train and evaluate outputs;
- ``champion/``: the champion's files when training starts from them.

The steps run in the params file's folder, so relative paths in it mean the same as for ``python -m pipeline`` run
from the repository root, whatever the working directory of the Airflow worker.

Order: collect -> validate -> merge -> (enough new events?) -> download -> preprocess -> train -> evaluate ->
register. The interval's valid events are merged *before* the ``min_new_events`` check, so a quiet interval skips
training without losing its events (the next retraining sees them). Re-running an interval repeats every step:
the merge adds nothing twice, and the retraining starts again from the same store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.errors import shown
from pipeline.ingest.inbox import collect, to_utc
from pipeline.ingest.store import count_events, merge
from pipeline.ingest.validate import BatchOutputs, validate_logs
from pipeline.io import write_json_atomic
from pipeline.params import LAST_DATE, Params, ParamsError, load_params

log = logging.getLogger(__name__)

Overrides = dict[str, Any] | None
FIRST = datetime(1970, 1, 1, tzinfo=UTC)  # no event before it is valid (data.timestamps.earliest)
LAST = datetime.combine(LAST_DATE + timedelta(days=1), time(), UTC)  # an interval ends by then


@dataclass(frozen=True)
class Interval:
    """A data interval ``[start, end)`` in UTC."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "start", to_utc(self.start))
            object.__setattr__(self, "end", to_utc(self.end))
        except OverflowError as err:  # 0001-01-01 with a positive offset: no UTC moment in a datetime's range
            raise _outside_range(f"[{self.start}, {self.end})") from err
        if self.start >= self.end:
            raise ParamsError(f"an interval needs start < end, got [{self.start}, {self.end})")
        if self.start < FIRST or self.end > LAST:  # no valid event lies outside, and the far end overflows
            raise _outside_range(f"[{self.start}, {self.end})")

    @classmethod
    def parse(cls, start: str | datetime, end: str | datetime | None = None) -> Interval:
        """From ISO dates or date-times (naive means UTC); ``end`` defaults to one day after ``start``."""
        try:
            begin = datetime.fromisoformat(start) if isinstance(start, str) else start
            finish = datetime.fromisoformat(end) if isinstance(end, str) else end
        except ValueError as err:
            raise ParamsError(
                f"an interval needs ISO dates or date-times (2024-01-05), got {shown(start)}, {shown(end)}"
            ) from err
        if finish is None:
            try:
                finish = to_utc(begin) + timedelta(days=1)
            except OverflowError as err:
                raise _outside_range(f"start {begin}") from err
        return cls(begin, finish)

    @property
    def name(self) -> str:
        return f"{self.start:%Y%m%dT%H%M%S}_{self.end:%Y%m%dT%H%M%S}"


def _outside_range(got: str) -> ParamsError:
    return ParamsError(f"an interval must lie within [{FIRST:%Y-%m-%d}, {LAST:%Y-%m-%d}) (UTC), got {got}")


@contextlib.contextmanager
def project_dir(params_file: str | Path) -> Iterator[Path]:
    """Run the block in the params file's folder (relative paths in it are relative to it), then come back."""
    folder = Path(params_file).resolve().parent
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(previous)


def interval_dir(params: Params, interval: Interval) -> Path:
    return Path(params.retrain.work_dir).resolve() / interval.name


def training_overrides(params: Params, interval: Interval) -> dict[str, Any]:
    """Overrides that point the download ... evaluate stages at the store and at the interval's folders."""
    root = interval_dir(params, interval)
    return {
        "data.dataset": "custom",
        "data.custom": {
            "path": str(Path(params.retrain.store_dir).resolve()),
            "format": "parquet",
            "user_col": "user_id",
            "item_col": "item_id",
            "timestamp_col": "timestamp",
            "rating_col": "rating",
            "until": int(interval.end.timestamp()),  # re-running an old interval never sees later days
            # the store holds ids and times typed at ingest already: read them back as they are
            "id_type": "string",
            "timestamp_format": "unix",
        },
        "data.interim_dir": str(root / "interim"),
        "preprocess.processed_dir": str(root / "processed"),
        "train.model_dir": str(root / "models"),
        "evaluate.report_dir": str(root / "reports"),
    }


# What a DAG run's conf may change: hyperparameters and the retraining gates. Paths, stores, the inbox, MLflow and
# data settings are the deployment's, fixed in params.yaml: a UI user must not point a run at another folder.
RUN_CONF_SECTIONS = ("model.",)
RUN_CONF_KEYS = frozenset(
    {
        *(
            f"train.{key}"
            for key in (
                "epochs",
                "batch_size",
                "lr",
                "weight_decay",
                "lr_schedule",
                "lr_warmup_steps",
                "grad_clip",
                "num_negatives",
                "windows",
                "length_buckets",
                "patience",
                "seed",
                "device",
                "amp",
                "eval_batch_size",
            )
        ),
        "retrain.min_new_events",
        "retrain.warm_start",
    }
)


def run_overrides(conf: dict[str, Any] | None, params_file: str | Path | None = None) -> dict[str, Any]:
    """The ``overrides`` of a DAG run's conf, refused whole when one key is outside the allow-list or, given the
    params file, when the parameters they make fail validation (out-of-range values: ``train.lr=1e30``)."""
    overrides = dict((conf or {}).get("overrides") or {})
    refused = sorted(key for key in overrides if key not in RUN_CONF_KEYS and not key.startswith(RUN_CONF_SECTIONS))
    if refused:
        allowed = ", ".join(["model.*", *sorted(RUN_CONF_KEYS)])
        raise ParamsError(
            f"run conf overrides {refused} are not allowed: a run may change only {allowed}. Paths, stores and "
            "data settings come from params.yaml; change them there (or with --set on the command line)."
        )
    if params_file is not None:
        try:
            load_params(params_file, overrides)
        except ParamsError as err:  # the file's own mistakes are named with the file already
            if str(err).startswith(str(params_file)):
                raise
            raise ParamsError(f"run conf overrides: {err}") from err
    return overrides


def training_params(params_file: str | Path, interval: Interval, overrides: Overrides = None) -> Params:
    base = load_params(params_file, overrides)
    return load_params(params_file, {**(overrides or {}), **training_overrides(base, interval)})


# ----------------------------------------------------------------------------------------------- ingestion steps
def collect_logs(params_file: str | Path, interval: Interval, overrides: Overrides = None) -> list[str]:
    """Stage the inbox's log files of ``interval``; returns their local paths."""
    with project_dir(params_file):
        params = load_params(params_file, overrides)
        root = interval_dir(params, interval)
        files = collect(params.retrain.inbox, params.retrain.file_pattern, interval.start, interval.end, root / "logs")
        write_json_atomic(root / "ingest" / "collected.json", [asdict(f) for f in files])
        return [f.local for f in files]


def validate_batch(
    params_file: str | Path, interval: Interval, files: list[str], overrides: Overrides = None
) -> dict[str, Any]:
    """Validate the staged files (see :mod:`pipeline.ingest.validate`); returns the report as a dict."""
    with project_dir(params_file):
        params = load_params(params_file, overrides)
        out = interval_dir(params, interval) / "ingest"
        collected = out / "collected.json"
        sources = {f["local"]: f["source"] for f in json.loads(collected.read_text())} if collected.exists() else {}
        report = validate_logs(
            files,
            params.data.custom,
            params.retrain.max_bad_fraction,
            out,
            sources=sources,
            timestamps=params.data.timestamps,
            max_file_mb=params.data.max_file_mb,
        )
        return asdict(report)


def merge_batch(params_file: str | Path, interval: Interval, overrides: Overrides = None) -> dict[str, Any]:
    """Merge the interval's validated batch into the store (idempotent); returns the counts."""
    with project_dir(params_file):
        params = load_params(params_file, overrides)
        out = interval_dir(params, interval) / "ingest"
        result = merge(params.retrain.store_dir, pq.read_table(BatchOutputs.under(out).batch))
        summary = {**asdict(result), "store_events": count_events(params.retrain.store_dir)}
        write_json_atomic(out / "merge.json", summary)
        return summary


def enough_new_events(params_file: str | Path, report: dict[str, Any], overrides: Overrides = None) -> bool:
    """Whether the interval brought ``retrain.min_new_events`` valid events: below that, retraining is skipped."""
    with project_dir(params_file):
        minimum = load_params(params_file, overrides).retrain.min_new_events
    enough = report["events"] >= minimum
    log.info(
        "%d valid event(s) arrived (retrain.min_new_events=%d): %s",
        report["events"],
        minimum,
        "retraining" if enough else "skipping retraining; the champion stays",
    )
    return enough


def ingest(params_file: str | Path, interval: Interval, overrides: Overrides = None) -> dict[str, Any]:
    """Collect, validate and merge one interval (``python -m pipeline ingest``); no training."""
    files = collect_logs(params_file, interval, overrides)
    report = validate_batch(params_file, interval, files, overrides)
    return {"validation": report, "merge": merge_batch(params_file, interval, overrides)}


# ----------------------------------------------------------------------------------------------- training steps
def run_stage(name: str, params_file: str | Path, interval: Interval, overrides: Overrides = None) -> None:
    """Run stage ``name`` (download, preprocess or evaluate) for the interval: the function DVC's stage runs.

    DVC's ``evaluate`` stage evaluates and then registers; here those are two tasks (:func:`register_model`), so
    the registration shows, fails and retries on its own in the Airflow UI.
    """
    from pipeline import stages

    # evaluate without register: registration is a task of its own here
    steps = {"download": stages.download, "preprocess": stages.preprocess, "evaluate": stages.evaluate}
    if name not in steps:
        raise ValueError(f"unknown stage {name!r}: one of download, preprocess, evaluate (train: train_model)")
    stage = steps[name]
    with project_dir(params_file):
        stage(training_params(params_file, interval, overrides))


def train_model(params_file: str | Path, interval: Interval, overrides: Overrides = None) -> dict[str, Any]:
    """The ``train`` stage, warm-started from the champion when ``retrain.warm_start`` is on and one exists."""
    from pipeline.stages import train
    from pipeline.tracking.registry import download_champion

    with project_dir(params_file):
        params = training_params(params_file, interval, overrides)
        source = params.train.warm_start_from
        if params.retrain.warm_start and not source:
            champion = download_champion(params, interval_dir(params, interval) / "champion")
            if champion is not None:
                source = str(champion)
                params = training_params(params_file, interval, {**(overrides or {}), "train.warm_start_from": source})
        train(params)
        return {"warm_start_from": source}


def register_model(params_file: str | Path, interval: Interval, overrides: Overrides = None) -> dict[str, Any]:
    """Register the interval's model with gated promotion: :func:`pipeline.tracking.promotion.register`."""
    from pipeline.tracking.promotion import register

    with project_dir(params_file):
        result = register(training_params(params_file, interval, overrides))
        return _plain(result)


def _plain(value: Any) -> Any:
    """A JSON-ready copy (Airflow keeps task results as JSON)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    return json.loads(json.dumps(value, default=str))
