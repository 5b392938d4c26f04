"""From the Parquet splits to left-padded tensors, vectorised over Arrow list arrays.

The data layer's one sequence helper, shared by training, evaluation and serving: it imports only numpy and Arrow
(no preprocessing, download or trainer code), so a served model loads without them.

Sequences are *left*-padded with 0 (the most recent item sits in the last column), so the last position is
always the one that predicts the next item, whatever the history length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def list_parts(column: pa.ChunkedArray | pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [n+1], flat values) of a list column, zero-copy where Arrow allows."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy()
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


def gather_windows(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """Rows ``values[start:end]`` keeping the last ``width`` items, left-padded with 0 -> int64 ``[n, width]``."""
    ends = ends.astype(np.int64)
    starts = np.maximum(starts.astype(np.int64), ends - width)
    index = ends[:, None] - width + np.arange(width)[None, :]
    valid = index >= starts[:, None]
    out = np.zeros((len(ends), width), dtype=np.int64)
    if len(values):
        out[valid] = values[index[valid]]
    return out


@dataclass
class TrainingSequences:
    """Causal training pairs: ``targets[b, t]`` is the item after ``inputs[b, t]`` (0 = nothing to predict)."""

    inputs: np.ndarray  # int64 [n, L]
    targets: np.ndarray  # int64 [n, L]


def training_sequences(train: pa.Table, max_seq_len: int, windows: str = "last") -> TrainingSequences:
    """Cut each user's training sequence into windows of L+1 items (input = first L, target = last L).

    ``last`` keeps only the most recent window per user (SASRec's recipe); ``all`` also keeps every earlier
    non-overlapping chunk, so long histories (ML-1M) contribute all their events each epoch. Users with a single
    training item have nothing to predict and are skipped.
    """
    offsets, values = list_parts(train["item_ids"])
    lengths = np.diff(offsets)
    keep = lengths >= 2
    row_start, row_end = offsets[:-1][keep], offsets[1:][keep]
    if windows == "all":
        per_row = -(-(row_end - row_start - 1) // max_seq_len)  # ceil((n - 1) / L) windows
        row = np.repeat(np.arange(len(row_end)), per_row)
        k = np.arange(len(row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        ends = row_end[row] - k * max_seq_len
        starts = np.maximum(row_start[row], ends - max_seq_len - 1)
    else:
        ends, starts = row_end, np.maximum(row_start, row_end - max_seq_len - 1)
    inputs = gather_windows(values, starts, ends - 1, max_seq_len)
    targets = gather_windows(values, starts + 1, ends, max_seq_len)
    return TrainingSequences(inputs, targets)


@dataclass
class EvalSplit:
    """One evaluation split: model inputs (last L history items), targets, and full histories for exclusion."""

    users: np.ndarray  # int32 [n]
    inputs: np.ndarray  # int64 [n, L]
    targets: np.ndarray  # int64 [n]
    history_offsets: np.ndarray  # int64 [n + 1]
    history_values: np.ndarray  # int32: full histories (exclude_seen needs every seen item, not just the last L)

    def __len__(self) -> int:
        return len(self.targets)

    def seen(self, rows: np.ndarray) -> np.ndarray:
        """Full histories of ``rows`` as a 0-padded matrix (0 = padding, never an item)."""
        starts, ends = self.history_offsets[rows], self.history_offsets[rows + 1]
        width = max(1, int((ends - starts).max(initial=0)))
        return gather_windows(self.history_values, starts, ends, width)


def eval_split(table: pa.Table, max_seq_len: int) -> EvalSplit:
    offsets, values = list_parts(table["history"])
    inputs = gather_windows(values, offsets[:-1], offsets[1:], max_seq_len)
    return EvalSplit(
        users=table["user_id"].to_numpy(),
        inputs=inputs,
        targets=table["target"].to_numpy().astype(np.int64),
        history_offsets=offsets,
        history_values=values,
    )


def item_popularity(train: pa.Table, n_items: int) -> np.ndarray:
    """Training-interaction count per item id (index 0 = padding, always 0): the only popularity the model sees."""
    _, values = list_parts(train["item_ids"])
    return np.bincount(values, minlength=n_items + 1).astype(np.int64)


def history_lengths(table: pa.Table) -> np.ndarray:
    return pc.list_value_length(table["history"]).to_numpy(zero_copy_only=False).astype(np.int64)
