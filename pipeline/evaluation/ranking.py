"""Score a model on an evaluation split with full ranking, chunk by chunk (shared by validation and evaluate).

Users are scored in order of history length and each chunk is cut to its longest history (plus one spare column,
which BERT4Rec's appended [MASK] uses), as training does: positions are right-aligned and padding is never
attended to, so the scores are those of the full-width input, at a fraction of the encoder's cost on short-history
data (Beauty: 9 items on average in a window of 50). The per-user results come back in the split's row order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from pipeline.data.sequences import EvalSplit
from pipeline.evaluation.metrics import EvalBatch, full_ranking_metrics
from pipeline.model.base import SequentialRecommender


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
    lengths = (split.inputs > 0).sum(1)
    order = np.argsort(lengths, kind="stable")

    def batches() -> Iterator[EvalBatch]:
        for start in range(0, len(split), batch_size):
            rows = order[start : start + batch_size]
            width = min(int(lengths[rows].max(initial=0)) + 1, split.inputs.shape[1])
            inputs = torch.from_numpy(split.inputs[rows, -width:]).to(device)
            targets = torch.from_numpy(split.targets[rows]).to(device)
            seen = torch.from_numpy(split.seen(rows)).to(device) if exclude_seen else None
            yield EvalBatch(targets=targets, seen=seen, inputs=inputs)

    def score(batch: EvalBatch) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model.score_next(batch.inputs).float()

    try:
        by_length = full_ranking_metrics(
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
    in_split_order = {}
    for name, values in by_length.items():
        in_split_order[name] = np.empty_like(values)
        in_split_order[name][order] = values
    return in_split_order
