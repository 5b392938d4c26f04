"""The synthetic generator must be reproducible, well-formed and carry the structure it claims to plant."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.synthetic import (
    MIN_EVENTS,
    SECONDS_PER_DAY,
    SEGMENTS,
    SyntheticConfig,
    generate_interactions,
    item_popularity,
    item_structure,
)

CFG = SyntheticConfig(n_users=1500, n_items=600, n_categories=12, seed=7)


@pytest.fixture(scope="module")
def generated() -> tuple[pa.Table, pa.Table]:
    return generate_interactions(CFG)


@pytest.fixture(scope="module")
def arrays(generated: tuple[pa.Table, pa.Table]) -> dict[str, np.ndarray]:
    events, users = generated
    user = events["user_id"].to_numpy()
    segment = np.asarray(users["segment"].to_pylist())
    return {
        "user": user,
        "item": events["item_id"].to_numpy(),
        "time": events["timestamp"].to_numpy(),
        "segment": segment[user - 1],  # per event; users are 1..n_users in order
        "user_segment": segment,
    }


def _successor_rate(arrays: dict[str, np.ndarray], successor: np.ndarray, segment: str) -> float:
    user, item = arrays["user"], arrays["item"]
    pair = (user[1:] == user[:-1]) & (arrays["segment"][1:] == segment)
    return float((successor[item[:-1]] == item[1:])[pair].mean())


def _top_category_share(arrays: dict[str, np.ndarray], categories: np.ndarray, segment: str, k: int) -> float:
    """Mean over users of the segment of the share of their events in their k most used categories."""
    mask = arrays["segment"] == segment
    user, cat = arrays["user"][mask], categories[arrays["item"][mask]]
    counts = np.zeros((CFG.n_users + 1, CFG.n_categories), dtype=np.int64)
    np.add.at(counts, (user, cat), 1)
    counts = counts[counts.sum(axis=1) > 0]
    top = np.sort(counts, axis=1)[:, ::-1][:, :k].sum(axis=1)
    return float((top / counts.sum(axis=1)).mean())


# ------------------------------------------------------------------------------------------ reproducibility


def test_same_seed_gives_identical_tables(generated: tuple[pa.Table, pa.Table]) -> None:
    events, users = generate_interactions(CFG)
    assert events.equals(generated[0])
    assert users.equals(generated[1])


def test_different_seed_gives_different_tables(generated: tuple[pa.Table, pa.Table]) -> None:
    events, users = generate_interactions(dataclasses.replace(CFG, seed=CFG.seed + 1))
    assert not events.equals(generated[0])
    assert not users.equals(generated[1])
    categories, successor = item_structure(dataclasses.replace(CFG, seed=CFG.seed + 1))
    assert not np.array_equal(successor, item_structure(CFG)[1])
    assert not np.array_equal(categories, item_structure(CFG)[0])


def test_catalogue_does_not_depend_on_user_settings() -> None:
    # the item world stays fixed when only the user side changes, so runs at different scales are comparable
    other = dataclasses.replace(CFG, n_users=10, chain_fraction=1.0, loyal_fraction=0.0, noisy_fraction=0.0)
    for mine, theirs in zip(item_structure(CFG), item_structure(other), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(item_popularity(CFG), item_popularity(other))


# ------------------------------------------------------------------------------------------------ format


def test_schema_and_dtypes(generated: tuple[pa.Table, pa.Table]) -> None:
    events, users = generated
    assert events.schema == pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    assert users.schema == pa.schema([("user_id", pa.int64()), ("segment", pa.string())])
    assert all(column.null_count == 0 for column in events.columns + users.columns)


def test_users_table_lists_every_user_once_with_exact_segment_sizes(arrays: dict[str, np.ndarray]) -> None:
    _, users = generate_interactions(CFG)
    np.testing.assert_array_equal(users["user_id"].to_numpy(), np.arange(1, CFG.n_users + 1))
    labels, counts = np.unique(arrays["user_segment"], return_counts=True)
    assert set(labels) == set(SEGMENTS)
    sizes = dict(zip(labels, counts, strict=True))
    assert sizes == {"chain": 600, "loyal": 600, "noisy": 300}


def test_ids_in_range_and_every_user_has_min_events(arrays: dict[str, np.ndarray]) -> None:
    assert arrays["item"].min() >= 1 and arrays["item"].max() <= CFG.n_items
    per_user = np.bincount(arrays["user"], minlength=CFG.n_users + 1)
    assert per_user[0] == 0
    assert per_user[1:].min() >= MIN_EVENTS


def test_events_in_user_then_time_order(arrays: dict[str, np.ndarray]) -> None:
    user, time = arrays["user"], arrays["time"]
    assert np.all(np.diff(user) >= 0)
    same_user = user[1:] == user[:-1]
    assert np.all(np.diff(time)[same_user] >= 0)


def test_timestamps_span_many_days(arrays: dict[str, np.ndarray]) -> None:
    time = arrays["time"]
    assert time.min() >= CFG.start_timestamp
    days = np.unique((time - CFG.start_timestamp) // SECONDS_PER_DAY)
    # users start over the whole span, so (almost) every day of it has activity for a day-by-day replay
    assert len(days) >= 0.9 * CFG.span_days
    assert days.max() < 2 * CFG.span_days


def test_total_events_close_to_requested_mean(arrays: dict[str, np.ndarray]) -> None:
    expected = CFG.n_users * CFG.mean_events_per_user
    assert abs(len(arrays["item"]) - expected) / expected < 0.1


def test_minimum_mean_gives_minimum_lengths() -> None:
    events, _ = generate_interactions(dataclasses.replace(CFG, n_users=50, mean_events_per_user=MIN_EVENTS))
    assert events.num_rows == 50 * MIN_EVENTS


def test_single_user_and_single_segment_configs_work() -> None:
    cfg = SyntheticConfig(
        n_users=1, n_items=2, n_categories=1, chain_fraction=0.0, loyal_fraction=1.0, noisy_fraction=0.0
    )
    events, users = generate_interactions(cfg)
    assert events.num_rows >= MIN_EVENTS
    assert users["segment"].to_pylist() == ["loyal"]


# --------------------------------------------------------------------------------------------- structure


def test_item_structure_shapes_and_padding() -> None:
    categories, successor = item_structure(CFG)
    assert categories.shape == successor.shape == (CFG.n_items + 1,)
    assert categories[0] == -1 and successor[0] == 0
    assert set(np.unique(categories[1:])) == set(range(CFG.n_categories))
    assert successor[1:].min() >= 1 and successor[1:].max() <= CFG.n_items
    assert not np.any(successor[1:] == np.arange(1, CFG.n_items + 1))  # no self loops
    # mostly within the category, so the chains are learnable per category
    assert np.mean(categories[successor[1:]] == categories[1:]) > 0.8
    popularity = item_popularity(CFG)
    assert popularity[0] == 0 and np.isclose(popularity.sum(), 1.0)


def test_chain_users_follow_successors_far_more_than_noisy_users(arrays: dict[str, np.ndarray]) -> None:
    _, successor = item_structure(CFG)
    chain = _successor_rate(arrays, successor, "chain")
    noisy = _successor_rate(arrays, successor, "noisy")
    assert abs(chain - CFG.chain_prob) < 0.05  # plus the odd jump that lands on the successor by chance
    assert noisy < 0.05


def test_chain_prob_one_makes_every_step_a_successor() -> None:
    cfg = dataclasses.replace(
        CFG, n_users=40, chain_fraction=1.0, loyal_fraction=0.0, noisy_fraction=0.0, chain_prob=1.0
    )
    events, _ = generate_interactions(cfg)
    _, successor = item_structure(cfg)
    user, item = events["user_id"].to_numpy(), events["item_id"].to_numpy()
    same_user = user[1:] == user[:-1]
    assert np.all((successor[item[:-1]] == item[1:])[same_user])


def test_loyal_users_concentrate_on_few_categories(arrays: dict[str, np.ndarray]) -> None:
    categories, _ = item_structure(CFG)
    loyal = _top_category_share(arrays, categories, "loyal", k=3)
    noisy = _top_category_share(arrays, categories, "noisy", k=3)
    assert loyal > 0.9
    assert loyal - noisy > 0.2  # short noisy sequences look concentrated too, but far less so


def test_popularity_is_long_tailed(arrays: dict[str, np.ndarray]) -> None:
    counts = np.sort(np.bincount(arrays["item"], minlength=CFG.n_items + 1)[1:])[::-1]
    top_decile_share = counts[: CFG.n_items // 10].sum() / counts.sum()
    assert top_decile_share > 0.4  # uniform popularity would give 0.1


# -------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"chain_fraction": 0.5}, "sum to 1"),
        ({"noisy_fraction": -0.1, "loyal_fraction": 0.7}, r"\[0, 1\]"),
        ({"n_users": 0}, "n_users"),
        ({"n_items": 1}, "n_items"),
        ({"n_categories": 0}, "n_categories"),
        ({"n_categories": 1001}, "n_categories"),
        ({"mean_events_per_user": 4.0}, "mean_events_per_user"),
        ({"mean_events_per_user": float("nan")}, "mean_events_per_user"),
        ({"chain_prob": 1.5}, "chain_prob"),
        ({"popularity_exponent": -1.0}, "popularity_exponent"),
        ({"span_days": 0}, "span_days"),
        ({"start_timestamp": -1}, "start_timestamp"),
        ({"seed": -1}, "seed"),
        ({"n_users": 10.5}, "integer"),
    ],
)
def test_bad_configs_raise(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**changes)  # type: ignore[arg-type]
