"""The study's pictures: test NDCG@10 per bucket for every model side by side, and HyMoERec's expert load."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

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


Information = tuple[list[float], float]  # I(experts; label) per layer in bits, and H(label)


class LevelPoint(NamedTuple):
    """One heterogeneity level of the controlled experiment."""

    kinds: int
    gains: list[float]  # HyMoERec - SASRec test NDCG@10, one per seed both finished
    kind_info: Information | None
    popularity_info: Information | None


def heterogeneity(points: list[LevelPoint], out: Path) -> Path:
    """Left: HyMoERec − SASRec test NDCG@10 per number of user kinds (each seed a dot, the mean a line); right: the
    share of the label's entropy the routes carry, per layer, for the user's kind and the target's popularity."""
    plt = run_plots.plt
    fig, (gain_ax, info_ax) = plt.subplots(1, 2, figsize=(12, 4))
    kinds = [p.kinds for p in points]
    for p in points:
        gain_ax.scatter([p.kinds] * len(p.gains), p.gains, color="tab:blue", alpha=0.6)
    means = [float(np.mean(p.gains)) for p in points]
    gain_ax.plot(kinds, means, color="tab:blue", marker="o", label="mean over seeds")
    gain_ax.axhline(0.0, color="grey", linewidth=0.8)
    gain_ax.set_xticks(kinds)
    gain_ax.set_xlabel("kinds of user")
    gain_ax.set_ylabel("HyMoERec − SASRec test NDCG@10")
    gain_ax.set_title("gain of the experts")
    gain_ax.legend(fontsize=8)
    for name, style, field in (("user kind", "-", "kind_info"), ("target popularity", "--", "popularity_info")):
        measured = [(p.kinds, getattr(p, field)) for p in points]
        measured = [(k, m) for k, m in measured if m is not None and m[1] > 0]  # H = 0: one kind, nothing to know
        if not measured:
            continue
        for layer in range(len(measured[0][1][0])):
            info_ax.plot(
                [k for k, _ in measured],
                [m[0][layer] / m[1] for _, m in measured],
                style,
                marker="o",
                label=f"{name}, layer {layer + 1}",
            )
    info_ax.set_xticks(kinds)
    info_ax.set_xlabel("kinds of user")
    info_ax.set_ylabel("I(experts; label) / H(label)")
    info_ax.set_title("what the routes know")
    info_ax.grid(alpha=0.3)
    info_ax.legend(fontsize=8)
    fig.suptitle("synthetic users of one kind or several: HyMoERec against SASRec")
    fig.tight_layout()
    run_plots.save(fig, out)
    return out
