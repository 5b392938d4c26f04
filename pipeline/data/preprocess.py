"""The ``preprocess`` stage: canonical interactions -> leakage-free Parquet sequences.

Steps, all vectorised over the event arrays (numpy / pyarrow, no Python loop per event or per user):

1. optional rating threshold;
2. encode raw ids with codes whose order is the raw ids' sorted order, then sort events by (user, timestamp) with a
   *stable* sort, so equal timestamps keep their source order (the only order sequence-format files have);
3. de-duplication of (user, item) pairs by ``preprocess.dedup``;
4. iterative k-core until a fixed point (dropping an item can push a user under its minimum and vice versa);
5. contiguous ids, 0 reserved for padding (``user_map.parquet`` / ``item_map.parquet`` keep the raw ids);
6. the split: chronological leave-one-out (train = all but each user's last two events, valid target = second to
   last, test target = last) or a global time split (cut points at time quantiles, so no model ever trains on an
   event later than one it is evaluated on);
7. ``train.parquet`` (``user_id``, ``item_ids``, ``timestamps``), ``valid.parquet`` and ``test.parquet``
   (``user_id``, ``history``, ``target``, ``target_timestamp``), one row per user, plus ``stats.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.id_maps import id_map_table
from pipeline.data.layout import DownloadOutputs, PreprocessOutputs
from pipeline.data.quarantine import BadInputError
from pipeline.io import write_json_atomic, write_parquet_atomic
from pipeline.params import PreprocessParams

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


@dataclass
class Events:
    """Events sorted by (user, timestamp, source order) with contiguous ids (users and items start at 1)."""

    user: np.ndarray  # int32
    item: np.ndarray  # int32
    timestamp: np.ndarray  # int64
    raw_users: pa.Array  # raw_users[k] = raw id of user k + 1
    raw_items: pa.Array
    counts: dict[str, int]  # events left after each step, for stats.json


def preprocess(params: PreprocessParams, interim_dir: str | Path) -> PreprocessOutputs:
    """Run the stage: read ``interactions.parquet`` from ``interim_dir``, write the splits to ``processed_dir``."""
    inputs = DownloadOutputs.under(interim_dir)
    source = inputs.interactions
    timed = not inputs.manifest.exists() or json.loads(inputs.manifest.read_text()).get("has_timestamps", True)
    if params.split == "global_time" and not timed:
        raise BadInputError(
            "preprocess.split=global_time needs real timestamps, but this copy of the data has none (its line "
            "order stands in for time, so time quantiles would cut by user); use leave_one_out or a source with "
            "timestamps (e.g. data.beauty_source=ticoserec)"
        )
    if not source.exists():
        raise FileNotFoundError(f"{source} not found: run the download stage first (`python -m pipeline download`)")
    events = prepare_events(pq.read_table(source), params)
    outputs = PreprocessOutputs.under(params.processed_dir)
    if params.split == "leave_one_out":
        tables = leave_one_out(events)
    else:
        tables = global_time_split(events, params.time_split.valid_fraction, params.time_split.test_fraction)
    for name in SPLITS:
        write_parquet_atomic(getattr(outputs, name), tables[name])
    write_parquet_atomic(outputs.user_map, id_map_table("user_id", events.raw_users))
    write_parquet_atomic(outputs.item_map, id_map_table("item_id", events.raw_items))
    stats = dataset_stats(events, tables, params)
    write_json_atomic(outputs.stats, stats)
    log.info(
        "%d users, %d items, %d events (density %.5f); split %s: train %d events, valid %d users, test %d users",
        stats["users"],
        stats["items"],
        stats["events"],
        stats["density"],
        params.split,
        stats["split"]["train_events"],
        stats["split"]["valid_users"],
        stats["split"]["test_users"],
    )
    return outputs


# ----------------------------------------------------------------------------------------------- filtering
def prepare_events(table: pa.Table, params: PreprocessParams) -> Events:
    """Steps 1-5 of the module docstring on an interactions table."""
    missing = {"user_id", "item_id", "timestamp"} - set(table.column_names)
    if missing:
        raise BadInputError(f"interactions table lacks column(s) {sorted(missing)}")
    if table.num_rows == 0:
        raise BadInputError("the interactions table is empty")
    counts = {"input": table.num_rows}
    if params.min_rating is not None:
        if "rating" not in table.column_names:
            raise BadInputError("preprocess.min_rating is set but the dataset has no rating column")
        table = table.filter(pc.greater_equal(table["rating"], params.min_rating))
        counts["after_rating_filter"] = table.num_rows
    user_code, user_dict = _sorted_codes(table["user_id"])
    item_code, item_dict = _sorted_codes(table["item_id"])
    timestamp = table["timestamp"].to_numpy().astype(np.int64, copy=False)
    order = np.lexsort((timestamp, user_code))  # stable: equal keys keep source order
    user_code, item_code, timestamp = user_code[order], item_code[order], timestamp[order]

    keep = _dedup_mask(user_code, item_code, len(item_dict), params.dedup)
    if keep is not None:
        user_code, item_code, timestamp = user_code[keep], item_code[keep], timestamp[keep]
        counts["after_dedup"] = len(user_code)

    keep, rounds = k_core_mask(user_code, item_code, params.user_min, params.item_min)
    user_code, item_code, timestamp = user_code[keep], item_code[keep], timestamp[keep]
    counts["after_k_core"] = len(user_code)
    counts["k_core_rounds"] = rounds
    if len(user_code) == 0:
        raise BadInputError(
            f"no events survive the {params.user_min}/{params.item_min}-core filter; lower preprocess.user_min / "
            "preprocess.item_min or use more data"
        )
    user, raw_users = _contiguous(user_code, user_dict)
    item, raw_items = _contiguous(item_code, item_dict)
    return Events(user, item, timestamp, raw_users, raw_items, counts)


def k_core_mask(user: np.ndarray, item: np.ndarray, user_min: int, item_min: int) -> tuple[np.ndarray, int]:
    """Boolean mask of events in the (user_min, item_min)-core, iterated to a fixed point; also the round count."""
    keep = np.ones(len(user), dtype=bool)
    rounds = 0
    n_users = int(user.max()) + 1 if len(user) else 0
    n_items = int(item.max()) + 1 if len(item) else 0
    while True:
        rounds += 1
        user_counts = np.bincount(user[keep], minlength=n_users)
        item_counts = np.bincount(item[keep], minlength=n_items)
        new_keep = keep & (user_counts[user] >= user_min) & (item_counts[item] >= item_min)
        if new_keep.sum() == keep.sum():
            return new_keep, rounds
        keep = new_keep


def _sorted_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Integer codes for raw ids such that code order equals the sorted order of the raw ids."""
    encoded = pc.dictionary_encode(column).combine_chunks()
    dictionary = encoded.dictionary
    rank = np.empty(len(dictionary), dtype=np.int64)
    sort_order = pc.sort_indices(dictionary).to_numpy()
    rank[sort_order] = np.arange(len(dictionary))
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    return codes, dictionary.take(pa.array(sort_order))


def _dedup_mask(user: np.ndarray, item: np.ndarray, n_items: int, rule: str) -> np.ndarray | None:
    if rule == "none":
        return None
    if rule == "consecutive":
        keep = np.ones(len(user), dtype=bool)
        keep[1:] = (user[1:] != user[:-1]) | (item[1:] != item[:-1])
        return keep
    pair = user.astype(np.int64) * n_items + item
    order = np.argsort(pair, kind="stable")  # within a pair, events stay in time order
    sorted_pair = pair[order]
    boundary = np.ones(len(pair), dtype=bool)
    if rule == "first":
        boundary[1:] = sorted_pair[1:] != sorted_pair[:-1]
    else:  # last
        boundary[:-1] = sorted_pair[1:] != sorted_pair[:-1]
    keep = np.zeros(len(pair), dtype=bool)
    keep[order[boundary]] = True
    return keep


def _contiguous(codes: np.ndarray, dictionary: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Renumber surviving codes 1..N preserving order (so the event sort stays valid); 0 is padding."""
    present = np.bincount(codes, minlength=len(dictionary)) > 0
    new_id = np.cumsum(present).astype(np.int32)  # code -> 1-based rank among survivors
    raw = dictionary.filter(pa.array(present))
    return new_id[codes], raw


# ----------------------------------------------------------------------------------------------- splits
def leave_one_out(events: Events) -> dict[str, pa.Table]:
    """Chronological leave-one-out: valid/test targets are each user's last two events, never in train input."""
    n_users = len(events.raw_users)
    lengths = np.bincount(events.user, minlength=n_users + 1)[1:]
    if lengths.min() < 3:
        raise BadInputError("leave-one-out needs at least 3 events per user; raise preprocess.user_min to >= 3")
    ends = np.cumsum(lengths)
    position = np.arange(len(events.user)) - np.repeat(ends - lengths, lengths)
    remaining = np.repeat(lengths, lengths) - position  # 1 for the last event, 2 for the second to last
    users = np.arange(1, n_users + 1, dtype=np.int32)
    train_mask = remaining > 2
    train = _sequence_table(users, events, train_mask, lengths - 2)
    valid_idx, test_idx = ends - 2, ends - 1
    valid = _target_table(users, events, train_mask, lengths - 2, valid_idx)
    test = _target_table(users, events, remaining > 1, lengths - 1, test_idx)
    return {"train": train, "valid": valid, "test": test}


def global_time_split(events: Events, valid_fraction: float, test_fraction: float) -> dict[str, pa.Table]:
    """Global temporal split: train on events before ``t_valid``; valid/test targets are each user's first event
    in [t_valid, t_test) and in [t_test, end); histories hold only earlier events; users with no history are
    cold-start and skipped (counted in stats)."""
    ts = events.timestamp
    t_valid, t_test = np.quantile(ts, [1 - valid_fraction - test_fraction, 1 - test_fraction], method="lower")
    if t_valid >= t_test:
        raise BadInputError("the global time split needs distinct cut points; the data has too few timestamps")
    window = np.where(ts < t_valid, 0, np.where(ts < t_test, 1, 2))
    n_users = len(events.raw_users)
    users = np.arange(1, n_users + 1, dtype=np.int32)
    user = events.user
    new_run = np.ones(len(user), dtype=bool)
    new_run[1:] = (user[1:] != user[:-1]) | (window[1:] != window[:-1])

    def counts(mask: np.ndarray) -> np.ndarray:
        return np.bincount(user[mask], minlength=n_users + 1)[1:]

    train_mask = window == 0
    train_len = counts(train_mask)
    has_train = train_len > 0
    train = _sequence_table(users[has_train], events, train_mask, train_len[has_train])

    first_valid = np.flatnonzero(new_run & (window == 1))
    valid_users = user[first_valid]
    ok = train_len[valid_users - 1] > 0
    in_valid = np.zeros(n_users + 1, dtype=bool)
    in_valid[valid_users[ok]] = True
    valid = _target_table(
        valid_users[ok], events, train_mask & in_valid[user], train_len[valid_users[ok] - 1], first_valid[ok]
    )

    first_test = np.flatnonzero(new_run & (window == 2))
    test_users = user[first_test]
    before_test = window < 2
    hist_len = counts(before_test)
    ok_test = hist_len[test_users - 1] > 0
    in_test = np.zeros(n_users + 1, dtype=bool)
    in_test[test_users[ok_test]] = True
    test = _target_table(
        test_users[ok_test],
        events,
        before_test & in_test[user],
        hist_len[test_users[ok_test] - 1],
        first_test[ok_test],
    )
    meta = {b"t_valid": str(int(t_valid)).encode(), b"t_test": str(int(t_test)).encode()}
    return {
        name: table.replace_schema_metadata(meta)
        for name, table in {"train": train, "valid": valid, "test": test}.items()
    }


def _sequence_table(users: np.ndarray, events: Events, mask: np.ndarray, lengths: np.ndarray) -> pa.Table:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table(
        {
            "user_id": pa.array(users, pa.int32()),
            "item_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(events.item[mask], pa.int32())),
            "timestamps": pa.ListArray.from_arrays(pa.array(offsets), pa.array(events.timestamp[mask], pa.int64())),
        }
    )


def _target_table(
    users: np.ndarray,
    events: Events,
    history_mask: np.ndarray,
    history_lengths: np.ndarray,
    target_idx: np.ndarray,
) -> pa.Table:
    offsets = np.concatenate([[0], np.cumsum(history_lengths)]).astype(np.int32)
    return pa.table(
        {
            "user_id": pa.array(users, pa.int32()),
            "history": pa.ListArray.from_arrays(pa.array(offsets), pa.array(events.item[history_mask], pa.int32())),
            "target": pa.array(events.item[target_idx], pa.int32()),
            "target_timestamp": pa.array(events.timestamp[target_idx], pa.int64()),
        }
    )


def dataset_stats(events: Events, tables: dict[str, pa.Table], params: PreprocessParams) -> dict[str, Any]:
    n_users, n_items, n_events = len(events.raw_users), len(events.raw_items), len(events.user)
    lengths = np.bincount(events.user, minlength=n_users + 1)[1:]
    quantiles = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
    return {
        "users": n_users,
        "items": n_items,
        "events": n_events,
        "density": n_events / (n_users * n_items),
        "sequence_length": {
            "mean": float(lengths.mean()),
            **{f"p{int(q * 100)}": float(np.quantile(lengths, q)) for q in quantiles},
        },
        "filtering": events.counts,
        "split": {
            "kind": params.split,
            "train_users": tables["train"].num_rows,
            "train_events": int(pc.sum(pc.list_value_length(tables["train"]["item_ids"])).as_py() or 0),
            "valid_users": tables["valid"].num_rows,
            "test_users": tables["test"].num_rows,
        },
    }
