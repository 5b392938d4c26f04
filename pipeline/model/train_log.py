"""The per-epoch training log (``train_log.csv``, beside ``model.pt``): written by the trainer, read by plots, DVC,
MLflow and the study.

One module owns the columns so the writer and every reader agree; it lives with the model's files rather than in
the trainer and imports nothing heavy, so evaluation and tracking read a log without loading the trainer.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.io import atomic_path

LOG_COLUMNS = [
    "epoch",
    "step",
    "train_loss",
    "ce_loss",
    "lb_loss",
    "valid_hr@10",
    "valid_ndcg@10",
    "usage_entropy",
    "alpha",
    "history_bias",  # the learned offset b of model.history_bias (nan when off)
    "epoch_seconds",  # wall time of the steps and the validation (a paused or crowded process takes longer)
    # CPU time of the process (all threads) over the same span: on the CPU the work the epoch cost, comparable
    # across runs that shared the machine or were paused; on CUDA only the host's part
    "epoch_cpu_seconds",
]


def train_log_path(model_dir: str | Path) -> Path:
    """Where the trainer writes the log of the model in ``model_dir``."""
    return Path(model_dir) / "train_log.csv"


def write_log(path: Path, history: list[dict[str, float]]) -> None:
    """Rewrite the whole log atomically (a resumed run's file never holds half a row)."""
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def read_log(path: Path) -> list[dict[str, float]]:
    """Rows as floats: nan where a column does not apply (alpha without MoE, history_bias when off); cells a log
    written before its column existed lacks are left out."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
