"""Where each data stage writes its files: the folder layouts the later stages, tracking and serving read.

Kept apart from the stages themselves so that a reader of ``train.parquet`` or the item map (the trainer, the
evaluator, the registry) depends on these few names, not on the download and preprocessing code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq


@dataclass(frozen=True)
class DownloadOutputs:
    interactions: Path
    manifest: Path
    quarantine: Path

    @classmethod
    def under(cls, folder: str | Path) -> DownloadOutputs:
        folder = Path(folder)
        return cls(folder / "interactions.parquet", folder / "manifest.json", folder / "quarantine.csv")


@dataclass(frozen=True)
class PreprocessOutputs:
    train: Path
    valid: Path
    test: Path
    user_map: Path
    item_map: Path
    stats: Path

    @classmethod
    def under(cls, folder: str | Path) -> PreprocessOutputs:
        folder = Path(folder)
        names = ("train", "valid", "test", "user_map", "item_map")
        return cls(*(folder / f"{name}.parquet" for name in names), folder / "stats.json")


def num_items(processed_dir: str | Path) -> int:
    """Catalogue size (real items 1..n) from the item map written by preprocess."""
    return pq.read_metadata(PreprocessOutputs.under(processed_dir).item_map).num_rows
