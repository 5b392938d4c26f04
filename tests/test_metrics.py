"""Evaluation metrics against hand-computed values, brute-force references and protocol invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.evaluation.metrics import (
    EvalBatch,
    full_ranking_metrics,
    metric_names,
    metrics_from_rank_stats,
    rank_statistics,
    sample_negatives,
    sampled_metrics,
    summarise,
)

L3 = 1 / math.log2(3)  # NDCG discount at rank 2
L5 = 1 / math.log2(5)  # NDCG discount at rank 4

# (scores, target, exclude, greater, ties, expected per-row metrics)
# fmt: off
HAND_CASES = [
    pytest.param(
        # padding scores 100 but is ignored; only item 2 (0.9) beats item 3 (0.5): rank 2
        [100.0, 0.1, 0.9, 0.5, 0.3], 3, None, 1, 0,
        {"hr@1": 0.0, "hr@5": 1.0, "ndcg@1": 0.0, "ndcg@5": L3, "mrr@1": 0.0, "mrr@5": 0.5, "mrr": 0.5},
        id="no-ties-rank-2",
    ),
    pytest.param(
        # item 5 beats it, items 2 and 3 tie with it: rank uniform on {2, 3, 4}
        [0.0, 0.5, 0.5, 0.5, 0.1, 0.9], 1, None, 1, 2,
        {
            "hr@1": 0.0, "hr@2": 1 / 3, "hr@3": 2 / 3, "hr@5": 1.0,
            "ndcg@1": 0.0, "ndcg@3": (L3 + 0.5) / 3, "ndcg@5": (L3 + 0.5 + L5) / 3,
            "mrr@3": (1 / 2 + 1 / 3) / 3, "mrr": (1 / 2 + 1 / 3 + 1 / 4) / 3,  # 5/18 and 13/36
        },
        id="ties-rank-2-to-4",
    ),
    pytest.param(
        # constant row, items 4 and 5 seen: the target ties with items 1, 3, 6 -> rank uniform on {1..4}
        [1.0] * 7, 2, [4, 5], 0, 3,
        {"hr@1": 1 / 4, "hr@2": 1 / 2, "hr@5": 1.0, "ndcg@2": (1 + L3) / 4,
         "mrr": (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4},  # 25/48
        id="constant-with-seen",
    ),
    pytest.param(
        # the target (2) is also in the seen set but is never removed; seen item 1 (0.9) is; item 3 beats it
        [0.0, 0.9, 0.2, 0.8], 2, [1, 2], 1, 0,
        {"hr@1": 0.0, "hr@2": 1.0, "ndcg@2": L3, "mrr": 0.5},
        id="target-seen-kept",
    ),
    pytest.param(
        # tie at the top between items 1 and 2: rank uniform on {1, 2}
        [-1.0, 0.7, 0.7], 2, None, 0, 1,
        {"hr@1": 0.5, "ndcg@1": 0.5, "ndcg@2": (1 + L3) / 2, "mrr@1": 0.5, "mrr": (1 + 1 / 2) / 2},
        id="tie-at-top",
    ),
]
# fmt: on


@pytest.mark.parametrize(("scores", "target", "seen", "greater", "ties", "expected"), HAND_CASES)
def test_hand_computed(scores, target, seen, greater, ties, expected) -> None:
    exclude = None if seen is None else [torch.tensor(seen)]
    g, t = rank_statistics(torch.tensor([scores]), torch.tensor([target]), exclude)
    assert (int(g[0]), int(t[0])) == (greater, ties)
    ks = sorted({int(name.split("@")[1]) for name in expected if "@" in name})
    got = metrics_from_rank_stats(g, t, ks)
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value, abs=1e-12), name


def _brute_force(greater: int, ties: int, k: int) -> tuple[float, float, float, float]:
    # average the per-rank gains over every rank the target can take
    ranks = range(greater + 1, greater + ties + 2)
    hr = np.mean([r <= k for r in ranks])
    ndcg = np.mean([(r <= k) / math.log2(r + 1) for r in ranks])
    mrr_k = np.mean([(r <= k) / r for r in ranks])
    mrr = np.mean([1 / r for r in ranks])
    return float(hr), float(ndcg), float(mrr_k), float(mrr)


def test_metrics_match_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    greater = torch.randint(0, 30, (200,), generator=gen)
    ties = torch.randint(0, 30, (200,), generator=gen) * torch.randint(0, 2, (200,), generator=gen)
    ks = (1, 3, 10, 25)
    got = metrics_from_rank_stats(greater, ties, ks)
    for row in range(200):
        for k in ks:
            hr, ndcg, mrr_k, mrr = _brute_force(int(greater[row]), int(ties[row]), k)
            assert got[f"hr@{k}"][row].item() == pytest.approx(hr, abs=1e-12)
            assert got[f"ndcg@{k}"][row].item() == pytest.approx(ndcg, abs=1e-12)
            assert got[f"mrr@{k}"][row].item() == pytest.approx(mrr_k, abs=1e-12)
        assert got["mrr"][row].item() == pytest.approx(mrr, abs=1e-12)
    assert list(got) == metric_names(ks)


@pytest.mark.parametrize("num_items", [7, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_constant_scorer_gets_random_expectation(num_items: int, dtype: torch.dtype) -> None:
    scores = torch.full((num_items, num_items + 1), 0.25, dtype=dtype)
    targets = torch.arange(1, num_items + 1)
    ks = (1, 5, 10)
    per_row = metrics_from_rank_stats(*rank_statistics(scores, targets), ks)
    for k in ks:
        cut = min(k, num_items)
        expected_ndcg = sum(1 / math.log2(r + 1) for r in range(1, cut + 1)) / num_items
        assert torch.allclose(per_row[f"hr@{k}"], torch.tensor(cut / num_items, dtype=torch.float64))
        assert torch.allclose(per_row[f"ndcg@{k}"], torch.tensor(expected_ndcg, dtype=torch.float64))
    harmonic = sum(1 / r for r in range(1, num_items + 1))
    assert summarise(per_row)["mrr"] == pytest.approx(harmonic / num_items, rel=1e-12)


def _tied_scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    # few distinct values so ties are common
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (rows, cols), generator=gen).float()


@pytest.mark.parametrize("padding_score", [1e30, -1e30, math.inf, -math.inf, 2.0])
def test_padding_column_is_never_ranked(padding_score: float) -> None:
    scores = _tied_scores(8, 12, seed=1)
    targets = torch.arange(1, 9)
    before = rank_statistics(scores, targets)
    scores[:, 0] = padding_score
    after = rank_statistics(scores, targets)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert int((before[0] + before[1]).max()) <= 10  # at most the 10 other real items compete


def _reference_stats(scores, targets, seen) -> tuple[list[int], list[int]]:
    greater, ties = [], []
    for row, target in enumerate(targets.tolist()):
        others = [i for i in range(1, scores.shape[1]) if i != target and i not in set(seen[row])]
        value = scores[row, target].item()
        greater.append(sum(scores[row, i].item() > value for i in others))
        ties.append(sum(scores[row, i].item() == value for i in others))
    return greater, ties


def test_exclude_formats_agree_with_reference() -> None:
    scores = _tied_scores(6, 9, seed=2)
    targets = torch.tensor([1, 2, 3, 8, 5, 4])
    seen = [[2, 3], [2, 7, 8], [], [1, 2, 3, 4, 5, 6, 7], [5], [6, 6, 1]]  # rows 1, 4 have seen their target
    as_list = [torch.tensor(s, dtype=torch.long) for s in seen]
    padded = torch.zeros(6, 8, dtype=torch.long)
    for row, items in enumerate(seen):
        padded[row, : len(items)] = torch.tensor(items, dtype=torch.long)
    mask = torch.zeros(6, 9, dtype=torch.bool)
    for row, items in enumerate(seen):
        mask[row, items] = True
    expected = _reference_stats(scores, targets, seen)
    for exclude in (as_list, seen, padded, mask):
        greater, ties = rank_statistics(scores, targets, exclude)
        assert (greater.tolist(), ties.tolist()) == expected
    # excluding can only remove competitors
    g_all, t_all = rank_statistics(scores, targets)
    assert bool((greater <= g_all).all() and (ties <= t_all).all())
    assert ties[3].item() == 0 and greater[3].item() == 0  # every other item seen: rank 1 for sure


def _chunks(targets, seen, sizes):
    start = 0
    for size in sizes:
        rows = torch.arange(start, start + size)
        yield EvalBatch(targets=targets[rows], seen=[seen[i] for i in rows.tolist()], inputs=rows)
        start += size


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_chunked_driver_equals_one_shot(exclude_seen: bool) -> None:
    num_items = 12
    scores = _tied_scores(10, num_items + 1, seed=3).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    targets = torch.randint(1, num_items + 1, (10,), generator=gen)
    seen = [torch.randint(1, num_items + 1, (int(n),), generator=gen) for n in range(10)]
    ks = (1, 5, 10)
    per_row = full_ranking_metrics(
        lambda batch: scores[batch.inputs],
        _chunks(targets, seen, [4, 4, 2]),
        num_items,
        ks,
        exclude_seen=exclude_seen,
    )
    one_shot = metrics_from_rank_stats(*rank_statistics(scores, targets, seen if exclude_seen else None), ks)
    assert set(per_row) == set(one_shot)
    for name, values in one_shot.items():
        assert isinstance(per_row[name], np.ndarray) and per_row[name].shape == (10,)
        np.testing.assert_allclose(per_row[name], values.numpy(), rtol=0, atol=1e-12)


def test_driver_sampled_is_deterministic_and_checks_protocol() -> None:
    num_items = 150
    scores = torch.randn(6, num_items + 1, generator=torch.Generator().manual_seed(5))
    targets = torch.arange(1, 7)
    seen = [torch.arange(10, 20)] * 6

    def run(seed: int) -> dict[str, np.ndarray]:
        return full_ranking_metrics(
            lambda batch: scores[batch.inputs],
            _chunks(targets, seen, [3, 3]),
            num_items,
            (10,),
            exclude_seen=True,
            sampled_negatives=100,
            seed=seed,
        )

    first, again = run(0), run(0)
    assert {"hr@10", "sampled_hr@10", "sampled_mrr"} <= set(first)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    with pytest.raises(ValueError, match="seen"):
        full_ranking_metrics(lambda b: scores[:2], [EvalBatch(targets[:2])], num_items, exclude_seen=True)
    with pytest.raises(ValueError, match="score_fn"):
        full_ranking_metrics(lambda b: scores[:2, :-1], [EvalBatch(targets[:2])], num_items, exclude_seen=False)


def test_sample_negatives_respects_exclusions_and_seed() -> None:
    rows, num_cols = 20, 200
    gen = torch.Generator().manual_seed(6)
    targets = torch.randint(1, num_cols, (rows,), generator=gen)
    seen = [torch.randint(1, num_cols, (int(n),), generator=gen) for n in torch.randint(0, 60, (rows,))]
    popularity = torch.rand(num_cols, generator=gen)
    popularity[::7] = 0.0  # never sampled
    for pop in (None, popularity):
        negatives = sample_negatives(targets, num_cols, 50, popularity=pop, exclude=seen, seed=7)
        assert negatives.shape == (rows, 50)
        for row in range(rows):
            drawn = set(negatives[row].tolist())
            assert len(drawn) == 50 and 0 not in drawn and targets[row].item() not in drawn
            assert not drawn & set(seen[row].tolist())
            if pop is not None:
                assert not any(item % 7 == 0 for item in drawn)
        again = sample_negatives(targets, num_cols, 50, popularity=pop, exclude=seen, seed=7)
        other = sample_negatives(targets, num_cols, 50, popularity=pop, exclude=seen, seed=8)
        assert torch.equal(negatives, again) and not torch.equal(negatives, other)
    heavy = torch.ones(num_cols)
    heavy[3] = 1e6
    drawn = sample_negatives(targets, num_cols, 5, popularity=heavy, seed=0)
    assert bool(((drawn == 3).any(dim=1) | (targets == 3)).all())  # popularity-proportional
    with pytest.raises(ValueError, match="eligible"):
        sample_negatives(torch.tensor([1]), 50, 100)


def test_sampled_metrics_constant_and_perfect_scorer() -> None:
    num_cols = 300
    targets = torch.arange(1, 9)
    constant = sampled_metrics(torch.zeros(8, num_cols), targets, ks=(1, 10), seed=0)
    assert torch.allclose(constant["sampled_hr@10"], torch.tensor(10 / 101, dtype=torch.float64))
    harmonic = sum(1 / r for r in range(1, 102))
    assert torch.allclose(constant["sampled_mrr"], torch.tensor(harmonic / 101, dtype=torch.float64))
    perfect = torch.zeros(8, num_cols)
    perfect[torch.arange(8), targets] = 1.0
    perfect[:, 0] = 5.0  # padding is never a candidate
    result = sampled_metrics(perfect, targets, ks=(1,), seed=0)
    assert all(bool((values == 1.0).all()) for values in result.values())


def test_metrics_monotone_in_k() -> None:
    scores = _tied_scores(40, 30, seed=9)
    targets = torch.randint(1, 30, (40,), generator=torch.Generator().manual_seed(10))
    ks = tuple(range(1, 21))
    full = metrics_from_rank_stats(*rank_statistics(scores, targets), ks)
    sampled = sampled_metrics(scores, targets, ks=ks, num_negatives=20, seed=0)
    for per_row, prefix in ((full, ""), (sampled, "sampled_")):
        for name in ("hr", "ndcg", "mrr"):
            stacked = torch.stack([per_row[f"{prefix}{name}@{k}"] for k in ks])
            assert bool((stacked.diff(dim=0) >= -1e-15).all()), name
            assert bool((stacked <= 1.0).all() and (stacked >= 0.0).all())
        assert bool((per_row[f"{prefix}mrr@20"] <= per_row[f"{prefix}mrr"] + 1e-15).all())


@pytest.mark.parametrize("column", [0, 2])
def test_nan_scores_raise(column: int) -> None:
    scores = torch.rand(2, 120)
    scores[1, column] = math.nan
    targets = torch.tensor([1, 3])
    with pytest.raises(ValueError, match="NaN"):
        rank_statistics(scores, targets)
    with pytest.raises(ValueError, match="NaN"):
        sampled_metrics(scores, targets)
    with pytest.raises(ValueError, match="NaN"):
        full_ranking_metrics(lambda b: scores, [EvalBatch(targets)], 119, exclude_seen=False)


@pytest.mark.parametrize("target", [0, 5, -1])
def test_targets_out_of_range_raise(target: int) -> None:
    with pytest.raises(ValueError, match="targets"):
        rank_statistics(torch.rand(1, 5), torch.tensor([target]))


def test_summarise_means_and_rejects_empty() -> None:
    assert summarise({"hr@1": torch.tensor([0.0, 1.0]), "mrr": np.array([0.5, 0.25])}) == {
        "hr@1": 0.5,
        "mrr": 0.375,
    }
    with pytest.raises(ValueError):
        summarise({"hr@1": np.array([])})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unmasked_fast_count_equals_the_masked_count(seed: int) -> None:
    """Without exclusions rank_statistics counts over all columns and takes padding and target back out."""
    scores = _tied_scores(64, 40, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    scores[:, 0] = torch.randint(-1, 5, (64,), generator=gen).float()  # padding sometimes ties or beats the target
    scores[::7] = -math.inf  # rows where every score, the target's too, is -inf
    targets = torch.randint(1, 40, (64,), generator=gen)
    fast = rank_statistics(scores, targets)
    masked = rank_statistics(scores, targets, [[] for _ in range(64)])
    assert torch.equal(fast[0], masked[0]) and torch.equal(fast[1], masked[1])
    assert fast[0].dtype == masked[0].dtype == torch.long


def test_freed_host_memory_is_kept_on_glibc() -> None:
    import platform

    from pipeline.cpu_memory import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
