"""Training examples: each interaction with the features its user and item had just before it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.data import Dataset
from models.features import (
    POPULARITY_HALF_LIFE_MS,
    ItemStats,
    Replay,
    UserActivity,
    genre_vectors,
    genre_vocabulary,
    replay,
)
from models.index import ItemIndex
from models.inputs import item_row, user_row


class PopularityClock:
    """Time-decayed popularity of any item at any time, from an event log (vectorized).

    Equals `ItemStats.at(t)` after replaying the events strictly before `t`.
    """

    def __init__(self, item_ids: np.ndarray, timestamps_ms: np.ndarray):
        self._k = math.log(2) / POPULARITY_HALF_LIFE_MS
        self._t0 = int(timestamps_ms.min()) if len(timestamps_ms) else 0
        order = np.lexsort((timestamps_ms, item_ids))
        items, times = item_ids[order], timestamps_ms[order]
        self._bounds: dict[str, tuple[int, int]] = {}
        starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]]) if len(items) else []
        ends = np.r_[starts[1:], len(items)] if len(items) else []
        for s, e in zip(starts, ends, strict=True):
            self._bounds[items[s]] = (int(s), int(e))
        self._times = times
        self._cum = np.cumsum(np.exp((times - self._t0) * self._k))

    def at(self, item_ids: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        ts_ms = np.broadcast_to(np.asarray(ts_ms, dtype=np.int64), (len(item_ids),))
        out = np.zeros(len(item_ids), dtype=np.float64)
        for n, (item, t) in enumerate(zip(item_ids, ts_ms, strict=True)):
            bounds = self._bounds.get(item)
            if bounds is None:
                continue
            s, e = bounds
            j = s + int(np.searchsorted(self._times[s:e], t, side="left"))
            if j > s:
                total = self._cum[j - 1] - (self._cum[s - 1] if s > 0 else 0.0)
                out[n] = total * math.exp(-(t - self._t0) * self._k)
        return out.astype(np.float32)


@dataclass
class Examples:
    frame: pd.DataFrame  # workflow input columns, one row per interaction
    affinity: np.ndarray  # (n, G) user genre affinity before the interaction
    user_events: np.ndarray  # (n,) user event count before the interaction
    popularity: np.ndarray  # (n,) item popularity just before the interaction
    timestamps_ms: np.ndarray


@dataclass
class Prepared:
    genres: list[str]
    vectors: dict[str, np.ndarray]
    user_profiles: dict[str, dict]
    item_profiles: dict[str, dict]
    state: Replay  # after the training interactions


def prepare(dataset: Dataset, train: pd.DataFrame) -> Prepared:
    genres = genre_vocabulary(dataset.items["genres"])
    vectors = genre_vectors(dataset.items, genres)
    users = dataset.users.set_index("user_id").to_dict("index")
    items = {
        r.item_id: {"title": r.title, "year": _int_or_none(r.year), "genres": list(r.genres)}
        for r in dataset.items.itertuples()
    }
    return Prepared(genres, vectors, users, items, replay(train, vectors))


def build_examples(
    interactions: pd.DataFrame,
    before: list[UserActivity],
    prepared: Prepared,
    clock: PopularityClock,
    item_ids: np.ndarray | None = None,
) -> Examples:
    """Rows for `interactions` (or for the same users/times with other `item_ids`, negatives)."""
    items = interactions["item_id"].to_numpy() if item_ids is None else item_ids
    ts_ms = interactions["timestamp"].to_numpy().astype(np.int64) * 1000
    rows = []
    for user, item, state in zip(interactions["user_id"], items, before, strict=True):
        row = user_row(prepared.user_profiles.get(user), state.recent_items)
        row.update(item_row(item, prepared.item_profiles.get(item)))
        rows.append(row)
    g = len(prepared.genres)
    affinity = np.array(
        [s.genre_affinity if s.genre_affinity else np.zeros(g) for s in before], dtype=np.float32
    ).reshape(len(before), g)
    return Examples(
        frame=pd.DataFrame(rows),
        affinity=affinity,
        user_events=np.array([s.event_count for s in before], dtype=np.int64),
        popularity=clock.at(items, ts_ms),
        timestamps_ms=ts_ms,
    )


def hard_negatives(
    user_embeddings: np.ndarray,
    index: ItemIndex,
    positives: np.ndarray,
    recent: list[list[str]],
    n: int,
    depth: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """`n` negatives per positive drawn from the retrieval top-`depth` for that user state.

    The ranker then learns to order what retrieval actually hands it, not random items; a draw
    that is the positive or an item the user has just seen is redrawn uniformly from the catalog.
    """
    _, rows = index.index.search(np.ascontiguousarray(user_embeddings, dtype=np.float32), depth)
    ids = np.asarray(index.ids, dtype=object)
    picks = rows[np.arange(len(rows))[:, None], rng.integers(0, rows.shape[1], (len(rows), n))]
    draws = ids[np.maximum(picks, 0)]
    for r in range(len(draws)):
        bad = set(recent[r]) | {positives[r]}
        for c in range(n):
            while draws[r, c] in bad:
                draws[r, c] = ids[rng.integers(len(ids))]
    return draws


def state_items(state: Replay) -> pd.DataFrame:
    return pd.DataFrame(
        [{"item_id": i, **vars(s)} for i, s in state.items.items()],
        columns=["item_id", *vars(ItemStats()).keys()],
    )


def _int_or_none(value) -> int | None:
    return None if pd.isna(value) else int(value)
