"""PNG figures a person would rather look at than read: training curves, bucket metrics, expert load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display (CI, Airflow workers)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402
from pipeline.model.train_log import read_log  # noqa: E402


def save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def training_curves(log_path: Path, out: Path) -> None:
    rows = read_log(log_path)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    if rows:
        epoch = [r["epoch"] for r in rows]
        axes[0].plot(epoch, [r["ce_loss"] for r in rows])
        axes[0].set_title("next-item cross-entropy")
        axes[1].plot(epoch, [r.get("lb_loss", 0.0) for r in rows], color="tab:orange")
        axes[1].set_title("load-balance loss")
        axes[2].plot(epoch, [r["valid_hr@10"] for r in rows], label="HR@10")
        axes[2].plot(epoch, [r["valid_ndcg@10"] for r in rows], label="NDCG@10")
        axes[2].set_title("validation (full ranking)")
        axes[2].legend()
        entropy = [r.get("usage_entropy", float("nan")) for r in rows]
        if not np.all(np.isnan(entropy)):
            axes[3].plot(epoch, entropy, label="expert-usage entropy (normalised)")
            axes[3].plot(epoch, [r.get("alpha", float("nan")) for r in rows], label="alpha")
            axes[3].set_ylim(0, 1.05)
            axes[3].legend()
        axes[3].set_title("MoE routing")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, out)


def bucket_bars(metrics: dict[str, Any], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, title in (
        (axes[0], "test_by_history_length", "users by history length"),
        (axes[1], "test_by_target_popularity", "target item popularity"),
    ):
        buckets = metrics[key]
        names = list(buckets)
        x = np.arange(len(names))
        for offset, metric in ((-0.2, "hr@10"), (0.2, "ndcg@10")):
            ax.bar(x + offset, [buckets[n].get(metric, 0.0) for n in names], width=0.4, label=metric.upper())
        ax.set_xticks(x, [f"{n}\n(n={buckets[n]['users']})" for n in names])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    save(fig, out)


def expert_heatmap(load: dict[str, Any], out: Path) -> None:
    if not load.get("layers"):
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.text(0.5, 0.5, "no MoE in this model", ha="center", va="center")
        ax.axis("off")
        save(fig, out)
        return
    rows, labels = [], []
    for layer in range(load["layers"]):
        for name, table in (("history", "by_history_length"), ("item", "by_item_popularity")):
            buckets = load["user_buckets"] if name == "history" else load["item_buckets"]
            for bucket, shares in zip(buckets, load[table][layer], strict=True):
                rows.append(shares)
                labels.append(f"layer {layer} · {name} {bucket}")
    data = np.asarray(rows)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * data.shape[1], 0.9 + 0.32 * len(rows)))
    image = ax.imshow(data, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(data.shape[1]), [f"e{e}" for e in range(data.shape[1])])
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title("expert load (share of top-K assignments)")
    fig.colorbar(image, ax=ax, fraction=0.04)
    save(fig, out)
