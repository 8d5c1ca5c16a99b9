"""The serving state in Redis that is not a Feast feature: filter sets, live popularity ranking,
catalog additions, and event ids already applied. One place for the key layout.

- `{p}:seen:{user}`      ZSET item → last interaction ms (bounded to the newest `SEEN_LIMIT`)
- `{p}:unavailable`      SET of item ids that must not be recommended
- `{p}:popular`          ZSET item → popularity on a growing scale (see `popularity_weight`)
- `{p}:catalog`          HASH item → JSON profile of items added after training
- `{p}:applied:{user}`   SET of event ids applied to that user's state (idempotency)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence

from models.features import POPULARITY_HALF_LIFE_MS

SEEN_LIMIT = 1000
# Time origin of the popularity scale; far enough back that real event times are after it and
# close enough that exp() stays finite for centuries at a 7-day half-life.
POPULARITY_EPOCH_MS = 946_684_800_000  # 2000-01-01


def popularity_weight(ts_ms: int) -> float:
    """Weight of one event in `popular` so that ranking by the sum equals ranking by the
    time-decayed count at any later time (every score decays by the same factor)."""
    exponent = (ts_ms - POPULARITY_EPOCH_MS) * math.log(2) / POPULARITY_HALF_LIFE_MS
    return math.exp(min(exponent, 700.0))


class RedisState:
    def __init__(self, redis_url: str, prefix: str = "streamrec"):
        import redis

        self.client = redis.Redis.from_url(redis_url)
        self.prefix = prefix

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- reads (hot path) --------------------------------------------------------------------
    def seen_mask(self, user_id: str, items: Sequence[str]) -> list[bool]:
        if not items:
            return []
        scores = self.client.zmscore(self.key("seen", user_id), list(items))
        return [s is not None for s in scores]

    def unavailable_mask(self, items: Sequence[str]) -> list[bool]:
        if not items:
            return []
        return [bool(x) for x in self.client.smismember(self.key("unavailable"), list(items))]

    def popular(self, n: int) -> list[str]:
        return [i.decode() for i in self.client.zrevrange(self.key("popular"), 0, n - 1)]

    def catalog_additions(self, items: Iterable[str]) -> dict[str, dict]:
        items = list(items)
        if not items:
            return {}
        values = self.client.hmget(self.key("catalog"), items)
        return {i: json.loads(v) for i, v in zip(items, values, strict=True) if v is not None}

    def all_catalog_additions(self) -> dict[str, dict]:
        return {
            k.decode(): json.loads(v) for k, v in self.client.hgetall(self.key("catalog")).items()
        }

    def seen(self, user_id: str) -> list[str]:
        return [i.decode() for i in self.client.zrevrange(self.key("seen", user_id), 0, -1)]

    # --- writes (stream processors, feature load) --------------------------------------------
    def add_seen(self, pipe, user_id: str, item_id: str, ts_ms: int) -> None:
        key = self.key("seen", user_id)
        pipe.zadd(key, {item_id: ts_ms}, gt=True)  # adds new members; keeps the newest time
        pipe.zremrangebyrank(key, 0, -SEEN_LIMIT - 1)

    def add_popularity(self, pipe, item_id: str, ts_ms: int) -> None:
        pipe.zincrby(self.key("popular"), popularity_weight(ts_ms), item_id)

    def set_available(self, pipe, item_id: str, available: bool) -> None:
        if available:
            pipe.srem(self.key("unavailable"), item_id)
        else:
            pipe.sadd(self.key("unavailable"), item_id)

    def add_catalog_item(self, pipe, item_id: str, profile: dict) -> None:
        pipe.hset(self.key("catalog"), item_id, json.dumps(profile))

    def load(
        self,
        seen: Iterable[tuple[str, str, int]],
        popularity: dict[str, float],
        popularity_ms: dict[str, int],
    ) -> None:
        """Bulk-load the state after training: seen sets and the popularity ranking."""
        pipe = self.client.pipeline(transaction=False)
        for n, (user, item, ts_ms) in enumerate(seen):
            self.add_seen(pipe, user, item, ts_ms)
            if n % 5000 == 4999:
                pipe.execute()
        pipe.delete(self.key("popular"))
        scores = {
            i: p * popularity_weight(popularity_ms[i]) for i, p in popularity.items() if p > 0
        }
        if scores:
            pipe.zadd(self.key("popular"), scores)
        pipe.execute()
