"""One FFN layer step (forward + backward) of SASRec's FFN against HyMoERec's hybrid MoE, each routing kernel.

Why: a HyMoERec epoch costs more than SASRec's (BENCHMARKS.md §2e); this isolates the layer that differs. The
cases are interleaved over ``--rounds`` rounds of ``--steps`` steps each in one process and the median round is
reported, so a drift of the machine's speed spreads over every case. Tokens default to a Beauty training step
(batch 256, about 9 real items per window); the MoE uses the project's default settings (E = 8, K = 2, expert
width 64, dense branch 256) after its warm-up (alpha fully on).

    .venv/bin/python benchmarks/moe_layer.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pipeline.model.config import MoEConfig
from pipeline.model.moe import FeedForward, HybridMoE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2300, help="real tokens per step")
    parser.add_argument("--d", type=int, default=64, help="hidden size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d, requires_grad=True)
    cfg = MoEConfig()
    moe = HybridMoE(args.d, cfg, dropout=0.5).train()
    ffn = FeedForward(args.d, cfg.dense_hidden, 0.5).train()

    def step(layer: Callable[[torch.Tensor], object]) -> None:
        out = layer(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    cases: dict[str, Callable[[], None]] = {"SASRec FFN (256)": lambda: step(ffn)}
    for kernel in ("grouped", "loop", "dense"):
        layer = lambda z, k=kernel: moe(z, step=cfg.warmup_steps, implementation=k)  # noqa: E731
        cases[f"hybrid MoE, {kernel}"] = lambda layer=layer: step(layer)
    for run in cases.values():  # warm-up: allocator, kernels
        run()
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                run()
            timings[name].append((time.perf_counter() - started) / args.steps * 1000)
    base = statistics.median(timings["SASRec FFN (256)"])
    print(f"{args.tokens} tokens, d = {args.d}, {args.threads} thread(s), median of {args.rounds} rounds\n")
    print("| layer | ms / step (fwd + bwd) | × SASRec FFN |\n|---|---:|---:|")
    for name, values in timings.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f} |")


if __name__ == "__main__":
    main()
