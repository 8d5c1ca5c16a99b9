"""The Redis key layout on a Redis Cluster: what one script touches lies in one hash slot, and
the item shards spread over the slot space. No server: slots are computed as the cluster does."""

from __future__ import annotations

from collections import Counter

from redis.crc import key_slot

from state.store import SHARDS, RedisState, shard_of

STATE = RedisState("redis://127.0.0.1:1/0", prefix="streamrec")  # never connects


def _slots(keys: list[str]) -> set[int]:
    return {key_slot(k.encode()) for k in keys}


def test_a_users_keys_share_one_slot_whatever_the_id():
    for user in ["196", "", "}x", "{a}", "a{b}c", "x}y{", "用户"]:
        assert len(_slots(STATE._user_keys(user))) == 1, user  # noqa: SLF001


def test_each_shards_keys_share_one_slot():
    names = ("popular", "unavailable", "catalog", "updated", "counted", "acked")
    for shard in range(SHARDS):
        assert len(_slots(STATE._shard_keys(shard, *names))) == 1, shard  # noqa: SLF001


def test_shards_spread_evenly_over_three_primaries_and_items_over_shards():
    per = 16384 // 3
    slots = [next(iter(_slots(STATE._shard_keys(s)))) for s in range(SHARDS)]  # noqa: SLF001
    assert sorted(Counter(min(slot // per, 2) for slot in slots).values()) == [5, 5, 6]
    items = Counter(shard_of(str(i)) for i in range(100_000))
    assert len(items) == SHARDS and max(items.values()) < 1.05 * 100_000 / SHARDS
