"""Guard: transient failures are waited out, deterministic ones isolate and dead-letter the
poison event. No servers: the work functions raise the errors the real clients raise."""

from __future__ import annotations

import asyncio

import redis

from state.store import NotDurable
from streams import metrics
from streams.durable import Backoff, Guard, transient
from streams.processors import Contention, RawEvent

FAST = Backoff(first_s=0.001, max_s=0.002)


def events(n: int) -> list[RawEvent]:
    return [RawEvent("t", 0, offset, None, b"x", 0) for offset in range(n)]


def run(guard: Guard, work, batch):
    return asyncio.run(guard.run(work, batch, lambda letter: ("dead", letter)))


def test_dependency_errors_are_transient_and_bad_work_is_not():
    for e in (
        redis.ConnectionError("refused"),
        redis.TimeoutError("stalled"),
        redis.BusyLoadingError("loading the AOF"),
        ConnectionResetError(),
        NotDurable("no fsync"),
        Contention("watch"),
        redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
        redis.ResponseError("MISCONF Errors writing to the AOF file"),
        redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis.exceptions.NoScriptError("NOSCRIPT No matching script"),
        redis.exceptions.MovedError("3999 127.0.0.1:6381"),
        redis.exceptions.RedisClusterException("Redis Cluster cannot be connected."),
    ):
        assert transient(e), e
    for e in (
        ValueError("bad"),
        KeyError("x"),
        redis.ResponseError("WRONGTYPE"),
        redis.exceptions.RedisClusterException("MGET - all keys must map to the same key slot"),
    ):
        assert not transient(e), e


def test_a_dependency_outage_is_retried_until_the_batch_succeeds():
    failures = [redis.ConnectionError("down")] * 25
    calls = []

    async def work(batch):
        calls.append(len(batch))
        if failures:
            raise failures.pop()
        return "ok"

    guard = Guard("test-outage", tries=3, backoff=FAST)
    assert run(guard, work, events(4)) == ["ok"]
    assert calls == [4] * 26  # whole batch every time: never split, never dead-lettered
    assert metrics.STALLED.labels("test-outage")._value.get() == 0
    assert metrics.RETRIES.labels("test-outage", "transient")._value.get() == 25


def test_a_poison_event_is_dead_lettered_after_n_tries_and_the_rest_processed():
    tried: dict[int, int] = {}

    async def work(batch):
        for e in batch:
            tried[e.offset] = tried.get(e.offset, 0) + 1
        if any(e.offset == 2 for e in batch):
            raise ValueError("cannot handle offset 2")
        return [e.offset for e in batch]

    results = run(Guard("test-poison", tries=3, backoff=FAST), work, events(4))
    assert results[:2] == [[0], [1]] and results[3] == [3]
    kind, letter = results[2]
    assert kind == "dead" and letter["offset"] == 2
    assert "failed 3 times" in letter["error"] and "cannot handle offset 2" in letter["error"]
    assert tried == {0: 4, 1: 4, 2: 6, 3: 4}  # 3 as a batch, then alone (3 more for the poison)


def test_a_failure_that_goes_away_is_not_a_poison_event():
    failures = [ValueError("flaky")]

    async def work(batch):
        if failures:
            raise failures.pop()
        return len(batch)

    assert run(Guard("test-flaky", tries=3, backoff=FAST), work, events(3)) == [3]
