"""Training examples: each interaction with the features its user and item had just before it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.data import Dataset
from models.index import ItemIndex
from models.inputs import idle_hours, item_row, user_row
from models.workflow import MultiHot
from state.features import (
    Replay,
    UserActivity,
    decay,
    replay,
)


class PopularityClock:
    """Time-decayed popularity of any item at any time, from an event log (vectorized).

    Equals `ItemStats.at(t)` after replaying the events strictly before `t`.
    """

    def __init__(self, item_ids: np.ndarray, timestamps_ms: np.ndarray):
        self._t0 = int(timestamps_ms.min()) if len(timestamps_ms) else 0
        order = np.lexsort((timestamps_ms, item_ids))
        items, times = item_ids[order], timestamps_ms[order]
        self._bounds: dict[str, tuple[int, int]] = {}
        starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]]) if len(items) else []
        ends = np.r_[starts[1:], len(items)] if len(items) else []
        for s, e in zip(starts, ends, strict=True):
            self._bounds[items[s]] = (int(s), int(e))
        self._times = times
        self._cum = np.cumsum(decay(self._t0 - times))  # grown from t0: see `decay`

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
                out[n] = total * decay(t - self._t0)
        return out.astype(np.float32)


@dataclass
class Examples:
    frame: pd.DataFrame  # workflow input columns, one row per interaction
    affinity: np.ndarray  # (n, G) user genre affinity before the interaction
    user_events: np.ndarray  # (n,) user event count before the interaction
    idle_hours: np.ndarray  # (n,) hours since the user's previous interaction (0: none)
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
    multi_hot = MultiHot().fit(dataset.items["genres"])
    rows = multi_hot.transform(dataset.items["genres"])
    vectors = dict(zip(dataset.items["item_id"], rows, strict=True))
    users = dataset.users.set_index("user_id").to_dict("index")
    items = {
        r.item_id: {"title": r.title, "year": _int_or_none(r.year), "genres": list(r.genres)}
        for r in dataset.items.itertuples()
    }
    return Prepared(multi_hot.vocab, vectors, users, items, replay(train, vectors))


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
        idle_hours=np.array(
            [idle_hours(s.last_event_ms, t) for s, t in zip(before, ts_ms, strict=True)],
            dtype=np.float32,
        ),
        popularity=clock.at(items, ts_ms),
        timestamps_ms=ts_ms,
    )


class SeenBefore:
    """Which items each user had interacted with before a position of a time-ordered log.

    The filtering stage drops everything the user has seen, so negatives must not be seen
    items either: the ranker would learn that high-scoring (memorised) items are negatives.
    """

    def __init__(self, user_ids: np.ndarray, item_ids: np.ndarray):
        user_codes, users = pd.factorize(np.asarray(user_ids, dtype=object))
        item_codes, items = pd.factorize(np.asarray(item_ids, dtype=object))
        self._users, self._items = pd.Index(users), pd.Index(items)
        self._width = len(self._items) + 1  # the last code: an item not in the log
        keys = user_codes.astype(np.int64) * self._width + item_codes
        order = np.argsort(keys, kind="stable")  # the first occurrence of a pair comes first
        self._keys, self._first = keys[order], order

    def mask(self, user_ids: np.ndarray, positions: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(n, k) bool: user_ids[r] had items[r, c] at a log position before positions[r]."""
        items = np.asarray(items, dtype=object)
        users = self._users.get_indexer(np.asarray(user_ids, dtype=object)).astype(np.int64)
        codes = self._items.get_indexer(items.reshape(-1)).reshape(items.shape).astype(np.int64)
        codes[codes < 0] = self._width - 1
        keys = users[:, None] * self._width + codes
        if not len(self._keys):
            return np.zeros(items.shape, dtype=bool)
        at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        hit = (self._keys[at] == keys) & (users >= 0)[:, None]
        return hit & (self._first[at] < np.asarray(positions)[:, None])


def hard_negatives(
    user_embeddings: np.ndarray,
    index: ItemIndex,
    positives: np.ndarray,
    user_ids: np.ndarray,
    positions: np.ndarray,
    seen: SeenBefore,
    n: int,
    depth: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """`n` negatives per positive drawn from the retrieval top-`depth` for that user state.

    The ranker then learns to order what retrieval actually hands it after filtering: the draws
    are uniform over the top-`depth` items the user had not seen before `positions` (the
    interaction's place in the log `seen` was built from) and that are not the positive. When
    fewer than `n` such items remain, the rest are drawn uniformly from the unseen catalog.

    Returns the draws (len, n) and whether each positive was among the top-`depth` candidates.
    """
    _, rows = index.index.search(np.ascontiguousarray(user_embeddings, dtype=np.float32), depth)
    ids = np.asarray(index.ids, dtype=object)
    candidates = ids[np.maximum(rows, 0)]
    is_positive = candidates == np.asarray(positives, dtype=object)[:, None]
    bad = is_positive | (rows < 0) | seen.mask(user_ids, positions, candidates)
    keys = rng.random(candidates.shape)
    keys[bad] = 2.0  # sorts after every allowed candidate
    pick = np.argsort(keys, axis=1, kind="stable")[:, :n]
    draws = np.take_along_axis(candidates, pick, axis=1)
    for r, c in zip(*np.nonzero(np.take_along_axis(keys, pick, axis=1) > 1.0), strict=True):
        draws[r, c] = _unseen_draw(ids, positives[r], user_ids[r], positions[r], seen, rng)
    return draws, is_positive.any(axis=1)


def _unseen_draw(ids, positive, user, position, seen: SeenBefore, rng, tries: int = 100):
    """A uniform catalog item other than the positive, unseen if one turns up in `tries`."""
    item = positive
    for _ in range(tries):
        item = ids[rng.integers(len(ids))]
        if (
            item != positive
            and not seen.mask(
                np.array([user], dtype=object),
                np.array([position]),
                np.array([[item]], dtype=object),
            )[0, 0]
        ):
            return item
    return item


def _int_or_none(value) -> int | None:
    return None if pd.isna(value) else int(value)
