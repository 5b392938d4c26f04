"""Quality benchmark: train + evaluate several models and seeds on one prepared dataset, same protocol.

Each (model, seed) run gets its own model and report folder under ``--out``; a run whose ``metrics.json`` exists
is skipped and an interrupted one resumes from its checkpoint, so the benchmark can be stopped and continued.
Run the data stages first (e.g. ``dvc repro preprocess`` with ``data.dataset=beauty``), then for example::

    python benchmarks/quality.py --out benchmarks/results/beauty --seeds 1 2 3 \\
        --models hymoerec sasrec --set model.dropout=0.5 --threads 1

and ``python benchmarks/quality.py --out benchmarks/results/beauty --table`` prints the mean ± std table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.io import write_json_atomic
from pipeline.model.train_log import read_log
from pipeline.params import load_params

VARIANTS: dict[str, dict[str, Any]] = {
    "hymoerec": {"model.kind": "hymoerec", "model.moe.enabled": True},
    "sasrec": {"model.kind": "hymoerec", "model.moe.enabled": False},
    "gru4rec": {"model.kind": "gru4rec", "model.moe.enabled": False},
    "bert4rec": {"model.kind": "bert4rec", "model.moe.enabled": False},
    "narm": {"model.kind": "narm"},
    "mamba4rec": {"model.kind": "mamba4rec"},
}
REPORTED = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr")


def run(out: Path, model: str, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages import evaluate, train
    from pipeline.training.train import TrainOutputs

    folder = out / f"{model}-seed{seed}"
    done = folder / "reports" / "metrics.json"
    recorded = recorded_overrides(folder, overrides)
    if not done.exists():
        params = load_params(
            "params.yaml",
            {
                **overrides,
                **VARIANTS[model],
                "train.seed": seed,
                "train.model_dir": str(folder / "model"),
                "evaluate.report_dir": str(folder / "reports"),
            },
        )
        started = time.perf_counter()
        train(params)
        evaluate(params)
        (folder / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    metrics = json.loads(done.read_text())
    epoch_s = [row["epoch_seconds"] for row in read_log(TrainOutputs.under(folder / "model").log)]
    config = json.loads(TrainOutputs.under(folder / "model").config.read_text())
    return {
        "model": model,
        "seed": seed,
        "test": metrics["test"],
        "valid_ndcg@10": metrics["valid"]["ndcg@10"],
        "by_popularity": metrics["test_by_target_popularity"],
        "by_history": metrics["test_by_history_length"],
        "epochs": len(epoch_s),
        "best_epoch": config["best_epoch"],
        "epoch_seconds": statistics.median(epoch_s) if epoch_s else float("nan"),
        "overrides": recorded,
    }


def recorded_overrides(folder: Path, overrides: dict[str, Any]) -> dict[str, Any] | None:
    """The ``--set`` overrides a run folder was started with; other ones for the same folder are an error.

    Runs are resumed and skipped by folder name, so without this check a second command with other settings
    would silently label (or continue) results trained with the first one's. ``None``: the folder predates the
    record (started by an older version of this script), its settings are unknown here.
    """
    path = folder / "overrides.json"
    normalised = json.loads(json.dumps(overrides, sort_keys=True))
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != normalised:
            raise SystemExit(f"{folder} was started with --set {stored}, not {normalised}: use another --out")
        return stored
    if (folder / "model").exists():
        return None
    write_json_atomic(path, normalised)
    return normalised


def mean_std(values: list[float]) -> str:
    """``mean ± std`` over seeds; a single seed has no spread to show."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(out: Path) -> str:
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*-seed*/result.json")):
        result = json.loads(path.read_text())
        rows.setdefault(result["model"], []).append(result)
    lines = [
        "| model | seeds | " + " | ".join(m.upper() for m in REPORTED) + " | epochs (best) | s / epoch |",
        "|---" * (len(REPORTED) + 4) + "|",
    ]
    for model, results in rows.items():
        cells = [mean_std([r["test"][metric] for r in results]) for metric in REPORTED]
        epochs = ", ".join(f"{r['epochs']} ({r['best_epoch']})" for r in results)
        seconds = statistics.mean(r["epoch_seconds"] for r in results)
        lines.append(f"| {model} | {len(results)} | " + " | ".join(cells) + f" | {epochs} | {seconds:.1f} |")
    lines += ["", "Test NDCG@10 by bucket (mean ± std over seeds):", ""]
    groups = (("by_popularity", ("head", "mid", "tail")), ("by_history", ("short", "medium", "long")))
    lines.append("| model | " + " | ".join(f"{b} ({k[3:]})" for k, names in groups for b in names) + " |")
    lines.append("|---" * 7 + "|")
    for model, results in rows.items():
        cells = []
        for key, names in groups:
            for name in names:
                cells.append(mean_std([r[key][name].get("ndcg@10", float("nan")) for r in results]))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--models", nargs="+", default=["hymoerec", "sasrec"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--table", action="store_true", help="only print the table of finished runs")
    args = parser.parse_args()
    if not args.table:
        if args.threads:
            torch.set_num_threads(args.threads)
        overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
        args.out.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for model in args.models:
                result = run(args.out, model, seed, overrides)
                (args.out / f"{model}-seed{seed}" / "result.json").write_text(json.dumps(result, indent=2))
                print(
                    f"{model} seed {seed}: test NDCG@10 {result['test']['ndcg@10']:.4f} "
                    f"HR@10 {result['test']['hr@10']:.4f}",
                    flush=True,
                )
    print(table(args.out))


if __name__ == "__main__":
    main()
