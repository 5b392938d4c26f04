"""The pipeline's stages, declared once: what ``python -m pipeline <stage>``, DVC and the Airflow tasks run.

Each stage is the plain function of its layer (``data.download``, ``data.preprocess``, ``training.train``,
``evaluation.evaluate``, ``tracking.promotion.register``) plus, for train and evaluate, experiment tracking attached
at the edge: training reports each epoch to a callback and returns what it did, evaluation returns its metrics,
and :mod:`pipeline.tracking.train_stage` / :mod:`pipeline.tracking.evaluate_stage` log them.
The layers below never import MLflow. This module only dispatches (its functions hold no logic of their own), so
it is not among the stages' DVC dependencies; the modules in each ``Stage.code`` are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.params import Params

if TYPE_CHECKING:
    from pipeline.evaluation.evaluate import EvaluateResult
    from pipeline.training.train import TrainResult


@dataclass(frozen=True)
class Stage:
    """One stage: what the CLI shows and runs, and what DVC must watch (``dvc.yaml`` is checked against this).

    ``params`` are the ``params.yaml`` keys (or whole sections) the stage's outputs depend on, so that changing
    anything else (tracking, retraining, report cut-offs) leaves it up to date; ``code`` are the modules whose
    functions it runs: with every pipeline module they import, they are the stage's code dependencies.
    ``inputs`` and ``outputs`` are its files, as ``dvc.yaml`` writes them (paths from ``params.yaml``).
    """

    name: str
    help: str
    run: Callable[[Params], object]
    params: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    dvc: bool = True  # a stage of dvc.yaml (register and recommend are commands around the registry)


def download(params: Params) -> object:
    from pipeline.data.download import download as download_data

    return download_data(params.data)


def preprocess(params: Params) -> object:
    from pipeline.data.preprocess import preprocess as preprocess_data

    return preprocess_data(params.preprocess, params.data.interim_dir)


def train(params: Params) -> TrainResult:
    """Train with an MLflow run open around it (one step per epoch; FAILED if training raises), when enabled."""
    from pipeline.tracking.train_stage import tracked_training

    return tracked_training(params)


def evaluate(params: Params) -> EvaluateResult:
    """Evaluate, then log the metrics and reports on the model's MLflow run (when enabled)."""
    from pipeline.tracking.evaluate_stage import tracked_evaluation

    return tracked_evaluation(params)


def evaluate_and_register(params: Params) -> EvaluateResult:
    """DVC's ``evaluate`` stage: evaluate, then register (one DVC stage, two Airflow tasks)."""
    result = evaluate(params)
    if params.mlflow.enabled:
        register(params)
    return result


def register(params: Params) -> object:
    from pipeline.tracking.promotion import register as register_model

    return register_model(params)


def recommend(params: Params) -> object:
    from pipeline.tracking.batch import recommend_batch

    return recommend_batch(params)


SPLITS = ("train.parquet", "valid.parquet", "test.parquet")


def _under(folder: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{folder}/{name}" for name in names)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "download",
            "obtain the dataset (mirror, cache or official URL) -> interactions.parquet + manifest",
            download,
            params=("data",),
            code=("pipeline.data.download",),
            outputs=_under("${data.interim_dir}", "interactions.parquet", "quarantine.csv", "manifest.json"),
        ),
        Stage(
            "preprocess",
            "filter, k-core, re-index and split -> Parquet sequences + stats.json",
            preprocess,
            params=("preprocess", "data.interim_dir"),
            code=("pipeline.data.preprocess",),
            inputs=_under("${data.interim_dir}", "interactions.parquet"),
            outputs=_under(
                "${preprocess.processed_dir}", *SPLITS, "user_map.parquet", "item_map.parquet", "stats.json"
            ),
        ),
        Stage(
            "train",
            "train the model with early stopping on validation NDCG@10 (resumes a matching checkpoint)",
            train,
            # mlflow.* only says where the run is logged: changing it never re-trains (evaluate back-fills a run)
            params=("model", "train", "evaluate.exclude_seen", "preprocess.processed_dir"),
            code=("pipeline.tracking.train_stage",),
            inputs=_under("${preprocess.processed_dir}", "train.parquet", "valid.parquet", "item_map.parquet"),
            outputs=_under(
                "${train.model_dir}", "model.pt", "model.json", "checkpoint.pt", "mlflow_run.json", "train_log.csv"
            ),
        ),
        Stage(
            "evaluate",
            "full-ranking test metrics, bucket analysis, expert load and plots -> metrics.json; then register",
            evaluate_and_register,
            params=(
                "evaluate",
                "mlflow",
                "data.dataset",  # experiment and registered-model names
                "data.synthetic",  # the generated users' kinds, which the routing analysis reads on synthetic data
                "model.kind",  # the served model's requirements and a back-filled run's name
                "model.moe.enabled",
                "data.interim_dir",  # the source checksums tagged on a back-filled run
                "preprocess.processed_dir",
                "train.model_dir",
                "train.device",
                "train.amp",
                "train.cpu_amp",
                "train.eval_batch_size",
            ),
            # the pyfunc is code the stage logs (and, to re-score a champion, runs): it is part of what it depends on
            code=(
                "pipeline.tracking.evaluate_stage",
                "pipeline.tracking.promotion",
                "pipeline.tracking.pyfunc_model",
            ),
            inputs=(
                *_under("${train.model_dir}", "model.pt", "model.json", "mlflow_run.json"),
                *_under("${preprocess.processed_dir}", *SPLITS, "item_map.parquet"),
            ),
            outputs=_under(
                "${evaluate.report_dir}",
                "metrics.json",
                "per_user.parquet",
                "expert_load.json",
                "mlflow_run.json",
                "training_curves.png",
                "bucket_metrics.png",
                "expert_load.png",
            ),
        ),
        Stage(
            "register",
            "log the evaluated model to MLflow, register it as challenger, promote it if it beats the champion",
            register,
            code=("pipeline.tracking.promotion", "pipeline.tracking.pyfunc_model"),
            dvc=False,
        ),
        Stage(
            "recommend",
            "top-K items for every user from the champion model -> mlflow.batch_output (Parquet)",
            recommend,
            code=("pipeline.tracking.batch",),
            dvc=False,
        ),
    )
}
