"""One MLflow run per trained model, carried from stage to stage through small JSON pointer files.

``train`` starts the run (params flattened from ``params.yaml``, tags: dataset, data checksums, git commit, device,
model kind) and logs one step per epoch; ``evaluate`` adds the final validation / test metrics (bucket metrics
included) and the reports; ``register`` (:mod:`pipeline.tracking.promotion`) adds the model and the promotion
decision. The stages may run in different processes (DVC, Airflow tasks), so the run id travels in files:

* ``<train.model_dir>/mlflow_run.json``: the run that trained ``model.pt`` (and the sha256 of that file);
* ``<evaluate.report_dir>/mlflow_run.json``: the run the evaluation was logged on, and the evaluation fingerprint.

A pointer is trusted only when it names the same tracking store and ``model.pt`` still has the digest it records
(DVC may restore another model from its cache); otherwise ``evaluate`` starts a fresh run and back-fills it from
the files train wrote. With ``mlflow.enabled: false`` nothing here imports MLflow and the pointers say
``"run_id": null``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from pipeline.io import file_digest, write_json_atomic
from pipeline.model.train_log import read_log
from pipeline.params import Params
from pipeline.tracking.store import Tracking, TrackingError, display_uri, experiment_name, one_line

log = logging.getLogger(__name__)

POINTER = "mlflow_run.json"
NOTE_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's (or experiment's) description
EPOCH_KEYS = ("epoch", "step")  # columns of train_log.csv that are axes, not metrics


# ----------------------------------------------------------------------------------------------- names and values
def metric_key(name: str) -> str:
    """MLflow metric names may not contain ``@``: ``ndcg@10`` is logged as ``ndcg_at_10``."""
    return name.replace("@", "_at_")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": leaf}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def flat_params(params: Params) -> dict[str, str]:
    """The parameters that shaped this model, as ``section.key`` -> string (lists as JSON), as params.yaml spells it.

    Left out, so that the compare view shows what differs between models: ``retrain.*`` (when the DAG runs) and
    ``mlflow.*`` (where runs are logged), where the data is fetched from (``data.download``, ``data.mirror``,
    ``data.cache_dir``), the settings of other data sources and of other model kinds (:meth:`ModelConfig.relevant`).
    The whole file is the run's ``params.yaml`` artifact.
    """
    tree = dataclasses.asdict(params)
    tree.pop("retrain")
    tree.pop("mlflow")
    data = tree["data"]
    for where in ("download", "mirror", "cache_dir"):
        data.pop(where)
    for source in ("custom", "synthetic"):
        if params.data.dataset != source:
            data.pop(source)
    if params.data.dataset != "beauty":
        data.pop("beauty_source")
    tree["model"] = params.model.relevant()
    flat = flatten(tree)
    return {k: json.dumps(v) if isinstance(v, list | dict | bool) or v is None else str(v) for k, v in flat.items()}


def headline_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """What a run's metrics table shows from ``metrics.json``: every test and validation figure, and NDCG@10 per
    history-length and target-popularity bucket (the rest of the buckets stay in the ``metrics.json`` artifact)."""
    buckets = {
        section: {
            bucket: {"ndcg@10": values["ndcg@10"]} for bucket, values in metrics[section].items() if "ndcg@10" in values
        }
        for section in ("test_by_history_length", "test_by_target_popularity")
        if section in metrics
    }
    return numeric_metrics({"test": metrics.get("test", {}), "valid": metrics.get("valid", {}), **buckets})


def run_description(params: Params, metrics: Mapping[str, Any] | None = None) -> str:
    """The run's description (MLflow's note): what was trained on what, and once evaluated, how well."""
    model = params.model
    lines = [
        f"**{model.display_name}** on **{params.data.dataset}** (`model.kind={model.kind}`, hybrid MoE "
        f"{'on' if model.uses_moe else 'off'}; max length {model.max_seq_len}, width {model.hidden_size}), trained by "
        "`python -m pipeline train` with early stopping on validation NDCG@10."
    ]
    if metrics:
        test, protocol = metrics.get("test", {}), metrics.get("protocol", {})
        lines.append(
            f"Test, full ranking over {protocol.get('num_items', '?')} items and {protocol.get('test_users', '?')} "
            f"users: NDCG@10 {test.get('ndcg@10', math.nan):.4f}, HR@10 {test.get('hr@10', math.nan):.4f}, "
            f"MRR {test.get('mrr', math.nan):.4f}."
        )
    return "\n\n".join(lines)


def numeric_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested report (``metrics.json``), keys flattened and made MLflow-safe."""
    return {
        metric_key(k): float(v)
        for k, v in flatten(tree, prefix).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


# ----------------------------------------------------------------------------------------------- fingerprints
def data_digests(params: Params) -> dict[str, str]:
    """sha256 of the processed splits and maps (``data.processed.<name>.sha256``) and of the downloaded sources."""
    from pipeline.data.layout import DownloadOutputs, PreprocessOutputs

    tags: dict[str, str] = {}
    processed = PreprocessOutputs.under(params.preprocess.processed_dir)
    for name in ("train", "valid", "test", "item_map"):
        path = Path(getattr(processed, name))
        if path.exists():
            tags[f"data.processed.{name}.sha256"] = file_digest(path)
    manifest = Path(DownloadOutputs.under(params.data.interim_dir).manifest)
    if manifest.exists():
        for record in json.loads(manifest.read_text()).get("source", {}).get("files", []):
            if record.get("sha256"):
                tags[f"data.source.{record['name']}.sha256"] = record["sha256"]
    return tags


def eval_fingerprint(params: Params) -> str:
    """What "the same evaluation data" means: the test split, the id map it is written in, the ranking protocol.

    Two runs with equal fingerprints have test metrics that compare directly; otherwise the champion is re-scored.
    """
    from pipeline.data.layout import PreprocessOutputs

    processed = PreprocessOutputs.under(params.preprocess.processed_dir)
    payload = {
        "test": file_digest(processed.test),
        "item_map": file_digest(processed.item_map),
        "exclude_seen": params.evaluate.exclude_seen,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def git_commit(cwd: str | Path | None = None) -> tuple[str, bool] | None:
    """(HEAD commit, dirty?) of the checkout the running ``pipeline`` code comes from, or None outside git."""
    cwd = cwd or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip(), bool(status.stdout.strip())


# ----------------------------------------------------------------------------------------------- pointers
def train_pointer(params: Params) -> Path:
    return Path(params.train.model_dir) / POINTER


def eval_pointer(params: Params) -> Path:
    return Path(params.evaluate.report_dir) / POINTER


def read_pointer(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_digest(params: Params) -> str | None:
    path = Path(params.train.model_dir) / "model.pt"
    return file_digest(path) if path.exists() else None


# ----------------------------------------------------------------------------------------------- the run
class RunLogger:
    """The pipeline's MLflow run; a do-nothing object when tracking is off (``RunLogger()``).

    Used as a context manager by ``train``: the run ends FINISHED, or FAILED if the block raises.
    """

    def __init__(self, tracking: Tracking | None = None, run_id: str | None = None) -> None:
        self.tracking = tracking
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self.tracking is not None and self.run_id is not None

    # -- construction
    @classmethod
    def for_training(cls, params: Params, fingerprint: str, device: str, *, rank: int = 0) -> RunLogger:
        """Start the training run (or continue the one of the checkpoint this training resumes)."""
        if rank != 0:
            return cls()
        pointer = train_pointer(params)
        if not params.mlflow.enabled:
            write_json_atomic(pointer, {"run_id": None})
            return cls()
        tracking = Tracking.from_params(params)
        previous = read_pointer(pointer)
        checkpoint = Path(params.train.model_dir) / "checkpoint.pt"
        run_id = None
        if (
            params.train.resume
            and checkpoint.exists()
            and previous.get("fingerprint") == fingerprint
            and previous.get("tracking_uri") == display_uri(tracking.uri)
            and _live_run(tracking, previous.get("run_id"))
        ):
            run_id = previous["run_id"]
            tracking.call("resume run", tracking.client.update_run, run_id, status="RUNNING")
            log.info("MLflow: continuing run %s of the resumed checkpoint (%s)", run_id, display_uri(tracking.uri))
        else:
            run_id = _start_run(tracking, params, {"device": device, "pipeline.fingerprint": fingerprint})
        write_json_atomic(
            pointer, {"run_id": run_id, "tracking_uri": display_uri(tracking.uri), "fingerprint": fingerprint}
        )
        return cls(tracking, run_id)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if not self.enabled:
            return
        if kind is None:
            self.finish("FINISHED")
            return
        status = "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        # Training stopped because the server failed a whole retry budget: it has its one warning and the error
        # line already, so one more try to close the run, no second budget, and no warning if that fails too.
        lost = isinstance(err, TrackingError)
        tracking = self.tracking.once() if lost else self.tracking
        try:
            tracking.call("end run", tracking.client.set_terminated, self.run_id, status=status)
        except Exception as failure:  # noqa: BLE001 - the training error matters more than a failure to record it
            log.debug("could not mark MLflow run %s as %s", self.run_id, status, exc_info=True)
            log.log(
                logging.INFO if lost else logging.WARNING,
                "MLflow run %s stays RUNNING: could not mark it %s (%s)",
                self.run_id,
                status,
                one_line(failure) if not lost else "the tracking server is unreachable",
            )

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.tracking.call("end run", self.tracking.client.set_terminated, self.run_id, status=status)

    # -- logging
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        for start in range(0, len(batch), 1000):
            self.tracking.call(
                "log metrics", self.tracking.client.log_batch, self.run_id, metrics=batch[start : start + 1000]
            )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self.tracking.call("set tags", self.tracking.client.log_batch, self.run_id, tags=batch)

    def log_artifacts(self, paths: Iterable[str | Path], folder: str | None = None) -> None:
        if not self.enabled:
            return
        for path in map(Path, paths):
            if path.is_file():
                self.tracking.call(
                    f"upload {path.name}", self.tracking.client.log_artifact, self.run_id, str(path), folder
                )

    def log_datasets(self, params: Params, contexts: Mapping[str, str]) -> None:
        """The processed splits as MLflow dataset inputs (``{split: context}``): name, sha256 digest, rows, source."""
        if not self.enabled:
            return
        import pyarrow.parquet as pq
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from pipeline.data.layout import PreprocessOutputs

        splits = PreprocessOutputs.under(params.preprocess.processed_dir)
        inputs = []
        for split, context in contexts.items():
            path = Path(getattr(splits, split))
            if not path.exists():
                continue
            meta = pq.read_metadata(path)
            dataset = Dataset(
                name=f"{params.data.dataset}-{split}",
                digest=file_digest(path)[:16],
                source_type="local",
                source=json.dumps({"uri": path.resolve().as_uri()}),
                schema=json.dumps({"columns": meta.schema.names}),
                profile=json.dumps({"users": meta.num_rows}),
            )
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
        if inputs:
            self.tracking.call("log inputs", self.tracking.client.log_inputs, self.run_id, datasets=inputs)

    def log_epoch(self, row: Mapping[str, float]) -> None:
        """One row of ``train_log.csv``: every column but the axes, at step = epoch."""
        self.log_metrics({metric_key(k): v for k, v in row.items() if k not in EPOCH_KEYS}, step=int(row["epoch"]))

    def log_training(self, params: Params) -> None:
        """After training: the files train wrote, the best validation figure, and the model digest in the pointer."""
        if not self.enabled:
            return
        model_dir = Path(params.train.model_dir)
        config = json.loads((model_dir / "model.json").read_text())
        self.log_metrics(
            {
                "best_valid_ndcg_at_10": config.get("best_valid_ndcg@10", math.nan),
                "best_epoch": config.get("best_epoch", math.nan),
                "epochs_run": config.get("epochs_run", math.nan),
            }
        )
        self.tracking.call(
            "upload params.yaml",
            self.tracking.client.log_text,
            self.run_id,
            yaml.safe_dump(dataclasses.asdict(params), sort_keys=False),
            "params.yaml",
        )
        from pipeline.data.layout import DownloadOutputs, PreprocessOutputs

        self.log_artifacts(
            [
                model_dir / "model.json",
                model_dir / "train_log.csv",
                PreprocessOutputs.under(params.preprocess.processed_dir).stats,
                DownloadOutputs.under(params.data.interim_dir).manifest,
            ]
        )
        pointer = train_pointer(params)
        write_json_atomic(pointer, {**read_pointer(pointer), "model_sha256": model_digest(params)})


def log_evaluation(params: Params, report_dir: str | Path | None = None) -> str | None:
    """Log ``evaluate``'s results on the model's run (or a fresh, back-filled one); returns the run id.

    Writes ``<report_dir>/mlflow_run.json`` for ``register``.
    """
    reports = Path(report_dir or params.evaluate.report_dir)
    pointer = reports / POINTER
    if not params.mlflow.enabled:
        write_json_atomic(pointer, {"run_id": None})
        return None
    tracking = Tracking.from_params(params)
    digest = model_digest(params)
    trained = read_pointer(train_pointer(params))
    if (
        trained.get("model_sha256") == digest
        and trained.get("tracking_uri") == display_uri(tracking.uri)
        and _live_run(tracking, trained.get("run_id"))
    ):
        run = RunLogger(tracking, trained["run_id"])
    else:
        log.info("MLflow: %s has no run for this model.pt in %s; starting one", train_pointer(params), tracking.uri)
        run = RunLogger(tracking, _start_run(tracking, params, {"backfilled_from": "train_log.csv"}))
        model_json = Path(params.train.model_dir) / "model.json"
        if model_json.exists():
            run.set_tags({"device": json.loads(model_json.read_text()).get("device", "unknown")})
        for row in read_log(Path(params.train.model_dir) / "train_log.csv"):
            run.log_epoch(row)
        run.log_training(params)
    metrics = json.loads((reports / "metrics.json").read_text())
    fingerprint = eval_fingerprint(params)
    run.log_metrics(headline_metrics(metrics))
    run.set_tags(
        {
            "eval.fingerprint": fingerprint,
            "eval.exclude_seen": str(params.evaluate.exclude_seen).lower(),
            NOTE_TAG: run_description(params, metrics),
        }
    )
    run.log_datasets(params, {"test": "testing"})
    run.log_artifacts([reports / "metrics.json", reports / "expert_load.json"])
    run.log_artifacts(sorted(reports.glob("*.png")), "plots")
    run.finish("FINISHED")
    write_json_atomic(
        pointer,
        {
            "run_id": run.run_id,
            "tracking_uri": display_uri(tracking.uri),
            "model_sha256": digest,
            "eval_fingerprint": fingerprint,
        },
    )
    log.info("MLflow: evaluation logged on run %s (%s)", run.run_id, display_uri(tracking.uri))
    return run.run_id


# ----------------------------------------------------------------------------------------------- helpers
def _start_run(tracking: Tracking, params: Params, extra_tags: Mapping[str, str]) -> str:
    from mlflow.entities import Param

    dataset = params.data.dataset
    experiment_id = tracking.experiment_id(
        experiment_name(params),
        f"Models trained on {dataset} by the HyMoERec pipeline, one run each: compare them on test.ndcg_at_10 "
        "(full ranking); the registered model's `champion` alias is the one that serves.",
    )
    name = params.model.display_name.replace(" + hybrid MoE", "-MoE").replace(" ", "")
    tags = {
        "mlflow.runName": f"{name}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}",
        NOTE_TAG: run_description(params),
        "model.name": params.model.display_name,
        "mlflow.source.type": "JOB",
        "mlflow.source.name": "pipeline",
        "dataset": params.data.dataset,
        "model.kind": params.model.kind,
        "model.moe": "on" if params.model.uses_moe else "off",
        **data_digests(params),
        **extra_tags,
    }
    git = git_commit()
    if git is not None:
        tags["mlflow.source.git.commit"], tags["git.dirty"] = git[0], str(git[1]).lower()
    run = tracking.call("create run", tracking.client.create_run, experiment_id, tags=tags)
    run_id = run.info.run_id
    items = [Param(k, v) for k, v in flat_params(params).items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        tracking.call("log params", tracking.client.log_batch, run_id, params=items[start : start + 100])
    RunLogger(tracking, run_id).log_datasets(params, {"train": "training", "valid": "validation"})
    log.info("MLflow: run %s in experiment %s (%s)", run_id, experiment_name(params), display_uri(tracking.uri))
    return run_id


def _live_run(tracking: Tracking, run_id: str | None) -> bool:
    """Whether ``run_id`` exists in this store and is not deleted (a store may have been wiped)."""
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException

    try:
        run = tracking.call("get run", tracking.client.get_run, run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active"
