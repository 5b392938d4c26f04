"""Epoch time and full-ranking time of every model, side by side in one run (issue 12's speed targets).

Each (code tree, model) case runs in its own process (own peak RSS): ``train()`` for ``--epochs`` epochs on a
prepared dataset (MLflow off, nothing resumed), timing the epochs after the first (each includes the full-ranking
validation of every user, as in a real run), then the trained model ranks every test user against the whole
catalogue once (``rank all``). Cases are interleaved ``--repeats`` times (A B A B ...) and each figure is the
median over all its timed epochs (rank all: over its repeats), so a drift of the machine's speed during the run
spreads over every case instead of favouring the ones measured first. ``--code OLD=/path/to/checkout`` adds another
code tree (e.g. a ``git worktree`` of an older commit) so before/after figures come from the same run.

    python benchmarks/epoch_speed.py --processed data/study/beauty/data/processed --threads 2 \\
        --set model.dropout=0.5 --set model.attn_dropout=0.5 --set train.eval_batch_size=1024

Run it on a quiet machine (nothing else training).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from child import run_child  # benchmarks/child.py (scripts run from their folder)

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "hymoerec": {"model.kind": "hymoerec", "model.moe.enabled": True},
    "sasrec": {"model.kind": "hymoerec", "model.moe.enabled": False},
    "gru4rec": {"model.kind": "gru4rec"},
    "narm": {"model.kind": "narm"},
    "bert4rec": {"model.kind": "bert4rec"},
    "mamba4rec": {"model.kind": "mamba4rec"},
    # bf16 autocast on the CPU (train.cpu_amp): the full-softmax matmuls dominate an epoch
    "hymoerec-bf16": {"model.kind": "hymoerec", "model.moe.enabled": True, "train.cpu_amp": True},
    "sasrec-bf16": {"model.kind": "hymoerec", "model.moe.enabled": False, "train.cpu_amp": True},
    # the study's dense-width-128 search point: a dense branch half SASRec's FFN width, so dense + experts ~ its FLOPs
    "hymoerec-dense128": {"model.kind": "hymoerec", "model.moe.enabled": True, "model.moe.dense_hidden": 128},
    # the same network under its study name (issue 26): dense 128 + top-2 of 8 experts of 64 = SASRec's FFN FLOPs
    "flop-matched": {"model.kind": "hymoerec", "model.moe.enabled": True, "model.moe.dense_hidden": 128},
}
CHILD = """
import json, sys, tempfile, time
from pathlib import Path
import pyarrow.parquet as pq
import torch
from pipeline.params import load_params
from pipeline.training.train import train
try:  # this tree's layout; an older tree (--code) had them in the trainer and training.data / training.log
    from pipeline.device import pick_device
    from pipeline.model.files import load_trained_model
    from pipeline.data.sequences import eval_split
    from pipeline.model.train_log import read_log
except ImportError:
    from pipeline.training.train import load_trained_model, pick_device
    from pipeline.training.data import eval_split
    from pipeline.training.log import read_log
from pipeline.evaluation.ranking import rank_split

tree, processed, threads, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
overrides = json.loads(sys.argv[5])
torch.set_num_threads(threads)
with tempfile.TemporaryDirectory() as tmp:
    params = load_params(f"{tree}/params.yaml", {
        **overrides, "preprocess.processed_dir": processed, "train.model_dir": tmp, "train.epochs": epochs,
        "train.patience": epochs, "train.resume": False, "mlflow.enabled": False, "train.device": "cpu",
    })
    train(params)
    log = read_log(Path(tmp) / "train_log.csv")
    seconds = [row["epoch_seconds"] for row in log]
    cpu_seconds = [row.get("epoch_cpu_seconds", float("nan")) for row in log]  # older trees did not log it
    model = load_trained_model(tmp, pick_device("cpu"))
    test = eval_split(pq.read_table(f"{processed}/test.parquet"), model.max_seq_len)
    start = time.perf_counter()
    rank_split(model, test, ks=(10, 20), exclude_seen=False, batch_size=params.train.eval_batch_size,
               device=torch.device("cpu"))
    print(json.dumps({"epoch_seconds": seconds, "epoch_cpu_seconds": cpu_seconds,
                      "rank_all_seconds": time.perf_counter() - start, "users": len(test)}))
"""


def measure(tree: Path, processed: Path, threads: int, epochs: int, overrides: dict) -> dict | None:
    out, peak_mib, code = run_child(
        CHILD, str(tree), str(processed), str(threads), str(epochs), json.dumps(overrides), pythonpath=str(tree)
    )
    if code:
        return None
    result = json.loads(out.strip().splitlines()[-1])
    cpu = result.get("epoch_cpu_seconds") or [float("nan")] * len(result["epoch_seconds"])
    timed = {"timed": result["epoch_seconds"][1:] or result["epoch_seconds"], "timed_cpu": cpu[1:] or cpu}
    return {**result, **timed, "peak_mib": peak_mib}


def combine(results: list[dict | None]) -> dict | None:
    """Median epoch over every timed epoch of every repeat; median rank-all time; largest peak."""
    if not results or any(r is None for r in results):
        return None
    return {
        "epoch": statistics.median(s for r in results for s in r["timed"]),
        "epoch_cpu": statistics.median(s for r in results for s in r["timed_cpu"]),
        "rank_all_seconds": statistics.median(r["rank_all_seconds"] for r in results),
        "peak_mib": max(r["peak_mib"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", type=Path, required=True, help="preprocess output folder of the dataset")
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--code", action="append", default=[], metavar="LABEL=PATH", help="another code tree")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override (YAML)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per case (the first is not counted)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all cases")
    args = parser.parse_args()
    import yaml

    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    trees = [("this", REPO)] + [(label, Path(path)) for label, _, path in (c.partition("=") for c in args.code)]
    processed = args.processed.resolve()
    cases = [(label, tree, model) for label, tree in trees for model in args.models]
    runs: dict[tuple[str, str], list[dict | None]] = {(label, model): [] for label, _, model in cases}
    for round_ in range(args.repeats):
        for label, tree, model in cases:
            result = measure(tree, processed, args.threads, args.epochs, {**overrides, **VARIANTS[model]})
            runs[label, model].append(result)
            print(f"round {round_ + 1} {label} {model}: {result and result['epoch_seconds']}", flush=True)
    rows = [(label, model, combine(results)) for (label, model), results in runs.items()]
    print(
        "\n| code | model | s / epoch (incl. validation) | × SASRec | CPU s / epoch | × SASRec (CPU s) | "
        "rank all users (s) | peak RSS (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, model, result in rows:
        if result is None:
            print(f"| {label} | {model} | failed | | | | | |")
            continue
        sasrec = next((r for lab, m, r in rows if lab == label and m == "sasrec" and r), None)
        ratio = f"{result['epoch'] / sasrec['epoch']:.3f}" if sasrec else "–"
        cpu_ratio = f"{result['epoch_cpu'] / sasrec['epoch_cpu']:.3f}" if sasrec else "–"
        print(
            f"| {label} | {model} | {result['epoch']:.2f} | {ratio} | {result['epoch_cpu']:.2f} | {cpu_ratio} | "
            f"{result['rank_all_seconds']:.2f} | {result['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
