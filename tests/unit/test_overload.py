"""Overload: deadlines, answers published as they are ready, offsets acked in order, and the
back-off between empty fetches. No servers: Triton is a stub, Faust's stream a recorder."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from records import request

from schemas.serde import make_serde
from serving.operators import error_record
from streams import metrics, processors
from streams.kafka import Batches, EmptyFetchBackoff, InOrderAcks
from streams.processors import Answer, RawEvent, RequestProcessor
from streams.topics import TOPICS


def serde(role: str):
    return make_serde(role, TOPICS[role].schema)


def now_ms() -> int:
    return int(time.time() * 1000)


def events(records: list[dict], produced_ms: int | None = None) -> list[RawEvent]:
    s, at = serde("requests"), produced_ms if produced_ms is not None else now_ms()
    return [RawEvent("requests", 0, n, b"k", s.encode(r), at) for n, r in enumerate(records)]


class StubTriton:
    """Answers after `delays[user_id]` seconds (0 by default); records each call's timeout."""

    version = "stub"

    def __init__(self, delays: dict[str, float] | None = None):
        self.delays = delays or {}
        self.timeouts: list[float | None] = []

    async def run(self, tensors, timeout=None, version=None):
        self.timeouts.append(timeout)
        user = tensors["user_id"][0]
        await asyncio.sleep(self.delays.get(user.decode() if isinstance(user, bytes) else user, 0))
        return {"user": user}


@pytest.fixture(autouse=True)
def ok_responses(monkeypatch):
    """The graph's outputs are not needed here: a served request gets an empty `ok` answer."""

    def record(request, outputs):
        return error_record(request, "", "stub") | {"status": "ok", "error": None}

    monkeypatch.setattr(processors, "response_record", record)


def processor(triton: StubTriton, **extra) -> RequestProcessor:
    return RequestProcessor(serde("requests"), serde("recommendations"), triton, **extra)


def answer(p: RequestProcessor, batch: list[RawEvent]) -> list[dict]:
    out = asyncio.run(p.handle_batch(batch))
    assert all(isinstance(o, Answer) for o in out)
    return [serde("recommendations").decode(o.value) for o in out]


def test_a_request_past_its_deadline_is_answered_expired_without_serving():
    triton = StubTriton()
    expired_before = metrics.EXPIRED._value.get()
    [late] = answer(processor(triton), events([request("196", deadline_ms=now_ms() - 250)]))
    assert late["status"] == "expired" and late["items"] == []
    missed = int(late["error"].split("missed by ")[1].split(" ms")[0])
    assert 250 <= missed < 5000 and "before serving" in late["error"]
    assert triton.timeouts == []
    assert metrics.EXPIRED._value.get() == expired_before + 1


def test_without_its_own_deadline_a_request_is_due_the_default_after_it_was_produced():
    triton = StubTriton()
    p = processor(triton, default_deadline_ms=1000)
    fresh = request("196")  # its logical timestamp_ms is years ago: it does not count
    assert p.deadline_ms(fresh, produced_ms=5_000) == 6_000
    assert p.deadline_ms(request("196", deadline_ms=7_000), produced_ms=5_000) == 7_000
    [ok] = answer(p, events([fresh]))
    [late] = answer(p, events([request("196")], produced_ms=now_ms() - 1500))
    assert ok["status"] == "ok"
    assert late["status"] == "expired" and "before serving" in late["error"]
    assert len(triton.timeouts) == 1
    assert 0 < triton.timeouts[0] <= 1.0  # Triton gets the time left


def test_an_invalid_request_is_an_error_even_when_late():
    [bad] = answer(
        processor(StubTriton()), events([request("196", k=0, deadline_ms=now_ms() - 10)])
    )
    assert bad["status"] == "error" and "invalid request" in bad["error"]


def test_a_request_whose_serving_outlasts_its_deadline_is_answered_expired():
    triton = StubTriton({"slow": 5.0})
    started = time.monotonic()
    [late] = answer(processor(triton), events([request("slow", deadline_ms=now_ms() + 200)]))
    assert time.monotonic() - started < 2.0
    assert late["status"] == "expired" and "while serving" in late["error"]


def test_answers_come_as_each_is_ready_not_after_the_slowest():
    p = processor(StubTriton({"slow": 0.5}))
    batch = events([request("slow"), request("fast"), request("fast2")])

    async def arrivals() -> list[tuple[float, list[int]]]:
        started, seen = time.monotonic(), []
        async for ready in p.answers(batch):
            seen.append((time.monotonic() - started, sorted(n for n, _ in ready)))
        return seen

    seen = asyncio.run(arrivals())
    first_at, first = seen[0]
    assert first == [1, 2] and first_at < 0.4
    assert seen[-1][1] == [0]


def message(partition: int, offset: int):
    return SimpleNamespace(message=SimpleNamespace(topic="req", partition=partition, offset=offset))


class Recorder:
    def __init__(self):
        self.acked: list[tuple[int, int]] = []

    async def ack(self, event) -> bool:
        self.acked.append((event.message.partition, event.message.offset))
        return True


def test_offsets_are_acked_in_order_once_every_earlier_request_is_answered():
    stream = Recorder()
    acks = InOrderAcks(stream)
    batch = [message(0, 10), message(0, 11), message(1, 5), message(0, 12)]
    acks.taken(batch)
    asyncio.run(acks.done([batch[1], batch[3]]))  # 11 and 12 wait for 10
    asyncio.run(acks.done([batch[2]]))
    assert stream.acked == [(1, 5)]
    asyncio.run(acks.done([batch[0]]))
    assert stream.acked == [(1, 5), (0, 10), (0, 11), (0, 12)]


def test_empty_fetches_answered_at_once_are_spaced_out_and_data_resets_the_wait():
    backoff = EmptyFetchBackoff(max_s=0.008, first_s=0.0005)

    def empty(node: int, at: float, held_s: float = 0.0002) -> float:
        return backoff.after(node, False, held_s=held_s, max_wait_s=0.5, now=at)

    # An eighth of the time without data, from 0.5 ms up to 8 ms.
    waits = [empty(1, at) for at in (10.0, 10.002, 10.016, 10.040, 10.064, 11.0)]
    assert waits == pytest.approx([0.0005, 0.0005, 0.002, 0.005, 0.008, 0.008])
    assert backoff.after(1, True, held_s=0.0002, max_wait_s=0.5, now=11.001) == 0.0
    assert empty(1, 11.5) == 0.0005  # data reset the idle time
    # A broker that held the empty fetch (Apache Kafka) already waited: no back-off.
    assert empty(2, 12.0, held_s=0.5) == 0.0


def test_requests_are_batched_without_a_timer_while_idle():
    async def scenario() -> list[list[int]]:
        launched: list[list[int]] = []
        batches = Batches(3, 0.01, launched.append)
        loop = asyncio.get_running_loop()
        idle_timers = len(loop._scheduled)  # noqa: SLF001 - what an idle stream leaves armed
        for n in range(4):  # a full batch at once, the fourth alone after the wait
            batches.add(n)
        deadline = time.monotonic() + 2.0
        while len(launched) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert len(loop._scheduled) == idle_timers  # noqa: SLF001
        return launched

    assert asyncio.run(scenario()) == [[0, 1, 2], [3]]
