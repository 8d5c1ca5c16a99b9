"""Redis state beside the Feast features: filter sets, the live popularity ranking, catalog
additions, and the stream processors' authoritative user state. One place for the key layout.

The layout runs unchanged on one Redis/Valkey server and on a Redis Cluster: every atomic write
touches one hash slot, named by the `{...}` hash tag in its keys.

Per user (hash tag: `@` and the user id), written together by one script (`apply_user`):
- `{p}:user:{@u}`      JSON `UserActivity`: the user's stream state (Feast gets a projection)
- `{p}:seen:{@u}`      ZSET item → last interaction ms (bounded to the newest `SEEN_LIMIT`)
- `{p}:applied:{@u}`   ZSET event id → event ms of the newest `APPLIED_LIMIT` applied events
- `{p}:pending:{@u}`   SET of event ids applied to the user but not yet counted on the item side

Per item shard, `{s}` = `{@SHARD_TAGS[N]}` with N = crc32(item) mod `SHARDS` (no hot slot):
- `{p}:popular:{s}`    ZSET item → Σ exp(k·(t_event − epoch)): ranking by it is ranking by
                       time-decayed popularity at any time; the decayed count at time t is
                       score · exp(−k·(t − epoch)) (see `popularity_at`)
- `{p}:unavailable:{s}` SET of item ids that must not be recommended
- `{p}:catalog:{s}`    HASH item → JSON profile of items added or changed after training
- `{p}:updated:{s}`    HASH item → event ms of the newest item update applied (newest wins)
- `{p}:counted:{s}`    ZSET `user:event id` → sequence: events whose popularity is counted (the
                       newest `COUNTED_LIMIT`), so that counting again after a crash is a no-op
- `{p}:acked:{s}`      count of interactions whose effects are all written (replay barrier)
- `{p}:changes:{s}`    STREAM of what the serving stages keep in memory (popularity deltas,
                       availability, catalog profiles, resets), entries numbered by
                       `{p}:changes-n:{s}` so that a reader notices entries trimmed before it
                       read them (it then reloads a snapshot, see `snapshot`)

Global: `{p}:popular:epoch`, the epoch (ms) of the popularity scale, set when the state is
loaded; `{p}:response:{@request id}`, the response cache.

An interaction takes effect once whatever fails: `apply_user` marks it applied and pending with
the user's state (compare-and-set on that state); `count` adds its popularity and acks it, once
per event id; `clear_pending` forgets it. A retry after a crash between any two steps redoes only
what is missing. Every client has socket timeouts: a stalled server raises `redis.TimeoutError`
instead of hanging a stream worker or a serving stage for ever.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import cached_property, lru_cache

from state.features import DECAY_PER_MS, UserActivity, decay

SEEN_LIMIT = 1000
APPLIED_LIMIT = 1000
COUNTED_LIMIT = 100_000  # per shard: far more than a batch retried after a crash can hold
CHANGES_LIMIT = 100_000  # entries kept per `{p}:changes:{s}` (approximately: MAXLEN ~)
SHARDS = 16
TIMEOUT_S = 2.0  # socket timeouts of every streamrec Redis client

# Appends one numbered entry to a shard's change stream. KEYS: changes, changes-n.
_LOG_LUA = """
local function log(kind, data)
  local n = redis.call('INCR', KEYS[2])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'n', n, 'kind', kind, 'data', data)
end
"""

# ARGV: changes limit, kind, data.
_LOG = _LOG_LUA + "log(ARGV[2], ARGV[3])"

# One user's new events, if the user's state is still `expected` ('' = none). KEYS: user, seen,
# applied, pending. ARGV: expected, new state, seen limit, applied limit, then (event id, item,
# ms) triples. Returns 1, or 0 when another writer changed the state first.
_APPLY_USER = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
for i = 5, #ARGV, 3 do
  redis.call('ZADD', KEYS[3], ARGV[i + 2], ARGV[i])
  redis.call('SADD', KEYS[4], ARGV[i])
  redis.call('ZADD', KEYS[2], 'GT', ARGV[i + 2], ARGV[i + 1])
end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[3]) - 1)
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -tonumber(ARGV[4]) - 1)
return 1
"""

# Counts events on one shard, each once. KEYS: changes, changes-n, popular, counted, acked.
# ARGV: changes limit, counted limit, then (token, item, weight) triples. The weights travel as
# the shortest exact decimal strings, so the sorted set and the change stream's readers add the
# same doubles in the same order.
_COUNT = (
    _LOG_LUA
    + """
local deltas = {}
for i = 3, #ARGV, 3 do
  if not redis.call('ZSCORE', KEYS[4], ARGV[i]) then
    redis.call('ZINCRBY', KEYS[3], ARGV[i + 2], ARGV[i + 1])
    redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), ARGV[i])
    deltas[#deltas + 1] = {ARGV[i + 1], ARGV[i + 2]}
  end
end
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[2]) - 1)
if #deltas > 0 then log('popularity', cjson.encode(deltas)) end
return #deltas
"""
)

# One item update, newest wins. KEYS: changes, changes-n, unavailable, updated, catalog.
# ARGV: changes limit, item, ms, '1' available / '0' not, profile JSON, '1' to store the profile
# even if the item has none stored yet. Returns 1, or 0 when a newer update was applied before.
_UPDATE_ITEM = (
    _LOG_LUA
    + """
local item = ARGV[2]
local newest = redis.call('HGET', KEYS[4], item)
if newest and tonumber(newest) > tonumber(ARGV[3]) then return 0 end
local available = ARGV[4] == '1'
if available then redis.call('SREM', KEYS[3], item) else redis.call('SADD', KEYS[3], item) end
redis.call('HSET', KEYS[4], item, ARGV[3])
log('available', cjson.encode({{item, available}}))
if ARGV[6] == '1' or redis.call('HEXISTS', KEYS[5], item) == 1 then
  redis.call('HSET', KEYS[5], item, ARGV[5])
  log('catalog', cjson.encode({[item] = cjson.decode(ARGV[5])}))
end
return 1
"""
)

# One shard as of one instant. KEYS: changes, changes-n, popular, unavailable, catalog.
_SNAPSHOT = """
return {
  redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES'),
  redis.call('SMEMBERS', KEYS[4]),
  redis.call('HGETALL', KEYS[5]),
  redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1),
  redis.call('GET', KEYS[2]) or '0',
}
"""


@lru_cache(maxsize=64)
def is_cluster(redis_url: str) -> bool:
    """Whether the server at `redis_url` is a node of a Redis Cluster (asked once per URL)."""
    import redis

    client = redis.Redis.from_url(
        redis_url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
    )
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    finally:
        client.close()


def redis_client(redis_url: str):
    """A client of the server, or of the whole cluster when `redis_url` names any of its nodes."""
    import redis

    timeouts = {"socket_timeout": TIMEOUT_S, "socket_connect_timeout": TIMEOUT_S}
    if is_cluster(redis_url):
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(redis_url, **timeouts)
    return redis.Redis.from_url(redis_url, **timeouts)


class NotDurable(RuntimeError):
    """Redis did not confirm that a write reached its append-only file in time."""


def pending_id(user_id: str, event_id: str) -> str:
    """An interaction's token on the item side (event ids are unique per user)."""
    return f"{user_id}:{event_id}"


def _shard_tags() -> list[str]:
    """One hash tag per shard, shard N's in the N-th sixteenth of the 16384 cluster slots: the
    shards spread evenly over primaries that hold equal slot ranges (tags named by number,
    like `shard-3`, would put 8 of 16 on the first of three primaries)."""
    from redis.crc import key_slot

    span = 16384 // SHARDS
    return [
        next(
            t
            for j in range(10_000)
            if key_slot(f"@{(t := f'shard-{n}.{j}')}".encode()) // span == n
        )
        for n in range(SHARDS)
    ]


SHARD_TAGS = _shard_tags()


def shard_of(item_id: str) -> int:
    return zlib.crc32(item_id.encode()) % SHARDS


def _by_shard(items: Iterable[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for item in items:
        out[shard_of(item)].append(item)
    return out


def _wait_aof(client, marker: str, replicas: int, timeout_ms: int) -> tuple[int, int]:
    """The marker write, then WAITAOF (and WAIT for `replicas`), on one connection: (local
    fsyncs, 1 or 0; replicas that have the write).
    Two round trips, not one pipeline: a WAITAOF that arrives with the write blocks until the
    server's next cron tick (100 ms), one that follows it finds the write already fsynced."""
    pool = client.connection_pool
    connection = pool.get_connection("SET")
    try:
        connection.send_command("SET", marker, 1)
        connection.read_response()
        connection.send_command("WAITAOF", 1, 0, timeout_ms)
        local, _ = connection.read_response()
        copies = 0
        if replicas:  # received, not fsynced: a replica fsyncs once a second, and WAITAOF waits
            connection.send_command("WAIT", replicas, timeout_ms)
            copies = connection.read_response()
        return local, copies
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


class RedisState:
    def __init__(
        self,
        redis_url: str,
        prefix: str = "streamrec",
        wait_aof: bool = True,
        wait_replicas: int = 0,
    ):
        self.redis_url = redis_url
        self.prefix = prefix
        self.wait_aof = wait_aof
        self.wait_replicas = wait_replicas
        self._epoch: int | None = None
        self._loaded = False

    @cached_property
    def client(self):
        """Connected on first use (a server down at start-up is found by the first call)."""
        return redis_client(self.redis_url)

    @cached_property
    def cluster(self) -> bool:
        return is_cluster(self.redis_url)

    def key(self, name: str, tag: str | None = None) -> str:
        """`{p}:name`, or `{p}:name:{@tag}`: keys of one tag share a Redis Cluster slot (the
        `@` keeps the hash tag non-empty whatever the tag holds: an empty one, as in `{}x}`,
        would hash the whole key)."""
        return f"{self.prefix}:{name}" if tag is None else f"{self.prefix}:{name}:{{@{tag}}}"

    @cached_property
    def _scripts(self) -> dict:
        scripts = {"log": _LOG, "apply_user": _APPLY_USER, "count": _COUNT}
        scripts |= {"update_item": _UPDATE_ITEM, "snapshot": _SNAPSHOT}
        return {name: self.client.register_script(text) for name, text in scripts.items()}

    def _user_keys(self, user_id: str) -> list[str]:
        return [self.key(n, user_id) for n in ("user", "seen", "applied", "pending")]

    def _shard_keys(self, shard: int, *names: str) -> list[str]:
        tag = SHARD_TAGS[shard]
        return [self.key("changes", tag), self.key("changes-n", tag)] + [
            self.key(n, tag) for n in names
        ]

    def pipeline(self):
        """A non-transactional pipeline (on a cluster, split by node); atomicity is per script."""
        return self.client.pipeline(transaction=False)

    def _script(self, name: str, keys: list[str], args: list, pipe) -> None:
        """Queue a script call. A cluster pipeline calls scripts only by raw EVALSHA and cannot
        load them: `execute` does."""
        if not self.cluster:
            self._scripts[name](keys=keys, args=args, client=pipe)
        else:
            pipe.execute_command("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)

    def execute(self, pipe) -> list:
        """Run a pipeline that calls scripts. On a cluster the scripts are loaded on every
        primary first, and again after a NOSCRIPT (a restarted node), which is raised for the
        caller's retry (`streams.durable` counts it transient; every write is idempotent)."""
        from redis.exceptions import NoScriptError

        if self.cluster and not self._loaded:
            self._load_scripts()
        try:
            return pipe.execute()
        except NoScriptError:
            self._load_scripts()
            raise

    def _load_scripts(self) -> None:
        for script in self._scripts.values():
            self.client.script_load(script.script)
        self._loaded = True

    # --- popularity scale ----------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        if self._epoch is None:
            value = self.client.get(self.key("popular:epoch"))
            self._epoch = int(value) if value is not None else 0
        return self._epoch

    def popularity_weight(self, ts_ms: int) -> float:
        """One event's weight on the `popular` scale. float64 holds ~1000 half-lives past the
        epoch (19 years at 7 days); beyond that the weight saturates instead of overflowing."""
        return float(decay(max(self.epoch - ts_ms, -700.0 / DECAY_PER_MS)))

    def popularity_at(self, score: float, ts_ms: int) -> float:
        return score * float(decay(ts_ms - self.epoch))

    # --- reads (hot path) ----------------------------------------------------------------------
    def _per_item(self, items: Sequence[str], name: str, read) -> list:
        """`read(pipe, key, items of the shard)` per shard in one pipeline; results by item."""
        if not items:
            return []
        shards = _by_shard(dict.fromkeys(items))
        pipe = self.pipeline()
        for shard, members in shards.items():
            read(pipe, self.key(name, SHARD_TAGS[shard]), members)
        found = {}
        for members, values in zip(shards.values(), pipe.execute(), strict=True):
            found.update(zip(members, values, strict=True))
        return [found[i] for i in items]

    def unavailable_mask(self, items: Sequence[str]) -> list[bool]:
        values = self._per_item(items, "unavailable", lambda p, k, m: p.smismember(k, m))
        return [bool(x) for x in values]

    def popularity_scores(self, items: Sequence[str]) -> list[float]:
        return [s or 0.0 for s in self._per_item(items, "popular", lambda p, k, m: p.zmscore(k, m))]

    def catalog_additions(self, items: Iterable[str]) -> dict[str, dict]:
        """Profiles of these items if they were added or changed after training."""
        items = list(items)
        values = self._per_item(items, "catalog", lambda p, k, m: p.hmget(k, m))
        return {i: json.loads(v) for i, v in zip(items, values, strict=True) if v is not None}

    def seen_sets(self, user_ids: Sequence[str]) -> list[list[bytes]]:
        """Each user's seen items (raw ids), in one round trip."""
        pipe = self.pipeline()
        for user in user_ids:
            pipe.zrange(self.key("seen", user), 0, -1)
        return pipe.execute() if user_ids else []

    def seen(self, user_id: str) -> list[str]:
        return [i.decode() for i in self.client.zrevrange(self.key("seen", user_id), 0, -1)]

    def users(self, user_ids: Sequence[str]) -> list[UserActivity | None]:
        pipe = self.pipeline()
        for user in user_ids:
            pipe.get(self.key("user", user))
        values = pipe.execute() if user_ids else []
        return [UserActivity(**json.loads(raw)) if raw else None for raw in values]

    def user_records(
        self, users: Sequence[tuple[str, Sequence[str]]]
    ) -> list[tuple[bytes | None, list[bool], set[str]]]:
        """For each (user, event ids, at least one): the stored state (raw JSON, for
        `apply_user`), which of the events are applied, and the user's pending events; one
        round trip."""
        pipe = self.pipeline()
        for user, event_ids in users:
            state, _, applied, pending = self._user_keys(user)
            pipe.get(state)
            pipe.zmscore(applied, list(event_ids))
            pipe.smembers(pending)
        values = pipe.execute() if users else []
        return [
            (raw, [s is not None for s in scores], {p.decode() for p in pending})
            for raw, scores, pending in zip(values[::3], values[1::3], values[2::3], strict=True)
        ]

    def changes(self, after: dict[int, bytes], count: int = 1000) -> dict[int, list]:
        """Each shard's change-stream entries after its stream id in `after` (oldest first, up
        to `count` per shard)."""
        keys = [self.key("changes", SHARD_TAGS[shard]) for shard in range(SHARDS)]
        found = {}
        for client, shards in self._by_node(keys):  # the hot path: no cluster pipeline
            pipe = client.pipeline(transaction=False)
            for shard in shards:
                start = b"(" + after[shard] if after[shard] != b"0-0" else b"-"
                pipe.xrange(keys[shard], start, b"+", count=count)
            found.update(zip(shards, self._on_node(pipe.execute), strict=True))
        return found

    def snapshot(self) -> dict:
        """What the change streams describe, each shard as of one instant: popularity,
        unavailable items, catalog profiles, the popularity epoch, and each shard's last entry
        (stream id and number)."""
        pipe = self.pipeline()
        for shard in range(SHARDS):
            keys = self._shard_keys(shard, "popular", "unavailable", "catalog")
            self._script("snapshot", keys, [], pipe)
        pipe.get(self.key("popular:epoch"))
        *shards, epoch = self.execute(pipe)
        out: dict = {"popularity": {}, "unavailable": set(), "catalog": {}, "last": {}}
        for shard, (popular, unavailable, catalog, last, n) in enumerate(shards):
            pairs = zip(popular[::2], popular[1::2], strict=True)
            out["popularity"].update((i.decode(), float(s)) for i, s in pairs)
            out["unavailable"].update(i.decode() for i in unavailable)
            pairs = zip(catalog[::2], catalog[1::2], strict=True)
            out["catalog"].update((i.decode(), json.loads(p)) for i, p in pairs)
            out["last"][shard] = (last[0][0] if last else b"0-0", int(n))
        out["epoch"] = int(epoch or 0)
        return out

    def acked(self) -> int:
        """Interactions fully processed (state, Feast and popularity written) since the state
        was loaded."""
        pipe = self.pipeline()
        for shard in range(SHARDS):
            pipe.get(self.key("acked", SHARD_TAGS[shard]))
        return sum(int(v or 0) for v in pipe.execute())

    # --- writes (stream processors, state load) ------------------------------------------------
    def apply_user(
        self,
        pipe,
        user_id: str,
        expected: bytes | None,
        state: UserActivity,
        events: Sequence[tuple[str, str, int]],
    ) -> None:
        """Queue: the user's new state and (event id, item, ms) events, if the stored state is
        still `expected`; the script's reply is 0 when it was not (nothing written)."""
        args: list = [expected or b"", json.dumps(vars(state)), SEEN_LIMIT, APPLIED_LIMIT]
        for event_id, item, ts_ms in events:
            args += [event_id, item, ts_ms]
        self._script("apply_user", self._user_keys(user_id), args, pipe)

    def count(self, events: Sequence[tuple[str, str, int]]) -> int:
        """Add the popularity of (token, item, ms) interactions, in order, and ack them; each
        token once, however often this runs. Returns how many were new."""
        shards: dict[int, list] = defaultdict(list)
        for token, item, ts_ms in events:
            shards[shard_of(item)] += [token, item, repr(self.popularity_weight(ts_ms))]
        if not shards:
            return 0
        pipe = self.pipeline()
        for shard, args in shards.items():
            keys = self._shard_keys(shard, "popular", "counted", "acked")
            args = [CHANGES_LIMIT, COUNTED_LIMIT, *args]
            self._script("count", keys, args, pipe)
        return sum(self.execute(pipe))

    def clear_pending(self, pending: dict[str, list[str]]) -> None:
        """Forget these users' pending event ids (counted: see `count`)."""
        pipe = self.pipeline()
        for user, event_ids in pending.items():
            if event_ids:
                pipe.srem(self.key("pending", user), *event_ids)
        pipe.execute()

    def update_item(
        self,
        pipe,
        item_id: str,
        ts_ms: int,
        available: bool,
        profile: dict | None = None,
        new_profile: bool = False,
    ) -> None:
        """Queue one item update, newest wins (reply 0 when a newer one was applied): its
        availability, and its profile if `new_profile` or the item has a stored profile."""
        keys = self._shard_keys(shard_of(item_id), "unavailable", "updated", "catalog")
        args = [CHANGES_LIMIT, item_id, ts_ms, int(available), json.dumps(profile or {})]
        args.append(int(new_profile))
        self._script("update_item", keys, args, pipe)

    def add_seen(self, pipe, user_id: str, item_id: str, ts_ms: int) -> None:
        key = self.key("seen", user_id)
        pipe.zadd(key, {item_id: ts_ms}, gt=True)  # adds new members; keeps the newest time
        pipe.zremrangebyrank(key, 0, -SEEN_LIMIT - 1)

    def log_change(self, pipe, shard: int, kind: str, data) -> None:
        args = [CHANGES_LIMIT, kind, json.dumps(data)]
        self._script("log", self._shard_keys(shard), args, pipe)

    def wait_durable(self, timeout_ms: int = int(TIMEOUT_S * 750)) -> None:
        """Block until every write made so far (by any client) is fsynced to the AOF of every
        primary.

        WAITAOF waits for the writes of the connection that sends it, so each primary gets a
        marker write and the WAITAOF on one connection: the marker's offset covers everything
        before it. WAITAOF makes the server fsync at once, so under `appendfsync everysec` this
        costs about as much as a ping; it needs `appendonly yes`. Off (`wait_aof=False`) for a
        Redis without an AOF, where a crash may lose what was written in its last second.
        """
        if not self.wait_aof:
            return
        markers = self._durability_markers()
        nodes = [(client, markers[n]) for client, [n] in self._by_node(markers)]

        def wait(node: tuple) -> tuple[int, int]:
            return self._on_node(lambda: _wait_aof(*node, self.wait_replicas, timeout_ms))

        # Several primaries fsync at the same time.
        replies = [wait(nodes[0])] if len(nodes) == 1 else list(self._pool.map(wait, nodes))
        if any(local < 1 or copies < self.wait_replicas for local, copies in replies):
            raise NotDurable(
                f"Redis did not fsync its AOF (or reach {self.wait_replicas} replicas) "
                f"within {timeout_ms} ms"
            )

    @cached_property
    def _pool(self):
        from concurrent.futures import ThreadPoolExecutor

        return ThreadPoolExecutor(8, thread_name_prefix="streamrec-waitaof")

    def _durability_markers(self) -> list[str]:
        """A key on each primary (of a slot it serves)."""
        if not self.cluster:
            return [self.key("durable")]
        from redis.crc import key_slot

        nodes: dict[str, str] = {}
        slots = self.client.nodes_manager.slots_cache
        primaries = {node.name for node in self.client.get_primaries()}
        for n in range(100_000):
            key = self.key("durable", str(n))
            nodes.setdefault(slots[key_slot(key.encode())][0].name, key)
            if len(nodes) == len(primaries):
                break
        return list(nodes.values())

    def _by_node(self, keys: list[str]) -> list[tuple]:
        """(client of one server, the indices of `keys` it serves): one plain pipeline per
        server, faster than a cluster pipeline by a factor of ten."""
        if not self.cluster:
            return [(self.client, list(range(len(keys))))]
        from redis.crc import key_slot

        slots = self.client.nodes_manager.slots_cache
        groups: dict[str, tuple] = {}
        for n, key in enumerate(keys):
            node = slots[key_slot(key.encode())][0]
            groups.setdefault(node.name, (node.redis_connection, []))[1].append(n)
        return list(groups.values())

    def _on_node(self, call):
        """`call()` on one server's own client: when it fails (a node down, slots moved) the
        cluster client refreshes its slot map before the error goes up."""
        import redis

        try:
            return call()
        except redis.RedisError:
            if self.cluster:
                with contextlib.suppress(redis.RedisError):
                    self.client.nodes_manager.initialize()
            raise

    def load(
        self,
        seen: Iterable[tuple[str, str, int]],
        popularity: dict[str, float],
        popularity_ms: dict[str, int],
        epoch_ms: int,
    ) -> None:
        """Bulk-load the state after training: seen sets and the popularity ranking."""
        pipe = self.pipeline()
        for n, (user, item, ts_ms) in enumerate(seen):
            self.add_seen(pipe, user, item, ts_ms)
            if n % 5000 == 4999:
                pipe.execute()
        pipe.set(self.key("popular:epoch"), epoch_ms)
        self._epoch = epoch_ms
        scores = {
            i: p * self.popularity_weight(popularity_ms[i]) for i, p in popularity.items() if p > 0
        }
        shards = _by_shard(scores)
        for shard in range(SHARDS):
            key = self.key("popular", SHARD_TAGS[shard])
            pipe.delete(key)
            if shards.get(shard):
                pipe.zadd(key, {i: scores[i] for i in shards[shard]})
            self.log_change(pipe, shard, "reset", None)  # readers reload everything
        self.execute(pipe)
