"""What the stream workers do with each micro-batch, independent of Faust.

- Interactions → the user's stream state, seen set and item popularity in Redis, atomically and
  once per event id; then a projection into the Feast online store (user_activity, item_stats).
- Item updates → availability and catalog additions (picked up by the serving stages).
- Requests → the Triton ensemble → one response each; bad requests get an error response.
Undecodable events become dead letters with the reason. A batch whose effects cannot be written
raises: `process` is idempotent, and `streams.durable` retries it until its effects are durable
before any offset is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.features import UserActivity, update_user
from schemas.serde import DecodeError, Serde
from serving.operators import (
    MAX_K,
    error_record,
    request_tensors,
    response_record,
    validate_request,
)
from serving.state import RedisState, pending_id


@dataclass
class RawEvent:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int  # when it was produced (Kafka message time)


def dead_letter(event: RawEvent, error: str, processor: str) -> dict:
    return {
        "topic": event.topic,
        "partition": event.partition,
        "offset": event.offset,
        "key": event.key,
        "value": bytes(event.value or b""),
        "error": error,
        "processor": processor,
        "timestamp_ms": int(time.time() * 1000),
    }


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    dead_letters: list[dict] = field(default_factory=list)
    freshness_s: list[float] = field(default_factory=list)  # produce → online write, per event


def decode_all(
    serde: Serde, events: list[RawEvent], processor: str, check: Callable[[dict], str | None]
):
    """(event, record) pairs of the decodable, valid events, and dead letters for the rest."""
    good, dead = [], []
    for event in events:
        try:
            record = serde.decode(event.value)
        except DecodeError as e:
            dead.append(dead_letter(event, e.reason, processor))
            continue
        if reason := check(record):
            dead.append(dead_letter(event, reason, processor))
        else:
            good.append((event, record))
    return good, dead


class Contention(RuntimeError):
    """Another writer kept changing the same users' state (a transient condition)."""


def _check_interaction(r: dict) -> str | None:
    if not r["event_id"] or not r["user_id"] or not r["item_id"]:
        return "event_id, user_id and item_id must be non-empty"
    return None


class InteractionProcessor:
    name = "interactions"

    def __init__(
        self,
        serde: Serde,
        redis_url: str,
        feature_repo: Path,
        artifacts: Path,
        project: str = "streamrec",
        wait_aof: bool = True,
    ):
        from models.feature_repo import OnlineReader, feature_store

        self.serde = serde
        self.state = RedisState(redis_url, prefix=project, wait_aof=wait_aof)
        self.reader = OnlineReader(redis_url, project=project)
        self.store = feature_store(feature_repo, redis_url)
        manifest = json.loads((artifacts / "manifest.json").read_text())
        self.genres = {g: n for n, g in enumerate(manifest["genres"])}
        profiles = json.loads((artifacts / "items.json").read_text())
        self.vectors = {i: self._vector(p.get("genres")) for i, p in profiles.items()}

    def _vector(self, genres) -> np.ndarray:
        v = np.zeros(len(self.genres), dtype=np.float32)
        for g in genres or []:
            if g in self.genres:
                v[self.genres[g]] = 1.0
        return v

    def process(self, events: list[RawEvent]) -> BatchResult:
        """State transaction → Feast projection → ack → fsync; safe to run again after a failure
        at any step (applied event ids make the transaction a no-op the second time)."""
        good, dead = decode_all(self.serde, events, self.name, _check_interaction)
        result = BatchResult(dead_letters=dead)
        if good:
            fresh = self._apply(good, result)
            self._project(fresh)
            self.state.ack([pending_id(r["user_id"], r["event_id"]) for _, r in good])
            self.state.wait_durable()
            done = time.time() * 1000
            result.freshness_s = [(done - e.timestamp_ms) / 1000 for e, _ in good]
        return result

    def _genres_of(self, items: set[str]) -> None:
        unknown = [i for i in items if i not in self.vectors]
        for item, profile in self.state.catalog_additions(unknown).items():
            self.vectors[item] = self._vector(profile.get("genres"))

    def _apply(self, good, result: BatchResult):
        """Apply new events to the users' state in one Redis transaction (retried on conflict)."""
        import redis

        users = sorted({r["user_id"] for _, r in good})
        self._genres_of({r["item_id"] for _, r in good})
        for _ in range(5):
            with self.state.client.pipeline() as pipe:
                try:
                    pipe.watch(*[self.state.key("user", u) for u in users])
                    fresh = self._transaction(pipe, users, good, result)
                    pipe.execute()
                    return fresh
                except redis.WatchError:
                    result.applied = result.duplicates = 0
        raise Contention("user state kept changing under this worker (another owner?)")

    def _transaction(self, pipe, users, good, result):
        states = dict(zip(users, self.state.users(users), strict=True))
        missing = [u for u, s in states.items() if s is None]
        for user, row in zip(missing, self.reader.users(missing, "user_activity"), strict=True):
            states[user] = UserActivity(**row) if row else None
        applied = self.state.applied_mask([(r["user_id"], r["event_id"]) for _, r in good])
        pipe.multi()
        # Every item of the batch is projected, applied now or before: a batch that failed after
        # its transaction leaves no stale Feast row when it is run again.
        items: dict[str, int] = {}
        seen_ids: set[tuple[str, str]] = set()
        counted: list[tuple[str, int]] = []
        for (_, r), done in zip(good, applied, strict=True):
            user, item, ts = r["user_id"], r["item_id"], int(r["timestamp_ms"])
            items[item] = max(ts, items.get(item, 0))
            if done or (user, r["event_id"]) in seen_ids:
                result.duplicates += 1
                continue
            seen_ids.add((user, r["event_id"]))
            states[user] = update_user(
                states[user], item, self.vectors.get(item, self._vector([])), ts
            )
            self.state.mark_applied(pipe, user, r["event_id"], ts)
            self.state.add_seen(pipe, user, item, ts)
            counted.append((item, ts))
            result.applied += 1
        self.state.add_popularity(pipe, counted)
        for user in {u for u, _ in seen_ids}:
            self.state.put_user(pipe, user, states[user])
        return {u: states[u] for u in users if states[u] is not None}, items

    def _project(self, fresh) -> None:
        """Write the users' and items' current state to the Feast online store.

        Feast's Redis store keeps a row unless the new event time is newer in whole seconds, so
        each row is stamped max(event second, stored second + 1): a second write in the same
        second is not lost. Users replayed with no new event are written again too: a worker that
        died between the state commit and this write leaves nothing stale behind.
        """
        from models.feature_repo import TIMESTAMP, write_online

        users, items = fresh
        if users:
            ids = list(users)
            rows = [vars(users[u]) | {"user_id": u} for u in ids]
            stamps = [s.last_event_ms // 1000 for s in users.values()]
            self._write(write_online, TIMESTAMP, "user", "user_activity", ids, rows, stamps)
        if items:
            ids = list(items)
            scores = self.state.popularity_scores(ids)
            rows = [
                {
                    "item_id": i,
                    "popularity": self.state.popularity_at(s, items[i]),
                    "popularity_ms": items[i],
                    "available": True,
                }
                for i, s in zip(ids, scores, strict=True)
            ]
            stamps = [items[i] // 1000 for i in ids]
            self._write(write_online, TIMESTAMP, "item", "item_stats", ids, rows, stamps)

    def _write(self, write_online, ts_col, entity, view, ids, rows, stamps) -> None:
        stored = self.reader.timestamps(entity, ids, view)
        seconds = [max(s, (old or 0) + 1) for s, old in zip(stamps, stored, strict=True)]
        df = pd.DataFrame(rows)
        df[ts_col] = pd.to_datetime(seconds, unit="s", utc=True)
        write_online(self.store, view, df)


def _check_item_update(r: dict) -> str | None:
    return None if r["item_id"] else "item_id must be non-empty"


class ItemUpdateProcessor:
    name = "item_updates"

    def __init__(
        self, serde: Serde, redis_url: str, project: str = "streamrec", wait_aof: bool = True
    ):
        self.serde = serde
        self.state = RedisState(redis_url, prefix=project, wait_aof=wait_aof)

    def process(self, events: list[RawEvent]) -> BatchResult:
        good, dead = decode_all(self.serde, events, self.name, _check_item_update)
        result = BatchResult(dead_letters=dead)
        newest: dict[str, dict] = {}
        for _, r in good:
            if (
                r["item_id"] not in newest
                or r["timestamp_ms"] >= newest[r["item_id"]]["timestamp_ms"]
            ):
                newest[r["item_id"]] = r
        items = list(newest)
        stored = self.state.catalog_additions(items)
        times = dict(zip(items, self.state.update_times(items), strict=True))
        pipe = self.state.client.pipeline(transaction=True)
        for item, r in newest.items():
            if times[item] is not None and times[item] > r["timestamp_ms"]:
                result.duplicates += 1  # older than what is stored: ignored
                continue
            self.state.set_available(pipe, item, r["available"])
            self.state.put_update_time(pipe, item, r["timestamp_ms"])
            profile = {
                "title": r["title"],
                "year": r["year"],
                "genres": r["genres"],
                "attributes": r["attributes"],
                "available": r["available"],
                "timestamp_ms": r["timestamp_ms"],
            }
            if r["title"] is not None or r["genres"] or item in stored:
                self.state.put_catalog_item(pipe, item, profile)
            result.applied += 1
        pipe.execute()
        if newest:
            self.state.wait_durable()
        return result


@dataclass
class Answer:
    """What to publish for one request: the encoded response, keyed by user."""

    key: bytes
    value: bytes
    response: dict | None  # None when the bytes are a cached earlier answer (a redelivery)


class ResponseCache:
    """Encoded responses by request id, so that a redelivered request is answered with the same
    bytes as the first time (consumers drop duplicates by request id). Best effort: while Redis
    is unreachable requests are still answered, and duplicates may then differ."""

    def __init__(self, state: RedisState, ttl_s: int):
        self.state, self.ttl_s = state, ttl_s

    def get(self, request_ids: list[str]) -> list[bytes | None]:
        import redis

        try:
            return self.state.client.mget([self.state.key("response", r) for r in request_ids])
        except redis.RedisError:
            return [None] * len(request_ids)

    def put(self, answers: dict[str, bytes]) -> None:
        import redis

        pipe = self.state.client.pipeline(transaction=False)
        for request_id, value in answers.items():
            pipe.set(self.state.key("response", request_id), value, ex=self.ttl_s)
        with contextlib.suppress(redis.RedisError):
            pipe.execute()


class RequestProcessor:
    """Answers requests through the Triton ensemble: bounded concurrency, deadlines, retries."""

    name = "requests"

    def __init__(
        self,
        serde: Serde,
        response_serde: Serde,
        triton,
        cache: ResponseCache | None = None,
        concurrency: int = 32,
        retries: int = 8,  # transient failures, within the deadline: ~3 s of back-off
        default_timeout_s: float = 5.0,
        max_k: int = MAX_K,
    ):
        self.serde = serde
        self.response_serde = response_serde
        self.triton = triton  # AsyncTritonRecommender (connected)
        self.cache = cache
        self.limit = asyncio.Semaphore(concurrency)
        self.retries = retries
        self.default_timeout_s = default_timeout_s
        self.max_k = max_k

    async def handle_batch(self, events: list[RawEvent]) -> list[Answer | dict]:
        """An answer or a dead letter per event, in order; earlier answers come from the cache."""
        requests: list[dict | None] = []
        out: list[Answer | dict | None] = []
        for event in events:
            try:
                requests.append(self.serde.decode(event.value))
                out.append(None)
            except DecodeError as e:
                requests.append(None)
                out.append(dead_letter(event, e.reason, self.name))
        todo = [n for n, r in enumerate(requests) if r is not None]
        ids = [str(requests[n].get("request_id") or "") for n in todo]
        cached = await asyncio.to_thread(self.cache.get, ids) if self.cache and todo else []
        fresh = []
        for n, value in zip(todo, cached or [None] * len(todo), strict=True):
            if value is not None:
                out[n] = Answer(str(requests[n]["user_id"]).encode(), value, None)
            else:
                fresh.append(n)
        responses = await asyncio.gather(*(self.handle(requests[n]) for n in fresh))
        for n, response in zip(fresh, responses, strict=True):
            out[n] = Answer(
                response["user_id"].encode(), self.response_serde.encode(response), response
            )
        if self.cache and fresh:
            answers = {r["request_id"]: out[n].value for n, r in zip(fresh, responses, strict=True)}
            await asyncio.to_thread(self.cache.put, {k: v for k, v in answers.items() if k})
        return out

    async def handle(self, request: dict) -> dict:
        """The response to one decoded request (an error response when it cannot be served)."""
        if error := validate_request(request, self.max_k):
            return error_record(request, f"invalid request: {error}", self.triton.version)
        timeout = self.default_timeout_s
        if request["deadline_ms"] is not None:
            timeout = (request["deadline_ms"] - time.time() * 1000) / 1000
            if timeout <= 0:
                return error_record(request, "deadline passed before serving", self.triton.version)
        async with self.limit:
            return await self._serve(request, timeout)

    async def _serve(self, request: dict, timeout: float) -> dict:
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + timeout
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                outputs = await asyncio.wait_for(self.triton.run(request_tensors(request)), left)
                return response_record(request, outputs, self.triton.version)
            except (InferenceServerException, ConnectionError, OSError) as e:
                if not _transient(e) or attempt == self.retries:
                    return error_record(request, f"serving failed: {e}", self.triton.version)
                pause = min(0.05 * 2**attempt, 0.5, max(0.0, deadline - time.monotonic()))
                await asyncio.sleep(pause)
            except TimeoutError:
                break
        return error_record(
            request, f"deadline of {timeout * 1000:.0f} ms exceeded", self.triton.version
        )


def _transient(error: Exception) -> bool:
    status = getattr(error, "status", lambda: None)()
    return status in (
        None,
        "StatusCode.UNAVAILABLE",
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.RESOURCE_EXHAUSTED",
        "StatusCode.INTERNAL",
    )
