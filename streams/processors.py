"""What the stream workers do with each micro-batch, independent of Faust.

- Interactions → the user's stream state, seen set and item popularity in Redis, atomically and
  once per event id; then a projection of the users' state into the Feast online store
  (user_activity). Item popularity lives only in Redis (`state.store`), not in Feast.
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.workflow import MultiHot
from schemas.artifacts import Artifacts
from schemas.serde import DecodeError, Serde
from serving.operators import (
    MAX_K,
    error_record,
    request_tensors,
    response_record,
    validate_request,
)
from state.features import UserActivity, update_user
from state.store import RedisState, pending_id
from streams import metrics


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

    def __init__(self, serde: Serde, state: RedisState, feature_repo: Path, artifacts: Path):
        from state.feature_store import OnlineReader, feature_store

        self.serde = serde
        self.state = state
        self.reader = OnlineReader(state.redis_url, project=state.prefix)
        self.store = feature_store(feature_repo, state.redis_url)
        version = Artifacts(artifacts)
        self.genres = MultiHot(version.manifest["genres"])
        profiles = version.read(Artifacts.ITEMS)
        self.vectors = {i: self._vector(p.get("genres")) for i, p in profiles.items()}

    def _vector(self, genres) -> np.ndarray:
        return self.genres.transform_one(list(genres or []))

    def process(self, events: list[RawEvent]) -> BatchResult:
        """Users' state → Feast projection → popularity and ack → fsync; safe to run again after
        a failure at any step (each step skips what an earlier run of it wrote)."""
        good, dead = decode_all(self.serde, events, self.name, _check_interaction)
        result = BatchResult(dead_letters=dead)
        if good:
            self._genres_of({r["item_id"] for _, r in good})
            fresh, uncounted = self._apply(good, result)
            self._project(fresh)
            self.state.count([(pending_id(u, e), item, ts) for u, e, item, ts in uncounted])
            pending: dict[str, list[str]] = {}
            for user, event_id, _, _ in uncounted:
                pending.setdefault(user, []).append(event_id)
            self.state.clear_pending(pending)
            self.state.wait_durable()
            done = time.time() * 1000
            result.freshness_s = [(done - e.timestamp_ms) / 1000 for e, _ in good]
        return result

    def _genres_of(self, items: set[str]) -> None:
        unknown = [i for i in items if i not in self.vectors]
        for item, profile in self.state.catalog_additions(unknown).items():
            self.vectors[item] = self._vector(profile.get("genres"))

    def _apply(self, good: list[tuple[RawEvent, dict]], result: BatchResult):
        """Apply new events to each user's state, one compare-and-set per user (retried for the
        users another writer changed meanwhile). Returns the batch's users' state after it, and
        the (user, event id, item, ms) events still to count on the item side: the new ones and
        those a failed earlier run left pending."""
        by_user: dict[str, list[dict]] = {}
        for _, r in good:
            by_user.setdefault(r["user_id"], []).append(r)
        fresh: dict[str, UserActivity] = {}
        uncounted: list[tuple[str, str, str, int]] = []
        todo = sorted(by_user)
        for _ in range(5):
            records = self.state.user_records(
                [(u, [r["event_id"] for r in by_user[u]]) for u in todo]
            )
            states = self._stored_states(todo, [raw for raw, _, _ in records])
            pipe = self.state.pipeline()
            writes: list[tuple[str, list]] = []  # (user, its new events) per script call
            for user, (raw, applied, pending) in zip(todo, records, strict=True):
                state, new, recount = self._user_events(
                    states[user], by_user[user], applied, pending
                )
                uncounted += [(user, e, i, t) for e, i, t in recount]
                if new:
                    self.state.apply_user(pipe, user, raw, state, new)
                    writes.append((user, [(user, e, i, t) for e, i, t in new]))
                if state is not None:
                    fresh[user] = state
            done = self.state.execute(pipe) if writes else []
            todo = [user for (user, _), ok in zip(writes, done, strict=True) if not ok]
            for (_, events), ok in zip(writes, done, strict=True):
                if ok:
                    result.applied += len(events)
                    uncounted += events
            if not todo:
                result.duplicates = len(good) - result.applied
                return fresh, uncounted
        raise Contention("user state kept changing under this worker (another owner?)")

    def _stored_states(self, users: list[str], raws: list[bytes | None]) -> dict:
        """Each user's stored stream state, else the Feast row loaded after training, else None."""
        states = {
            u: UserActivity(**json.loads(raw)) if raw else None
            for u, raw in zip(users, raws, strict=True)
        }
        missing = [u for u, s in states.items() if s is None]
        for user, row in zip(missing, self.reader.users(missing, "user_activity"), strict=True):
            states[user] = UserActivity(**row) if row else None
        return states

    def _user_events(self, state, records: list[dict], applied: list[bool], pending: set[str]):
        """One user's state after its batch events, the new (event id, item, ms) events, and the
        applied ones still pending (to count again)."""
        new, recount, ids = [], [], set()
        for r, done in zip(records, applied, strict=True):
            event = (r["event_id"], r["item_id"], int(r["timestamp_ms"]))
            if done or r["event_id"] in ids:
                if r["event_id"] in pending and r["event_id"] not in ids:
                    recount.append(event)
                ids.add(r["event_id"])
                continue
            ids.add(r["event_id"])
            state = update_user(
                state, event[1], self.vectors.get(event[1], self._vector([])), event[2]
            )
            new.append(event)
        return state, new, recount

    def _project(self, users: dict[str, UserActivity]) -> None:
        """Write the users' current state to the Feast online store (user_activity).

        Feast's Redis store keeps a row unless the new event time is newer in whole seconds, so
        each row is stamped max(event second, stored second + 1): a second write in the same
        second is not lost. Users replayed with no new event are written again too: a worker that
        died between the state commit and this write leaves nothing stale behind.
        """
        from state.feature_store import TIMESTAMP, write_online

        if not users:
            return
        ids = list(users)
        stored = self.reader.timestamps("user", ids, "user_activity")
        seconds = [
            max(users[u].last_event_ms // 1000, (old or 0) + 1)
            for u, old in zip(ids, stored, strict=True)
        ]
        df = pd.DataFrame([vars(users[u]) | {"user_id": u} for u in ids])
        df[TIMESTAMP] = pd.to_datetime(seconds, unit="s", utc=True)
        write_online(self.store, "user_activity", df)


def _check_item_update(r: dict) -> str | None:
    return None if r["item_id"] else "item_id must be non-empty"


class ItemUpdateProcessor:
    name = "item_updates"

    def __init__(self, serde: Serde, state: RedisState):
        self.serde = serde
        self.state = state

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
        pipe = self.state.pipeline()
        for item, r in newest.items():
            profile = {
                "title": r["title"],
                "year": r["year"],
                "genres": r["genres"],
                "attributes": r["attributes"],
                "available": r["available"],
                "timestamp_ms": r["timestamp_ms"],
            }
            new_profile = r["title"] is not None or bool(r["genres"])
            self.state.update_item(
                pipe, item, r["timestamp_ms"], r["available"], profile, new_profile
            )
        if newest:
            done = self.state.execute(pipe)
            result.applied = sum(done)
            result.duplicates = len(done) - result.applied  # older than what is stored: ignored
            self.state.wait_durable()
        return result


@dataclass
class Answer:
    """What to publish for one request: the encoded response, keyed by user."""

    key: bytes
    value: bytes
    response: dict | None  # None when the bytes are a cached earlier answer (a redelivery)


Outcome = Answer | dict  # an answer, or a dead letter (an undecodable or poison request)


class ResponseCache:
    """Encoded responses by request id, so that a redelivered request is answered with the same
    bytes as the first time (consumers drop duplicates by request id). Best effort: while Redis
    is unreachable requests are still answered, and duplicates may then differ."""

    def __init__(self, state: RedisState, ttl_s: int):
        self.state, self.ttl_s = state, ttl_s

    def get(self, request_ids: list[str]) -> list[bytes | None]:
        import redis

        pipe = self.state.pipeline()  # not MGET: on a cluster the keys lie in many slots
        for request_id in request_ids:
            pipe.get(self.state.key("response", request_id))
        try:
            return pipe.execute()
        except redis.RedisError:
            return [None] * len(request_ids)

    def put(self, answers: dict[str, bytes]) -> None:
        import redis

        pipe = self.state.pipeline()
        for request_id, value in answers.items():
            pipe.set(self.state.key("response", request_id), value, ex=self.ttl_s)
        with contextlib.suppress(redis.RedisError):
            pipe.execute()


def expired_record(request: dict, error: str, model_version: str = "") -> dict:
    """The answer to a request whose deadline passed: no items, status `expired`."""
    return error_record(request, error, model_version) | {"status": "expired"}


class RequestProcessor:
    """Answers requests through the Triton ensemble: bounded concurrency, deadlines, retries.

    A request's deadline is its `deadline_ms`, else `default_deadline_ms` after it was produced
    (its Kafka timestamp: the record's own `timestamp_ms` is the logical request time, which
    replays set in the past). One whose deadline has passed is answered `expired` without
    reaching Triton; Triton gets the time left as its timeout.
    """

    name = "requests"

    def __init__(
        self,
        serde: Serde,
        response_serde: Serde,
        triton,
        cache: ResponseCache | None = None,
        concurrency: int = 32,
        retries: int = 8,  # transient failures, within the deadline: ~2 s of back-off
        default_deadline_ms: int = 1000,
        max_k: int = MAX_K,
        arms=None,  # serving.arms.ArmsFile: the A/B test, if one runs
    ):
        from streams.durable import Guard  # streams.durable imports this module

        self.serde = serde
        self.response_serde = response_serde
        self.triton = triton  # AsyncTritonRecommender (connected)
        # Named by error answers: the version that served the last answer (models get promoted).
        self.version: str = triton.version
        self.cache = cache
        self.limit = asyncio.Semaphore(concurrency)
        self.retries = retries
        self.default_deadline_ms = default_deadline_ms
        self.max_k = max_k
        self.arms = arms
        self.guard = Guard(self.name)

    async def handle_batch(self, events: list[RawEvent]) -> list[Outcome]:
        """An answer or a dead letter per event, in order; earlier answers come from the cache."""
        out: list[Outcome | None] = [None] * len(events)
        async for ready in self.answers(events):
            for n, outcome in ready:
                out[n] = outcome
        return out

    async def answers(self, events: list[RawEvent]) -> AsyncIterator[list[tuple[int, Outcome]]]:
        """(index, outcome) for each event as soon as it is ready: dead letters, cached answers
        and requests already past their deadline first, then the served ones, those that finish
        together in one list (cached before they are yielded)."""
        requests, ready = self._decode(events)
        ready += await self._cached(requests)
        late = self._late(events, requests)
        if late:
            await self._remember(late)
        if ready or late:
            yield ready + late
        pending = {
            asyncio.ensure_future(self._answer(n, events[n], r))
            for n, r in enumerate(requests)
            if r is not None
        }
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                served = [task.result() for task in done]
                await self._remember(served)
                yield served
        finally:
            for task in pending:
                task.cancel()

    def _decode(
        self, events: list[RawEvent]
    ) -> tuple[list[dict | None], list[tuple[int, Outcome]]]:
        """The decoded requests (None where undecodable) and a dead letter for each of those."""
        requests: list[dict | None] = []
        letters: list[tuple[int, Outcome]] = []
        for n, event in enumerate(events):
            try:
                requests.append(self.serde.decode(event.value))
            except DecodeError as e:
                requests.append(None)
                letters.append((n, dead_letter(event, e.reason, self.name)))
        return requests, letters

    async def _cached(self, requests: list[dict | None]) -> list[tuple[int, Outcome]]:
        """Earlier answers to redelivered requests (one cache read for the batch); their
        requests are set to None, so they are not served again."""
        todo = [n for n, r in enumerate(requests) if r is not None]
        if not self.cache or not todo:
            return []
        ids = [str(requests[n].get("request_id") or "") for n in todo]
        found = []
        for n, value in zip(todo, await asyncio.to_thread(self.cache.get, ids), strict=True):
            if value is not None:
                found.append((n, Answer(str(requests[n]["user_id"]).encode(), value, None)))
                requests[n] = None
        return found

    def _late(
        self, events: list[RawEvent], requests: list[dict | None]
    ) -> list[tuple[int, Outcome]]:
        """`expired` answers to the valid requests already past their deadline, made here in one
        go: under overload they are most of the traffic, and cheap answers keep the backlog
        short. Their requests are set to None, so they are not served."""
        now_ms, out = time.time() * 1000, []
        for n, request in enumerate(requests):
            if request is None or validate_request(request, self.max_k):
                continue
            late_ms = now_ms - self.deadline_ms(request, events[n].timestamp_ms)
            if late_ms >= 0:
                error = f"deadline missed by {late_ms:.0f} ms before serving"
                out.append((n, self._encoded(self._expired(request, error))))
                requests[n] = None
        return out

    def _encoded(self, response: dict) -> Answer:
        return Answer(response["user_id"].encode(), self.response_serde.encode(response), response)

    async def _remember(self, served: list[tuple[int, Outcome]]) -> None:
        if not self.cache:
            return
        answers = {
            o.response["request_id"]: o.value
            for _, o in served
            if isinstance(o, Answer) and o.response and o.response["request_id"]
        }
        if answers:
            await asyncio.to_thread(self.cache.put, answers)

    async def _answer(self, n: int, event: RawEvent, request: dict) -> tuple[int, Outcome]:
        """One request's answer; one that keeps failing becomes a dead letter (the guard)."""

        async def respond(_: list[RawEvent]) -> Answer:
            return self._encoded(
                await self.handle(request, self.deadline_ms(request, event.timestamp_ms))
            )

        [outcome] = await self.guard.run(respond, [event], lambda letter: letter)
        return n, outcome

    def deadline_ms(self, request: dict, produced_ms: int) -> int:
        """When the answer is due (epoch ms)."""
        if request.get("deadline_ms") is not None:
            return int(request["deadline_ms"])
        return produced_ms + self.default_deadline_ms

    async def handle(self, request: dict, deadline_ms: int) -> dict:
        """The response to one decoded request (an error response when it cannot be served,
        an expired one when its deadline passes first)."""
        if error := validate_request(request, self.max_k):
            return error_record(request, f"invalid request: {error}", self.version)
        if (late_ms := time.time() * 1000 - deadline_ms) >= 0:
            return self._expired(request, f"deadline missed by {late_ms:.0f} ms before serving")
        async with self.limit:
            return await self._serve(request, deadline_ms)

    def _expired(self, request: dict, error: str) -> dict:
        metrics.EXPIRED.inc()
        return expired_record(request, error, self.version)

    async def _serve(self, request: dict, deadline_ms: int) -> dict:
        from tritonclient.utils import InferenceServerException

        tensors = request_tensors(request)
        test = self.arms.current(time.monotonic()) if self.arms else None
        arm = test.assign(str(request["user_id"])) if test else None
        failure = ""  # the last transient failure, if the deadline cut its retries short
        for attempt in range(self.retries + 1):
            left = deadline_ms / 1000 - time.time()
            if left <= 0:
                break
            try:
                version = arm.triton_version if arm else None
                call = self.triton.run(tensors, timeout=left, version=version)
                outputs = await asyncio.wait_for(call, left)  # in case the client ignores it
                response = response_record(request, outputs) | {"arm": arm.name if arm else ""}
                self.version = response["model_version"]
                return response
            except (InferenceServerException, ConnectionError, OSError) as e:
                if not _transient(e) or attempt == self.retries:
                    return error_record(request, f"serving failed: {e}", self.version)
                failure = f" (after {attempt + 1} failed tries, the last: {e})"
                # The first retry at once: a model being swapped in fails a request in
                # flight, and the new one answers right away.
                await asyncio.sleep(min(0.025 * 2**attempt if attempt else 0.0, 0.5, left))
            except TimeoutError:
                break
        late_ms = max(time.time() * 1000 - deadline_ms, 0)
        return self._expired(request, f"deadline missed by {late_ms:.0f} ms while serving{failure}")


def _transient(error: Exception) -> bool:
    status = getattr(error, "status", lambda: None)()
    return status in (
        None,
        "StatusCode.UNAVAILABLE",
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.RESOURCE_EXHAUSTED",
        "StatusCode.INTERNAL",
    )
