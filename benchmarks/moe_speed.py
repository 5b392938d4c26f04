"""Training-step time of HyMoERec per MoE routing kernel, against a dense SASRec step on the same batch.

One step = forward + backward + AdamW step with the full-catalogue next-item cross-entropy, the way the trainer
runs it. Models are timed round-robin (one step of each in turn) so background load drifts hit every row alike;
the table reports the median after the warm-up steps.

    python benchmarks/moe_speed.py                       # d=64, E=8, K=2, 2 layers, L=50, batch 256, 12,101 items
    python benchmarks/moe_speed.py --mean-len 9 --json out.json   # Beauty-like short histories (mostly padding)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from pipeline.model import ModelConfig, MoEConfig, build_model
from pipeline.model.moe import AUTO_IMPLEMENTATION

IMPLEMENTATIONS = ("loop", "grouped", "dense")


def make_batch(
    batch: int, seq_len: int, num_items: int, mean_len: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-padded histories; ``mean_len <= 0`` means every position is a real item (worst case)."""
    seqs = torch.randint(1, num_items + 1, (batch, seq_len + 1), generator=gen)
    if mean_len > 0:  # geometric lengths, as in Amazon review data (Beauty: ~8.9 interactions per user)
        lengths = torch.distributions.Geometric(probs=torch.tensor(1.0 / mean_len)).sample((batch,)) + 2
        lengths = lengths.clamp(max=seq_len + 1).long()
        seqs = torch.where(torch.arange(seq_len + 1) >= seq_len + 1 - lengths.unsqueeze(1), seqs, 0)
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    return inputs, torch.where(inputs > 0, targets, 0)


def model_config(args: argparse.Namespace, implementation: str | None) -> ModelConfig:
    moe = MoEConfig(
        enabled=implementation is not None,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_hidden=args.expert_hidden,
        dense_hidden=args.ffn_hidden,
        implementation=implementation or "auto",
    )
    return ModelConfig(
        kind="hymoerec",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=2,
        max_seq_len=args.seq_len,
        ffn_hidden=args.ffn_hidden,
        moe=moe,
    )


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    inputs, targets = make_batch(args.batch, args.seq_len, args.items, args.mean_len, torch.Generator().manual_seed(0))
    inputs, targets = inputs.to(device), targets.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    rows: dict[str, dict] = {}
    for name, impl in [("SASRec (MoE off)", None)] + [(f"HyMoERec {i}", i) for i in IMPLEMENTATIONS]:
        torch.manual_seed(0)
        model = build_model(model_config(args, impl), args.items).to(device).train()
        model.set_train_step(10**6)  # past the warm-up: alpha > 0 (the compute is the same either way)
        opt = torch.optim.AdamW(model.param_groups(0.01, 1e-3), lr=1e-3)
        rows[name] = {"model": model, "opt": opt, "times": [], "params": sum(p.numel() for p in model.parameters())}

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            out = model.training_loss(inputs, targets)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for i in range(args.warmup + args.iters):
        for row in rows.values():  # round-robin: load drifts hit every model alike
            elapsed = step(row["model"], row["opt"])
            if i >= args.warmup:
                row["times"].append(elapsed)

    base = statistics.median(rows["SASRec (MoE off)"]["times"])
    results = []
    for name, row in rows.items():
        med = statistics.median(row["times"])
        results.append(
            {
                "model": name,
                "ms_per_step": 1000 * med,
                "ms_min": 1000 * min(row["times"]),
                "ms_max": 1000 * max(row["times"]),
                "ratio_to_sasrec": med / base,
                "params": row["params"],
            }
        )
    real_fraction = (inputs > 0).float().mean().item()
    return {
        "results": results,
        "setup": {
            **vars(args),
            "real_token_fraction": real_fraction,
            "auto_implementation": AUTO_IMPLEMENTATION.get(device.type, "dense"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        },
    }


def markdown_table(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"device {setup['device_name']}, torch {setup['torch']}, {setup['threads']} threads; batch {setup['batch']}"
        f" x L={setup['seq_len']} ({100 * setup['real_token_fraction']:.0f}% real tokens), {setup['items']} items,"
        f" d={setup['hidden']}, E={setup['experts']}, K={setup['top_k']}, {setup['layers']} layers;"
        f" median of {setup['iters']} steps after {setup['warmup']} warm-up;"
        f" implementation=auto uses {setup['auto_implementation']} here",
        "",
        "| model | ms/step (median) | min-max | ratio to SASRec | parameters |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['model']} | {r['ms_per_step']:.1f} | {r['ms_min']:.0f}-{r['ms_max']:.0f} |"
            f" {r['ratio_to_sasrec']:.2f}x | {r['params']:,} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--items", type=int, default=12_101, help="catalogue size (Amazon Beauty: 12,101)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-hidden", type=int, default=64)
    parser.add_argument("--ffn-hidden", type=int, default=256, help="SASRec FFN = HyMoERec dense branch width")
    parser.add_argument(
        "--mean-len",
        type=float,
        default=0.0,
        help="mean history length (geometric); 0 = every position real (worst case)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print(markdown_table(report))
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(report, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")


if __name__ == "__main__":
    main()
