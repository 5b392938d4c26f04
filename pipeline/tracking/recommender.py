"""Top-K recommendations in raw item ids from a trained model: what the served pyfunc and the batch job run.

Raw ids are strings on the way in and out (an id map may hold integers or strings; ``"50"`` and ``50`` are the same
item). Items of a history that the model has never seen are ignored; a history with no known item gets no
recommendations (the model has nothing to condition on). Padding (id 0) is never returned, nor, when
``exclude_history`` is on, an item already in the history. No MLflow import here: the pyfunc wraps this class.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data.id_maps import read_id_map
from pipeline.data.sequences import gather_windows
from pipeline.errors import PipelineError
from pipeline.model import SequentialRecommender
from pipeline.model.files import load_model_files

DEFAULT_K = 10
CHUNK = 512  # histories scored per forward pass


@dataclass
class Recommender:
    model: SequentialRecommender
    raw_ids: np.ndarray  # raw_ids[i] = raw id (str) of internal item i; raw_ids[0] = "" (padding)
    index: dict[str, int]  # raw id -> internal id
    max_seq_len: int
    exclude_history: bool = True
    default_k: int = DEFAULT_K

    @classmethod
    def from_files(
        cls,
        weights: str | Path,
        config: str | Path,
        item_map: str | Path,
        *,
        exclude_history: bool = True,
        default_k: int = DEFAULT_K,
    ) -> Recommender:
        """Rebuild from ``model.pt`` (a state_dict, loaded with ``weights_only=True``), ``model.json`` and the map."""
        model = load_model_files(weights, config)
        raw_items = read_id_map(item_map, "item_id")
        raw_ids = np.full(model.num_items + 1, "", dtype=object)
        raw_ids[list(raw_items)] = list(raw_items.values())
        index = {raw: int(i) for i, raw in enumerate(raw_ids) if i > 0}
        return cls(model, raw_ids, index, model.max_seq_len, exclude_history, default_k)

    def encode(self, history: Sequence[object]) -> list[int]:
        """Internal ids of the known items of ``history`` (raw ids), oldest first; unknown ids are dropped."""
        return [i for i in (self.index.get(str(raw), 0) for raw in history) if i > 0]

    @torch.no_grad()
    def recommend(
        self, histories: Sequence[Sequence[object]], ks: Sequence[int], exclude_history: bool | None = None
    ) -> tuple[list[list[str]], list[list[float]]]:
        """Per history: up to ``k`` raw item ids, best first, and their scores."""
        exclude = self.exclude_history if exclude_history is None else exclude_history
        if len(histories) != len(ks):
            raise ValueError(f"{len(histories)} histories but {len(ks)} values of k")
        for k in ks:
            if k < 1:
                raise InvalidRequest(f"k must be >= 1, got {k}")
        encoded = [self.encode(h) for h in histories]
        items: list[list[str]] = [[] for _ in encoded]
        scores: list[list[float]] = [[] for _ in encoded]
        rows = [r for r, e in enumerate(encoded) if e]
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            ends = np.cumsum([len(encoded[r]) for r in chunk])
            flat = np.concatenate([encoded[r] for r in chunk]).astype(np.int64)
            inputs = gather_windows(flat, ends - np.diff(ends, prepend=0), ends, self.max_seq_len)  # left-padded
            logits = self.model.score_next(torch.from_numpy(inputs)).float()  # column 0 (padding) is -inf
            if exclude:
                for j, r in enumerate(chunk):
                    logits[j, encoded[r]] = -math.inf
            k_max = min(max(ks[r] for r in chunk), self.model.num_items)
            top_scores, top_ids = torch.topk(logits, k_max, dim=1)
            for j, r in enumerate(chunk):
                keep = torch.isfinite(top_scores[j, : ks[r]])  # -inf = padding or excluded: never returned
                items[r] = self.raw_ids[top_ids[j, : ks[r]][keep].numpy()].tolist()
                scores[r] = top_scores[j, : ks[r]][keep].tolist()
        return items, scores

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The pyfunc contract: ``history`` (raw ids), optional ``k`` (every row or none) -> ``items``, ``scores``.

        A malformed request raises :class:`InvalidRequest` with a one-line reason naming the row.
        """
        if "history" not in frame.columns:
            raise InvalidRequest("input needs a 'history' column: a list of raw item ids (strings) per row")
        histories = [_history(value, row) for row, value in enumerate(frame["history"])]
        ks = [self.default_k] * len(frame)
        if "k" in frame.columns and not all(_missing(k) for k in frame["k"]):
            missing = [row for row, k in enumerate(frame["k"]) if _missing(k)]
            if missing:  # a forgotten k would silently get the default: the request is ambiguous
                rows = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
                raise InvalidRequest(f"k must be on every row or on none; rows without it: {rows}")
            ks = [_positive_int(k, row) for row, k in enumerate(frame["k"])]
        items, scores = self.recommend(histories, ks)
        return pd.DataFrame({"items": items, "scores": scores})


class InvalidRequest(PipelineError, ValueError):
    """A recommendation request that cannot be answered as sent (the server answers 400 with this message)."""


def _history(value: object, row: int) -> list[str]:
    if _missing(value):
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise InvalidRequest(f"row {row}: history must be a list of raw item ids, got {type(value).__name__}")
    history = list(value)
    for raw in history:
        if not isinstance(raw, str):  # 50 and "50" would be one item, 1e22 and "1e22" not: ids travel as strings
            raise InvalidRequest(f"row {row}: item ids must be strings, got {_shown(raw)} ({type(raw).__name__})")
    return history


def _positive_int(value: object, row: int) -> int:
    """``k`` exactly as sent: 3 and 3.0 are 3; 2.7, 0, -3, true or "5" are refused, never truncated."""
    wrong = InvalidRequest(f"row {row}: k must be a positive integer, got {_shown(value)}")
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise wrong
    if not isinstance(value, numbers.Integral) and not (math.isfinite(value) and float(value).is_integer()):
        raise wrong
    if int(value) < 1:
        raise wrong
    return int(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
