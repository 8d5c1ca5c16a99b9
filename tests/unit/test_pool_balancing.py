"""TritonPool: balancing, ejection and readmission. No servers: fake backends that raise the
errors tritonclient raises (gRPC UNAVAILABLE for a server that is gone)."""

from __future__ import annotations

import asyncio
import time

import pytest
from tritonclient.utils import InferenceServerException

from serving.client import CanaryResult
from serving.pool import TritonPool, is_down, split_urls

UNAVAILABLE = "StatusCode.UNAVAILABLE"


class FakeTriton:
    """One server: answers with its url, or fails as a dead server does while `down`."""

    def __init__(self, url: str):
        self.url = url
        self.version = ""
        self.down = False
        self.calls = 0
        self.canaries = 0
        self.healed: list[str] = []
        self.gate: asyncio.Event | None = None  # set: calls wait for it

    def _check(self) -> None:
        if self.down:
            raise InferenceServerException("failed to connect to all addresses", UNAVAILABLE)

    async def connect(self) -> None:
        self._check()
        self.version = f"v-{self.url}"

    async def run(self, tensors, timeout=None, version=None) -> dict:
        self.calls += 1
        self._check()
        if self.gate is not None:
            await self.gate.wait()
        return {"server": self.url}

    async def canary(self, timeout: float = 2.0) -> CanaryResult:
        self.canaries += 1
        ok = not self.down
        return CanaryResult(ok, 0.001, "" if ok else "UNAVAILABLE: gone", ())

    async def heal(self, stages, timeout: float = 30.0) -> list[str]:
        self.healed += stages
        return list(stages)

    async def close(self) -> None:
        pass


def pool_of(*urls: str, probe_s: float = 60.0) -> tuple[TritonPool, dict[str, FakeTriton]]:
    fakes: dict[str, FakeTriton] = {}

    def make(url: str) -> FakeTriton:
        fakes[url] = FakeTriton(url)
        return fakes[url]

    return TritonPool(",".join(urls), probe_interval_s=probe_s, client=make), fakes


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def healthy(pool: TritonPool) -> dict[str, bool]:
    return {s.url: s.healthy for s in pool.servers}


def test_endpoints_are_split_on_commas():
    assert split_urls("a:1") == ["a:1"]
    assert split_urls(" a:1, b:2 ,a:1,") == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="no Triton endpoint"):
        split_urls(" , ")


def test_only_an_unreachable_server_counts_as_down():
    assert is_down(InferenceServerException("Socket closed", UNAVAILABLE))
    assert is_down(ConnectionRefusedError())
    assert not is_down(InferenceServerException("bad input", "StatusCode.INVALID_ARGUMENT"))
    assert not is_down(InferenceServerException("slow", "StatusCode.DEADLINE_EXCEEDED"))
    assert not is_down(TimeoutError())  # an OSError, but a slow server is not a dead one


def test_requests_are_spread_over_the_servers_in_turn():
    async def main():
        pool, fakes = pool_of("a:1", "b:2", "c:3")
        await pool.connect()
        answers = [(await pool.run({}))["server"] for _ in range(300)]
        await pool.close()
        return answers, pool

    answers, pool = asyncio.run(main())
    assert {u: answers.count(u) for u in ("a:1", "b:2", "c:3")} == {
        "a:1": 100,
        "b:2": 100,
        "c:3": 100,
    }
    assert [s.answered for s in pool.servers] == [100, 100, 100]
    assert pool.version == "v-a:1"


def test_a_request_goes_to_the_server_with_fewest_in_flight():
    async def main():
        pool, fakes = pool_of("a:1", "b:2")
        await pool.connect()
        fakes["a:1"].gate = asyncio.Event()  # a is slow: its requests wait; b answers at once
        tasks = [asyncio.create_task(pool.run({})) for _ in range(10)]
        await until(lambda: sum(t.done() for t in tasks) == 9)
        stuck = [s.in_flight for s in pool.servers]
        fakes["a:1"].gate.set()
        answers = [(await t)["server"] for t in tasks]
        await pool.close()
        return stuck, answers

    stuck, answers = asyncio.run(main())
    # In turn would give a five; by requests in flight it gets one, and b the other nine.
    assert stuck == [1, 0]
    assert answers.count("a:1") == 1 and answers.count("b:2") == 9


def test_a_dead_server_is_ejected_at_once_and_the_request_served_by_another():
    async def main():
        pool, fakes = pool_of("a:1", "b:2")
        await pool.connect()
        fakes["a:1"].down = True
        answers = [(await pool.run({}, timeout=5))["server"] for _ in range(10)]
        state = healthy(pool)
        await pool.close()
        return answers, state, fakes["a:1"].calls

    answers, state, calls_to_a = asyncio.run(main())
    assert answers == ["b:2"] * 10  # not one request failed
    assert state == {"a:1": False, "b:2": True}
    assert calls_to_a == 1  # ejected by the first failure: no further request tried it


def test_an_ejected_server_is_readmitted_when_its_canary_passes_and_takes_traffic():
    async def main():
        pool, fakes = pool_of("a:1", "b:2", probe_s=0.01)
        await pool.connect()
        fakes["a:1"].down = True
        await pool.run({})
        await pool.run({})
        assert healthy(pool)["a:1"] is False
        probed = fakes["a:1"].canaries
        await until(lambda: fakes["a:1"].canaries > probed)  # probed while down
        assert healthy(pool)["a:1"] is False
        fakes["a:1"].down = False
        await until(lambda: healthy(pool)["a:1"])
        answers = [(await pool.run({}))["server"] for _ in range(10)]
        await pool.close()
        return answers

    assert asyncio.run(main()).count("a:1") == 5


def test_with_every_server_down_each_is_tried_once_and_the_error_raised():
    async def main():
        pool, fakes = pool_of("a:1", "b:2")
        await pool.connect()
        for f in fakes.values():
            f.down = True
        with pytest.raises(InferenceServerException) as e:
            await pool.run({}, timeout=5)
        calls = [f.calls for f in fakes.values()]
        # Both ejected: a request still tries them (as one server is tried without a pool),
        # and the first to answer is readmitted.
        fakes["b:2"].down = False
        answer = await pool.run({})
        state = healthy(pool)
        await pool.close()
        return e.value.status(), calls, answer, state

    status, calls, answer, state = asyncio.run(main())
    assert status == UNAVAILABLE
    assert calls == [1, 1]
    assert answer == {"server": "b:2"} and state == {"a:1": False, "b:2": True}


def test_a_request_error_is_raised_and_ejects_nobody():
    async def main():
        pool, fakes = pool_of("a:1", "b:2")
        await pool.connect()

        async def bad(*_, **__):
            raise InferenceServerException("k must be positive", "StatusCode.INVALID_ARGUMENT")

        fakes["a:1"].run = fakes["b:2"].run = bad
        with pytest.raises(InferenceServerException, match="k must be"):
            await pool.run({})
        state = healthy(pool)
        await pool.close()
        return state

    assert asyncio.run(main()) == {"a:1": True, "b:2": True}


def test_one_server_behaves_as_the_plain_client():
    async def main():
        pool, fakes = pool_of("a:1")
        await pool.connect()
        assert await pool.run({}) == {"server": "a:1"}
        fakes["a:1"].down = True
        with pytest.raises(InferenceServerException):
            await pool.run({})
        calls = fakes["a:1"].calls
        result = await pool.canary()
        await pool.close()
        return calls, result, healthy(pool)

    calls, result, state = asyncio.run(main())
    assert calls == 2  # no retry of its own: the processor retries within the deadline
    assert not result.ok and result.reason == "UNAVAILABLE: gone"  # its own canary's result
    assert state == {"a:1": True}  # never ejected: nothing to fail over to


def test_a_server_down_at_start_starts_ejected_and_none_up_fails():
    async def main():
        pool, fakes = pool_of("a:1", "b:2")
        fakes["a:1"].down = True  # before connect: the factory made it already
        await pool.connect()
        state, version = healthy(pool), pool.version
        await pool.close()
        dead, fakes = pool_of("a:1", "b:2")
        for f in fakes.values():
            f.down = True
        with pytest.raises(InferenceServerException):
            await dead.connect()
        alone, fakes = pool_of("a:1")
        fakes["a:1"].down = True
        with pytest.raises(InferenceServerException):
            await alone.connect()
        return state, version

    state, version = asyncio.run(main())
    assert state == {"a:1": False, "b:2": True} and version == "v-b:2"


def test_canaries_eject_and_readmit_per_server_and_heal_goes_to_the_one_named():
    async def main():
        pool, fakes = pool_of("a:1", "b:2")
        await pool.connect()
        fakes["b:2"].down = True
        results = await pool.canaries()
        after_failure = healthy(pool)
        combined = await pool.canary()
        await pool.heal(["executor"], server="b:2")
        fakes["b:2"].down = False
        await pool.canaries()
        await pool.close()
        return results, after_failure, combined, healthy(pool), fakes

    results, after_failure, combined, after_pass, fakes = asyncio.run(main())
    assert results["a:1"].ok and not results["b:2"].ok
    assert after_failure == {"a:1": True, "b:2": False}
    assert not combined.ok and combined.reason == "b:2: UNAVAILABLE: gone"
    assert fakes["b:2"].healed == ["executor"] and fakes["a:1"].healed == []
    assert after_pass == {"a:1": True, "b:2": True}


def test_the_workers_metrics_show_each_server_of_the_latest_pool():
    from prometheus_client import generate_latest

    from streams import metrics

    async def main():
        for _ in range(2):  # a second pool replaces the first (no duplicate registration)
            pool, fakes = pool_of("a:1", "b:2")
            metrics.watch_triton(pool)
            await pool.connect()
        fakes["b:2"].down = True
        for _ in range(3):
            await pool.run({})
        await pool.close()

    asyncio.run(main())
    text = generate_latest().decode()
    assert 'streamrec_triton_server_up{server="a:1"} 1.0' in text
    assert 'streamrec_triton_server_up{server="b:2"} 0.0' in text
    assert 'streamrec_triton_requests_total{server="a:1"} 3.0' in text
