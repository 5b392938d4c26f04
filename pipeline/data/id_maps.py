"""The id maps preprocess writes (``user_map`` / ``item_map``: internal id -> raw id) and their reader.

A module of its own, importing only Arrow, so that serving a model reads its item map without loading the
preprocessing or download code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def id_map_table(name: str, raw: pa.Array) -> pa.Table:
    """Ids 1..n (0 is padding) beside the raw ids in that order (``name`` = user_id | item_id)."""
    ids = pa.array(np.arange(1, len(raw) + 1, dtype=np.int32))
    if pa.types.is_large_string(raw.type):
        raw = raw.cast(pa.string())
    return pa.table({name: ids, f"raw_{name}": raw})


def read_id_map(path: str | Path, name: str) -> dict[int, str]:
    """``{id: raw id}`` of a ``user_map`` / ``item_map`` file (``name`` = user_id | item_id); raw ids as strings."""
    table = pq.read_table(path)
    return {i: str(r) for i, r in zip(table[name].to_pylist(), table[f"raw_{name}"].to_pylist(), strict=True)}
