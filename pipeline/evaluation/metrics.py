"""Honest full-ranking (and sampled) evaluation primitives.

Item ids run 1..num_items; column 0 of every score matrix is the padding item and is never ranked. Ranking is
done by counting, not sorting: for each row we count the candidates scoring strictly above the target
(``greater``) and the other candidates tying with it (``ties``). Metrics are then the exact expectation over a
uniformly random order among tied items, so a constant scorer gets the random-ranking value (HR@10 = 10/N)
instead of looking good or bad depending on how ``topk`` happens to order ties.

Whether already-seen items are removed from the ranking is a protocol choice (``exclude_seen``); the target is
never removed, even when the user has seen it before. Sampled metrics (1 positive vs 100 negatives) are
offered for comparison with older papers only: they are biased, report full ranking first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "EvalBatch",
    "Exclude",
    "full_ranking_metrics",
    "metric_names",
    "metrics_from_rank_stats",
    "rank_statistics",
    "sample_negatives",
    "sampled_metrics",
    "summarise",
]

DEFAULT_KS: tuple[int, ...] = (5, 10, 20)

# A boolean mask [B, C] (True = excluded), a padded LongTensor [B, L] of item ids (0 = padding), or one
# 1-D index collection per row.
Exclude = Tensor | Sequence[Tensor | Sequence[int] | np.ndarray]


@dataclass(frozen=True, eq=False)
class EvalBatch:
    """One chunk of users to evaluate.

    ``inputs`` is whatever ``score_fn`` needs (padded histories, user ids, ...); this module never reads it,
    which keeps model code out of evaluation. ``seen`` lists items dropped from the ranking under
    ``exclude_seen``.
    """

    targets: Tensor  # (LongTensor [b]) held-out item id per user, in 1..num_items
    seen: Exclude | None = None  # (see ``Exclude``) items the user interacted with before the target
    inputs: Any = None  # (any) passed untouched to score_fn


def metric_names(ks: Sequence[int] = DEFAULT_KS, prefix: str = "") -> list[str]:
    """Keys produced by :func:`metrics_from_rank_stats`, in a stable order (for logging and tables)."""
    names = [f"{prefix}{name}@{k}" for k in _check_ks(ks) for name in ("hr", "ndcg", "mrr")]
    return [*names, f"{prefix}mrr"]


def rank_statistics(scores: Tensor, targets: Tensor, exclude: Exclude | None = None) -> tuple[Tensor, Tensor]:
    """Count, per row, ranked candidates scoring strictly above the target and other candidates tying with it.

    Column 0 (padding) and excluded items are never counted; the target is never excluded. Scores are compared
    in at least float32 so bf16/fp16 model outputs do not invent ties through the comparison dtype alone.

    Returns ``(greater, ties)``, both LongTensor [B].
    """
    scores = _as_scores(scores)
    num_rows, num_cols = scores.shape
    targets = _check_targets(targets, num_rows, num_cols, scores.device)
    target_scores = scores.gather(1, targets[:, None])
    if exclude is None:
        # fast path: count over every column, then take the padding column and the target itself back out.
        # int32 sums: summing a bool matrix to int64 first copies it to 8 bytes per entry (3x slower on CPU)
        padding = scores[:, :1]
        greater = (scores > target_scores).sum(1, dtype=torch.int32) - (padding > target_scores).squeeze(1).int()
        ties = (scores == target_scores).sum(1, dtype=torch.int32) - 1 - (padding == target_scores).squeeze(1).int()
        return greater.long(), ties.long()
    counted = _counted_mask(scores, targets, exclude)
    greater = ((scores > target_scores) & counted).sum(dim=1, dtype=torch.int32)
    ties = ((scores == target_scores) & counted).sum(dim=1, dtype=torch.int32)
    return greater.long(), ties.long()


def metrics_from_rank_stats(
    greater: Tensor, ties: Tensor, ks: Sequence[int] = DEFAULT_KS, prefix: str = ""
) -> dict[str, Tensor]:
    """Per-row ``hr@k``, ``ndcg@k``, ``mrr@k`` and ``mrr`` as exact expectations over random tie order.

    The target's rank is uniform on {greater+1, ..., greater+ties+1}, so each metric is the mean of a per-rank
    gain over that range: a difference of two prefix sums divided by ties+1 (one relevant item, so IDCG = 1).
    Values are float64 so prefix-sum differences stay exact enough for catalogues of millions of items.
    """
    ks = _check_ks(ks)
    greater = torch.as_tensor(greater).long().reshape(-1)
    ties = torch.as_tensor(ties, device=greater.device).long().reshape(-1)
    if greater.shape != ties.shape:
        raise ValueError(f"greater and ties differ in shape: {tuple(greater.shape)} vs {tuple(ties.shape)}")
    if greater.numel() and (int(greater.min()) < 0 or int(ties.min()) < 0):
        raise ValueError("greater and ties must be non-negative counts")

    device = greater.device
    count = (ties + 1).double()
    low = greater  # ranks 1..low are taken by better candidates
    high = greater + ties + 1  # the last rank the target can get
    top = int(high.max()) if high.numel() else 0
    max_k = max(ks)
    ranks = torch.arange(1, max(top, 1) + 1, dtype=torch.float64, device=device)
    discount = _prefix(1.0 / torch.log2(ranks[: min(max_k, top)] + 1.0))
    harmonic = _prefix(1.0 / ranks)

    out: dict[str, Tensor] = {}
    for k in ks:
        hi_k = high.clamp(max=k)
        lo_k = low.clamp(max=k)
        out[f"{prefix}hr@{k}"] = (hi_k - lo_k).double() / count
        out[f"{prefix}ndcg@{k}"] = (discount[hi_k] - discount[lo_k]) / count
        out[f"{prefix}mrr@{k}"] = (harmonic[hi_k] - harmonic[lo_k]) / count
    # without ties use 1/rank directly: a difference of two large harmonic sums loses digits for deep ranks
    untied = 1.0 / (greater + 1).double()
    out[f"{prefix}mrr"] = torch.where(ties == 0, untied, (harmonic[high] - harmonic[low]) / count)
    return out


def full_ranking_metrics(
    score_fn: Callable[[EvalBatch], Tensor],
    batches: Iterable[EvalBatch],
    num_items: int,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    exclude_seen: bool,
    sampled_negatives: int = 0,
    popularity: Tensor | np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Score users one chunk at a time; return per-row metrics (one float64 entry per user, in batch order).

    Only one chunk's [b, num_items + 1] score matrix is alive at a time, so memory is bounded by the chunk
    size, not the catalogue times the user count. Per-row values (rather than means) let callers compute
    bucket metrics, e.g. by history length or target popularity. ``exclude_seen`` has no default: it changes
    the numbers, so every caller must state (and report) the protocol. With ``sampled_negatives > 0`` the
    ``sampled_*`` metrics come from the same scores, with one generator seeded once for the whole run.
    """
    ks = _check_ks(ks)
    if num_items < 1:
        raise ValueError(f"num_items must be positive, got {num_items}")
    collected: dict[str, list[np.ndarray]] = {}
    generator: torch.Generator | None = None
    weights = None if popularity is None else _popularity_weights(popularity, num_items + 1)
    for batch in batches:
        with torch.no_grad():
            scores = score_fn(batch)
        if scores.ndim != 2 or scores.shape[1] != num_items + 1:
            raise ValueError(f"score_fn must return [b, {num_items + 1}], got {tuple(scores.shape)}")
        if exclude_seen and batch.seen is None:
            raise ValueError("exclude_seen=True but a batch has no `seen` items (pass empty sets explicitly)")
        exclude = batch.seen if exclude_seen else None
        greater, ties = rank_statistics(scores, batch.targets, exclude)
        rows = metrics_from_rank_stats(greater, ties, ks)
        if sampled_negatives > 0:
            if generator is None:
                generator = torch.Generator(device=scores.device).manual_seed(seed)
            rows |= sampled_metrics(
                scores,
                batch.targets,
                ks=ks,
                num_negatives=sampled_negatives,
                popularity=weights,
                exclude=exclude,
                seed=generator,
            )
        for name, values in rows.items():
            collected.setdefault(name, []).append(values.detach().cpu().numpy())
    if not collected:
        raise ValueError("no batches to evaluate")
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def sample_negatives(
    targets: Tensor,
    num_candidates: int,
    num_negatives: int = 100,
    *,
    popularity: Tensor | np.ndarray | None = None,
    exclude: Exclude | None = None,
    seed: int | torch.Generator = 0,
) -> Tensor:
    """Draw distinct negatives per row among items that are not padding, not the target and not excluded.

    Sampling is uniform, or proportional to ``popularity`` (indexed by item id, length ``num_candidates``).
    One ``torch.multinomial`` call over masked weights handles all rows at once (without replacement, so no
    duplicate negatives). An ``int`` seed makes a fresh generator; pass a ``torch.Generator`` to continue one
    stream across chunks. Returns LongTensor [B, num_negatives] on the generator's device.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be positive, got {num_negatives}")
    if isinstance(seed, torch.Generator):
        generator = seed
    else:
        generator = torch.Generator(device=torch.as_tensor(targets).device).manual_seed(int(seed))
    device = generator.device
    targets = _check_targets(targets, torch.as_tensor(targets).numel(), num_candidates, device)
    num_rows = targets.numel()
    if popularity is None:
        weights = torch.ones(num_rows, num_candidates, dtype=torch.float32, device=device)
    else:
        weights = _popularity_weights(popularity, num_candidates).to(device).expand(num_rows, -1).clone()
    weights[:, 0] = 0.0
    weights[torch.arange(num_rows, device=device), targets] = 0.0
    excluded = _exclusion_mask(exclude, num_rows, num_candidates, device)
    if excluded is not None:
        weights.masked_fill_(excluded, 0.0)
    eligible = (weights > 0).sum(dim=1)
    if num_rows and int(eligible.min()) < num_negatives:
        row = int(eligible.argmin())
        raise ValueError(
            f"row {row} has only {int(eligible[row])} eligible negatives, fewer than num_negatives={num_negatives}"
        )
    if num_rows == 0:
        return torch.empty(0, num_negatives, dtype=torch.long, device=device)
    return torch.multinomial(weights, num_negatives, replacement=False, generator=generator)


def sampled_metrics(
    scores: Tensor,
    targets: Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    num_negatives: int = 100,
    popularity: Tensor | np.ndarray | None = None,
    exclude: Exclude | None = None,
    seed: int | torch.Generator = 0,
) -> dict[str, Tensor]:
    """Per-row ``sampled_*`` metrics: the target ranked among itself and ``num_negatives`` sampled negatives.

    The older-paper protocol, kept for comparison only: it overstates quality and can reorder models. Ties are
    handled exactly as in full ranking. With an ``int`` seed the generator lives on the scores' device, so CPU
    and GPU runs draw different (each deterministic) negatives.
    """
    scores = _as_scores(scores)
    num_rows, num_cols = scores.shape
    targets = _check_targets(targets, num_rows, num_cols, scores.device)
    if not isinstance(seed, torch.Generator):
        seed = torch.Generator(device=scores.device).manual_seed(int(seed))
    negatives = sample_negatives(
        targets.to(seed.device),
        num_cols,
        num_negatives,
        popularity=popularity,
        exclude=exclude,
        seed=seed,
    ).to(scores.device)
    target_scores = scores.gather(1, targets[:, None])
    negative_scores = scores.gather(1, negatives)
    greater = (negative_scores > target_scores).sum(dim=1)
    ties = (negative_scores == target_scores).sum(dim=1)
    return metrics_from_rank_stats(greater, ties, ks, prefix="sampled_")


def summarise(per_row: Mapping[str, Tensor | np.ndarray | Sequence[float]]) -> dict[str, float]:
    """Mean of every per-row metric (every user weighs the same)."""
    out: dict[str, float] = {}
    for name, values in per_row.items():
        array = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else np.asarray(values)
        if array.size == 0:
            raise ValueError(f"metric {name!r} has no rows to average")
        out[name] = float(array.astype(np.float64).mean())
    return out


def _prefix(values: Tensor) -> Tensor:
    # P[m] = sum of the first m values, so the sum over ranks lo+1..hi is P[hi] - P[lo]
    return torch.cat([values.new_zeros(1), torch.cumsum(values, dim=0)])


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive cut-offs, got {ks}")
    return ks


def _as_scores(scores: Tensor) -> Tensor:
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, C], got shape {tuple(scores.shape)}")
    if scores.shape[1] < 2:
        raise ValueError("scores need the padding column plus at least one item")
    if scores.dtype != torch.float64:
        scores = scores.float()
    if bool(torch.isnan(scores).any()):
        bad = torch.isnan(scores).any(dim=1).nonzero().flatten()
        raise ValueError(f"NaN in scores ({bad.numel()} row(s), first row {int(bad[0])}): check the model")
    return scores


def _check_targets(targets: Tensor, num_rows: int, num_cols: int, device: torch.device) -> Tensor:
    targets = torch.as_tensor(targets, device=device).long().reshape(-1)
    if targets.numel() != num_rows:
        raise ValueError(f"{targets.numel()} targets for {num_rows} score rows")
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= num_cols):
        raise ValueError(f"targets must be item ids in 1..{num_cols - 1} (0 is padding)")
    return targets


def _counted_mask(scores: Tensor, targets: Tensor, exclude: Exclude | None) -> Tensor:
    # candidates the target competes with: every real item except excluded ones and the target itself
    num_rows, num_cols = scores.shape
    counted = torch.ones(num_rows, num_cols, dtype=torch.bool, device=scores.device)
    counted[:, 0] = False
    excluded = _exclusion_mask(exclude, num_rows, num_cols, scores.device)
    if excluded is not None:
        counted &= ~excluded
    counted[torch.arange(num_rows, device=scores.device), targets] = False
    return counted


def _exclusion_mask(exclude: Exclude | None, num_rows: int, num_cols: int, device: torch.device) -> Tensor | None:
    if exclude is None:
        return None
    if isinstance(exclude, Tensor) and exclude.dtype == torch.bool:
        if tuple(exclude.shape) != (num_rows, num_cols):
            raise ValueError(f"exclude mask must be [{num_rows}, {num_cols}], got {tuple(exclude.shape)}")
        return exclude.to(device)
    if isinstance(exclude, Tensor):
        if exclude.ndim != 2 or exclude.shape[0] != num_rows:
            raise ValueError(f"padded exclude ids must be [{num_rows}, L], got {tuple(exclude.shape)}")
        cols = exclude.to(device).long()
        rows = torch.arange(num_rows, device=device)[:, None].expand_as(cols)
    else:
        if len(exclude) != num_rows:
            raise ValueError(f"{len(exclude)} exclude sets for {num_rows} rows")
        parts = [torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1) for ids in exclude]
        lengths = torch.tensor([part.numel() for part in parts], device=device)
        cols = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)
        rows = torch.repeat_interleave(torch.arange(num_rows, device=device), lengths)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= num_cols):
        raise ValueError(f"exclude ids must lie in 0..{num_cols - 1}")
    mask = torch.zeros(num_rows, num_cols, dtype=torch.bool, device=device)
    mask[rows.reshape(-1), cols.reshape(-1)] = True  # id 0 (padding) lands on column 0, never ranked anyway
    return mask


def _popularity_weights(popularity: Tensor | np.ndarray, num_cols: int) -> Tensor:
    weights = torch.as_tensor(np.asarray(popularity) if not isinstance(popularity, Tensor) else popularity)
    weights = weights.detach().to(torch.float32).reshape(-1)
    if weights.numel() != num_cols:
        raise ValueError(f"popularity needs one weight per item id 0..{num_cols - 1}, got {weights.numel()}")
    if bool((~torch.isfinite(weights)).any()) or bool((weights < 0).any()):
        raise ValueError("popularity weights must be finite and non-negative")
    return weights
