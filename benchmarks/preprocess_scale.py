"""Scale benchmark of the data stages: N synthetic events -> interactions.parquet -> Parquet sequences.

Each stage runs in a child process so its peak RSS is its own (``ru_maxrss`` of the child), exactly as under
``dvc repro``. Usage: ``python benchmarks/preprocess_scale.py --events 10000000 [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGE_SCRIPT = """
import sys, time
from pipeline.params import DataParams, PreprocessParams, SyntheticParams
stage, work, n_users, n_items = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
if stage == "download":
    from pipeline.data.download import download
    synthetic = SyntheticParams(n_users=n_users, n_items=n_items, mean_events_per_user=40.0, n_categories=200, seed=1)
    download(DataParams(dataset="synthetic", interim_dir=work + "/interim", synthetic=synthetic))
else:
    from pipeline.data.preprocess import preprocess
    preprocess(PreprocessParams(processed_dir=work + "/processed"), work + "/interim")
print(time.perf_counter() - start)
"""


def run_stage(stage: str, work: str, n_users: int, n_items: int) -> dict[str, float]:
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", STAGE_SCRIPT, stage, work, str(n_users), str(n_items)],
        stdout=subprocess.PIPE,
        text=True,
    )
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the max over all children
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"{stage} failed with exit code {child.returncode}")
    stage_s = float(stdout.strip().splitlines()[-1])
    return {"stage_s": stage_s, "process_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="approximate number of events")
    parser.add_argument("--items", type=int, default=100_000, help="catalogue size")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    n_users = max(1, args.events // 40)
    with tempfile.TemporaryDirectory() as work:
        results = {stage: run_stage(stage, work, n_users, args.items) for stage in ("download", "preprocess")}
        stats = json.loads((Path(work) / "processed" / "stats.json").read_text())
    results["events_in"] = stats["filtering"]["input"]
    results["events_out"] = stats["events"]
    print("| stage | in-stage time (s) | process wall (s) | peak RSS (MiB) |\n|---|---|---|---|")
    for stage in ("download", "preprocess"):
        r = results[stage]
        print(f"| {stage} | {r['stage_s']:.2f} | {r['process_s']:.2f} | {r['peak_rss_mib']:.0f} |")
    print(f"events in: {results['events_in']:,}; after 5-core: {results['events_out']:,}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
