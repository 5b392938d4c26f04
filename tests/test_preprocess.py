"""Preprocess stage: filtering, k-core, re-indexing and the two splits, checked against plain-Python references."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.download import download
from pipeline.data.layout import DownloadOutputs
from pipeline.data.preprocess import (
    Events,
    PreprocessOutputs,
    k_core_mask,
    leave_one_out,
    prepare_events,
    preprocess,
)
from pipeline.data.quarantine import BadInputError
from pipeline.params import MIRROR_ENV, PreprocessParams, TimeSplitParams, load_params

Raw = tuple[Any, Any, int]  # (raw user, raw item, timestamp) in source order


# ------------------------------------------------------------------------------------------ helpers
def table(rows: list[Raw], ratings: list[float] | None = None) -> pa.Table:
    users, items, stamps = zip(*rows, strict=True)
    columns: dict[str, Any] = {
        "user_id": list(users),
        "item_id": list(items),
        "timestamp": pa.array(stamps, pa.int64()),
    }
    if ratings is not None:
        columns["rating"] = pa.array(ratings, pa.float32())
    return pa.table(columns)


def loose(**kwargs: Any) -> PreprocessParams:
    """No k-core unless asked: hand examples stay small."""
    return PreprocessParams(**{"user_min": 1, "item_min": 1, **kwargs})


def raw_sequences(events: Events) -> dict[Any, list[tuple[Any, int]]]:
    """Processed events mapped back to raw ids: ``{raw user: [(raw item, timestamp), ...]}`` in processed order."""
    raw_users, raw_items = events.raw_users.to_pylist(), events.raw_items.to_pylist()
    out: dict[Any, list[tuple[Any, int]]] = defaultdict(list)
    for u, i, t in zip(events.user.tolist(), events.item.tolist(), events.timestamp.tolist(), strict=True):
        out[raw_users[u - 1]].append((raw_items[i - 1], t))
    return dict(out)


def reference_k_core(rows: list[Raw], user_min: int, item_min: int) -> list[bool]:
    """Peel one under-populated user or item at a time until none is left (slow, obviously correct)."""
    alive = [True] * len(rows)
    while True:
        users = Counter(r[0] for r, a in zip(rows, alive, strict=True) if a)
        items = Counter(r[1] for r, a in zip(rows, alive, strict=True) if a)
        weak_users = [u for u, c in users.items() if c < user_min]
        weak_items = [i for i, c in items.items() if c < item_min]
        if not weak_users and not weak_items:
            return alive
        if weak_users:
            alive = [a and r[0] != weak_users[0] for r, a in zip(rows, alive, strict=True)]
        else:
            alive = [a and r[1] != weak_items[0] for r, a in zip(rows, alive, strict=True)]


def reference_sequences(rows: list[Raw]) -> dict[Any, list[tuple[Any, int]]]:
    """Per-user time order; Python's sort is stable, so equal timestamps keep source order."""
    out: dict[Any, list[tuple[Any, int]]] = defaultdict(list)
    for user, item, ts in sorted(rows, key=lambda r: r[2]):
        out[user].append((item, ts))
    return dict(out)


def random_rows(seed: int, n: int, n_users: int, n_items: int, string_ids: bool = False) -> list[Raw]:
    """Skewed random logs with repeated timestamps (ties) and sparse raw ids."""
    rng = np.random.default_rng(seed)
    users = rng.zipf(1.6, size=n) % n_users
    items = rng.zipf(1.4, size=n) % n_items
    stamps = rng.integers(1_000, 1_060, size=n)  # few distinct values: many ties
    if string_ids:
        return [(f"user-{u:03d}", f"item-{i:03d}", int(t)) for u, i, t in zip(users, items, stamps, strict=True)]
    return [(int(u) * 7919 + 10**9, int(i) * 13 + 5, int(t)) for u, i, t in zip(users, items, stamps, strict=True)]


def run_stage(tmp_path: Path, rows: list[Raw], params: PreprocessParams) -> PreprocessOutputs:
    """Write ``rows`` as the download stage would and run the real preprocess stage on them."""
    interim = tmp_path / "interim"
    interim.mkdir(exist_ok=True)
    pq.write_table(table(rows), DownloadOutputs.under(interim).interactions)
    params.processed_dir = str(tmp_path / "processed")
    return preprocess(params, interim)


def by_user(path: Path) -> dict[int, dict[str, Any]]:
    return {row["user_id"]: row for row in pq.read_table(path).to_pylist()}


def id_map(path: Path) -> list[Any]:
    """Raw id of processed id k at position k - 1, after checking the ids are exactly 1..N."""
    t = pq.read_table(path)
    ids, raw = t.column(0).to_pylist(), t.column(1).to_pylist()
    assert ids == list(range(1, len(ids) + 1))
    return raw


# ------------------------------------------------------------------------------------------ k-core
def test_k_core_needs_many_rounds_to_reach_fixed_point() -> None:
    # a 2x2 core plus a chain where each removal makes the next user or item fall under 2
    core = [("U1", "I1"), ("U1", "I2"), ("U2", "I1"), ("U2", "I2")]
    chain = [("a", "A"), ("a", "B"), ("b", "B"), ("b", "C"), ("c", "C"), ("c", "D"), ("d", "D"), ("d", "I1")]
    rows = [(u, i, t) for t, (u, i) in enumerate(chain + core)]
    events = prepare_events(table(rows), loose(user_min=2, item_min=2))

    assert events.counts["k_core_rounds"] >= 3
    assert events.counts["after_k_core"] == 4
    assert {(u, i) for u, seq in raw_sequences(events).items() for i, _ in seq} == set(core)
    assert reference_k_core(rows, 2, 2) == [False] * len(chain) + [True] * len(core)


@pytest.mark.parametrize("seed, user_min, item_min", [(0, 3, 2), (1, 2, 4), (2, 5, 5), (3, 4, 3), (4, 1, 6), (5, 6, 1)])
def test_k_core_matches_reference_on_random_logs(seed: int, user_min: int, item_min: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    user = rng.zipf(1.5, size=n) % 60
    item = rng.zipf(1.5, size=n) % 50
    keep, rounds = k_core_mask(user, item, user_min, item_min)

    expected = reference_k_core([(u, i, 0) for u, i in zip(user, item, strict=True)], user_min, item_min)
    assert keep.tolist() == expected  # identical to the unique maximal core: nothing keepable was dropped
    assert 0 < keep.sum() < n and rounds >= 2  # the case is not trivial either way
    assert min(c for c in np.bincount(user[keep]) if c) >= user_min
    assert min(c for c in np.bincount(item[keep]) if c) >= item_min
    again, _ = k_core_mask(user[keep], item[keep], user_min, item_min)
    assert again.all()  # a fixed point


def test_nothing_survives_the_core_is_an_error() -> None:
    with pytest.raises(BadInputError, match="no events survive the 3/1-core"):
        prepare_events(table([("u", "a", 1), ("u", "b", 2)]), loose(user_min=3))


# ------------------------------------------------------------------------------------------ filters and order
DEDUP_ROWS: list[Raw] = [("u", "A", 1), ("u", "B", 2), ("u", "A", 3), ("u", "A", 4), ("u", "C", 5), ("u", "B", 6)]
DEDUP_ROWS += [("v", "A", 1), ("v", "A", 2)]


@pytest.mark.parametrize(
    "rule, expected_u, expected_v",
    [
        ("none", [("A", 1), ("B", 2), ("A", 3), ("A", 4), ("C", 5), ("B", 6)], [("A", 1), ("A", 2)]),
        ("first", [("A", 1), ("B", 2), ("C", 5)], [("A", 1)]),
        ("last", [("A", 4), ("C", 5), ("B", 6)], [("A", 2)]),
        ("consecutive", [("A", 1), ("B", 2), ("A", 3), ("C", 5), ("B", 6)], [("A", 1)]),
    ],
)
def test_dedup_rules(rule: str, expected_u: list, expected_v: list) -> None:
    rows = DEDUP_ROWS[::-1]  # source order is not time order: dedup must follow time
    events = prepare_events(table(rows), loose(dedup=rule))
    assert raw_sequences(events) == {"u": expected_u, "v": expected_v}
    if rule != "none":
        assert events.counts["after_dedup"] == len(expected_u) + len(expected_v)


def test_rating_threshold() -> None:
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("v", "a", 4), ("v", "d", 5)]
    events = prepare_events(table(rows, ratings=[1.0, 4.0, 5.0, 3.5, 4.0]), loose(min_rating=4.0))
    assert raw_sequences(events) == {"u": [("b", 2), ("c", 3)], "v": [("d", 5)]}
    assert events.counts["after_rating_filter"] == 3
    with pytest.raises(BadInputError, match="rating"):
        prepare_events(table(rows), loose(min_rating=4.0))


@pytest.mark.parametrize("ids", ["string", "int"])
def test_equal_timestamps_keep_source_order(ids: str) -> None:
    items = {"string": ["z", "a", "m", "b"], "int": [30, 10, 5, 20]}[ids]
    rows = [("u", items[0], 5), ("w", items[1], 5), ("u", items[1], 5), ("u", items[2], 1), ("u", items[3], 5)]
    rows += [("w", items[0], 5)]
    events = prepare_events(table(rows), loose())
    assert raw_sequences(events) == {
        "u": [(items[2], 1), (items[0], 5), (items[1], 5), (items[3], 5)],  # not sorted by item id
        "w": [(items[1], 5), (items[0], 5)],
    }


# ------------------------------------------------------------------------------------------ ids and maps
@pytest.mark.parametrize("string_ids", [False, True], ids=["int-ids", "string-ids"])
def test_contiguous_ids_and_maps_round_trip(tmp_path: Path, string_ids: bool) -> None:
    rows = random_rows(seed=11, n=1500, n_users=90, n_items=70, string_ids=string_ids)
    params = PreprocessParams(user_min=3, item_min=2)
    out = run_stage(tmp_path, rows, params)

    raw_users, raw_items = id_map(out.user_map), id_map(out.item_map)
    assert pq.read_schema(out.user_map).field("raw_user_id").type == (pa.string() if string_ids else pa.int64())
    assert raw_users == sorted(set(raw_users)) and raw_items == sorted(set(raw_items))  # unique, in raw order
    train, valid, test = by_user(out.train), by_user(out.valid), by_user(out.test)
    assert sorted(test) == list(range(1, len(raw_users) + 1))

    # every processed event, mapped back, is exactly the filtered raw log
    alive = reference_k_core(rows, 3, 2)
    expected = reference_sequences([r for r, a in zip(rows, alive, strict=True) if a])
    assert 0 < len(expected) < len({r[0] for r in rows})  # the filter really removed someone
    recovered = {}
    used_items = set()
    for user, row in test.items():
        items = row["history"] + [row["target"]]
        stamps = train[user]["timestamps"] + [valid[user]["target_timestamp"], row["target_timestamp"]]
        used_items.update(items)
        recovered[raw_users[user - 1]] = [(raw_items[i - 1], t) for i, t in zip(items, stamps, strict=True)]
    assert recovered == expected
    assert used_items == set(range(1, len(raw_items) + 1))  # contiguous, 0 never used


# ------------------------------------------------------------------------------------------ splits
def test_leave_one_out_has_no_leakage(tmp_path: Path) -> None:
    rows = random_rows(seed=3, n=1200, n_users=80, n_items=60)
    out = run_stage(tmp_path, rows, PreprocessParams(user_min=3, item_min=1))
    raw_users, raw_items = id_map(out.user_map), id_map(out.item_map)
    train, valid, test = by_user(out.train), by_user(out.valid), by_user(out.test)
    expected = reference_sequences([r for r, a in zip(rows, reference_k_core(rows, 3, 1), strict=True) if a])
    assert set(train) == set(valid) == set(test) == set(range(1, len(raw_users) + 1))

    for user in train:
        seq = expected[raw_users[user - 1]]
        items = [raw_items[i - 1] for i in train[user]["item_ids"]]
        assert list(zip(items, train[user]["timestamps"], strict=True)) == seq[:-2]  # last two positions held out
        assert (raw_items[valid[user]["target"] - 1], valid[user]["target_timestamp"]) == seq[-2]
        assert (raw_items[test[user]["target"] - 1], test[user]["target_timestamp"]) == seq[-1]
        assert valid[user]["history"] == train[user]["item_ids"]
        assert test[user]["history"] == train[user]["item_ids"] + [valid[user]["target"]]
        assert max(train[user]["timestamps"], default=0) <= valid[user]["target_timestamp"]
        assert valid[user]["target_timestamp"] <= test[user]["target_timestamp"]


def test_leave_one_out_needs_three_events_per_user() -> None:
    events = prepare_events(table([("u", "a", 1), ("u", "b", 2), ("v", "a", 1), ("v", "b", 2), ("v", "c", 3)]), loose())
    with pytest.raises(BadInputError, match="at least 3 events"):
        leave_one_out(events)


def test_global_time_split_is_chronological(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rows = [
        (int(u), int(i), int(t))
        for u, i, t in zip(
            rng.integers(0, 60, 1500), rng.integers(0, 40, 1500), rng.integers(0, 10_000, 1500), strict=True
        )
    ]
    params = PreprocessParams(user_min=1, item_min=1, split="global_time", time_split=TimeSplitParams(0.2, 0.1))
    out = run_stage(tmp_path, rows, params)
    meta = pq.read_schema(out.train).metadata
    t_valid, t_test = int(meta[b"t_valid"]), int(meta[b"t_test"])
    stamps = sorted(r[2] for r in rows)
    assert stamps[0] < t_valid < t_test <= stamps[-1]
    assert abs(sum(t < t_valid for t in stamps) / len(stamps) - 0.7) < 0.02
    assert abs(sum(t >= t_test for t in stamps) / len(stamps) - 0.1) < 0.02

    raw_users, raw_items = id_map(out.user_map), id_map(out.item_map)
    train, valid, test = by_user(out.train), by_user(out.valid), by_user(out.test)
    expected = reference_sequences(rows)
    exp_train, exp_valid, exp_test = {}, {}, {}
    for user, seq in expected.items():
        before_valid = [e for e in seq if e[1] < t_valid]
        in_valid = [e for e in seq if t_valid <= e[1] < t_test]
        before_test = [e for e in seq if e[1] < t_test]
        in_test = [e for e in seq if e[1] >= t_test]
        if before_valid:
            exp_train[user] = before_valid
            if in_valid:
                exp_valid[user] = ([i for i, _ in before_valid], in_valid[0])
        if before_test and in_test:
            exp_test[user] = ([i for i, _ in before_test], in_test[0])

    def raw(item_ids: list[int]) -> list[Any]:
        return [raw_items[i - 1] for i in item_ids]

    got_train = {
        raw_users[u - 1]: list(zip(raw(r["item_ids"]), r["timestamps"], strict=True)) for u, r in train.items()
    }
    assert got_train == exp_train
    assert all(t < t_valid for r in train.values() for t in r["timestamps"])
    for got, want, (lo, hi) in ((valid, exp_valid, (t_valid, t_test)), (test, exp_test, (t_test, stamps[-1] + 1))):
        mapped = {
            raw_users[u - 1]: (raw(r["history"]), (raw_items[r["target"] - 1], r["target_timestamp"]))
            for u, r in got.items()
        }
        assert mapped == want
        assert all(lo <= r["target_timestamp"] < hi for r in got.values())
    # cold-start users (no event before the window) get no validation row
    assert len(exp_valid) < len(expected) and len(exp_test) < len(expected)


# ------------------------------------------------------------------------------------------ outputs
SEQUENCE_SCHEMA = pa.schema(
    [("user_id", pa.int32()), ("item_ids", pa.list_(pa.int32())), ("timestamps", pa.list_(pa.int64()))]
)
TARGET_SCHEMA = pa.schema(
    [
        ("user_id", pa.int32()),
        ("history", pa.list_(pa.int32())),
        ("target", pa.int32()),
        ("target_timestamp", pa.int64()),
    ]
)


@pytest.mark.parametrize("split", ["leave_one_out", "global_time"])
def test_parquet_schemas_and_stats(tmp_path: Path, split: str) -> None:
    rows = random_rows(seed=7, n=1500, n_users=70, n_items=50, string_ids=True)
    rows = [(u, i, t + 37 * k) for k, (u, i, t) in enumerate(rows)]  # spread timestamps for the time split
    out = run_stage(tmp_path, rows, PreprocessParams(user_min=3, item_min=2, dedup="consecutive", split=split))

    assert pq.read_schema(out.train).equals(SEQUENCE_SCHEMA)
    for path in (out.valid, out.test):
        assert pq.read_schema(path).equals(TARGET_SCHEMA)
    assert pq.read_schema(out.user_map).equals(pa.schema([("user_id", pa.int32()), ("raw_user_id", pa.string())]))
    assert pq.read_schema(out.item_map).equals(pa.schema([("item_id", pa.int32()), ("raw_item_id", pa.string())]))

    stats = json.loads(out.stats.read_text())
    assert set(stats) == {"users", "items", "events", "density", "sequence_length", "filtering", "split"}
    n_users, n_items = pq.read_metadata(out.user_map).num_rows, pq.read_metadata(out.item_map).num_rows
    assert (stats["users"], stats["items"]) == (n_users, n_items)
    assert stats["density"] == pytest.approx(stats["events"] / (n_users * n_items))
    assert stats["sequence_length"]["mean"] == pytest.approx(stats["events"] / n_users)
    assert set(stats["sequence_length"]) == {"mean", "p0", "p25", "p50", "p75", "p90", "p99", "p100"}
    assert stats["sequence_length"]["p0"] >= 3
    filtering = stats["filtering"]
    assert filtering["input"] == len(rows)
    assert filtering["input"] >= filtering["after_dedup"] >= filtering["after_k_core"] == stats["events"]
    assert filtering["k_core_rounds"] >= 1
    train = pq.read_table(out.train)
    assert stats["split"] == {
        "kind": split,
        "train_users": train.num_rows,
        "train_events": sum(len(x) for x in train["item_ids"].to_pylist()),
        "valid_users": pq.read_metadata(out.valid).num_rows,
        "test_users": pq.read_metadata(out.test).num_rows,
    }
    if split == "leave_one_out":
        assert stats["split"]["train_events"] == stats["events"] - 2 * n_users


def test_preprocess_without_download_names_the_stage(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download stage"):
        preprocess(PreprocessParams(processed_dir=str(tmp_path / "p")), tmp_path / "missing")


# ------------------------------------------------------------------------------------------ real data sets
@pytest.mark.parametrize(
    "dataset, needs, layout, expected",
    [
        ("beauty", "amazon-beauty/s3rec/Beauty.txt", "s3rec", (22_363, 12_101, 198_502)),
        ("ml-100k", "ml-100k/u.data", "u.data", (943, 1_349, 99_287)),
    ],
)
def test_real_dataset_statistics(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    real_mirror: Path,
    dataset: str,
    needs: str,
    layout: str,
    expected: tuple[int, int, int],
) -> None:
    if not (real_mirror / needs).is_file():
        pytest.skip(f"{needs} not in the mirror {real_mirror}")
    monkeypatch.setenv(MIRROR_ENV, str(real_mirror))
    (tmp_path / "params.yaml").write_text("{}\n")
    params = load_params(
        tmp_path / "params.yaml",
        {
            "data.dataset": dataset,
            "data.cache_dir": str(tmp_path / "cache"),
            "data.interim_dir": str(tmp_path / "interim"),
            "preprocess.processed_dir": str(tmp_path / "processed"),
        },
    )
    downloaded = download(params.data)
    manifest = json.loads(downloaded.manifest.read_text())
    assert (manifest["source"]["kind"], manifest["source"]["layout"]) == ("mirror", layout)

    out = preprocess(params.preprocess, params.data.interim_dir)
    stats = json.loads(out.stats.read_text())
    assert (stats["users"], stats["items"], stats["events"]) == expected
    assert stats["split"]["test_users"] == expected[0]
    assert stats["split"]["train_events"] == expected[2] - 2 * expected[0]


def test_global_time_split_refuses_data_without_timestamps(tmp_path: Path) -> None:
    """Sequence-format copies use line order as time: cutting that by quantiles would cut by user, not by time."""
    rows = [(u, i, u * 10 + i) for u in range(1, 7) for i in range(1, 7)]
    interim = tmp_path / "interim"
    interim.mkdir()
    (interim / "manifest.json").write_text(json.dumps({"has_timestamps": False}))
    pq.write_table(table(rows), DownloadOutputs.under(interim).interactions)
    params = loose(split="global_time", processed_dir=str(tmp_path / "processed"))
    with pytest.raises(BadInputError, match="needs real timestamps"):
        preprocess(params, interim)
    (interim / "manifest.json").write_text(json.dumps({"has_timestamps": True}))
    stats = json.loads(preprocess(params, interim).stats.read_text())
    assert (stats["events"], stats["split"]["kind"]) == (36, "global_time")
