"""Two real tritonservers on one model repository behind one stream worker
(`STREAMREC_TRITON_URL=a,b`): one is SIGKILLed under a steady stream of requests and restarted on
its port; every request is still answered ok, and the killed server is ejected, readmitted and
takes traffic again."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import threading
import time
import uuid
from pathlib import Path

import pytest
from records import request, stack_settings, wait_until

from serving.client import ENSEMBLE, AsyncTritonRecommender, TritonRecommender
from serving.operators import request_tensors, response_record
from serving.pool import TritonPool
from streamrec.stack.process import pid_alive
from streamrec.stack.servers import start_triton, stop_service
from streamrec.workers import Workers
from streams.kafka import EventProducer, ResponseStream

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tritons(artifacts, serving_config, tmp_path_factory):
    """Servers "a" and "b" on one exported repository, each with its own root (log, shm)."""
    from serving.triton_export import export_repository

    root = tmp_path_factory.mktemp("pool")
    repository = export_repository(artifacts, root / "models", serving_config)
    services = {}
    try:
        for name in ("a", "b"):
            services[name] = start_triton(root / name, timeout=180, repository=repository)
        yield services  # a test that restarts one puts the new one here
    finally:
        for service in services.values():
            stop_service(service)


def pool_metrics(port: int) -> tuple[dict[str, float], dict[str, float]]:
    """The worker's view of its Triton servers: up (1/0) and inferences answered, by url."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    up, answered = {}, {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "streamrec_triton_server_up":
                up[s.labels["server"]] = s.value
            elif s.name == "streamrec_triton_requests_total":
                answered[s.labels["server"]] = s.value
    return up, answered


class Stream:
    """Requests produced every `period_s` in a thread of their own, and their answers."""

    def __init__(self, settings, period_s: float = 0.05):
        self.period_s = period_s
        self.sent: dict[str, float] = {}  # request id -> time.monotonic() when produced
        self.answers: dict[str, tuple[dict, float]] = {}  # request id -> (first answer, when)
        self.duplicates = 0
        self._stop = threading.Event()
        self._reader = ResponseStream(
            settings, settings.kafka_bootstrap, self._answered, f"pool-{uuid.uuid4().hex}", True
        )
        self._producer = EventProducer(settings, settings.kafka_bootstrap)
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def _answered(self, response: dict) -> None:
        rid = response["request_id"]
        if rid in self.answers:
            self.duplicates += 1
        elif rid in self.sent:
            self.answers[rid] = (response, time.monotonic())

    def _produce(self) -> None:
        n = 0
        while not self._stop.wait(self.period_s):  # pacing the load, not synchronising
            r = request(str(1 + n % 900), k=10)
            self.sent[r["request_id"]] = time.monotonic()
            self._producer.send("requests", r)
            n += 1
        self._producer.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        self.stop()
        self._reader.close()

    def latencies_ms(self, since: float = 0.0, until_: float = float("inf")) -> list[float]:
        return sorted(
            (at - self.sent[rid]) * 1000
            for rid, (_, at) in list(self.answers.items())
            if since <= self.sent[rid] < until_
        )


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def test_the_pool_answers_as_one_client_does_at_little_added_latency(tritons):
    a, b = tritons["a"].endpoint, tritons["b"].endpoint
    requests = [request(str(u), k=10) for u in range(1, 101)]

    async def measure():
        clients = {
            "direct": AsyncTritonRecommender(a),
            "pool of one": TritonPool(a),
            "pool of two": TritonPool(f"{a},{b}"),
        }
        for c in clients.values():
            await c.connect()
        times: dict[str, list[float]] = {name: [] for name in clients}
        items: dict[str, list[list[str]]] = {name: [] for name in clients}
        try:
            for _ in range(3):  # interleaved: each request through each client in turn
                for r in requests:
                    tensors = request_tensors(r)
                    for name, client in clients.items():
                        start = time.perf_counter()
                        outputs = await client.run(tensors, timeout=30)
                        times[name].append((time.perf_counter() - start) * 1000)
                        items[name].append(
                            [i["item_id"] for i in response_record(r, outputs)["items"]]
                        )
            answered = [s.answered for s in clients["pool of two"].servers]
        finally:
            for c in clients.values():
                await c.close()
        return times, items, answered

    times, items, answered = asyncio.run(measure())
    assert items["pool of one"] == items["direct"] and items["pool of two"] == items["direct"]
    assert all(len(i) == 10 for i in items["direct"])
    assert answered == [150, 150]  # one at a time: the servers in turn
    for name, ms in times.items():
        ms.sort()
        print(f"{name}: p50 {statistics.median(ms):.2f} ms, p99 {_pct(ms, 0.99):.2f} ms")


def test_a_killed_server_is_ejected_readmitted_after_its_restart_and_no_request_fails(
    tritons, base_settings, kafka, redis_url, artifacts
):
    a, b = tritons["a"].endpoint, tritons["b"].endpoint
    settings = stack_settings(
        base_settings, kafka, redis_url, f"{a},{b}", artifacts, request_deadline_ms=30_000
    )
    workers = Workers(settings)
    [worker] = workers.start(1, timeout=240)
    stream = None
    try:
        stream = Stream(settings)
        scrape = lambda: pool_metrics(worker.metrics_port)  # noqa: E731

        # Both servers take traffic.
        _, before = wait_until(
            lambda: (m := scrape())[1].get(a, 0) >= 20 and m[1].get(b, 0) >= 20 and m,
            120,
            "both servers to answer 20 requests",
        )
        # SIGKILL a (the server and its stage stubs), mid-stream.
        killed_at = time.monotonic()
        os.killpg(tritons["a"].pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(tritons["a"].pid), 30, "tritonserver a to exit")
        up, at_ejection = wait_until(lambda: (m := scrape())[0][a] == 0 and m, 30, "a's ejection")
        ejected_s = time.monotonic() - killed_at
        answered_at_kill = len(stream.answers)
        wait_until(
            lambda: len(stream.answers) >= answered_at_kill + 60, 120, "60 answers without a"
        )
        _, during = scrape()

        # Restart a on its port and repository; the pool readmits it once a canary passes.
        started = time.monotonic()
        root = Path(tritons["a"].log).parent
        tritons["a"] = start_triton(root, timeout=180, previous=tritons["a"])
        ready_at = time.monotonic()
        wait_until(lambda: scrape()[0][a] == 1, 60, "a's readmission", every=0.05)
        readmitted_at = time.monotonic()
        _, after = wait_until(
            lambda: (m := scrape())[1][a] >= during[a] + 20 and m, 120, "a to answer 20 more"
        )
        stream.stop()
        wait_until(lambda: set(stream.sent) <= set(stream.answers), 120, "every answer")
        _, final = scrape()
        served_by_a = TritonRecommender(a).client.get_inference_statistics(ENSEMBLE)
    finally:
        if stream is not None:
            stream.close()
        workers.stop_all()

    statuses = [r["status"] for r, _ in stream.answers.values()]
    errors = [r.get("error") for r, _ in stream.answers.values() if r["status"] != "ok"]
    print(
        f"sent {len(stream.sent)}, answered {len(stream.answers)}, ok {statuses.count('ok')}, "
        f"errors {len(errors)} {errors[:3]}, duplicates {stream.duplicates}\n"
        f"answered by a / b: before the kill {before[a]:.0f} / {before[b]:.0f}, "
        f"while a was down {during[a]:.0f} / {during[b]:.0f}, "
        f"after its readmission {after[a]:.0f} / {after[b]:.0f}, at the end {final[a]:.0f} / "
        f"{final[b]:.0f}\n"
        f"ejected {ejected_s:.2f} s after the kill; restart took {ready_at - started:.1f} s; "
        f"readmitted {readmitted_at - ready_at:.2f} s after the restarted server was ready "
        f"({readmitted_at - killed_at:.1f} s after the kill)"
    )
    for name, (lo, hi) in {
        "before the kill": (0, killed_at),
        "a down": (killed_at, readmitted_at),
        "after readmission": (readmitted_at, float("inf")),
    }.items():
        ms = stream.latencies_ms(lo, hi)
        print(
            f"end to end {name}: {len(ms)} requests, "
            f"p50 {_pct(ms, 0.5):.1f} ms, p99 {_pct(ms, 0.99):.1f} ms"
        )

    assert len(stream.sent) == len(stream.answers) == statuses.count("ok"), errors[:5]
    assert at_ejection[a] == during[a]  # no request went to the dead server once it was out
    assert during[b] >= at_ejection[b] + 60 - 5  # b took the traffic (canaries aside)
    assert after[a] >= during[a] + 20  # a takes traffic again
    # Triton's own count on the restarted a: the worker's requests since then (and canaries).
    success = served_by_a.model_stats[0].inference_stats.success.count
    assert success >= final[a] - during[a]


def test_cli_reads_from_the_first_server_that_answers_and_switches_every_server(
    tritons, artifacts, tmp_path
):
    """`streamrec models promote`'s path (`serving.rollout`) with several servers."""
    import json
    import shutil

    from serving.pool import TritonServers
    from serving.triton_export import add_version
    from streamrec.stack.process import free_port

    a, b = tritons["a"].endpoint, tritons["b"].endpoint
    dead = f"127.0.0.1:{free_port()}"
    # The same model under another version name: what the servers answer with tells them apart.
    other = shutil.copytree(artifacts, tmp_path / f"{artifacts.name}-copy")
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(manifest | {"version": other.name}))
    number = add_version(other, Path(tritons["a"].extra["repository"]))

    def served() -> list[str]:
        return [TritonRecommender(url).served_version() for url in (a, b)]

    assert TritonServers(f"{dead},{a},{b}").served_version() == artifacts.name  # a read
    with pytest.raises(ConnectionError, match=dead):  # one is unreachable: nobody switches
        TritonServers(f"{a},{dead},{b}").serve_version(number)
    assert served() == [artifacts.name] * 2
    TritonServers(f"{a},{b}").serve_version(number)
    assert served() == [other.name] * 2
