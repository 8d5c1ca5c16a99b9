"""Open-loop request load over Kafka for the end-to-end benchmark.

- `Generator`: a producer process of its own (no GIL shared with the response consumer) that
  sends pre-encoded requests on a fixed schedule with a confluent-kafka producer at
  `linger.ms=0`, and returns when each was handed to the producer.
- `stack_processes` / `CpuAccount`: the stack's processes by role, found from the PIDs the
  benchmark's services and the workers' run directory record, and their CPU time (psutil).
- `step_figures`: what one rate step shows: offered and achieved rates, latency of the ok
  answers, answers by status, unanswered requests and whether a backlog built up.
"""

from __future__ import annotations

import gc
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from bench.common import summarize

# --- the producer process ----------------------------------------------------------------------

Message = tuple[bytes | None, bytes]  # key, value


def _send_paced(
    producer, topic: str, messages: Sequence[Message], rate: float, start: float
) -> tuple[list[float], int]:
    """Produce message i at `start + i / rate` (perf_counter, the same clock in every process
    on Linux); late sends go at once (open loop: never skipped). Returns the send times and
    the number of failed deliveries."""
    failed = 0

    def delivered(err, _msg) -> None:
        nonlocal failed
        if err is not None:
            failed += 1

    sent: list[float] = []
    for i, (key, value) in enumerate(messages):
        while (left := start + i / rate - time.perf_counter()) > 0:
            time.sleep(left)
        sent.append(time.perf_counter())
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=delivered)
                break
            except BufferError:  # local queue full: let librdkafka deliver, then retry
                producer.poll(0.001)
        producer.poll(0)
    producer.flush(60)
    return sent, failed


def _generator_main(conn, conf: dict[str, Any]) -> None:
    from confluent_kafka import Producer

    gc.disable()  # nothing here lives long: no collector pause may delay a send
    producer = Producer(conf | {"linger.ms": 0})
    producer.list_topics(timeout=30)  # connected before the first job
    conn.send("ready")
    while (job := conn.recv()) is not None:
        conn.send(_send_paced(producer, *job))
    producer.flush(30)


class Generator:
    """One long-lived producer process; `send` runs one paced job and waits for it."""

    def __init__(self, conf: dict[str, Any]):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_generator_main, args=(child, conf), name="e2e-generator", daemon=True
        )
        self._process.start()
        if not self._conn.poll(60) or self._conn.recv() != "ready":
            raise RuntimeError("the request generator did not start")

    @property
    def pid(self) -> int:
        return int(self._process.pid or 0)

    def send(
        self, topic: str, messages: Sequence[Message], rate: float, start: float
    ) -> tuple[list[float], int]:
        """Send on schedule from `start` (perf_counter); (send times, failed deliveries)."""
        self._conn.send((topic, list(messages), rate, start))
        timeout = start - time.perf_counter() + len(messages) / rate + 120
        if not self._conn.poll(timeout):
            raise RuntimeError("the request generator did not finish its job")
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


def schedule_start(n: int) -> float:
    """A start time leaving room to encode `n` requests and hand them to the generator."""
    return time.perf_counter() + 0.3 + n * 50e-6


# --- processes and their CPU time ----------------------------------------------------------------


def stack_processes(
    services: dict[str, Any], worker_pids: Sequence[int], generator_pid: int | None
) -> dict[str, list[int]]:
    """PIDs by role: each stream worker with its children, the broker, Valkey, tritonserver,
    its Python-backend stubs (its children), the request generator and this process (the
    response consumer). `services`: role → PID of the benchmark's servers; `worker_pids`:
    from the workers' run directory (`Workers.running()`)."""

    def tree(pid: int) -> list[int]:
        try:
            return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    groups = {
        "stream worker": [p for w in worker_pids for p in tree(w)],
        "broker": [services["broker"]],
        "valkey": list(services["valkey"]),  # every node of a cluster
        "tritonserver": [services["triton"]],
        "triton stubs": tree(services["triton"])[1:],
        "bench consumer": [psutil.Process().pid],
    }
    if generator_pid:
        groups["load generator"] = [generator_pid]
    return groups


def _cpu_seconds(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return t.user + t.system


@dataclass
class CpuSnapshot:
    t: float
    seconds: dict[str, dict[int, float]]  # role → pid → CPU seconds
    machine_busy: float  # CPU seconds of the whole machine, all cores


class CpuAccount:
    """CPU seconds by role, snapshotted at phase boundaries; processes are found again at each
    snapshot (a restarted stub counts from its start)."""

    def __init__(self, discover: Callable[[], dict[str, list[int]]]):
        self.discover = discover

    def snapshot(self) -> CpuSnapshot:
        seconds = {
            role: {pid: _cpu_seconds(pid) for pid in pids} for role, pids in self.discover().items()
        }
        m = psutil.cpu_times()
        busy = sum(m) - m.idle - getattr(m, "iowait", 0.0)
        return CpuSnapshot(time.perf_counter(), seconds, busy)

    @staticmethod
    def spent(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, float]:
        """CPU seconds of each role between two snapshots."""
        return {
            role: sum(s - a.seconds.get(role, {}).get(pid, 0.0) for pid, s in pids.items())
            for role, pids in b.seconds.items()
        }

    @classmethod
    def usage(cls, a: CpuSnapshot, b: CpuSnapshot) -> dict[str, Any]:
        """Percent of one core by role, all of them, the whole machine and the rest of it."""
        wall = max(b.t - a.t, 1e-9)
        pct = {role: round(s / wall * 100, 1) for role, s in cls.spent(a, b).items()}
        ours = round(sum(pct.values()), 1)
        machine = round((b.machine_busy - a.machine_busy) / wall * 100, 1)
        return {
            "wall_s": round(wall, 2),
            "percent_of_one_core": pct,
            "ours_total": ours,
            "machine_busy": machine,
            "others": round(max(machine - ours, 0.0), 1),
        }

    @classmethod
    def per_request(
        cls, a: CpuSnapshot, b: CpuSnapshot, answered: int, idle_pct: dict[str, float]
    ) -> dict[str, Any]:
        """CPU-ms per answered request by role; `above_idle` subtracts what the role burns
        with no traffic (its idle % of a core) over the same wall time."""
        wall = b.t - a.t
        spent = cls.spent(a, b)
        n = max(answered, 1)
        return {
            "answered": answered,
            "wall_s": round(wall, 2),
            "cpu_ms": {role: round(s * 1000 / n, 2) for role, s in spent.items()},
            "cpu_ms_above_idle": {
                role: round((s - idle_pct.get(role, 0.0) / 100 * wall) * 1000 / n, 2)
                for role, s in spent.items()
            },
            "total_cpu_ms": round(sum(spent.values()) * 1000 / n, 2),
        }


# --- the figures of one rate step ----------------------------------------------------------------


def backlog_slope(sent: np.ndarray, answered: np.ndarray, t0: float, t1: float) -> float:
    """Growth of the requests in flight (sent, not yet answered), in requests per second: the
    least-squares slope over [t0, t1] sampled every 100 ms."""
    grid = np.arange(t0, t1, 0.1)
    if grid.size < 2:
        return 0.0
    in_flight = np.searchsorted(np.sort(sent), grid, "right") - np.searchsorted(
        np.sort(answered), grid, "right"
    )
    return float(np.polyfit(grid - t0, in_flight, 1)[0])


def step_figures(
    rate: float,
    ids: Sequence[str],
    sent: Sequence[float],
    scheduled_start: float,
    warmup_n: int,
    answers: dict[str, tuple[float, dict]],
    slo_ms: float,
) -> dict[str, Any]:
    """Figures of the requests after the first `warmup_n` (the step's warm-up). `answers`:
    request id → (arrival perf_counter, response) of the first response to each."""
    measured = range(warmup_n, len(ids))
    by_status: dict[str, int] = {}
    ok_ms: list[float] = []
    ok_arrivals: list[float] = []
    for i in measured:
        hit = answers.get(ids[i])
        if hit is None:
            continue
        arrived, response = hit
        by_status[response["status"]] = by_status.get(response["status"], 0) + 1
        if response["status"] == "ok":
            ok_ms.append((arrived - sent[i]) * 1000)
            ok_arrivals.append(arrived)
    t0 = sent[warmup_n] if len(sent) > warmup_n else scheduled_start
    t1 = sent[-1]
    window = max(t1 - t0, 1e-9)
    ok = by_status.get("ok", 0)
    span = max(ok_arrivals) - t0 if ok_arrivals else None
    arrivals = np.array([answers[r][0] for r in ids if r in answers])
    lag_ms = [(s - (scheduled_start + i / rate)) * 1000 for i, s in enumerate(sent)]
    latency = summarize(ok_ms)
    growth = backlog_slope(np.asarray(sent), arrivals, t0, t1)
    achieved = round(ok / span, 2) if span else 0.0
    steady = achieved >= 0.95 * rate and growth <= max(0.02 * rate, 1.0)
    return {
        "offered_rps": rate,
        "requests": len(measured),
        "warmup_requests": warmup_n,
        "sent_rps": round((len(measured) - 1) / window, 2) if len(measured) > 1 else None,
        "send_lag_ms": summarize(lag_ms),
        "achieved_rps": achieved,
        "latency_ms": latency,
        "ok": ok,
        "expired": by_status.get("expired", 0),
        "error": sum(n for s, n in by_status.items() if s not in ("ok", "expired")),
        "unanswered": len(measured) - sum(by_status.values()),
        "backlog_growth_per_s": round(growth, 2),
        "steady": steady,
        "sustainable": steady and latency.get("p99", float("inf")) <= slo_ms,
    }
