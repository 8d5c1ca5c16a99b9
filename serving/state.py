"""Redis state beside the Feast features: filter sets, the live popularity ranking, catalog
additions, and the stream processors' authoritative user state. One place for the key layout.

- `{p}:seen:{user}`      ZSET item → last interaction ms (bounded to the newest `SEEN_LIMIT`)
- `{p}:unavailable`      SET of item ids that must not be recommended
- `{p}:popular`          ZSET item → Σ exp(k·(t_event − epoch)): ranking by it is ranking by
                         time-decayed popularity at any time; the decayed count at time t is
                         score · exp(−k·(t − epoch)) (see `popularity_at`)
- `{p}:popular:epoch`    the epoch (ms) of that scale, set when the state is loaded
- `{p}:catalog`          HASH item → JSON profile (title, year, genres, timestamp_ms) of items
                         added or changed after training
- `{p}:updated`          HASH item → event ms of the newest item update applied (newest wins)
- `{p}:user:{user}`      JSON `UserActivity`: the user's stream state (Feast gets a projection)
- `{p}:applied:{user}`   ZSET event id → event ms of the newest `APPLIED_LIMIT` applied events
- `{p}:pending`          SET of `user:event id` applied to the state but not yet to Feast
- `{p}:acked`            count of interactions whose effects are all written (replay barrier)
- `{p}:changes`          STREAM of what the serving stages keep in memory (popularity deltas,
                         availability, catalog profiles, resets), entries numbered by
                         `{p}:changes:n` so that a reader notices entries trimmed before it read
                         them (it then reloads a snapshot, see `snapshot`)

Every client has socket timeouts: a stalled server raises `redis.TimeoutError` instead of
hanging a stream worker or a serving stage for ever.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence

from models.features import POPULARITY_HALF_LIFE_MS, UserActivity

SEEN_LIMIT = 1000
CHANGES_LIMIT = 100_000  # entries kept in `{p}:changes` (approximately: MAXLEN ~)
APPLIED_LIMIT = 1000
TIMEOUT_S = 2.0  # socket timeouts of every streamrec Redis client
_K = math.log(2) / POPULARITY_HALF_LIFE_MS

# Counts as acked the pending events that are still pending: a batch retried after a failure
# (or by a new worker after a crash) acks each event once.
_ACK = """
local n = redis.call('SREM', KEYS[1], unpack(ARGV))
redis.call('INCRBY', KEYS[2], n)
return n
"""


# Appends one numbered entry to the change stream (atomic with the caller's transaction).
_LOG = """
local n = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'n', n, 'kind', ARGV[2], 'data', ARGV[3])
return n
"""


def redis_client(redis_url: str):
    import redis

    return redis.Redis.from_url(
        redis_url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
    )


class NotDurable(RuntimeError):
    """Redis did not confirm that a write reached its append-only file in time."""


def pending_id(user_id: str, event_id: str) -> str:
    return f"{user_id}:{event_id}"


class RedisState:
    def __init__(self, redis_url: str, prefix: str = "streamrec", wait_aof: bool = True):
        self.client = redis_client(redis_url)
        self.prefix = prefix
        self.wait_aof = wait_aof
        self._epoch: int | None = None
        self._ack = self.client.register_script(_ACK)
        self._log = self.client.register_script(_LOG)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- popularity scale ----------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        if self._epoch is None:
            value = self.client.get(self.key("popular", "epoch"))
            self._epoch = int(value) if value is not None else 0
        return self._epoch

    def popularity_weight(self, ts_ms: int) -> float:
        """One event's weight on the `popular` scale. float64 holds ~1000 half-lives past the
        epoch (19 years at 7 days); beyond that the weight saturates instead of overflowing."""
        return math.exp(min((ts_ms - self.epoch) * _K, 700.0))

    def popularity_at(self, score: float, ts_ms: int) -> float:
        return score * math.exp(-(ts_ms - self.epoch) * _K)

    # --- reads (hot path) ----------------------------------------------------------------------
    def unavailable_mask(self, items: Sequence[str]) -> list[bool]:
        if not items:
            return []
        return [bool(x) for x in self.client.smismember(self.key("unavailable"), list(items))]

    def seen_sets(self, user_ids: Sequence[str]) -> list[list[bytes]]:
        """Each user's seen items (raw ids), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for user in user_ids:
            pipe.zrange(self.key("seen", user), 0, -1)
        return pipe.execute() if user_ids else []

    def changes(self, after: bytes, count: int = 1000) -> list[tuple[bytes, dict]]:
        """Entries of the change stream after stream id `after` (oldest first, up to `count`)."""
        found = self.client.xread({self.key("changes"): after}, count=count)
        return found[0][1] if found else []

    def snapshot(self) -> dict:
        """What the change stream describes, as of one instant: popularity, unavailable items,
        catalog profiles, the popularity epoch, and the stream's last entry (id and number)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zrange(self.key("popular"), 0, -1, withscores=True)
        pipe.smembers(self.key("unavailable"))
        pipe.hgetall(self.key("catalog"))
        pipe.get(self.key("popular", "epoch"))
        pipe.xrevrange(self.key("changes"), count=1)
        pipe.get(self.key("changes", "n"))
        popular, unavailable, catalog, epoch, last, n = pipe.execute()
        return {
            "popularity": {i.decode(): s for i, s in popular},
            "unavailable": {i.decode() for i in unavailable},
            "catalog": {i.decode(): json.loads(p) for i, p in catalog.items()},
            "epoch": int(epoch or 0),
            "last_id": last[0][0] if last else b"0-0",
            "n": int(n or 0),
        }

    def popularity_scores(self, items: Sequence[str]) -> list[float]:
        if not items:
            return []
        return [s or 0.0 for s in self.client.zmscore(self.key("popular"), list(items))]

    def catalog_additions(self, items: Iterable[str]) -> dict[str, dict]:
        """Profiles of these items if they were added or changed after training."""
        items = list(items)
        if not items:
            return {}
        values = self.client.hmget(self.key("catalog"), items)
        return {i: json.loads(v) for i, v in zip(items, values, strict=True) if v is not None}

    def update_times(self, items: Sequence[str]) -> list[int | None]:
        if not items:
            return []
        return [
            None if v is None else int(v) for v in self.client.hmget(self.key("updated"), items)
        ]

    def acked(self) -> int:
        """Interactions fully processed (state and Feast written) since the state was loaded."""
        return int(self.client.get(self.key("acked")) or 0)

    def ack(self, pending: Sequence[str]) -> int:
        """Ack these pending events (see `mark_pending`); returns how many were still pending."""
        keys = [self.key("pending"), self.key("acked")]
        chunks = (pending[i : i + 1000] for i in range(0, len(pending), 1000))  # Lua's unpack limit
        return sum(int(self._ack(keys=keys, args=list(chunk))) for chunk in chunks)

    def wait_durable(self, timeout_ms: int = 5000) -> None:
        """Block until this client's writes (and all before them) are fsynced to the AOF.

        WAITAOF makes the server fsync at once, so under `appendfsync everysec` this costs
        about as much as a ping; it needs `appendonly yes`. Off (`wait_aof=False`) for a Redis
        without an AOF, where a crash may lose what was written in its last second.
        """
        if not self.wait_aof:
            return
        local, _ = self.client.execute_command("WAITAOF", 1, 0, timeout_ms)
        if local < 1:
            raise NotDurable(f"Redis did not fsync its AOF within {timeout_ms} ms")

    def seen(self, user_id: str) -> list[str]:
        return [i.decode() for i in self.client.zrevrange(self.key("seen", user_id), 0, -1)]

    def users(self, user_ids: Sequence[str]) -> list[UserActivity | None]:
        values = self.client.mget([self.key("user", u) for u in user_ids]) if user_ids else []
        return [UserActivity(**json.loads(v)) if v else None for v in values]

    def applied_mask(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Which (user, event id) pairs were already applied."""
        pipe = self.client.pipeline(transaction=False)
        for user, event_id in pairs:
            pipe.zscore(self.key("applied", user), event_id)
        return [s is not None for s in pipe.execute()] if pairs else []

    # --- writes (stream processors, state load), queued on a pipeline ------------------------
    def add_seen(self, pipe, user_id: str, item_id: str, ts_ms: int) -> None:
        key = self.key("seen", user_id)
        pipe.zadd(key, {item_id: ts_ms}, gt=True)  # adds new members; keeps the newest time
        pipe.zremrangebyrank(key, 0, -SEEN_LIMIT - 1)

    def add_popularity(self, pipe, events: Sequence[tuple[str, int]]) -> None:
        """Count (item, event ms) interactions, in order; one change-stream entry for all."""
        weights = [(item, self.popularity_weight(ts_ms)) for item, ts_ms in events]
        for item, weight in weights:
            pipe.zincrby(self.key("popular"), weight, item)
        if weights:  # JSON keeps each float exactly: readers add the same doubles in order
            self.log_change(pipe, "popularity", weights)

    def log_change(self, pipe, kind: str, data) -> None:
        keys = [self.key("changes"), self.key("changes", "n")]
        self._log(keys=keys, args=[CHANGES_LIMIT, kind, json.dumps(data)], client=pipe)

    def mark_applied(self, pipe, user_id: str, event_id: str, ts_ms: int) -> None:
        key = self.key("applied", user_id)
        pipe.zadd(key, {event_id: ts_ms})
        pipe.zremrangebyrank(key, 0, -APPLIED_LIMIT - 1)
        pipe.sadd(self.key("pending"), pending_id(user_id, event_id))

    def put_user(self, pipe, user_id: str, state: UserActivity) -> None:
        pipe.set(self.key("user", user_id), json.dumps(vars(state)))

    def set_available(self, pipe, item_id: str, available: bool) -> None:
        if available:
            pipe.srem(self.key("unavailable"), item_id)
        else:
            pipe.sadd(self.key("unavailable"), item_id)
        self.log_change(pipe, "available", [[item_id, available]])

    def put_update_time(self, pipe, item_id: str, ts_ms: int) -> None:
        pipe.hset(self.key("updated"), item_id, ts_ms)

    def put_catalog_item(self, pipe, item_id: str, profile: dict) -> None:
        pipe.hset(self.key("catalog"), item_id, json.dumps(profile))
        self.log_change(pipe, "catalog", {item_id: profile})

    def load(
        self,
        seen: Iterable[tuple[str, str, int]],
        popularity: dict[str, float],
        popularity_ms: dict[str, int],
        epoch_ms: int,
    ) -> None:
        """Bulk-load the state after training: seen sets and the popularity ranking."""
        pipe = self.client.pipeline(transaction=False)
        for n, (user, item, ts_ms) in enumerate(seen):
            self.add_seen(pipe, user, item, ts_ms)
            if n % 5000 == 4999:
                pipe.execute()
        pipe.set(self.key("popular", "epoch"), epoch_ms)
        self._epoch = epoch_ms
        pipe.delete(self.key("popular"))
        scores = {
            i: p * self.popularity_weight(popularity_ms[i]) for i, p in popularity.items() if p > 0
        }
        if scores:
            pipe.zadd(self.key("popular"), scores)
        self.log_change(pipe, "reset", None)  # readers reload everything
        pipe.execute()
