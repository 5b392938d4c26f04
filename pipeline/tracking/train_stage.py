"""The train stage with its MLflow run, as the entry points (CLI / DVC, Airflow, the study) run it.

A module of its own so that the stage's code (its DVC dependencies) is the trainer and the run logging, no more.
"""

from __future__ import annotations

from pipeline.device import pick_device, setup_distributed
from pipeline.params import Params
from pipeline.tracking.runs import RunLogger
from pipeline.training.train import TrainResult, run_fingerprint, train


def tracked_training(params: Params) -> TrainResult:
    """Train with the MLflow run opened (or continued, for a resumed checkpoint) around it: one step per epoch
    through the trainer's callback, the files and best figures after; the run ends FAILED if training raises."""
    rank, _ = setup_distributed(params.train.device)  # under torchrun: before anything asks for the rank
    device = pick_device(params.train.device)
    fingerprint = run_fingerprint(params)
    with RunLogger.for_training(params, fingerprint, str(device), rank=rank) as run:
        result = train(params, on_epoch=run.log_epoch, fingerprint=fingerprint)
        if rank == 0:
            run.log_training(params)
    return result
