"""Score a model on an evaluation split with full ranking, chunk by chunk (shared by validation and evaluate)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from pipeline.evaluation.metrics import EvalBatch, full_ranking_metrics
from pipeline.model.base import SequentialRecommender
from pipeline.training.data import EvalSplit


@torch.no_grad()
def rank_split(
    model: SequentialRecommender,
    split: EvalSplit,
    *,
    ks: Sequence[int],
    exclude_seen: bool,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    sampled_negatives: int = 0,
    popularity: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per-user metrics (one array entry per row of ``split``) from full-catalogue scores, padding never ranked."""
    was_training = model.training
    model.eval()

    def batches() -> Iterator[EvalBatch]:
        for start in range(0, len(split), batch_size):
            stop = min(start + batch_size, len(split))
            inputs = torch.from_numpy(split.inputs[start:stop]).to(device)
            targets = torch.from_numpy(split.targets[start:stop]).to(device)
            seen = torch.from_numpy(split.seen(start, stop)).to(device) if exclude_seen else None
            yield EvalBatch(targets=targets, seen=seen, inputs=inputs)

    def score(batch: EvalBatch) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model.score_next(batch.inputs).float()

    try:
        return full_ranking_metrics(
            score,
            batches(),
            model.num_items,
            ks,
            exclude_seen=exclude_seen,
            sampled_negatives=sampled_negatives,
            popularity=None if popularity is None else torch.as_tensor(popularity, dtype=torch.float32, device=device),
            seed=seed,
        )
    finally:
        model.train(was_training)
