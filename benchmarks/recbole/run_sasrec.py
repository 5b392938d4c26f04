"""RecBole 1.2.1's SASRec on this project's Amazon Beauty splits, with the project's SASRec hyperparameters.

Run it with the RecBole virtualenv (``bash benchmarks/recbole/setup.sh`` creates it), never the project's:

    benchmarks/recbole/.venv/bin/python benchmarks/recbole/run_sasrec.py --seed 1 --threads 2
    benchmarks/recbole/.venv/bin/python benchmarks/recbole/run_sasrec.py --epochs 2      # smoke run

What it does:

1. Rebuilds every user's chronological sequence from the prepared splits (``test.history + [test.target]``),
   checks that ``train`` / ``valid`` are exactly its prefixes, and writes it as a RecBole atomic file
   ``<work>/dataset/beauty/beauty.inter`` (user, item, timestamp). Timestamps are synthesized as 0, 1, 2, ... per
   user from the sequence order, so RecBole's ``order: TO`` sort reproduces our order exactly.
2. Runs RecBole's SASRec with leave-one-out (``split: {LS: valid_and_test}``: last item = test, second to last =
   validation), full ranking over all items, HR/NDCG/MRR @10/@20, early stopping on validation NDCG@10 with
   patience 10. Before training it checks that RecBole's validation and test rows are our targets with our
   (last-50) histories, and that its training targets are exactly ours.
3. Times every epoch (training, validation, wall clock since the start of training) and writes a JSON report:
   per-epoch train seconds and validation NDCG@10, the best validation NDCG@10 and the wall time at which it was
   reached, and the test metrics of the best checkpoint.

Differences from the project's SASRec (pipeline/model/transformer.py, model.moe.enabled=false) that remain:

* Architecture: RecBole's SASRec is post-LN (BERT-style blocks: x = LN(x + drop(attn(x))), then
  LN(x + drop(ffn(x))), LayerNorm eps 1e-12) with a LayerNorm on the input embeddings and no final LayerNorm; ours
  is pre-LN with a final LayerNorm (GPT-2 style) and GPT-2's depth-scaled init of the residual projections. Both
  use ReLU in the FFN here (RecBole's default is GELU, set to ReLU below as in ours), learned positions, no
  sqrt(d) scaling of item embeddings, and an output layer tied to the item embeddings. RecBole's positions are
  left-aligned (position 0 = oldest item), ours right-aligned (most recent item = last position). Ours adds a
  learned score offset for items already in the history (model.history_bias, on by default); RecBole has none.
* Training samples: RecBole augments every prefix of a user's training sequence into its own sample and trains on
  the last position of each (each user with n training items gives n - 1 samples, ~131k for Beauty), whereas ours
  trains on one window per user (its last L + 1 items) with the loss at every position (train.windows: last).
  Both supervise (almost) every training target once per epoch, but RecBole runs ~6x more (shorter) sequences per epoch,
  so its epochs cost more and it takes more optimizer steps per epoch. This is RecBole's default and kept.
* Optimizer: RecBole's Adam without gradient clipping; ours AdamW (weight decay 0 here, so the same update) with
  gradient-norm clipping at 1.0. Batches: RecBole shuffles samples; ours buckets users by length.
* Speed: RecBole 1.2.1 leaves autograd anomaly detection on (see main); it is switched off here by default, which
  changes no number. RecBole pads every sample to 50 positions and uses its own attention (no SDPA).
* Evaluation: identical protocol (full ranking over all items, history items not excluded, padding id masked).
  RecBole reports Hit@k, which is our HR@k with one target per user.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA = REPO / "data/study/beauty/data/processed"
DATASET = "beauty"

# The project's SASRec on Beauty: params.yaml + pipeline/study/spec.yaml's beauty overrides, moe.enabled=false.
HYPERPARAMETERS = {
    "hidden_size": 64,  # model.hidden_size
    "inner_size": 256,  # model.ffn_hidden
    "n_layers": 2,  # model.num_layers
    "n_heads": 2,  # model.num_heads
    "hidden_dropout_prob": 0.5,  # model.dropout (beauty override)
    "attn_dropout_prob": 0.5,  # model.attn_dropout (beauty override)
    "hidden_act": "relu",  # our causal transformer uses ReLU (RecBole's default is GELU)
    "layer_norm_eps": 1e-12,  # RecBole's default (torch's and ours: 1e-5); kept
    "initializer_range": 0.02,  # as ours
    "MAX_ITEM_LIST_LENGTH": 50,  # model.max_seq_len
    "loss_type": "CE",  # full-catalogue softmax (train.num_negatives: 0)
    "train_neg_sample_args": None,  # no negative sampling (required by loss_type CE)
    "learner": "adam",
    "learning_rate": 0.001,  # train.lr
    "weight_decay": 0.0,  # train.weight_decay
    "train_batch_size": 256,  # train.batch_size
    "stopping_step": 10,  # train.patience
    "eval_step": 1,
    "clip_grad_norm": None,  # RecBole's default; ours clips at 1.0 (train.grad_clip)
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="processed split folder (train/valid/test.parquet)")
    p.add_argument("--work", type=Path, default=HERE / "work", help="RecBole's atomic files, logs and checkpoints")
    p.add_argument("--out", type=Path, default=None, help="JSON report (default: <work>/sasrec_seed<seed>.json)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--epochs", type=int, default=200, help="maximum epochs (early stopping usually ends sooner)")
    p.add_argument("--eval-batch-size", type=int, default=1024, help="users scored per validation/test batch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--anomaly-detection",
        action="store_true",
        help="keep autograd anomaly detection on, as importing RecBole's sequential models leaves it (slower, same "
        "numbers); by default it is switched off before training",
    )
    return p.parse_args(argv)


def read_sequences(data: Path) -> tuple[dict[int, list[int]], int]:
    """Every user's full chronological item sequence, checked against all three splits; and the item count."""
    import pyarrow.parquet as pq

    train = pq.read_table(data / "train.parquet", columns=["user_id", "item_ids"]).to_pydict()
    valid = pq.read_table(data / "valid.parquet", columns=["user_id", "history", "target"]).to_pydict()
    test = pq.read_table(data / "test.parquet", columns=["user_id", "history", "target"]).to_pydict()
    seqs = {u: [*h, t] for u, h, t in zip(test["user_id"], test["history"], test["target"], strict=True)}
    train_by_user = dict(zip(train["user_id"], train["item_ids"], strict=True))
    if not (len(seqs) == len(train_by_user) == len(valid["user_id"])):
        raise ValueError("train / valid / test do not hold the same users")
    for u, h, t in zip(valid["user_id"], valid["history"], valid["target"], strict=True):
        seq = seqs[u]
        if len(seq) < 3 or seq[:-2] != h or seq[-2] != t or train_by_user[u] != h:
            raise ValueError(f"user {u}: splits are not leave-one-out prefixes of one sequence")
    n_items = len(pq.read_table(data / "item_map.parquet", columns=["item_id"]))
    return seqs, n_items


def write_atomic_file(seqs: dict[int, list[int]], path: Path) -> None:
    """RecBole .inter file; timestamps 0, 1, 2, ... per user follow our sequence order (no ties)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in sorted(seqs):
            f.writelines(f"{u}\t{item}\t{t}\n" for t, item in enumerate(seqs[u]))
    tmp.replace(path)


def check_recbole_splits(train_data, valid_data, test_data, seqs: dict[int, list[int]], max_len: int) -> None:
    """RecBole's split rows must be ours: same targets, same (truncated) histories, same training targets."""
    import numpy as np

    ds = train_data._dataset
    uid, iid = ds.uid_field, ds.iid_field
    list_field, len_field = iid + ds.config["LIST_SUFFIX"], ds.config["ITEM_LIST_LENGTH_FIELD"]
    item_token = np.asarray(ds.field2id_token[iid]).astype(object)
    user_token = np.asarray(ds.field2id_token[uid]).astype(object)

    for name, loader, offset in (("valid", valid_data, 2), ("test", test_data, 1)):
        feat = loader._dataset.inter_feat
        users = user_token[feat[uid].numpy()].astype(int)
        targets = item_token[feat[iid].numpy()].astype(int)
        lists, lengths = feat[list_field].numpy(), feat[len_field].numpy()
        if len(users) != len(seqs) or len(set(users.tolist())) != len(seqs):
            raise AssertionError(f"RecBole {name}: {len(users)} rows, expected one per user ({len(seqs)})")
        for u, target, row, n in zip(users.tolist(), targets.tolist(), lists, lengths.tolist(), strict=True):
            seq = seqs[u]
            history = seq[: len(seq) - offset][-max_len:]
            if target != seq[-offset] or item_token[row[:n]].astype(int).tolist() != history:
                raise AssertionError(f"RecBole {name}: user {u} differs from our split")

    feat = train_data._dataset.inter_feat
    ours = sorted((u, item) for u, seq in seqs.items() for item in seq[1:-2])
    theirs = sorted(
        zip(
            user_token[feat[uid].numpy()].astype(int).tolist(),
            item_token[feat[iid].numpy()].astype(int).tolist(),
            strict=True,
        )
    )
    if ours != theirs:
        raise AssertionError(f"RecBole train: {len(theirs)} (user, target) samples differ from ours ({len(ours)})")


def patch_torch_load() -> None:
    """torch >= 2.6 defaults ``torch.load(weights_only=True)``; RecBole 1.2.1's checkpoint also pickles its Config.

    ``Trainer.evaluate(load_best_model=True)`` (the test at the end of training) then fails with an
    UnpicklingError. Restore the old default for calls that do not choose: the only file loaded here is the
    checkpoint this process has just written. Explicit ``weights_only=...`` arguments are left alone.
    """
    import torch

    original = torch.load

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return original(*args, **kwargs)

    torch.load = load


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch starts its thread pools
        os.environ[var] = str(args.threads)

    import numpy as np
    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    torch.set_num_threads(args.threads)
    patch_torch_load()

    work = args.work.resolve()
    out = (args.out or work / f"sasrec_seed{args.seed}.json").resolve()
    data = args.data.resolve()
    seqs, n_items = read_sequences(data)
    write_atomic_file(seqs, work / "dataset" / DATASET / f"{DATASET}.inter")
    os.chdir(work)  # RecBole writes log/ and log_tensorboard/ under the working directory

    config_dict = {
        **HYPERPARAMETERS,
        "data_path": str(work / "dataset"),
        "checkpoint_dir": str(work / "saved"),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)",  # the splits are already 5-core: no further filtering
        "item_inter_num_interval": "[0,inf)",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": [10, 20],
        "valid_metric": "NDCG@10",
        "metric_decimal_place": 6,
        "epochs": args.epochs,
        "eval_batch_size": args.eval_batch_size,
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": args.device == "cuda",
        "gpu_id": "0" if args.device == "cuda" else "",
        "worker": 0,
        "show_progress": False,
        "save_dataset": False,
        "save_dataloaders": False,
        "log_wandb": False,
    }
    sys.argv[1:] = []  # RecBole's Config also parses --key=value command-line arguments: ours are not for it
    config = Config(model="SASRec", dataset=DATASET, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)

    t_data = time.perf_counter()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    data_seconds = time.perf_counter() - t_data
    if dataset.item_num - 1 != n_items:  # RecBole counts its padding id 0
        raise AssertionError(f"RecBole sees {dataset.item_num - 1} items, the project {n_items}")
    check_recbole_splits(train_data, valid_data, test_data, seqs, config["MAX_ITEM_LIST_LENGTH"])

    init_seed(config["seed"], config["reproducibility"])  # as run_recbole: model init independent of data order
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    # get_model imports recbole.model.sequential_recommender, whose sine.py (the SINE model) runs
    # torch.autograd.set_detect_anomaly(True) at import: a debugging mode, on for every RecBole model trained in the
    # process. It checks every backward output for NaN and records forward stack traces (~45% of a SASRec training
    # step's CPU time here) without changing any number, so it is switched off unless --anomaly-detection.
    anomaly_as_shipped = torch.is_anomaly_enabled()
    torch.autograd.set_detect_anomaly(args.anomaly_detection)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    # per-epoch timing around RecBole's own epoch functions (its log prints the same train/eval times)
    epochs: list[dict] = []
    clock = {"t0": 0.0}
    train_epoch, valid_epoch = trainer._train_epoch, trainer._valid_epoch

    def timed_train_epoch(train_data, epoch_idx, *a, **kw):
        start = time.perf_counter()
        loss = train_epoch(train_data, epoch_idx, *a, **kw)
        end = time.perf_counter()
        loss = float(sum(loss) if isinstance(loss, tuple) else loss)
        epochs.append({"epoch": epoch_idx + 1, "train_seconds": end - start, "train_loss": loss})
        return loss

    def timed_valid_epoch(valid_data, *a, **kw):
        start = time.perf_counter()
        score, result = valid_epoch(valid_data, *a, **kw)
        end = time.perf_counter()
        epochs[-1].update(
            valid_seconds=end - start,
            valid_ndcg10=float(result["ndcg@10"]),
            wall_seconds=end - clock["t0"],
            valid={k: float(v) for k, v in result.items()},
        )
        return score, result

    trainer._train_epoch, trainer._valid_epoch = timed_train_epoch, timed_valid_epoch

    clock["t0"] = time.perf_counter()
    best_score, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    fit_seconds = time.perf_counter() - clock["t0"]
    t_test = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    test_seconds = time.perf_counter() - t_test

    best = max(epochs, key=lambda e: (e["valid_ndcg10"], -e["epoch"]))  # first epoch reaching the maximum
    report = {
        "tool": f"RecBole {recbole.__version__} SASRec",
        "data": str(data),
        "users": len(seqs),
        "items": n_items,
        "train_samples": len(train_data._dataset),
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "device": str(config["device"]),
        "max_epochs": args.epochs,
        "hyperparameters": {**HYPERPARAMETERS, "eval_batch_size": args.eval_batch_size},
        "versions": {"recbole": recbole.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "python": platform.python_version(),
        "anomaly_detection": torch.is_anomaly_enabled(),
        "anomaly_detection_as_shipped": anomaly_as_shipped,
        "data_prep_seconds": data_seconds,
        "epochs_run": len(epochs),
        "stopped_early": len(epochs) < args.epochs,
        "fit_seconds": fit_seconds,
        "best_epoch": best["epoch"],
        "best_valid_ndcg10": best["valid_ndcg10"],
        "wall_seconds_to_best": best["wall_seconds"],
        "recbole_best_valid_score": float(best_score),
        "valid_at_best": {k: float(v) for k, v in (best_valid or {}).items()},
        "test": {k: float(v) for k, v in test_result.items()},
        "test_seconds": test_seconds,
        "epochs": epochs,
        "checkpoint": trainer.saved_model_file,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: v for k, v in report.items() if k not in ("epochs", "hyperparameters", "valid_at_best")}
    summary["epochs"] = [
        {k: round(e[k], 4) if isinstance(e[k], float) else e[k] for k in e if k != "valid"} for e in epochs
    ]
    print(json.dumps(summary, indent=2))
    print(f"report written to {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
