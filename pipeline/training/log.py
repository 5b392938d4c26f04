"""The per-epoch training log (``train_log.csv``): written by the trainer, read by plots, DVC and MLflow.

One module owns the columns so the writer and every reader agree; it imports nothing heavy, so the plotting and
tracking code can read a log without loading the trainer.
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
    "epoch_seconds",
]


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
