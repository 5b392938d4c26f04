"""``python -m pipeline.study``: run the reproduction study (resumable) and write RESULTS.md from its MLflow runs.

python -m pipeline.study status                       # the plan and what is done, per dataset
python -m pipeline.study status --dataset ml-1m --jobs  # what is pending, as JOBS for benchmarks/gpu_study.sh
python -m pipeline.study run --dataset beauty --threads 1 &   # start it twice: two workers share the plan
python -m pipeline.study run --dataset beauty --group ablation --variants no-dense --seeds 1
python -m pipeline.study interim --dataset ml-1m       # unfinished runs' best weights so far (workers stopped)
python -m pipeline.study report                       # RESULTS.md + results/plots/*.png from MLflow
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.params import ParamsError
from pipeline.study.plan import RECORDS_DIR, SPEC_FILE, WORK_DIR, Run, load_spec, plan

log = logging.getLogger("pipeline.study")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.study", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file the runs start from")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="models, checkpoints, prepared data")
    parser.add_argument("--records", type=Path, default=RECORDS_DIR, help="folder of the committed run records")
    parser.add_argument("--spec", type=Path, default=SPEC_FILE, help="study definition (default: the project's)")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        ("run", "train + evaluate the pending runs"),
        ("status", "list the plan and its state"),
        ("interim", "evaluate unfinished runs' best weights so far (runs being trained are skipped)"),
    )
    for name, help_text in commands:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--dataset", action="append", help="study dataset (repeatable; default: all)")
        command.add_argument("--group", action="append", help="main | ablation (repeatable; default: all)")
        command.add_argument("--variants", nargs="+", help="only these variants")
        command.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    sub.choices["run"].add_argument("--threads", type=int, default=0, help="torch threads per worker (0: default)")
    sub.choices["status"].add_argument(
        "--jobs", action="store_true", help="only the pending runs, as a JOBS list for benchmarks/gpu_study.sh"
    )
    report = sub.add_parser("report", help="write RESULTS.md and its plots from the study's MLflow runs")
    report.add_argument("--out", type=Path, default=Path("RESULTS.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "report":
            from pipeline.study.report import write_report

            write_report(args.out, args.records, args.params, args.spec, args.work_dir)
            return 0
        spec = load_spec(args.spec)
        runs = [
            run
            for dataset in args.dataset or list(spec["datasets"])
            for run in plan(spec, dataset, groups=args.group, variants=args.variants, seeds=args.seeds)
        ]
        if args.command == "status" and args.jobs:
            pending = [r for r in runs if not r.record_path(args.records).exists()]
            print(",".join(f"{r.dataset} {r.variant} {r.seed}" for r in pending))
            return 0
        if args.command == "status":
            for run in runs:
                state = "done" if run.record_path(args.records).exists() else "pending"
                if state == "pending" and run.interim_record_path(args.records).exists():
                    state = "pending (interim result)"
                print(f"{run.dataset:8s} {run.group:9s} {run.name:28s} {state}")
            return 0
        if args.command == "interim":
            return record_interims(runs, args)
        return run_all(runs, args)
    except ParamsError as err:
        print(f"error: study: {err}", file=sys.stderr)
        return 2
    except (PipelineError, OSError) as err:
        print(f"error: study: {err}", file=sys.stderr)
        return 1


def run_all(runs: list[Run], args: argparse.Namespace) -> int:
    """Every pending run this worker can claim, in plan order; a failed run is reported and the next one starts."""
    import torch

    from pipeline.study.runner import execute

    if args.threads:
        torch.set_num_threads(args.threads)
    failed = []
    for run in runs:
        if run.record_path(args.records).exists():
            continue
        try:
            record = execute(run, args.params, args.work_dir, args.records)
        except (PipelineError, OSError, RuntimeError) as err:  # a bad run must not stop the rest of the study
            log.error("study: %s / %s failed: %s", run.dataset, run.name, err, exc_info=True)
            failed.append(run)
            continue
        if record is None:
            log.info("study: %s / %s is being run by another worker", run.dataset, run.name)
        else:
            log.info("study: %s / %s recorded in %s", run.dataset, run.name, record)
    if failed:
        log.error("study: %d run(s) failed: %s", len(failed), ", ".join(f"{r.dataset}/{r.name}" for r in failed))
    return 1 if failed else 0


def record_interims(runs: list[Run], args: argparse.Namespace) -> int:
    """An interim record for every selected run that is unfinished, not training and has a checkpoint here."""
    from pipeline.study.runner import record_interim

    recorded, failed = 0, []
    for run in runs:
        try:
            path = record_interim(run, args.params, args.work_dir, args.records)
        except (PipelineError, OSError, RuntimeError) as err:  # as in run_all: one bad run must not stop the rest
            log.error("study: %s / %s: no interim result: %s", run.dataset, run.name, err, exc_info=True)
            failed.append(run)
            continue
        if path is not None:
            recorded += 1
            log.info("study: interim result recorded in %s", path)
    log.info("study: %d interim result(s) recorded", recorded)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
