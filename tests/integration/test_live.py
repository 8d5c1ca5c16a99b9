"""The serving stages' in-memory item table against a real Valkey: it mirrors what the stream
processors write, exactly, and recovers when the change stream moved on without it."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from serving.live import LiveItems
from state.store import SHARD_TAGS, RedisState, shard_of

pytestmark = pytest.mark.integration

T0 = 893_000_000_000


@pytest.fixture()
def state(backend, request):
    state = RedisState(backend.redis_url, prefix=f"live-{request.node.name}"[:40])
    state.load(
        seen=[], popularity={"1": 3.0, "2": 1.0}, popularity_ms={"1": T0, "2": T0}, epoch_ms=T0
    )
    return state


def _interactions(state: RedisState, events: list[tuple[str, int]]) -> int:
    """Count these (item, ms) interactions as a worker does; the change entries written."""
    state.count([(uuid.uuid4().hex, item, ts) for item, ts in events])
    return len({shard_of(item) for item, _ in events})


def _zset(state: RedisState, items: list[str]) -> list[float]:
    return state.popularity_scores(items)


def test_popularity_mirrors_the_sorted_set_bit_for_bit(artifacts, state):
    items = LiveItems(artifacts, state)
    rng = np.random.default_rng(0)
    ids = [str(i) for i in rng.integers(1, 200, 3000)]
    times = T0 + np.sort(rng.integers(0, 10**10, 3000))
    entries = 0
    for start in range(0, 3000, 250):  # a worker's micro-batches
        entries += _interactions(
            state,
            list(zip(ids[start : start + 250], times[start : start + 250].tolist(), strict=True)),
        )
    assert items.sync() == entries
    distinct = sorted(set(ids))
    assert items.popularity[items.rows(distinct)].tolist() == _zset(state, distinct)
    assert items.sync() == 0  # nothing new: nothing applied


def test_availability_and_catalog_additions_reach_the_table(artifacts, state):
    items = LiveItems(artifacts, state)
    items.vectors  # noqa: B018 - loaded: a new item must be embedded into index and vectors
    n = len(items.ids)
    pipe = state.pipeline()
    state.update_item(pipe, "5", T0, available=False)
    state.update_item(
        pipe, "new-film", T0, True, {"title": "New", "year": 1998, "genres": ["Drama"]}, True
    )
    state.update_item(pipe, "never-heard-of", T0, available=False)
    state.execute(pipe)
    items.sync()
    assert items.unavailable[items.rows(["5"])].tolist() == [True]
    assert items.ids[n:] == ["new-film"] and len(items.index.ids) == n + 1
    assert np.array_equal(items.vectors[n], items.index.index.reconstruct(n))
    assert items.features["item_year"].shape[0] == n + 1
    # an unknown item made unavailable is remembered for when it joins the catalog
    pipe = state.pipeline()
    late = {"title": "Late", "year": 1990, "genres": []}
    state.update_item(pipe, "never-heard-of", T0 + 1, False, late, new_profile=True)
    state.update_item(pipe, "5", T0 + 1, available=True)
    state.execute(pipe)
    items.sync()
    assert items.unavailable[items.rows(["never-heard-of", "5"])].tolist() == [True, False]


def test_a_reader_left_behind_by_trimming_reloads_and_agrees(artifacts, state, monkeypatch):
    from state import store

    items = LiveItems(artifacts, state)
    monkeypatch.setattr(store, "CHANGES_LIMIT", 1)
    for n in range(300):  # MAXLEN ~ trims whole nodes (100 entries): the reader's next is gone
        _interactions(state, [("1", T0 + n)])
    shard = shard_of("1")
    first = state.client.xrange(state.key("changes", SHARD_TAGS[shard]), count=1)[0][1]
    assert int(first[b"n"]) > items._last[shard][1] + 1  # noqa: SLF001 - the test's premise
    items.sync()
    assert items.popularity[items.rows(["1", "2"])].tolist() == _zset(state, ["1", "2"])


def test_a_reset_by_a_new_load_is_picked_up(artifacts, state):
    items = LiveItems(artifacts, state)
    state.load(seen=[], popularity={"7": 2.0}, popularity_ms={"7": T0}, epoch_ms=T0 + 1)
    _interactions(state, [("7", T0 + 5), ("8", T0 + 6)])  # read with the reset, in one go
    items.sync()
    assert items.epoch == T0 + 1
    assert items.top(1).tolist() == items.rows(["7"]).tolist()
    assert items.popularity[items.rows(["7", "8", "1"])].tolist() == _zset(state, ["7", "8"]) + [
        0.0
    ]
