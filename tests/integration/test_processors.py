"""The stream processors driven directly (no Faust) against the real Valkey fixture.

Only the Triton *client* is replaced, by the in-process graph wrapped in a stub that can be told
to fail or stall. The processors write state (users, seen items, item popularity, availability):
they write it under a project of the module's own (`own_state`), never into the session's.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import redis
from records import T0, interaction, item_update, request

from schemas.serde import make_serde
from serving.client import LocalRecommender
from state.store import RedisState, redis_client
from streams.processors import (
    Answer,
    Contention,
    InteractionProcessor,
    ItemUpdateProcessor,
    RawEvent,
    RequestProcessor,
    ResponseCache,
)
from streams.topics import TOPICS

pytestmark = pytest.mark.integration


def serde(role: str):
    return make_serde(role, TOPICS[role].schema)


def raw(role: str, records: list[dict]) -> list[RawEvent]:
    """Events produced now (a request's default deadline counts from its Kafka timestamp)."""
    s, now_ms = serde(role), int(time.time() * 1000)
    return [RawEvent(role, 0, n, b"k", s.encode(r), now_ms) for n, r in enumerate(records)]


@pytest.fixture(scope="module")
def interactions(own_state, artifacts):
    state = RedisState(own_state.redis_url, own_state.config["feast_project"])
    return InteractionProcessor(
        serde("interactions"), state, own_state.settings.feature_repo(), artifacts
    )


@pytest.fixture(scope="module")
def state(own_state) -> RedisState:
    return RedisState(own_state.redis_url, prefix=own_state.config["feast_project"])


def test_a_redelivered_batch_and_a_repeated_event_take_effect_once(interactions, state):
    user = f"dup-{uuid.uuid4().hex[:6]}"
    events = [interaction(user, str(1 + n), T0 + n) for n in range(5)]
    batch = raw("interactions", [*events, events[2]])  # one event twice in the batch
    acked = state.acked()
    first = interactions.process(batch)
    again = interactions.process(batch)  # what a worker does after a crash before its commit
    assert (first.applied, first.duplicates) == (5, 1)
    assert (again.applied, again.duplicates) == (0, 6)
    assert state.users([user])[0].event_count == 5
    assert set(state.seen(user)) == {e["item_id"] for e in events}
    assert state.acked() - acked == 5  # each event acked once, however often it was run


def test_a_batch_that_failed_after_its_transaction_is_projected_and_acked_on_retry(
    interactions, state, monkeypatch
):
    user = f"proj-{uuid.uuid4().hex[:6]}"
    batch = raw("interactions", [interaction(user, "50", T0), interaction(user, "181", T0 + 1)])
    acked = state.acked()
    real_project = InteractionProcessor._project

    def lost_connection(self, fresh):
        raise redis.ConnectionError("connection lost mid-batch")

    monkeypatch.setattr(InteractionProcessor, "_project", lost_connection)
    with pytest.raises(redis.ConnectionError):
        interactions.process(batch)
    assert state.users([user])[0].event_count == 2  # the transaction went through
    assert state.acked() == acked  # but nothing is acked before Feast has it
    monkeypatch.setattr(InteractionProcessor, "_project", real_project)
    retry = interactions.process(batch)
    assert (retry.applied, retry.duplicates) == (0, 2)
    assert interactions.reader.users([user], "user_activity")[0]["event_count"] == 2
    assert state.acked() - acked == 2
    # Item popularity is Redis state only: no Feast row of the former `item_stats` view.
    assert interactions.reader.timestamps("item", ["50", "181"], "item_stats") == [None, None]


def test_a_concurrent_change_of_the_users_state_retries_the_transaction(
    interactions, state, own_state, monkeypatch
):
    user = f"cas-{uuid.uuid4().hex[:6]}"
    other = redis_client(own_state.redis_url)  # another writer
    real = InteractionProcessor._stored_states
    calls = []

    def write_user(count: int) -> None:  # between this worker's read and its compare-and-set
        state_json = {"recent_items": [], "event_count": count, "genre_affinity": []}
        other.set(state.key("user", user), json.dumps(state_json | {"last_event_ms": 0}))

    def meddle_once(self, users, raws):
        out = real(self, users, raws)
        calls.append(1)
        if len(calls) == 1:
            write_user(10)
        return out

    monkeypatch.setattr(InteractionProcessor, "_stored_states", meddle_once)
    result = interactions.process(raw("interactions", [interaction(user, "7", T0)]))
    assert len(calls) == 2 and (result.applied, result.duplicates) == (1, 0)
    assert state.users([user])[0].event_count == 11  # applied on top of the other write

    def meddle_always(self, users, raws):
        out = real(self, users, raws)
        calls.append(1)
        write_user(100 + len(calls))
        return out

    monkeypatch.setattr(InteractionProcessor, "_stored_states", meddle_always)
    with pytest.raises(Contention):
        interactions.process(raw("interactions", [interaction(user, "8", T0 + 1, "e-8")]))
    assert "8" not in state.seen(user)  # nothing half-applied
    assert state.user_records([(user, ["e-8"])])[0][1:] == ([False], set())


def test_item_updates_out_of_order_keep_the_newest(own_state, state):
    processor = ItemUpdateProcessor(serde("item_updates"), state)
    item = f"ooo-{uuid.uuid4().hex[:6]}"
    # In one batch: the older update loses to the newer one.
    result = processor.process(
        raw("item_updates", [item_update(item, T0 + 2, False), item_update(item, T0 + 1, True)])
    )
    assert result.applied == 1 and state.unavailable_mask([item]) == [True]
    # Across batches: an older update arriving late is ignored, also for availability alone.
    late = processor.process(raw("item_updates", [item_update(item, T0, True)]))
    assert (late.applied, late.duplicates) == (0, 1)
    assert state.unavailable_mask([item]) == [True]
    film = item_update(item, T0 + 3, True, title="A Film", year=1998, genres=["Comedy"])
    newer = processor.process(raw("item_updates", [film]))
    assert newer.applied == 1 and state.unavailable_mask([item]) == [False]
    assert state.catalog_additions([item])[item]["title"] == "A Film"


class StubTriton:
    """Stands in for AsyncTritonRecommender: the in-process graph, with scripted failures."""

    def __init__(self, local: LocalRecommender, failures: list[Exception] = (), stall_s=0.0):
        self.local, self.failures, self.stall_s = local, list(failures), stall_s
        self.version = local.version
        self.calls = 0

    async def run(self, tensors, timeout=None, version=None):
        self.calls += 1
        if self.stall_s:
            await asyncio.sleep(self.stall_s)
        if self.failures:
            raise self.failures.pop(0)
        return self.local.run(tensors)


@pytest.fixture(scope="module")
def local(artifacts, own_state) -> LocalRecommender:
    return LocalRecommender(artifacts, own_state.config)


def answer(processor: RequestProcessor, records: list[dict]) -> list[dict]:
    out = asyncio.run(processor.handle_batch(raw("requests", records)))
    assert all(isinstance(o, Answer) for o in out)
    return [serde("recommendations").decode(o.value) for o in out]


def unavailable(message: str):
    from tritonclient.utils import InferenceServerException

    return InferenceServerException(message, status="StatusCode.UNAVAILABLE")


def test_transient_serving_errors_are_retried_within_the_deadline(local):
    triton = StubTriton(local, [unavailable("stage restarting"), unavailable("still")])
    processor = RequestProcessor(serde("requests"), serde("recommendations"), triton)
    [response] = answer(processor, [request("196", k=5)])
    assert response["status"] == "ok" and len(response["items"]) == 5
    assert triton.calls == 3


def test_a_request_gets_an_error_response_when_retries_are_exhausted(local):
    from tritonclient.utils import InferenceServerException

    triton = StubTriton(local, [unavailable("down")] * 10)
    processor = RequestProcessor(serde("requests"), serde("recommendations"), triton, retries=2)
    [response] = answer(processor, [request("196", k=5)])
    assert response["status"] == "error" and "serving failed" in response["error"]
    assert triton.calls == 3
    bad = StubTriton(
        local, [InferenceServerException("bad input", status="StatusCode.INVALID_ARGUMENT")]
    )
    processor = RequestProcessor(serde("requests"), serde("recommendations"), bad)
    [response] = answer(processor, [request("196", k=5)])
    assert response["status"] == "error" and bad.calls == 1  # not transient: no retry


def test_deadlines_bound_the_wait_for_a_stalled_server(local):
    triton = StubTriton(local, stall_s=5.0)
    processor = RequestProcessor(serde("requests"), serde("recommendations"), triton)
    started = time.monotonic()
    deadline = int(time.time() * 1000) + 300
    expired = int(time.time() * 1000) - 1
    stalled, late = answer(
        processor, [request("196", deadline_ms=deadline), request("196", deadline_ms=expired)]
    )
    assert time.monotonic() - started < 2.0
    assert stalled["status"] == "expired" and "while serving" in stalled["error"]
    assert late["status"] == "expired" and "before serving" in late["error"]
    assert triton.calls == 1  # the expired one never reached the server


def test_a_redelivered_request_gets_the_same_bytes_without_serving_again(local, state):
    triton = StubTriton(local)
    cache = ResponseCache(state, ttl_s=60)
    processor = RequestProcessor(serde("requests"), serde("recommendations"), triton, cache)
    r = request("196", temperature=1.0)  # sampled: serving it again would give another answer
    first = asyncio.run(processor.handle_batch(raw("requests", [r])))[0]
    again = asyncio.run(processor.handle_batch(raw("requests", [r])))[0]
    assert again.value == first.value and again.response is None
    assert triton.calls == 1
    assert 0 < state.client.ttl(state.key("response", r["request_id"])) <= 60


def test_undecodable_requests_are_dead_letters_and_the_rest_answered(local):
    processor = RequestProcessor(serde("requests"), serde("recommendations"), StubTriton(local))
    events = raw("requests", [request("196")])
    events.insert(0, RawEvent("requests", 0, 9, b"k", b"\x00junk", T0))
    letter, ok = asyncio.run(processor.handle_batch(events))
    assert isinstance(letter, dict) and letter["offset"] == 9 and letter["error"]
    assert isinstance(ok, Answer) and ok.response["status"] == "ok"
