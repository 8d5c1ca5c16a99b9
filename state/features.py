"""Stream-updatable features, computed by the same functions offline and online.

Training replays the training interactions through `update_user` / `ItemPopularity`; the stream
processors call the same functions on live events. So a user's features at serving time are
built exactly as they were for training, and a user unknown at training time gets features from
its first events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

HISTORY_LEN = 20
GENRE_DECAY = 0.8  # weight of the past in the genre-affinity moving average
POPULARITY_HALF_LIFE_MS = 7 * 24 * 3600 * 1000
DECAY_PER_MS = math.log(2) / POPULARITY_HALF_LIFE_MS


@dataclass
class UserActivity:
    """One user's stream state: the `user_activity` feature view."""

    recent_items: list[str] = field(default_factory=list)  # most recent first
    event_count: int = 0
    genre_affinity: list[float] = field(default_factory=list)  # a distribution over genres
    last_event_ms: int = 0


def update_user(
    state: UserActivity | None, item_id: str, genres: np.ndarray, ts_ms: int
) -> UserActivity:
    """The state after one more interaction (`genres`: the item's multi-hot genre vector).

    An event older than the newest one applied (late, out of order) is counted but does not
    rewrite the recency features: it never overwrites newer state.
    """
    state = state or UserActivity()
    if ts_ms < state.last_event_ms:
        return replace(state, event_count=state.event_count + 1)
    recent = [item_id] + [i for i in state.recent_items if i != item_id]
    g = np.asarray(genres, dtype=np.float64)
    g = g / g.sum() if g.sum() > 0 else g
    if state.genre_affinity:
        affinity = GENRE_DECAY * np.asarray(state.genre_affinity) + (1 - GENRE_DECAY) * g
    else:
        affinity = g
    return UserActivity(
        recent_items=recent[:HISTORY_LEN],
        event_count=state.event_count + 1,
        genre_affinity=[float(x) for x in affinity],
        last_event_ms=max(ts_ms, state.last_event_ms),
    )


def decay(elapsed_ms):
    """The share of a time-decayed count left after `elapsed_ms` (a number or an array): the
    one definition of popularity's decay. A negative time grows the count, which is how
    `state.store` keeps popularity on a scale that never needs rewriting."""
    return np.exp(-DECAY_PER_MS * np.asarray(elapsed_ms, dtype=np.float64))


@dataclass
class ItemStats:
    """One item's popularity, offline (training's replay, the artifacts' `item_stats.parquet`).
    Online it lives only in the `popular` sorted set of `state.store`, on another scale."""

    popularity: float = 0.0  # time-decayed interaction count as of `popularity_ms`
    popularity_ms: int = 0

    def at(self, ts_ms: int) -> float:
        return self.popularity * float(decay(max(ts_ms - self.popularity_ms, 0)))


def update_item(stats: ItemStats | None, ts_ms: int) -> ItemStats:
    stats = stats or ItemStats()
    ts = max(ts_ms, stats.popularity_ms)
    return ItemStats(stats.at(ts) + 1.0, ts)


@dataclass
class Replay:
    """Features as they were just before each interaction, and the states after the last."""

    users_before: list[UserActivity]  # aligned with the interactions
    popularity_before: np.ndarray  # the item's decayed popularity just before each interaction
    users: dict[str, UserActivity]
    items: dict[str, ItemStats]


def replay(
    interactions: pd.DataFrame,
    genre_vectors: dict[str, np.ndarray],
    users: dict[str, UserActivity] | None = None,
    items: dict[str, ItemStats] | None = None,
) -> Replay:
    """Run interactions (sorted by time) through the stream updates, from optional states."""
    users = dict(users or {})
    items = dict(items or {})
    width = len(next(iter(genre_vectors.values()))) if genre_vectors else 0
    no_genres = np.zeros(width)
    before, pop = [], np.zeros(len(interactions), dtype=np.float32)
    rows = zip(
        interactions["user_id"].to_numpy(),
        interactions["item_id"].to_numpy(),
        interactions["timestamp"].to_numpy(),
        strict=True,
    )
    for n, (user, item, ts) in enumerate(rows):
        ts_ms = int(ts) * 1000
        state = users.get(user)
        before.append(state or UserActivity())
        stats = items.get(item)
        pop[n] = stats.at(ts_ms) if stats else 0.0
        users[user] = update_user(state, item, genre_vectors.get(item, no_genres), ts_ms)
        items[item] = update_item(stats, ts_ms)
    return Replay(before, pop, users, items)
