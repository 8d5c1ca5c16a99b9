"""Open-loop request load over Kafka and what it costs: `Generator`, a producer process of its
own (no GIL shared with the response reader) sending pre-encoded requests on a fixed schedule
(confluent-kafka, `linger.ms=0`); CPU seconds by role (psutil); the figures of one rate step."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import psutil

from bench.common import summarize

Message = tuple[bytes | None, bytes]  # key, value
Snapshot = tuple[float, dict[str, dict[int, float]], float]  # time, role → pid → s, machine
_producer: Any = None  # the generator process's


def _connect(conf: dict[str, Any]) -> None:
    from confluent_kafka import Producer

    global _producer
    gc.disable()  # nothing lives long in the generator: no collector pause may delay a send
    _producer = Producer(conf | {"linger.ms": 0})
    _producer.list_topics(timeout=30)  # connected before the first job


def _send_paced(topic: str, messages: list[Message], rate: float, start: float) -> list[float]:
    """Message i at `start + i / rate` (perf_counter: one clock for all processes on Linux), a
    late one at once (open loop: never skipped); the send times."""
    sent = []
    for i, (key, value) in enumerate(messages):
        while (left := start + i / rate - time.perf_counter()) > 0:
            time.sleep(left)
        sent.append(time.perf_counter())
        _producer.produce(topic, value, key)
        _producer.poll(0)
    _producer.flush(60)
    return sent


class Generator:
    """One long-lived producer process; `send` runs one paced job and waits for it."""

    def __init__(self, conf: dict[str, Any]) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(1, spawn, initializer=_connect, initargs=(conf,))
        self.pid = self.pool.submit(os.getpid).result(60)

    def send(self, topic: str, messages: list[Message], rate: float, start: float) -> list[float]:
        job = self.pool.submit(_send_paced, topic, messages, rate, start)
        return job.result(start - time.perf_counter() + len(messages) / rate + 120)

    def close(self) -> None:
        self.pool.shutdown()


def cpu_snapshot(processes: Callable[[], dict[str, list[int]]]) -> Snapshot:
    """CPU seconds (user + system) of every process by role, and of the whole machine."""
    seconds: dict[str, dict[int, float]] = {}
    for role, pids in processes().items():
        seconds[role] = {}
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                seconds[role][pid] = sum(psutil.Process(pid).cpu_times()[:2])
    m = psutil.cpu_times()
    return time.perf_counter(), seconds, sum(m) - m.idle - m.iowait


def cpu_spent(a: Snapshot, b: Snapshot) -> dict[str, float]:
    """CPU seconds of each role between two snapshots (a process new in `b` from its start)."""
    before = a[1]
    return {
        r: sum(s - before.get(r, {}).get(p, 0) for p, s in ps.items()) for r, ps in b[1].items()
    }


def cpu_usage(a: Snapshot, b: Snapshot, answered: int = 0, idle: dict | None = None) -> dict:
    """% of one core by role, all of them, the whole machine and the rest of it; with
    `answered`, CPU-ms per answered request by role, and less what the role burns with no
    traffic (`idle`: % of a core) in the same time."""
    wall, spent = max(b[0] - a[0], 1e-9), cpu_spent(a, b)
    pct = {role: round(s / wall * 100, 1) for role, s in spent.items()}
    ours, machine = round(sum(pct.values()), 1), round((b[2] - a[2]) / wall * 100, 1)
    out = {"percent_of_one_core": pct, "ours_total": ours, "machine_busy": machine}
    out |= {"others": round(max(machine - ours, 0.0), 1), "wall_s": round(wall, 2)}
    if answered:
        ms = {r: s * 1000 / answered for r, s in spent.items()}
        above = {r: v - (idle or {}).get(r, 0) * wall * 10 / answered for r, v in ms.items()}
        out |= {"answered": answered, "total_cpu_ms": round(sum(ms.values()), 2)}
        out |= {"cpu_ms": {r: round(v, 2) for r, v in ms.items()}}
        out |= {"cpu_ms_above_idle": {r: round(v, 2) for r, v in above.items()}}
    return out


def step_figures(
    rate: float, ids: list[str], sent: list[float], warmup_n: int, answers: dict, slo_ms: float
) -> dict[str, Any]:
    """Figures of the requests after the first `warmup_n` (the step's warm-up). `answers`:
    request id → (arrival perf_counter, first response)."""
    hits = [(answers.get(r), s) for r, s in zip(ids[warmup_n:], sent[warmup_n:], strict=True)]
    ok = [
        (h[0], (h[0] - s) * 1000, h[1]["stages"]) for h, s in hits if h and h[1]["status"] == "ok"
    ]
    other = [h[1] for h, _ in hits if h and h[1]["status"] != "ok"]
    reasons = Counter(
        f"{o['status']}: " + re.sub(r"\d+", "N", o["error"] or "")[:80] for o in other
    )
    stages: dict[str, list[float]] = {}
    for st in (st for *_, sts in ok for st in sts):
        stages.setdefault(st["name"], []).append(st["duration_ms"])
    outside = [ms - sum(st["duration_ms"] for st in sts) for _, ms, sts in ok]
    # requests in flight (sent, not yet answered) every 100 ms; their least-squares slope per s
    t0, t1, measured = sent[warmup_n], sent[-1], len(ids) - warmup_n
    grid, arrived = np.arange(t0, t1, 0.1), np.sort([a for a, _ in answers.values()])
    flying = np.searchsorted(sent, grid, "right") - np.searchsorted(arrived, grid, "right")
    growth = float(np.polyfit(grid - t0, flying, 1)[0]) if grid.size > 1 else 0.0
    achieved = round(len(ok) / (max(a for a, *_ in ok) - t0), 2) if ok else 0.0
    latency, expired = (
        summarize([ms for _, ms, _ in ok]),
        sum(reasons[k] for k in reasons if k.startswith("expired")),
    )
    steady = achieved >= 0.95 * rate and growth <= max(0.02 * rate, 1.0)
    return {
        "offered_rps": rate,
        "requests": measured,
        "sent_rps": round((measured - 1) / max(t1 - t0, 1e-9), 2),
        "achieved_rps": achieved,
        "latency_ms": latency,
        "ok": len(ok),
        "expired": expired,
        "error": len(other) - expired,
        "unanswered": measured - len(ok) - len(other),
        "backlog_growth_per_s": round(growth, 2),
        "steady": steady,
        "sustainable": steady and latency.get("p99", float("inf")) <= slo_ms,
        "error_reasons": dict(reasons),
        "stages_p50_ms": {k: round(float(np.median(v)), 3) for k, v in stages.items()},
        "outside_stages_p50_ms": round(float(np.median(outside)), 3) if outside else None,
    }
