"""The evaluate stage with its MLflow logging, as the entry points (CLI / DVC, Airflow, the study) run it."""

from __future__ import annotations

from pipeline.evaluation.evaluate import EvaluateResult, evaluate
from pipeline.params import Params
from pipeline.tracking.runs import log_evaluation


def tracked_evaluation(params: Params) -> EvaluateResult:
    """Evaluate, then log the metrics and reports on the model's MLflow run (when enabled)."""
    result = evaluate(params)
    log_evaluation(params)
    return result
