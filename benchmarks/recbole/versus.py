"""Wall time to RecBole's best validation NDCG@10: the project's SASRec and RecBole 1.2.1's, side by side in one run.

Issue 12's target: the project reaches RecBole's best validation NDCG@10 in ≤ 0.1× the wall time RecBole needs to
reach it. Each side trains in its own process with the same number of torch threads (``--threads``), on the same
Beauty splits (the study's prepared data), seed, hyperparameters and full-ranking validation after every epoch.
By default the two run one after the other (ours first, it is the short one), each alone on the quiet machine;
``--concurrent`` starts both at once instead, for ``--threads 1`` on a 2-core machine (one core each: half the wall
time of the pair, both slowed alike by the shared memory bandwidth). Nothing else may run meanwhile.

    bash benchmarks/recbole/setup.sh            # once: RecBole's own virtualenv
    .venv/bin/python benchmarks/recbole/versus.py --seed 1 --threads 2
    .venv/bin/python benchmarks/recbole/versus.py --variant sasrec-no-history-bias   # the paper's network
    .venv/bin/python benchmarks/recbole/versus.py --epochs 2                         # smoke run

Run it with the project's virtualenv from the repository root. Wall time counts from the first training step to the
end of an epoch's validation (both sides: the model build and RecBole's dataset preparation are not in it). The
project's side is the study's variant (``pipeline/study/spec.yaml``, default ``sasrec``) trained by ``train()``
with MLflow off and nothing resumed. Writes ``benchmarks/recbole/work/versus_<variant>_seed<k>.json`` and prints a
Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/child.py
from child import run_child  # noqa: E402

OURS = """
import json, logging, sys, tempfile
from pathlib import Path
import torch
from pipeline.evaluation.evaluate import EvaluateOutputs
from pipeline.model.train_log import read_log
from pipeline.stages import evaluate, train
from pipeline.study.plan import load_spec, plan, run_params
from pipeline.training.train import TrainOutputs

variant, work = sys.argv[1], sys.argv[4]
seed, threads, max_epochs = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])
torch.set_num_threads(threads)
logging.basicConfig(level=logging.INFO, format="%(asctime)s ours: %(message)s")  # progress on stderr
(run,) = plan(load_spec(), "beauty", variants=[variant], seeds=[seed])
with tempfile.TemporaryDirectory() as tmp:
    params = run_params(run, "params.yaml", Path(work), {
        "train.epochs": max_epochs, "train.model_dir": f"{tmp}/model", "evaluate.report_dir": f"{tmp}/reports",
        "train.resume": False, "mlflow.enabled": False,
    })
    train(params)
    evaluate(params)
    rows = read_log(TrainOutputs.under(params.train.model_dir).log)
    metrics = json.loads(EvaluateOutputs.under(params.evaluate.report_dir).metrics.read_text())
    print(json.dumps({"epochs": rows, "test": metrics["test"], "threads": torch.get_num_threads()}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="sasrec", help="the study's Beauty variant trained on our side")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    parser.add_argument("--concurrent", action="store_true", help="run both sides at once (default: one by one)")
    parser.add_argument("--epochs", type=int, default=200, help="maximum epochs of each side (both stop early)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "data/study", help="the study's prepared data")
    parser.add_argument("--recbole-python", type=Path, default=HERE / ".venv/bin/python")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def wall_to_reach(epochs: list[dict[str, float]], level: float) -> tuple[int, float] | None:
    """(epoch, wall seconds) at the end of the first epoch whose validation NDCG@10 is at least ``level``."""
    return next(((e["epoch"], e["wall_seconds"]) for e in epochs if e["valid_ndcg10"] >= level), None)


def our_curve(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Our train log as (epoch, validation NDCG@10, wall seconds since training started) like RecBole's report."""
    wall, curve = 0.0, []
    for row in rows:
        wall += row["epoch_seconds"]  # the epoch's steps and its validation
        curve.append({"epoch": int(row["epoch"]), "valid_ndcg10": row["valid_ndcg@10"], "wall_seconds": wall})
    return curve


def compare(ours: dict[str, Any], recbole: dict[str, Any]) -> dict[str, Any]:
    """The issue's ratio and what surrounds it: each side's best, and when each reached RecBole's best."""
    our_epochs = our_curve(ours["epochs"])
    level = recbole["best_valid_ndcg10"]
    our_best = max(our_epochs, key=lambda e: (e["valid_ndcg10"], -e["epoch"]))
    reached = wall_to_reach(our_epochs, level)
    return {
        "recbole_best_valid_ndcg10": level,
        "recbole_best_epoch": recbole["best_epoch"],
        "recbole_wall_to_best": recbole["wall_seconds_to_best"],
        "ours_best_valid_ndcg10": our_best["valid_ndcg10"],
        "ours_best_epoch": our_best["epoch"],
        "ours_wall_to_own_best": our_best["wall_seconds"],
        "ours_epoch_reaching_recbole_best": reached and reached[0],
        "ours_wall_to_recbole_best": reached and reached[1],
        "ratio_to_recbole_best": reached and reached[1] / recbole["wall_seconds_to_best"],
        "recbole_epoch_seconds": statistics.median(e["train_seconds"] + e["valid_seconds"] for e in recbole["epochs"]),
        "ours_epoch_seconds": statistics.median(row["epoch_seconds"] for row in ours["epochs"]),
        "ours_test": ours["test"],
        "recbole_test": recbole["test"],
    }


def table(result: dict[str, Any], variant: str, threads: int) -> str:
    ratio = result["ratio_to_recbole_best"]
    how = f"{threads} thread{'s' * (threads > 1)}"
    reached = (
        f"{result['ours_wall_to_recbole_best']:.0f} (epoch {result['ours_epoch_reaching_recbole_best']})"
        if ratio is not None
        else "never"
    )
    rows = [
        "| side | s / epoch (incl. validation) | best valid NDCG@10 (epoch) | wall s to own best | "
        "wall s to RecBole's best | × RecBole | test NDCG@10 | test HR@10 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| RecBole 1.2.1 SASRec ({how}) | {result['recbole_epoch_seconds']:.1f} | "
        f"{result['recbole_best_valid_ndcg10']:.4f} ({result['recbole_best_epoch']}) | "
        f"{result['recbole_wall_to_best']:.0f} | {result['recbole_wall_to_best']:.0f} | 1.00 | "
        f"{result['recbole_test']['ndcg@10']:.4f} | {result['recbole_test']['hit@10']:.4f} |",
        f"| this project, `{variant}` ({how}) | {result['ours_epoch_seconds']:.1f} | "
        f"{result['ours_best_valid_ndcg10']:.4f} ({result['ours_best_epoch']}) | "
        f"{result['ours_wall_to_own_best']:.0f} | {reached} | "
        f"{'–' if ratio is None else f'{ratio:.3f}'} | "
        f"{result['ours_test']['ndcg@10']:.4f} | {result['ours_test']['hr@10']:.4f} |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.recbole_python.exists():
        print(
            f"versus: no RecBole virtualenv at {args.recbole_python}: run bash benchmarks/recbole/setup.sh",
            file=sys.stderr,
        )
        return 2
    processed = (args.work_dir / "beauty/data/processed").resolve()
    if not (processed / "train.parquet").exists():
        print(f"versus: no prepared Beauty splits in {processed}: run the study once (python -m pipeline.study)")
        return 2
    work = HERE / "work"
    recbole_out = work / f"versus_recbole_seed{args.seed}.json"
    recbole_cmd = [
        str(args.recbole_python), str(HERE / "run_sasrec.py"), "--data", str(processed), "--seed", str(args.seed),
        "--threads", str(args.threads), "--epochs", str(args.epochs), "--out", str(recbole_out),
    ]  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    recbole_log = work / f"versus_recbole_seed{args.seed}.log"
    with recbole_log.open("w") as log_file:

        def start_recbole() -> subprocess.Popen:
            print(f"versus: RecBole starts (its log: {recbole_log})", file=sys.stderr, flush=True)
            return subprocess.Popen(recbole_cmd, stdout=log_file, stderr=subprocess.STDOUT)

        recbole = start_recbole() if args.concurrent else None
        ours_out, ours_peak_mib, ours_code = run_child(
            OURS, args.variant, str(args.seed), str(args.threads), str(args.work_dir.resolve()), str(args.epochs),
            pythonpath=str(REPO),
        )  # fmt: skip
        if ours_code and recbole:
            recbole.terminate()  # ours failed: no comparison to wait for
        elif not ours_code and recbole is None:
            recbole = start_recbole()
        recbole_code = recbole.wait() if recbole else None
    if ours_code or recbole_code:
        print(f"versus: failed (ours exit {ours_code}, RecBole exit {recbole_code}; its log: {recbole_log})")
        return 1
    ours = json.loads(ours_out.strip().splitlines()[-1])
    result = compare(ours, json.loads(recbole_out.read_text()))
    result |= {
        "variant": args.variant,
        "seed": args.seed,
        "threads": args.threads,
        "concurrent": args.concurrent,
        "ours_peak_mib": ours_peak_mib,
    }
    out = args.out or work / f"versus_{args.variant}_seed{args.seed}.json"
    out.write_text(json.dumps({**result, "ours_epochs": our_curve(ours["epochs"])}, indent=2) + "\n")
    print(table(result, args.variant, args.threads))
    print(f"\nfull report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
