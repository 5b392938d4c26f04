"""Seeded synthetic interaction logs with known heterogeneous structure.

Tests, the 10-million-event scale benchmark and the offline ``synthetic`` demo data set need logs whose
structure is known in advance, so models and analyses can be checked against ground truth. HyMoERec's experts
are meant to specialise on heterogeneous users and on niche versus popular items, so three user segments
behave differently on purpose:

- ``chain`` users follow item-to-item successor chains (a sequential signal that also reaches niche items:
  successors are spread uniformly over each category, whatever the item's popularity);
- ``loyal`` users stay within 1-3 categories (a long-term preference signal);
- ``noisy`` users sample from the global long-tailed popularity (no signal beyond popularity).

Item ids and user ids start at 1; 0 is left free as the padding id. Everything is vectorised with numpy; the
only Python loop runs over sequence *steps* (vectorised across users) for chain users, whose next item depends
on the previous one. Random streams are derived from ``(seed, stream)`` so the item catalogue does not change
when only the user-side settings (``n_users``, fractions, lengths...) change.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from pipeline.errors import ParamsError

MIN_EVENTS = 5  # every user gets at least this many events (leave-one-out splits need a few per user)
SEGMENTS = ("chain", "loyal", "noisy")  # segment codes 0, 1, 2 in this order
SECONDS_PER_DAY = 86_400

_CHAIN, _LOYAL, _NOISY = range(3)
_LENGTH_SIGMA = 1.0  # lognormal sigma of the length tail: heavy enough for a few very long users
_MEAN_GAP_HOURS = 6.0  # mean exponential gap between a user's consecutive events
_CROSS_CATEGORY_SUCCESSORS = 0.1  # share of successor links rewired to a uniform random item
_MAX_LOYAL_CATEGORIES = 3
_LOYAL_EXPLORE = 0.05  # share of a loyal user's events drawn from global popularity instead

# Independent random streams: (seed, stream) keeps the catalogue fixed when only user settings change.
_ITEM_STREAM, _USER_STREAM = 0, 1


@dataclass(frozen=True)
class SyntheticConfig:
    """Settings of :func:`generate_interactions`; validated on construction so bad configs fail early."""

    n_users: int = 2000  # (int) number of users, ids 1..n_users
    n_items: int = 1000  # (int) number of items, ids 1..n_items
    mean_events_per_user: float = 40.0  # (float) mean sequence length: MIN_EVENTS + lognormal tail
    n_categories: int = 20  # (int) item categories, balanced in size
    chain_fraction: float = 0.4  # (float) users following successor chains
    loyal_fraction: float = 0.4  # (float) users loyal to 1-3 categories
    noisy_fraction: float = 0.2  # (float) users sampling from global popularity
    chain_prob: float = 0.8  # (float) chance a chain user's next item is successor[previous item]
    popularity_exponent: float = 1.1  # (float) Zipf exponent of item popularity (0 = uniform)
    start_timestamp: int = 1_600_000_000  # (int) unix seconds; users start uniformly in the next span_days
    span_days: int = 180  # (int) days over which users start
    seed: int = 0  # (int) master seed; same seed -> identical tables

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
                raise ParamsError(f"{f.name} must be an integer, got {value!r}")
            if f.type == "float" and (not isinstance(value, numbers.Real) or not math.isfinite(value)):
                raise ParamsError(f"{f.name} must be a finite number, got {value!r}")
        if self.n_users < 1:
            raise ParamsError(f"n_users must be >= 1, got {self.n_users}")
        if self.n_items < 2:
            raise ParamsError(f"n_items must be >= 2, got {self.n_items}")
        if not 1 <= self.n_categories <= self.n_items:
            raise ParamsError(f"n_categories must be in [1, n_items={self.n_items}], got {self.n_categories}")
        if self.mean_events_per_user < MIN_EVENTS:
            raise ParamsError(
                f"mean_events_per_user must be >= {MIN_EVENTS} (the minimum length), got {self.mean_events_per_user}"
            )
        fractions = (self.chain_fraction, self.loyal_fraction, self.noisy_fraction)
        if any(not 0.0 <= f <= 1.0 for f in fractions):
            raise ParamsError(f"segment fractions must each be in [0, 1], got {fractions}")
        if not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
            raise ParamsError(
                "chain_fraction + loyal_fraction + noisy_fraction must sum to 1, got "
                f"{self.chain_fraction} + {self.loyal_fraction} + {self.noisy_fraction} = {sum(fractions):g}"
            )
        if not 0.0 <= self.chain_prob <= 1.0:
            raise ParamsError(f"chain_prob must be in [0, 1], got {self.chain_prob}")
        if self.popularity_exponent < 0:
            raise ParamsError(f"popularity_exponent must be >= 0, got {self.popularity_exponent}")
        if self.start_timestamp < 0:
            raise ParamsError(f"start_timestamp must be >= 0, got {self.start_timestamp}")
        if self.span_days < 1:
            raise ParamsError(f"span_days must be >= 1, got {self.span_days}")
        if self.seed < 0:
            raise ParamsError(f"seed must be >= 0 (numpy SeedSequence), got {self.seed}")


class _Catalogue(NamedTuple):
    categories: np.ndarray  # (n_items + 1,) int64, category of each item id; [0] = -1 for padding
    successor: np.ndarray  # (n_items + 1,) int64, successor item id of each item id; [0] = 0
    popularity: np.ndarray  # (n_items + 1,) float64, sampling probability of each item id; [0] = 0


def item_structure(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth ``(categories, successor)``, both indexed by item id (index 0 is padding).

    ``categories[i]`` is the category (0-based) of item ``i`` and ``successor[i]`` the item a chain user moves
    to after ``i``; indexing by id lets analyses write ``successor[events]`` directly. Depends only on
    ``n_items``, ``n_categories``, ``popularity_exponent`` and ``seed``.
    """
    catalogue = _catalogue(cfg)
    return catalogue.categories, catalogue.successor


def item_popularity(cfg: SyntheticConfig) -> np.ndarray:
    """Ground-truth sampling probability of each item id (index 0 is padding and has probability 0)."""
    return _catalogue(cfg).popularity


def generate_interactions(cfg: SyntheticConfig) -> tuple[pa.Table, pa.Table]:
    """Generate ``(events, users)`` tables.

    ``events`` has int64 columns ``user_id``, ``item_id`` and ``timestamp`` (unix seconds), sorted by user and
    then time (timestamps non-decreasing per user; ties are possible). ``users`` has ``user_id`` (int64) and
    ``segment`` (string: ``chain``, ``loyal`` or ``noisy``), the ground truth for per-segment analyses.
    """
    catalogue = _catalogue(cfg)
    rng = np.random.default_rng([cfg.seed, _USER_STREAM])

    segment = _assign_segments(cfg, rng)
    lengths = _sequence_lengths(cfg, rng)
    offsets = np.zeros(cfg.n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])

    segment_of_event = np.repeat(segment, lengths)
    items = np.empty(total, dtype=np.int64)
    for code, fill in ((_NOISY, _fill_noisy), (_LOYAL, _fill_loyal), (_CHAIN, _fill_chain)):
        users = np.flatnonzero(segment == code)
        positions = np.flatnonzero(segment_of_event == code)
        items[positions] = fill(cfg, catalogue, rng, lengths[users])
    del segment_of_event

    timestamps = _timestamps(cfg, rng, lengths, offsets)
    user_ids = np.repeat(np.arange(1, cfg.n_users + 1, dtype=np.int64), lengths)
    events = pa.table({"user_id": pa.array(user_ids), "item_id": pa.array(items), "timestamp": pa.array(timestamps)})
    users = pa.table(
        {
            "user_id": pa.array(np.arange(1, cfg.n_users + 1, dtype=np.int64)),
            "segment": pa.array(SEGMENTS, type=pa.string()).take(pa.array(segment)),
        }
    )
    return events, users


# --------------------------------------------------------------------------------------------- catalogue


def _catalogue(cfg: SyntheticConfig) -> _Catalogue:
    rng = np.random.default_rng([cfg.seed, _ITEM_STREAM])
    n = cfg.n_items

    # Balanced, shuffled categories: every category is non-empty because n_categories <= n_items.
    category = rng.permutation(np.arange(n, dtype=np.int64) % cfg.n_categories)

    # Zipf popularity over a random ranking, so popular items are not simply the low ids.
    rank = rng.permutation(n) + 1
    weight = rank.astype(np.float64) ** -cfg.popularity_exponent
    popularity = weight / weight.sum()

    # Successors: one random cycle through each category (so chains cover niche items as much as popular
    # ones), then a few links rewired anywhere so categories are not closed worlds.
    order = np.lexsort((rng.random(n), category))
    sorted_category = category[order]
    first = np.r_[True, sorted_category[1:] != sorted_category[:-1]]
    last = np.r_[first[1:], True]
    index = np.arange(n)
    group_start = np.maximum.accumulate(np.where(first, index, 0))
    successor = np.empty(n, dtype=np.int64)
    successor[order] = order[np.where(last, group_start, index + 1)]
    # Singleton categories would loop onto themselves; rewire those too, never onto the item itself.
    rewire = np.flatnonzero((rng.random(n) < _CROSS_CATEGORY_SUCCESSORS) | (successor == index))
    target = rng.integers(0, n - 1, size=len(rewire))
    successor[rewire] = target + (target >= rewire)

    return _Catalogue(
        categories=np.r_[np.int64(-1), category],
        successor=np.r_[np.int64(0), successor + 1],
        popularity=np.r_[0.0, popularity],
    )


def _sample_popular(catalogue: _Catalogue, rng: np.random.Generator, size: int) -> np.ndarray:
    """Item ids drawn i.i.d. from global popularity (inverse-CDF: one searchsorted, no Python loop)."""
    cdf = np.cumsum(catalogue.popularity[1:])
    ids = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
    return np.minimum(ids, len(cdf) - 1) + 1  # the min guards against rounding at the top end


def _sample_in_categories(catalogue: _Catalogue, rng: np.random.Generator, cats: np.ndarray) -> np.ndarray:
    """One item id per entry of ``cats``, drawn by popularity within that category.

    Items are laid out category by category on one cumulative-popularity axis; each draw is a uniform point
    inside its category's interval, so a single searchsorted serves every category at once.
    """
    category = catalogue.categories[1:]
    order = np.argsort(category, kind="stable")
    cum = np.r_[0.0, np.cumsum(catalogue.popularity[1:][order])]
    bounds = np.searchsorted(category[order], np.arange(category.max() + 2))  # item slots of each category
    lo, hi = cum[bounds[:-1]], cum[bounds[1:]]
    point = lo[cats] + rng.random(len(cats)) * (hi[cats] - lo[cats])
    slot = np.searchsorted(cum, point, side="right") - 1
    slot = np.clip(slot, bounds[cats], bounds[cats + 1] - 1)  # float rounding must not leave the category
    return order[slot] + 1


# ------------------------------------------------------------------------------------------------- users


def _assign_segments(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Exact segment sizes (largest remainder), shuffled over user ids: fractions hold even for few users."""
    fractions = np.array([cfg.chain_fraction, cfg.loyal_fraction, cfg.noisy_fraction])
    exact = fractions / fractions.sum() * cfg.n_users
    counts = np.floor(exact).astype(np.int64)
    shortfall = cfg.n_users - int(counts.sum())
    counts[np.argsort(counts - exact, kind="stable")[:shortfall]] += 1
    return rng.permutation(np.repeat(np.arange(3, dtype=np.int8), counts))


def _sequence_lengths(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """MIN_EVENTS plus a lognormal tail whose mean makes the overall mean ``mean_events_per_user``."""
    tail_mean = cfg.mean_events_per_user - MIN_EVENTS
    if tail_mean <= 0:
        return np.full(cfg.n_users, MIN_EVENTS, dtype=np.int64)
    mu = math.log(tail_mean) - _LENGTH_SIGMA**2 / 2
    tail = np.rint(rng.lognormal(mu, _LENGTH_SIGMA, size=cfg.n_users)).astype(np.int64)
    return tail + MIN_EVENTS


def _timestamps(cfg: SyntheticConfig, rng: np.random.Generator, lengths: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Users start uniformly over ``span_days``; gaps between their events are exponential (hours).

    Users longer than the mean get proportionally shorter gaps (by the square root of the ratio): heavy users
    are also frequent users, and the log does not trail on for months past ``span_days``.
    One global cumulative sum does all users at once: each user's first "gap" is set to the jump from the
    previous user's last timestamp to this user's start, which resets the running sum per user.
    """
    starts = cfg.start_timestamp + rng.integers(0, cfg.span_days * SECONDS_PER_DAY, size=cfg.n_users)
    scale = _MEAN_GAP_HOURS * 3600 * np.sqrt(np.minimum(1.0, cfg.mean_events_per_user / lengths))
    gap = rng.standard_exponential(int(offsets[-1]), dtype=np.float32)  # float32 halves the temporary
    gap *= np.repeat(scale.astype(np.float32), lengths)
    times = np.rint(gap).astype(np.int64)
    del gap
    first = offsets[:-1]
    times[first] = 0
    user_span = np.add.reduceat(times, first)  # every user has >= MIN_EVENTS, so no empty segments
    previous_last = np.r_[np.int64(0), (starts + user_span)[:-1]]
    times[first] = starts - previous_last
    np.cumsum(times, out=times)
    return times


# --------------------------------------------------------------------------------------------- segments


def _fill_noisy(
    cfg: SyntheticConfig, catalogue: _Catalogue, rng: np.random.Generator, lengths: np.ndarray
) -> np.ndarray:
    return _sample_popular(catalogue, rng, int(lengths.sum()))


def _fill_loyal(
    cfg: SyntheticConfig, catalogue: _Catalogue, rng: np.random.Generator, lengths: np.ndarray
) -> np.ndarray:
    """Each loyal user draws 1-3 categories (with replacement, so repeats mean fewer) and stays in them."""
    n_users = len(lengths)
    n_cats = rng.integers(1, _MAX_LOYAL_CATEGORIES + 1, size=n_users)
    favourites = rng.integers(0, cfg.n_categories, size=(n_users, _MAX_LOYAL_CATEGORIES))
    row = np.repeat(np.arange(n_users), lengths)
    pick = (rng.random(len(row)) * n_cats[row]).astype(np.int64)
    items = _sample_in_categories(catalogue, rng, favourites[row, pick])
    explore = np.flatnonzero(rng.random(len(row)) < _LOYAL_EXPLORE)
    items[explore] = _sample_popular(catalogue, rng, len(explore))
    return items


def _fill_chain(
    cfg: SyntheticConfig, catalogue: _Catalogue, rng: np.random.Generator, lengths: np.ndarray
) -> np.ndarray:
    """Markov chains: follow ``successor`` with ``chain_prob``, else jump to a popularity draw.

    Every slot is pre-filled with its jump candidate; then steps t = 1, 2, ... overwrite the slots that follow
    their predecessor. Users are sorted longest first, so the users still active at step t are a prefix.
    """
    total = int(lengths.sum())
    items = _sample_popular(catalogue, rng, total)
    follow = rng.random(total) < cfg.chain_prob
    if total == 0:
        return items
    starts = np.r_[np.int64(0), np.cumsum(lengths)[:-1]]
    by_length = np.argsort(-lengths, kind="stable")
    starts, lengths = starts[by_length], lengths[by_length]
    neg_lengths = -lengths  # ascending, for searchsorted
    for step in range(1, int(lengths[0])):
        n_active = int(np.searchsorted(neg_lengths, -step, side="left"))  # users with length > step
        slots = starts[:n_active] + step
        slots = slots[follow[slots]]
        items[slots] = catalogue.successor[items[slots - 1]]
    return items
