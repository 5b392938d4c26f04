"""The ``train`` stage: next-item training with early stopping on validation NDCG@10 and exact resume.

Reproducibility contract: the data order of epoch ``e`` is a pure function of ``(seed, e)``, and every other
source of randomness (weights init, dropout, BERT4Rec masking, sampled negatives) lives in RNG states that the
end-of-epoch checkpoint stores. A run killed at any point and resumed from its last checkpoint therefore replays
exactly the steps the uninterrupted run would have taken and ends with identical weights and metrics.

Data-parallel under ``torchrun --nproc_per_node N -m pipeline train``: one model, wrapped in
DistributedDataParallel (gloo on the CPU, NCCL on CUDA); every global batch is split between the ranks
(``batch[rank::world]``) and the gradients averaged, rank 0 validates and shares the figures, and only rank 0
writes the checkpoint, ``model.pt``, ``model.json`` (with ``world_size``) and the log. A resumed run continues from
the last checkpoint as in one process (each rank then draws fresh dropout masks; exact replay is single-process).

Before the model is built, settings whose training cannot fit the device's memory are refused (:func:`check_memory`);
an epoch whose mean loss is not finite stops training with :class:`~pipeline.errors.TrainingDivergedError`, checked
at the epoch's one host sync, so no step waits for it (under torchrun on every rank's mean at once, so all ranks stop
together).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline.data.layout import PreprocessOutputs, num_items
from pipeline.data.sequences import eval_split, training_sequences
from pipeline.device import autocast_dtype, pick_device, setup_distributed
from pipeline.errors import BadInputError, PipelineError, TrainingDivergedError
from pipeline.evaluation.metrics import summarise
from pipeline.evaluation.ranking import rank_split
from pipeline.io import atomic_path, file_digest, write_json_atomic
from pipeline.model import build_model
from pipeline.model.config import TRANSFORMER_KINDS, ModelConfig
from pipeline.model.files import ModelFiles, save_weights
from pipeline.model.train_log import LOG_COLUMNS, train_log_path, write_log
from pipeline.params import Params, ParamsError, from_dict

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
        files = ModelFiles.under(folder)
        return cls(files.weights, files.config, folder / "checkpoint.pt", train_log_path(folder))


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# train settings added after checkpoints existed: left out of the fingerprint at their default (the behaviour the
# older checkpoints were trained with), so adding one does not restart every run in progress
NEW_AT_DEFAULT = {"cpu_amp": False}


def run_fingerprint(params: Params) -> str:
    """Hash of everything a checkpoint depends on: a checkpoint from other params or data is never resumed."""
    splits = PreprocessOutputs.under(params.preprocess.processed_dir)
    payload = {
        "model": params.model.relevant(),  # settings of other model kinds do not invalidate a checkpoint
        "train": {
            k: v
            for k, v in dataclasses.asdict(params.train).items()
            if k not in ("resume", "device", "eval_batch_size", "model_dir") and NEW_AT_DEFAULT.get(k, ...) != v
        },
        "data": [file_digest(path) if path.exists() else "" for path in (splits.train, splits.valid)],
        "exclude_seen": params.evaluate.exclude_seen,  # changes the validation metric, hence model selection
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainResult:
    """What the train stage did: the files it wrote and how training went (what tracking logs at the edge)."""

    outputs: TrainOutputs
    model_kind: str
    num_items: int
    parameters: int
    device: str
    fingerprint: str  # run_fingerprint: the params and data this model was trained on
    best_epoch: int
    best_valid_ndcg10: float
    epochs_run: int
    steps: int
    resumed_after_epoch: int  # 0 = trained from the start
    history: list[dict[str, float]]  # one row per epoch, as train_log.csv


EpochCallback = Callable[[dict[str, float]], None]


def train(params: Params, on_epoch: EpochCallback | None = None, fingerprint: str | None = None) -> TrainResult:
    """Train ``params.model`` on the processed splits (resuming a matching checkpoint); returns what it did.

    ``on_epoch`` receives each epoch's row of ``train_log.csv`` once the epoch's checkpoint is written (on rank 0):
    the entry points attach experiment tracking there, so this layer never imports it. ``fingerprint``: the
    :func:`run_fingerprint` of ``params`` when the caller has it already (it hashes the training data).
    """
    return Trainer(params, fingerprint).fit(on_epoch)


def write_best_so_far(params: Params) -> TrainResult:
    """``model.pt`` and ``model.json`` from the best weights in an unfinished run's last epoch checkpoint, without
    training on: a run longer than the time a machine is held can be evaluated as an interim result. Training later
    resumes from the same checkpoint (``train.resume``) and overwrites these files when it ends."""
    trainer = Trainer(params)
    if trainer.state.epoch == 0:
        raise PipelineError(
            f"{trainer.outputs.checkpoint}: no usable epoch checkpoint (missing, written for other parameters or "
            "data, or train.resume is off): nothing to take weights from; training will start this run afresh"
        )
    trainer.write_model()
    return trainer.result()


class TrainingLoss(torch.nn.Module):
    """The model's training loss as ``forward``: DistributedDataParallel synchronises the gradients of forward calls.

    Returns the loss tensor (what DDP traces); the whole :class:`LossOutput` is kept in ``last``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.last: Any = None

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.last = self.model.training_loss(inputs, targets, **kwargs)
        return self.last.loss


class Trainer:
    """One training run: set-up (data, model, optimiser, resume or warm start), then epochs until early stopping.

    Each step of an epoch is its own method (:meth:`train_epoch`, :meth:`validate`, :meth:`end_epoch`,
    :meth:`save_checkpoint`), so one can be read, tested or replaced without the others.
    """

    def __init__(self, params: Params, fingerprint: str | None = None) -> None:
        self.params = params
        self.cfg = cfg = params.train
        self.outputs = TrainOutputs.under(cfg.model_dir)
        self.fingerprint = fingerprint or run_fingerprint(params)
        self.rank, self.world = setup_distributed(cfg.device)  # (0, 1) unless started by torchrun
        self.device = pick_device(cfg.device)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device, cfg.cpu_amp)

        processed = params.preprocess.processed_dir
        self.splits = PreprocessOutputs.under(processed)
        self.num_items = num_items(processed)
        sequences = training_sequences(pq.read_table(self.splits.train), params.model.max_seq_len, cfg.windows)
        self.valid = eval_split(pq.read_table(self.splits.valid), params.model.max_seq_len)
        if len(sequences.inputs) == 0:
            raise BadInputError("no training sequence has two or more items: nothing to learn from")
        self.lengths = (sequences.inputs > 0).sum(1)
        self.inputs = torch.from_numpy(sequences.inputs)
        self.targets = torch.from_numpy(sequences.targets)
        check_memory(params, self.num_items, len(self.inputs), int(self.lengths.max()) + 1, self.device)

        seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = build_model(params.model, self.num_items).to(self.device)
        self.ddp: torch.nn.Module | None = None
        if self.world > 1:
            # gradients are averaged over the ranks in backward; top-K routing leaves some experts without a
            # gradient in a step, hence find_unused_parameters
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                TrainingLoss(self.model),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
            torch.manual_seed(cfg.seed * 1000 + self.rank)  # each rank its own dropout masks
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(cfg.weight_decay, cfg.lr),
            lr=cfg.lr,
            betas=(0.9, 0.98),
            fused=self.device.type == "cuda",
        )
        steps_per_epoch = math.ceil(len(sequences.inputs) / cfg.batch_size)  # every rank steps once per global batch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg, steps_per_epoch * cfg.epochs)
        )
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + self.rank)
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self._epoch_started = 0.0
        self._resume_or_warm_start()
        self.resumed_after_epoch = self.state.epoch

    def _resume_or_warm_start(self) -> None:
        cfg = self.cfg
        if cfg.resume and self.outputs.checkpoint.exists():
            loaded = _load_checkpoint(
                self.outputs.checkpoint, self.fingerprint, self.model, self.optimizer, self.scheduler, self.generator
            )
            if loaded is not None:
                self.state, self.best_weights = loaded
                if self.world > 1:  # the checkpoint holds rank 0's random state: give each rank its own again
                    torch.manual_seed(cfg.seed * 1000 + self.rank + 7919 * self.state.epoch)
                    self.generator.manual_seed(cfg.seed + self.rank + 7919 * self.state.epoch)
        if (
            self.state.epoch == 0
            and cfg.warm_start_from
            and warm_start(self.model, cfg.warm_start_from, self.params.model, self.splits.item_map)
        ):
            self.state.step = int(self.model.train_step)  # the MoE warm-up w(t) continues, it does not restart

    @property
    def done(self) -> bool:
        return self.state.epoch >= self.cfg.epochs or self.state.bad_epochs >= self.cfg.patience

    def fit(self, on_epoch: EpochCallback | None = None) -> TrainResult:
        params = self.params
        (log.info if self.rank == 0 else log.debug)(
            "training %s (%s, MoE %s) on %d sequences, %d items, device %s%s; %d parameters",
            params.model.kind,
            "causal" if params.model.kind != "bert4rec" else "cloze",
            "on" if params.model.uses_moe else "off",
            len(self.inputs),
            self.num_items,
            self.device,
            f", resumed after epoch {self.state.epoch}" if self.state.epoch else "",
            self.parameters,
        )
        while not self.done:
            row = self.train_epoch()
            row.update(self.validate())
            row["epoch_seconds"] = _now() - self._epoch_started
            row["epoch_cpu_seconds"] = time.process_time() - self._epoch_cpu_started
            self.end_epoch({column: row[column] for column in LOG_COLUMNS})  # the log's column order
            if self.rank == 0:
                self.save_checkpoint()
                if on_epoch is not None:
                    on_epoch(row)
        if self.rank == 0:
            self.write_model()
        if self.rank == 0:
            log.info("best validation NDCG@10 %.4f at epoch %d", self.state.best_metric, self.state.best_epoch)
        return self.result()

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def train_epoch(self) -> dict[str, float]:
        """One pass over this rank's batches of the epoch; returns the epoch's training columns of the log."""
        cfg, model, state, device = self.cfg, self.model, self.state, self.device
        epoch = state.epoch
        batches = epoch_batches(
            self.lengths, cfg.batch_size, cfg.seed, epoch, cfg.length_buckets, self.rank, self.world
        )
        model.train()
        # running sums stay on the device: one host sync per epoch, not three per step (a GPU step never waits)
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        out = None
        self._epoch_started = _now()  # epoch_seconds: the steps and the validation, as before the Trainer
        self._epoch_cpu_started = time.process_time()
        # a bar only on a terminal (disable=None): captured into a log (Airflow, nohup) it would be noise
        bar = tqdm(
            batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None if self.rank == 0 else True
        )
        for batch in bar:
            # positions are right-aligned, so dropping all-padding columns changes nothing but the cost;
            # one spare column lets BERT4Rec append the last target without losing the oldest item
            width = min(int(self.lengths[batch].max()) + 1, self.params.model.max_seq_len)
            index = torch.from_numpy(batch)
            x, y = self.inputs[index, -width:].to(device), self.targets[index, -width:].to(device)
            model.set_train_step(state.step)
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                if self.ddp is not None:  # through DDP's forward, so that backward averages the gradients
                    self.ddp(x, y, num_negatives=cfg.num_negatives, generator=self.generator)
                    out = self.ddp.module.last
                else:
                    out = model.training_loss(x, y, num_negatives=cfg.num_negatives, generator=self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            state.step += 1
            totals += torch.stack([v.detach().to(totals.dtype) for v in (out.loss, out.ce, out.lb)])
            if not bar.disable:  # a terminal is watching: its loss is worth a sync
                bar.set_postfix(loss=f"{float(out.loss.detach()):.4f}")
        n_batches = max(1, len(batches))
        means = totals / n_batches
        if self.world > 1:
            # every rank decides alike: a rank stopping on its own NaN would leave the others waiting in their next
            # collective (until NCCL's timeout). Sums of the ranks' means are finite only where every rank's is.
            everywhere = means.clone()
            torch.distributed.all_reduce(everywhere)
            means = torch.cat([means, everywhere / self.world])
        loss, ce, lb, *mean_of_ranks = means.tolist()  # the epoch's one host sync, which also tells divergence
        if not all(math.isfinite(value) for value in mean_of_ranks or [loss]):
            loss, ce, lb = mean_of_ranks or [loss, ce, lb]
            raise TrainingDivergedError(self._diverged(loss, ce, lb))
        last_stats = out.stats if out is not None else {}  # the epoch's last step, as logged before
        return {
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": loss,
            "ce_loss": ce,
            "lb_loss": lb,
            "usage_entropy": _layer_mean(last_stats, "usage_entropy"),
            "alpha": _layer_mean(last_stats, "alpha"),
            "history_bias": float(model.history_bias.detach()) if model.history_bias is not None else float("nan"),
        }

    def _diverged(self, loss: float, ce: float, lb: float) -> str:
        """The one line that stops a diverged run: the loss, what to change, and what is left on disk."""
        cfg, state = self.cfg, self.state
        if state.epoch == 0:
            left = "nothing was written for this run"
        else:  # the checkpoint of the last finished epoch holds the best weights so far
            left = (
                f"model.pt was not written; {self.outputs.checkpoint} holds epoch {state.epoch} and the best weights "
                f"so far (epoch {state.best_epoch}, valid NDCG@10 {state.best_metric:.4f})"
            )
        return (
            f"training diverged in epoch {state.epoch + 1}: the mean loss is {loss} (ce {ce}, lb {lb}); lower "
            f"train.lr ({cfg.lr:g}) or train.weight_decay ({cfg.weight_decay:g}), or clip gradients harder "
            f"(train.grad_clip {cfg.grad_clip:g}); {left}"
        )

    def validate(self) -> dict[str, float]:
        """Full-ranking HR@10 / NDCG@10 on the validation split (the model-selection metric).

        Under torchrun rank 0 validates and sends the figures to the others, so every rank takes the same
        early-stopping decision (the weights are the same on all ranks)."""
        if self.world > 1:
            figures = [self._validate() if self.rank == 0 else None]
            torch.distributed.broadcast_object_list(figures, src=0)
            return figures[0]
        return self._validate()

    def _validate(self) -> dict[str, float]:
        metrics = summarise(
            rank_split(
                self.model,
                self.valid,
                ks=(10,),
                exclude_seen=self.params.evaluate.exclude_seen,
                batch_size=self.cfg.eval_batch_size,
                device=self.device,
                amp_dtype=self.amp_dtype,
            )
        )
        return {"valid_hr@10": metrics["hr@10"], "valid_ndcg@10": metrics["ndcg@10"]}

    def end_epoch(self, row: dict[str, float]) -> bool:
        """Record the epoch and apply early stopping; keeps the best weights. Returns whether the epoch improved."""
        state = self.state
        state.history.append(row)
        state.epoch += 1
        value = row[f"valid_{SELECTION_METRIC}"]
        improved = value > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = value, state.epoch, 0
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            state.bad_epochs += 1
        (log.info if self.rank == 0 else log.debug)(
            "epoch %d: loss %.4f (lb %.4f)  valid HR@10 %.4f NDCG@10 %.4f%s  [%.1fs]",
            state.epoch,
            row["train_loss"],
            row["lb_loss"],
            row["valid_hr@10"],
            row["valid_ndcg@10"],
            "  *best*" if improved else "",
            row["epoch_seconds"],
        )
        return improved

    def save_checkpoint(self) -> None:
        """The end-of-epoch checkpoint (exact resume) and the log so far."""
        _save_checkpoint(
            self.outputs.checkpoint,
            self.fingerprint,
            self.model,
            self.best_weights,
            self.optimizer,
            self.scheduler,
            self.generator,
            self.state,
        )
        write_log(self.outputs.log, self.state.history)

    def write_model(self) -> None:
        """``model.pt`` (the best weights), ``model.json`` and the final log."""
        state = self.state
        save_weights(
            self.outputs.model, self.best_weights if self.best_weights is not None else self.model.state_dict()
        )
        write_json_atomic(
            self.outputs.config,
            {
                "model": self.params.model.relevant(),  # settings of other model kinds do not invalidate a checkpoint
                "num_items": self.num_items,
                "best_epoch": state.best_epoch,
                "best_valid_ndcg@10": state.best_metric,
                "epochs_run": state.epoch,
                "steps": state.step,
                "fingerprint": self.fingerprint,
                "item_catalogue": catalogue_fingerprint(self.splits.item_map),
                "device": str(self.device),
                "world_size": self.world,  # processes that trained it (torchrun), each on its share of every batch
                "weights_sha256": file_digest(self.outputs.model),  # the loader refuses any other model.pt
            },
        )
        write_log(self.outputs.log, state.history)

    def result(self) -> TrainResult:
        state = self.state
        return TrainResult(
            outputs=self.outputs,
            model_kind=self.params.model.kind,
            num_items=self.num_items,
            parameters=self.parameters,
            device=str(self.device),
            fingerprint=self.fingerprint,
            best_epoch=state.best_epoch,
            best_valid_ndcg10=state.best_metric,
            epochs_run=state.epoch,
            steps=state.step,
            resumed_after_epoch=self.resumed_after_epoch,
            history=list(state.history),
        )


def training_memory_bytes(model: ModelConfig, train: Any, num_items: int, sequences: int, width: int) -> int:
    """A rough lower estimate of the memory training needs: weights with their gradients and AdamW's two moments,
    and the largest tensors of one step (the scores over the catalogue, attention, the per-token activations of
    every layer) or of one validation chunk. Only the terms that grow with the settings are counted, so a run this
    refuses could never have trained; one it accepts may still be tight."""
    h, layers, tokens = model.hidden_size, model.num_layers, min(train.batch_size, sequences) * width
    items = num_items + 1
    ffn = active = model.ffn_hidden  # inner widths: of the FFN weights, of what one token computes
    if model.uses_moe:
        moe = model.moe
        ffn, active = (
            moe.dense_hidden + moe.num_experts * moe.expert_hidden,
            moe.dense_hidden + moe.top_k * moe.expert_hidden,
        )
    if model.kind == "narm":
        layers, ffn = model.narm.num_layers, 3 * model.narm.hidden_size
        active = ffn
    elif model.kind == "mamba4rec":  # the selective scan keeps expand * d * d_state values per position
        layers, ffn = model.mamba.num_layers, model.mamba.expand * h
        active = ffn * (model.mamba.d_state + 4)
    weights = items * h + layers * (4 * h * h + 2 * h * ffn)
    per_token = layers * (10 * h + 2 * active) + 2 * (train.num_negatives + 1 if train.num_negatives else items)
    attention = 2 * layers * model.num_heads * width if model.kind in TRANSFORMER_KINDS else 0
    step = tokens * (per_token + attention)
    validation = min(train.eval_batch_size, sequences) * items
    return 16 * weights + 4 * max(step, validation)


def check_memory(params: Params, num_items: int, sequences: int, width: int, device: torch.device) -> None:
    """Refuse settings whose training cannot fit the device's memory before anything is allocated: with them
    ``build_model`` or the first step would die of an allocation failure after minutes, or swap the host."""
    width = min(width, params.model.max_seq_len)
    need = training_memory_bytes(params.model, params.train, num_items, sequences, width)
    have = _device_memory(device)
    if need > have:
        raise ParamsError(
            f"training would need at least {need / 2**30:.1f} GiB ({num_items} items, model.hidden_size "
            f"{params.model.hidden_size}, model.num_layers {params.model.num_layers}, batches of "
            f"{params.train.batch_size} x {width} positions) but the {device.type} has {have / 2**30:.1f} GiB: "
            "lower model.hidden_size, the layer or FFN sizes, train.batch_size or model.max_seq_len"
        )


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
    try:  # through ModelConfig, so a model.json written before a parameter existed gets that parameter's default;
        # only the settings the network depends on count (model.json leaves the other kinds' sections out)
        saved = from_dict(ModelConfig, config.get("model", {}), "model")
        same_architecture = saved.relevant() == model_cfg.relevant()
    except ParamsError:  # written by a newer version with parameters this one does not know
        same_architecture = False
    if not same_architecture:
        log.info("warm start: %s has another architecture; training from scratch", source)
        return False
    model.load_state_dict(torch.load(outputs.model, map_location="cpu", weights_only=True))
    log.info("warm start from %s (same architecture and item catalogue)", source)
    return True


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
    # every rank gets a share of every batch, so all take the same number of steps (a batch smaller than the
    # world, the last one at most, is dropped under torchrun: a rank without rows would stall the others)
    return [b[rank::world] for b in batches if len(b) >= world]


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


def _now() -> float:
    return time.perf_counter()


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
