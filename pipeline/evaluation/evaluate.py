"""The ``evaluate`` stage: full-ranking test metrics and *where* the gain comes from.

Protocol: every item except padding is a candidate, ties are resolved by their expected rank (a constant scorer
gets the random-ranking expectation), ``exclude_seen`` is a parameter and is reported with the metrics, and the
model was selected on validation NDCG@10 by the train stage; test data is only read here.

Beyond the overall figures it reports metrics per user bucket (tertiles of history length) and per target-item
popularity bucket (head / mid / tail: items ranked by training popularity, cut so that each bucket holds a third of
the training interactions), and the MoE expert load per layer per bucket, with PNG plots of all of it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.data.layout import PreprocessOutputs
from pipeline.data.sequences import EvalSplit, eval_split, history_lengths, item_popularity
from pipeline.device import autocast_dtype, pick_device
from pipeline.evaluation.metrics import summarise
from pipeline.evaluation.ranking import rank_split
from pipeline.io import write_json_atomic, write_parquet_atomic
from pipeline.model import SequentialRecommender
from pipeline.model.files import load_trained_model
from pipeline.model.train_log import train_log_path
from pipeline.params import Params

log = logging.getLogger(__name__)

USER_BUCKETS = ("short", "medium", "long")
ITEM_BUCKETS = ("head", "mid", "tail")


@dataclass(frozen=True)
class EvaluateOutputs:
    metrics: Path
    expert_load: Path
    per_user: Path
    curves_png: Path
    buckets_png: Path
    experts_png: Path

    @classmethod
    def under(cls, folder: str | Path) -> EvaluateOutputs:
        folder = Path(folder)
        return cls(
            folder / "metrics.json",
            folder / "expert_load.json",
            folder / "per_user.parquet",
            folder / "training_curves.png",
            folder / "bucket_metrics.png",
            folder / "expert_load.png",
        )


@dataclass(frozen=True)
class EvaluateResult:
    """What the evaluate stage wrote and found (``metrics`` is ``metrics.json``'s content)."""

    outputs: EvaluateOutputs
    metrics: dict[str, Any]
    expert_load: dict[str, Any]


def evaluate(params: Params) -> EvaluateResult:
    """Test (and validation) metrics of the trained model, by bucket, with expert load and plots.

    Tracking is not this stage's business: the entry points log the result (:mod:`pipeline.stages`).
    """
    cfg = params.evaluate
    outputs = EvaluateOutputs.under(cfg.report_dir)
    device = pick_device(params.train.device)
    amp_dtype = autocast_dtype(params.train.amp, device, params.train.cpu_amp)
    splits = PreprocessOutputs.under(params.preprocess.processed_dir)
    model = load_trained_model(params.train.model_dir, device)
    train_table = pq.read_table(splits.train)
    popularity = item_popularity(train_table, model.num_items)
    test_table = pq.read_table(splits.test)
    test = eval_split(test_table, model.max_seq_len)  # the length it was trained with, whatever params say now
    valid = eval_split(pq.read_table(splits.valid), model.max_seq_len)

    def rank(split: EvalSplit) -> dict[str, np.ndarray]:
        return rank_split(
            model,
            split,
            ks=cfg.ks,
            exclude_seen=cfg.exclude_seen,
            batch_size=params.train.eval_batch_size,
            device=device,
            amp_dtype=amp_dtype,
            sampled_negatives=cfg.sampled_negatives,
            popularity=popularity if cfg.sampled_distribution == "popularity" else None,
            seed=cfg.seed,
        )

    per_user = rank(test)
    valid_metrics = summarise(rank(valid))
    user_bucket = length_buckets(history_lengths(test_table))
    item_bucket_of = popularity_buckets(popularity)
    target_bucket = item_bucket_of[test.targets]
    metrics: dict[str, Any] = {
        "test": summarise(per_user),
        "valid": valid_metrics,
        "test_by_history_length": bucket_metrics(per_user, user_bucket, USER_BUCKETS),
        "test_by_target_popularity": bucket_metrics(per_user, target_bucket, ITEM_BUCKETS),
        "protocol": {
            "ranking": "full catalogue, padding never ranked, ties by expected rank",
            "exclude_seen": cfg.exclude_seen,
            "num_items": model.num_items,
            "test_users": len(test),
            "sampled_negatives": cfg.sampled_negatives,
            "selection": "best validation NDCG@10",
        },
    }
    load = expert_load(
        model,
        test,
        user_bucket,
        item_bucket_of,
        params.train.eval_batch_size,
        device,
        user_kind=synthetic_user_kinds(params, splits.user_map, test.users),
    )
    write_json_atomic(outputs.metrics, metrics)
    write_json_atomic(outputs.expert_load, load)
    columns = {
        "user_id": pa.array(test.users),
        "history_bucket": pa.array(np.array(USER_BUCKETS)[user_bucket]),
        "target_bucket": pa.array(np.array(ITEM_BUCKETS)[target_bucket]),
    }
    columns.update({name: pa.array(values) for name, values in per_user.items()})
    write_parquet_atomic(outputs.per_user, pa.table(columns))

    from pipeline.evaluation import plots

    plots.training_curves(train_log_path(params.train.model_dir), outputs.curves_png)
    plots.bucket_bars(metrics, outputs.buckets_png)
    plots.expert_heatmap(load, outputs.experts_png)
    log.info(
        "test HR@10 %.4f NDCG@10 %.4f MRR %.4f (valid NDCG@10 %.4f) over %d users, %d items%s",
        metrics["test"]["hr@10"],
        metrics["test"]["ndcg@10"],
        metrics["test"]["mrr"],
        valid_metrics["ndcg@10"],
        len(test),
        model.num_items,
        ", seen items excluded" if cfg.exclude_seen else "",
    )
    return EvaluateResult(outputs, metrics, load)


def length_buckets(lengths: np.ndarray) -> np.ndarray:
    """0/1/2 = short/medium/long by history-length tertiles (ties at a cut go to the lower bucket)."""
    cuts = np.quantile(lengths, [1 / 3, 2 / 3])
    return np.searchsorted(cuts, lengths, side="left").astype(np.int64)


def popularity_buckets(popularity: np.ndarray) -> np.ndarray:
    """Bucket per item id (0 head, 1 mid, 2 tail): by training popularity, each a third of the interactions.

    Items never seen in training are tail; index 0 (padding) is tail too and is never used.
    """
    counts = popularity[1:].astype(np.float64)
    order = np.argsort(-counts, kind="stable")
    share_before = (np.cumsum(counts[order]) - counts[order]) / max(counts.sum(), 1.0)
    bucket = np.full(len(popularity), 2, dtype=np.int64)
    bucket[order + 1] = np.minimum((share_before * 3).astype(np.int64), 2)
    bucket[1:][counts == 0] = 2
    return bucket


def bucket_metrics(per_user: dict[str, np.ndarray], bucket: np.ndarray, names: tuple[str, ...]) -> dict[str, Any]:
    result = {}
    for index, name in enumerate(names):
        mask = bucket == index
        # a bucket can be empty (e.g. most users share one history length, so two tertile cuts coincide)
        means = summarise({k: v[mask] for k, v in per_user.items()}) if mask.any() else {}
        result[name] = {"users": int(mask.sum()), **means}
    return result


def synthetic_user_kinds(params: Params, user_map: Path, users: np.ndarray) -> np.ndarray | None:
    """Each evaluated user's ground-truth kind (index into ``SEGMENTS``) on synthetic data; None on real data.

    The generator is seeded, so the segments are regenerated from the same settings rather than stored."""
    if params.data.dataset != "synthetic":
        return None
    from pipeline.data.synthetic import SEGMENTS, SyntheticConfig, generate_interactions

    _, generated = generate_interactions(SyntheticConfig(**dataclasses.asdict(params.data.synthetic)))
    kind_of_raw = dict(
        zip(generated["user_id"].to_pylist(), map(SEGMENTS.index, generated["segment"].to_pylist()), strict=True)
    )
    ids = pq.read_table(user_map)
    kind_of_id = np.zeros(int(pc.max(ids["user_id"]).as_py()) + 1, dtype=np.int64)
    kind_of_id[ids["user_id"].to_numpy()] = [kind_of_raw[int(raw)] for raw in ids["raw_user_id"].to_pylist()]
    return kind_of_id[users]


def mutual_information_bits(joint: np.ndarray) -> float:
    """I(label; expert) in bits from a ``[labels, experts]`` count table (0 when the table is empty)."""
    total = joint.sum()
    if total == 0:
        return 0.0
    p = joint / total
    expected = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nonzero = p > 0
    return max(0.0, float((p[nonzero] * np.log2(p[nonzero] / expected[nonzero])).sum()))  # no -1e-17 from rounding


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: one label gives 0.0, not -0.0


@torch.no_grad()
def expert_load(
    model: SequentialRecommender,
    split: EvalSplit,
    user_bucket: np.ndarray,
    item_bucket_of: np.ndarray,
    batch_size: int,
    device: torch.device,
    user_kind: np.ndarray | None = None,
) -> dict[str, Any]:
    """Where the experts' top-K assignments go, per layer: shares per user bucket and per input-item popularity
    bucket, and how much the routes tell about a label (``information``).

    Labels: the popularity bucket of the token's *target* (the item that follows it; the test item after the last
    position) and, on synthetic data, the user's ground-truth kind. Each of a token's K chosen experts counts once
    in a ``[label, expert]`` table; its mutual information I(label; expert) in bits, beside H(label), says how
    much the routing knows about the label (0: the experts ignore it).
    """
    probe = model.routing(torch.from_numpy(split.inputs[:1]).to(device))
    if probe is None:
        return {"layers": 0}
    n_layers, n_experts = len(probe), int(model.cfg.moe.num_experts)  # routing is only non-None with MoE
    by_user = np.zeros((n_layers, len(USER_BUCKETS), n_experts))
    by_item = np.zeros((n_layers, len(ITEM_BUCKETS), n_experts))
    by_target = np.zeros((n_layers, len(ITEM_BUCKETS), n_experts), dtype=np.int64)
    n_kinds = int(user_kind.max(initial=0)) + 1 if user_kind is not None else 0
    by_kind = np.zeros((n_layers, n_kinds, n_experts), dtype=np.int64)
    for start in range(0, len(split), batch_size):
        inputs = torch.from_numpy(split.inputs[start : start + batch_size]).to(device)
        routes = model.routing(inputs)
        items = split.inputs[start : start + batch_size]
        # inputs are left-padded, so every real position but the last is followed by a real item
        following = np.concatenate([items[:, 1:], split.targets[start : start + batch_size, None]], axis=1)
        labels = {
            "user": (by_user, np.broadcast_to(user_bucket[start : start + batch_size, None], items.shape)),
            "item": (by_item, item_bucket_of[items]),
            "target": (by_target, item_bucket_of[following]),
        }
        if user_kind is not None:
            labels["kind"] = (by_kind, np.broadcast_to(user_kind[start : start + batch_size, None], items.shape))
        for layer, route in enumerate(routes):
            experts = route.cpu().numpy()  # [B, L, K], -1 at padding
            real = experts >= 0
            e = experts[real]
            for table, label in labels.values():
                np.add.at(table[layer], (np.repeat(label[..., None], experts.shape[-1], -1)[real], e), 1)

    def shares(table: np.ndarray) -> list[list[list[float]]]:
        return (table / np.maximum(table.sum(-1, keepdims=True), 1)).round(5).tolist()

    def information(table: np.ndarray, names: list[str]) -> dict[str, Any]:
        return {
            "labels": names,
            "counts": table.tolist(),
            "mi_bits": [round(mutual_information_bits(layer), 5) for layer in table],
            "label_entropy_bits": round(entropy_bits(table[0].sum(1)), 5),
        }

    result = {
        "layers": n_layers,
        "experts": n_experts,
        "user_buckets": list(USER_BUCKETS),
        "item_buckets": list(ITEM_BUCKETS),
        "by_history_length": shares(by_user),
        "by_item_popularity": shares(by_item),
        "information": {"target_popularity": information(by_target, list(ITEM_BUCKETS))},
    }
    if user_kind is not None:
        from pipeline.data.synthetic import SEGMENTS

        result["information"]["user_kind"] = information(by_kind, list(SEGMENTS[: by_kind.shape[1]]))
    return result
