"""Which selective-scan kernel Mamba4Rec uses on the CPU: an own recursive-doubling scan, mambapy's Blelloch
``pscan`` (a maintained pure-PyTorch package) or the sequential loop, side by side in one run.

Each (kernel, shape) runs forward + backward of ``h_t = a_t h_{t-1} + b_t`` at Mamba4Rec's sizes (d_inner 128,
d_state 32) in its own process, so its peak RSS is its own; best of ``--repeats``. The doubling candidate, which
lost, lives here only. Usage: ``python benchmarks/mamba_scan.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from child import run_child  # benchmarks/child.py (scripts run from their folder)

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"beauty (B 256, L 50)": (256, 50), "ml-1m (B 64, L 200)": (64, 200)}
CHILD = """
import sys, time, torch
from mambapy.pscan import pscan
from pipeline.model.mamba4rec import _scan_sequential

def doubling(decay, drive):  # Hillis-Steele: log2(L) whole-tensor steps, new tensors each step
    length, offset = decay.shape[1], 1
    while offset < length:
        drive = torch.cat([drive[:, :offset], drive[:, offset:] + decay[:, offset:] * drive[:, :-offset]], dim=1)
        decay = torch.cat([decay[:, :offset], decay[:, offset:] * decay[:, :-offset]], dim=1)
        offset *= 2
    return drive

kernel, batch, length, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
decay = torch.rand(batch, length, 128, 32, generator=g) * 0.5 + 0.5
drive = torch.randn(batch, length, 128, 32, generator=g)
scan = {"doubling": doubling, "mambapy": pscan, "sequential": _scan_sequential}[kernel]
best = float("inf")
for _ in range(repeats):
    a, b = decay.clone().requires_grad_(), drive.clone().requires_grad_()
    start = time.perf_counter()
    scan(a, b).sum().backward()
    best = min(best, time.perf_counter() - start)
print(best)
"""


def run(kernel: str, batch: int, length: int, repeats: int) -> tuple[float, float] | None:
    out, peak_mib, code = run_child(CHILD, kernel, str(batch), str(length), str(repeats), pythonpath=str(REPO))
    return None if code else (float(out.strip().splitlines()[-1]), peak_mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    kernels = ("doubling", "mambapy", "sequential")
    print("| shape | " + " | ".join(f"{k}: s / peak MiB" for k in kernels) + " |")
    print("|---|" + "---:|" * len(kernels))
    for name, (batch, length) in SHAPES.items():
        cells = []
        for kernel in kernels:
            result = run(kernel, batch, length, args.repeats)
            cells.append("n/a" if result is None else f"{result[0]:.2f} / {result[1]:,.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
