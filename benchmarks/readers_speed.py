"""Speed and memory of the readers on clean files: this tree against an earlier commit, side by side in one run.

The exact typing of raw fields (int64 range, timestamp window, line-numbered CSV parsing) must not make clean input
slow. Each (code version, format) pair runs in a child process (its own peak RSS), best of ``--repeats`` reads.
Usage: ``python benchmarks/readers_speed.py --rows 1000000 --baseline ceba4c0``.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from child import run_child  # benchmarks/child.py (scripts run from their folder)

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import sys, time
from pipeline.data.readers import read_custom, read_delimited
kind, path, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
columns = {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp"}
best = float("inf")
for _ in range(repeats):
    start = time.perf_counter()
    if kind == "u.data":
        result = read_delimited(path, ["user_id", "item_id", "rating", "timestamp"], "\\t")
    else:
        result = read_custom(path, columns)
    best = min(best, time.perf_counter() - start)
assert len(result.events) == result.total_rows, "a clean file must keep every row"
print(best)
"""


def write_inputs(folder: Path, rows: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    users = rng.integers(1, rows // 20 + 2, rows)
    items = rng.integers(1, 50_000, rows)
    stamps = 1_600_000_000 + np.sort(rng.integers(0, 10**7, rows))
    ratings = rng.integers(1, 6, rows)
    csv = folder / "log.csv"
    body = "\n".join(f"u{u},i{i},{t}" for u, i, t in zip(users, items, stamps, strict=True))
    csv.write_text("user_id,item_id,timestamp\n" + body + "\n")
    jsonl = folder / "log.jsonl"
    jsonl.write_text(
        "\n".join(
            f'{{"user_id": "u{u}", "item_id": "i{i}", "timestamp": {t}}}'
            for u, i, t in zip(users, items, stamps, strict=True)
        )
        + "\n"
    )
    udata = folder / "u.data"
    udata.write_text("\n".join(f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in zip(users, items, ratings, stamps, strict=True)))
    return {"custom csv": csv, "custom jsonl": jsonl, "u.data": udata}


def measure(code: Path, kind: str, path: Path, repeats: int) -> tuple[float, float]:
    reader = "u.data" if kind == "u.data" else "custom"
    stdout, peak_mib, exit_code = run_child(CHILD, reader, str(path), str(repeats), pythonpath=str(code))
    if exit_code:
        raise SystemExit(f"{kind} with the code in {code} failed")
    return float(stdout.strip().splitlines()[-1]), peak_mib


def export(ref: str, folder: Path) -> Path:
    """The ``pipeline`` package as it was at ``ref`` (git archive), for the side-by-side baseline."""
    archive = subprocess.run(["git", "archive", ref, "pipeline"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="git ref to compare against (e.g. the commit before a reader change)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        inputs = write_inputs(Path(work), args.rows)
        versions = {"this tree": REPO}
        if args.baseline:
            versions[args.baseline] = export(args.baseline, Path(tempfile.mkdtemp(dir=work)))
        print(f"{args.rows:,} rows, best of {args.repeats}")
        print("| format | " + " | ".join(f"{v}: s / peak MiB" for v in versions) + " | time ratio |")
        print("|---|" + "---:|" * (len(versions) + 1))
        for kind, path in inputs.items():
            figures = [measure(code, kind, path, args.repeats) for code in versions.values()]
            ratio = f"{figures[0][0] / figures[1][0]:.2f}x" if len(figures) > 1 else "-"
            cells = " | ".join(f"{s:.2f} / {mib:,.0f}" for s, mib in figures)
            print(f"| {kind} | {cells} | {ratio} |")


if __name__ == "__main__":
    main()
