"""The study's pictures: test NDCG@10 per bucket for every model side by side, and HyMoERec's expert load."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.evaluation import plots as run_plots

if TYPE_CHECKING:
    from pipeline.study.report import Variant

BUCKETS = (
    ("test_by_target_popularity", ("head", "mid", "tail"), "target item popularity (thirds of training interactions)"),
    ("test_by_history_length", ("short", "medium", "long"), "user history length (tertiles)"),
)


def draw(dataset: str, variants: list[Variant], folder: Path) -> list[Path]:
    """Write the dataset's PNGs under ``folder``; returns their paths (those with something to show)."""
    finished = [v for v in variants if v.records]
    if not finished:
        return []
    written = [bucket_comparison(dataset, finished, folder / f"{dataset}-buckets.png")]
    moe = next((v for v in finished if v.name == "hymoerec"), None)
    if moe is not None and moe.records[0]["expert_load"].get("layers"):
        # expert ids are arbitrary per seed, so seeds are not averaged: the first seed's load is shown
        path = folder / f"{dataset}-experts-seed{moe.records[0]['seed']}.png"
        run_plots.expert_heatmap(moe.records[0]["expert_load"], path)
        written.append(path)
    return written


def bucket_comparison(dataset: str, variants: list[Variant], out: Path) -> Path:
    plt = run_plots.plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
    width = 0.8 / len(variants)
    for ax, (key, names, title) in zip(axes, BUCKETS, strict=True):
        x = np.arange(len(names))
        for index, variant in enumerate(variants):
            values = np.array([[r["metrics"][key][n].get("ndcg@10", np.nan) for n in names] for r in variant.records])
            spread = values.std(axis=0, ddof=1) if len(values) > 1 else None
            ax.bar(
                x + (index - (len(variants) - 1) / 2) * width,
                values.mean(axis=0),
                width,
                yerr=spread,
                capsize=2,
                label=f"{variant.label} ({len(values)} seed{'s' if len(values) > 1 else ''})",
            )
        ax.set_xticks(x, names)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test NDCG@10")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{dataset}: where each model scores (mean ± std over seeds)")
    fig.tight_layout()
    run_plots.save(fig, out)
    return out
