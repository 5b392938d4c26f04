"""The ``train`` stage: next-item training with early stopping on validation NDCG@10 and exact resume.

Reproducibility contract: the data order of epoch ``e`` is a pure function of ``(seed, e)``, and every other
source of randomness (weights init, dropout, BERT4Rec masking, sampled negatives) lives in RNG states that the
end-of-epoch checkpoint stores. A run killed at any point and resumed from its last checkpoint therefore replays
exactly the steps the uninterrupted run would have taken and ends with identical weights and metrics.

DDP-ready: the epoch permutation is sliced by rank (``perm[rank::world]``) and only rank 0 writes files; under
``torchrun`` wrap the model in ``DistributedDataParallel`` before the loop (see the roadmap).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline.cpu_memory import keep_freed_memory
from pipeline.data.preprocess import PreprocessOutputs
from pipeline.errors import BadInputError
from pipeline.evaluation.metrics import summarise
from pipeline.evaluation.ranking import rank_split
from pipeline.io import atomic_path, file_digest, write_bytes_atomic, write_json_atomic
from pipeline.model import SequentialRecommender, build_model
from pipeline.model.config import ModelConfig
from pipeline.params import Params, ParamsError, from_dict
from pipeline.tracking.runs import RunLogger
from pipeline.training.data import eval_split, num_items, training_sequences
from pipeline.training.log import write_log

log = logging.getLogger(__name__)

SELECTION_METRIC = "ndcg@10"


@dataclass(frozen=True)
class TrainOutputs:
    model: Path  # best-on-validation weights (state_dict)
    config: Path  # everything needed to rebuild the model
    checkpoint: Path  # last epoch, for resume
    log: Path  # per-epoch metrics (DVC plots)

    @classmethod
    def under(cls, folder: str | Path) -> TrainOutputs:
        folder = Path(folder)
        return cls(folder / "model.pt", folder / "model.json", folder / "checkpoint.pt", folder / "train_log.csv")


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def pick_device(choice: str) -> torch.device:
    """The device to run on; on the CPU, freed tensor memory is also kept for reuse (:mod:`pipeline.cpu_memory`)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device is 'cuda' but no CUDA device is available: set train.device to auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(choice)
    if device.type == "cpu":
        keep_freed_memory()
    return device


def autocast_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA when ``train.amp`` is on; None (full float32) on CPU."""
    return torch.bfloat16 if (amp and device.type == "cuda") else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_fingerprint(params: Params) -> str:
    """Hash of everything a checkpoint depends on: a checkpoint from other params or data is never resumed."""
    splits = PreprocessOutputs.under(params.preprocess.processed_dir)
    payload = {
        "model": params.model.relevant(),  # settings of other model kinds do not invalidate a checkpoint
        "train": {
            k: v
            for k, v in dataclasses.asdict(params.train).items()
            if k not in ("resume", "device", "eval_batch_size", "model_dir")
        },
        "data": [file_digest(path) if path.exists() else "" for path in (splits.train, splits.valid)],
        "exclude_seen": params.evaluate.exclude_seen,  # changes the validation metric, hence model selection
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def train(params: Params) -> TrainOutputs:
    """Train ``params.model`` on the processed splits (resuming a matching checkpoint); returns the paths written.

    With ``mlflow.enabled`` the run is logged to MLflow (params, tags, one step per epoch, the files written) and
    its id is left in ``<model_dir>/mlflow_run.json`` for evaluate and register.
    """
    rank, _ = _distributed()
    device = str(pick_device(params.train.device))
    fingerprint = run_fingerprint(params)
    with RunLogger.for_training(params, fingerprint, device, rank=rank) as run:
        return _train(params, run, fingerprint)


def _train(params: Params, run: RunLogger, fingerprint: str) -> TrainOutputs:
    cfg = params.train
    processed = params.preprocess.processed_dir
    outputs = TrainOutputs.under(cfg.model_dir)
    device = pick_device(cfg.device)
    amp_dtype = autocast_dtype(cfg.amp, device)
    rank, world = _distributed()

    splits = PreprocessOutputs.under(processed)
    n_items = num_items(processed)
    sequences = training_sequences(pq.read_table(splits.train), params.model.max_seq_len, cfg.windows)
    valid = eval_split(pq.read_table(splits.valid), params.model.max_seq_len)
    if len(sequences.inputs) == 0:
        raise BadInputError("no training sequence has two or more items: nothing to learn from")

    seed_everything(cfg.seed)
    model = build_model(params.model, n_items).to(device)
    optimizer = torch.optim.AdamW(
        model.param_groups(cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=(0.9, 0.98), fused=device.type == "cuda"
    )
    steps_per_epoch = math.ceil(len(sequences.inputs) / world / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch * cfg.epochs))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    state, best_weights = TrainState(), None
    if cfg.resume and outputs.checkpoint.exists():
        loaded = _load_checkpoint(outputs.checkpoint, fingerprint, model, optimizer, scheduler, generator)
        if loaded is not None:
            state, best_weights = loaded
    if (
        state.epoch == 0
        and cfg.warm_start_from
        and warm_start(model, cfg.warm_start_from, params.model, splits.item_map)
    ):
        state.step = int(model.train_step)  # the loaded step: the MoE warm-up w(t) continues, it does not restart
    log.info(
        "training %s (%s, MoE %s) on %d sequences, %d items, device %s%s; %d parameters",
        params.model.kind,
        "causal" if params.model.kind != "bert4rec" else "cloze",
        "on" if params.model.uses_moe else "off",
        len(sequences.inputs),
        n_items,
        device,
        f", resumed after epoch {state.epoch}" if state.epoch else "",
        sum(p.numel() for p in model.parameters()),
    )

    lengths = (sequences.inputs > 0).sum(1)
    inputs_all = torch.from_numpy(sequences.inputs)
    targets_all = torch.from_numpy(sequences.targets)
    while state.epoch < cfg.epochs and state.bad_epochs < cfg.patience:
        epoch = state.epoch
        batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.length_buckets, rank, world)
        model.train()
        totals = {"loss": 0.0, "ce": 0.0, "lb": 0.0}
        last_stats: dict[str, float] = {}
        started = _now()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=rank != 0)
        for batch in bar:
            # positions are right-aligned, so dropping all-padding columns changes nothing but the cost;
            # one spare column lets BERT4Rec append the last target without losing the oldest item
            width = min(int(lengths[batch].max()) + 1, params.model.max_seq_len)
            index = torch.from_numpy(batch)
            x, y = inputs_all[index, -width:].to(device), targets_all[index, -width:].to(device)
            model.set_train_step(state.step)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model.training_loss(x, y, num_negatives=cfg.num_negatives, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            state.step += 1
            for key, value in (("loss", out.loss), ("ce", out.ce), ("lb", out.lb)):
                totals[key] += float(value.detach())
            last_stats = out.stats
            bar.set_postfix(loss=f"{float(out.loss.detach()):.4f}")
        n_batches = max(1, len(batches))
        metrics = summarise(
            rank_split(
                model,
                valid,
                ks=(10,),
                exclude_seen=params.evaluate.exclude_seen,
                batch_size=cfg.eval_batch_size,
                device=device,
                amp_dtype=amp_dtype,
            )
        )
        row = {
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": totals["loss"] / n_batches,
            "ce_loss": totals["ce"] / n_batches,
            "lb_loss": totals["lb"] / n_batches,
            "valid_hr@10": metrics["hr@10"],
            "valid_ndcg@10": metrics["ndcg@10"],
            "usage_entropy": _layer_mean(last_stats, "usage_entropy"),
            "alpha": _layer_mean(last_stats, "alpha"),
            "history_bias": float(model.history_bias.detach()) if model.history_bias is not None else float("nan"),
            "epoch_seconds": _now() - started,
        }
        state.history.append(row)
        state.epoch += 1
        improved = metrics[SELECTION_METRIC] > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = metrics[SELECTION_METRIC], epoch + 1, 0
        else:
            state.bad_epochs += 1
        log.info(
            "epoch %d: loss %.4f (lb %.4f)  valid HR@10 %.4f NDCG@10 %.4f%s  [%.1fs]",
            epoch + 1,
            row["train_loss"],
            row["lb_loss"],
            row["valid_hr@10"],
            row["valid_ndcg@10"],
            "  *best*" if improved else "",
            row["epoch_seconds"],
        )
        if improved:
            best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if rank == 0:
            _save_checkpoint(
                outputs.checkpoint, fingerprint, model, best_weights, optimizer, scheduler, generator, state
            )
            write_log(outputs.log, state.history)
            run.log_epoch(row)
    if rank == 0:
        _save_state_dict(outputs.model, best_weights if best_weights is not None else model.state_dict())
        write_json_atomic(
            outputs.config,
            {
                "model": params.model.relevant(),  # settings of other model kinds do not invalidate a checkpoint
                "num_items": n_items,
                "best_epoch": state.best_epoch,
                "best_valid_ndcg@10": state.best_metric,
                "epochs_run": state.epoch,
                "steps": state.step,
                "fingerprint": fingerprint,
                "item_catalogue": catalogue_fingerprint(splits.item_map),
                "device": str(device),
            },
        )
        write_log(outputs.log, state.history)
        run.log_training(params)
    log.info("best validation NDCG@10 %.4f at epoch %d", state.best_metric, state.best_epoch)
    return outputs


def catalogue_fingerprint(item_map: str | Path) -> str:
    """Hash of the raw item ids in id order: two models with equal fingerprints score the same items the same way."""
    raw = pq.read_table(item_map, columns=["raw_item_id"]).column("raw_item_id").cast("string")
    return hashlib.sha256("\n".join(raw.to_pylist()).encode()).hexdigest()[:16]


def warm_start(model: torch.nn.Module, source: str | Path, model_cfg: ModelConfig, item_map: str | Path) -> bool:
    """Load the best weights of the model in ``source`` when it has this architecture and item catalogue.

    A retrained catalogue (an item entered or left the k-core) changes what every embedding row means, so then the
    model trains from scratch; returns whether the weights were loaded.
    """
    outputs = TrainOutputs.under(source)
    if not (outputs.model.is_file() and outputs.config.is_file()):
        raise FileNotFoundError(f"train.warm_start_from={source}: no model.pt and model.json there")
    config = json.loads(outputs.config.read_text())
    if config.get("item_catalogue") != catalogue_fingerprint(item_map):
        log.info("warm start: %s was trained on another item catalogue; training from scratch", source)
        return False
    try:  # through ModelConfig, so a model.json written before a parameter existed gets that parameter's default
        same_architecture = from_dict(ModelConfig, config.get("model", {}), "model") == model_cfg
    except ParamsError:  # written by a newer version with parameters this one does not know
        same_architecture = False
    if not same_architecture:
        log.info("warm start: %s has another architecture; training from scratch", source)
        return False
    model.load_state_dict(torch.load(outputs.model, map_location="cpu", weights_only=True))
    log.info("warm start from %s (same architecture and item catalogue)", source)
    return True


def load_trained_model(model_dir: str | Path, device: torch.device | str = "cpu") -> SequentialRecommender:
    """The best weights of the run in ``model_dir`` (``model.pt`` + ``model.json``)."""
    outputs = TrainOutputs.under(model_dir)
    return load_model_files(outputs.model, outputs.config, device)


def load_model_files(
    weights: str | Path, config: str | Path, device: torch.device | str = "cpu"
) -> SequentialRecommender:
    """Rebuild the model from ``model.json`` and load ``model.pt`` (``weights_only=True``: no pickled code), eval mode.

    One loader for the evaluate stage and the served MLflow model, whose artifacts are separate files.
    """
    meta = json.loads(Path(config).read_text())
    model = build_model(from_dict(ModelConfig, meta["model"], "model"), int(meta["num_items"]))
    model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    return model.to(device).eval()


def epoch_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, bucket: bool, rank: int = 0, world: int = 1
) -> list[np.ndarray]:
    """This rank's batches of epoch ``epoch``: a pure function of ``(seed, epoch)``, hence exactly resumable.

    With ``bucket`` the shuffled rows are sorted by length within windows of 64 batches and the batches are then
    shuffled: batches of similar lengths waste little compute on padding (most of it on sparse data such as
    Amazon Beauty, where the median history is a few items) while the order stays random at the batch level.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if bucket:
        window = batch_size * 64
        order = np.concatenate(
            [
                part[np.argsort(lengths[part], kind="stable")]
                for part in np.split(order, range(window, len(order), window))
            ]
        )
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return [b[rank::world] for b in batches if len(b[rank::world])]


# ----------------------------------------------------------------------------------------------- helpers
def _lr_lambda(cfg: Any, total_steps: int):  # noqa: ANN202 - returns a closure for LambdaLR
    def factor(step: int) -> float:
        if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = min(1.0, (step - cfg.lr_warmup_steps) / max(1, total_steps - cfg.lr_warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _layer_mean(stats: dict[str, float], name: str) -> float:
    values = [v for k, v in stats.items() if k.endswith(f"/{name}")]
    return float(np.mean(values)) if values else float("nan")


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _now() -> float:
    return time.perf_counter()


def _save_state_dict(path: Path, weights: dict[str, torch.Tensor]) -> None:
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def _save_checkpoint(
    path: Path,
    fingerprint: str,
    model: torch.nn.Module,
    best_weights: dict[str, Any] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    state: TrainState,
) -> None:
    """Everything needed to continue exactly: weights, best weights so far, optimiser, scheduler, RNGs, state."""
    payload = {
        "fingerprint": fingerprint,
        "model": model.state_dict(),
        "best_model": best_weights,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(generator),
        "state": {**dataclasses.asdict(state), "history": json.dumps(state.history)},
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(
    path: Path,
    fingerprint: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
) -> tuple[TrainState, dict[str, Any] | None] | None:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("fingerprint") != fingerprint:
        log.warning("%s was written for other parameters or data; starting from scratch", path)
        return None
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    generator.set_state(rng["generator"])
    saved = payload["state"]
    state = TrainState(
        epoch=int(saved["epoch"]),
        step=int(saved["step"]),
        best_metric=float(saved["best_metric"]),
        best_epoch=int(saved["best_epoch"]),
        bad_epochs=int(saved["bad_epochs"]),
        history=json.loads(saved["history"]),
    )
    return state, payload.get("best_model")
