"""End-to-end benchmark: Kafka → Faust stream worker(s) → Triton ensemble → Kafka, one data set.

    .venv/bin/python -m bench.e2e                           # ML-100K (trains once, cached)
    .venv/bin/python -m bench.e2e --rates 20,50,100 --workers 2

One run, on an embedded stack the benchmark starts itself (broker, Valkey, tritonserver and
stream workers on free 127.0.0.1 ports, in a temporary directory, stopped by PID at the end):

1. Interactions: a burst of N events produced as fast as possible (the data's hold-out, padded
   with synthetic events over known users and items if N is larger); events/s from the first
   produce until the processed counter (`RedisState.acked()`) has grown by N; feature freshness
   from the workers' `streamrec_feature_freshness_seconds` histogram (bucket estimate); then
   single interactions produced one at a time, timed from produce to `acked()` incrementing.
2. Requests at steady rates, open loop: a producer thread sends on a fixed schedule without
   waiting for answers, a consumer thread records when each response arrives; latency =
   arrival − scheduled send time (queueing behind a slow producer counts). Known users and a
   share of unknown ones, k=10, temperature 0. Raising the rate stops once p99 > 1 s; then
   up to `--refine` more rates locate where p99 crosses 100 ms (halving below the ladder if
   no rate held it, else bisecting). Each request carries a deadline (`--deadline-s`), so an
   overloaded rate drains as error responses instead of minutes of backlog.
3. The in-process graph (`LocalRecommender`) on the same requests, sequentially, on the same
   Valkey state; the end-to-end / in-process ratio of the medians.
4. Per-stage medians from the responses' `stages` under each rate, beside the in-process ones.
5. `bench/results/e2e-<data>.{json,md}` and a plot `bench/results/e2e-latency.png` (written
   with a small built-in PNG writer; no plotting library needed).

CPU time of every process (worker, tritonserver and each stage's Python stub, broker, Valkey,
this process) is sampled per phase, to show what limits throughput on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    RESULTS,
    ROOT,
    MemorySampler,
    Phases,
    children,
    cmdline,
    console,
    fmt,
    machine_info,
    markdown_table,
    public,
    ratio,
    summarize,
    write_results,
)


class BenchmarkFailure(RuntimeError):
    pass


# --- arguments -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=(
            "End-to-end benchmark of the streaming recommender on an embedded stack it starts "
            "itself: interaction throughput and feature freshness, open-loop request→response "
            "latency at steady rates, the in-process graph on the same requests, per-stage "
            "timings and per-process CPU. Writes bench/results/e2e-<data>.json, .md and "
            "bench/results/e2e-latency.png."
        ),
    )
    p.add_argument(
        "--data", default="ml-100k", help="data set (default ml-100k); see bench.serving"
    )
    p.add_argument(
        "--artifacts",
        type=Path,
        help="a trained artifact version (or an artifact root with `current`) to reuse; "
        "default: train once into bench/.work/<data>/artifacts and reuse that",
    )
    p.add_argument("--retrain", action="store_true", help="train again even if cached")
    p.add_argument("--workers", type=int, default=1, help="stream worker processes (default 1)")
    p.add_argument("--partitions", type=int, default=4, help="partitions per topic (default 4)")
    p.add_argument("--instances", type=int, default=1, help="Triton instances per operator")
    p.add_argument(
        "--events", type=int, default=20_000, help="interactions in the burst (default 20,000)"
    )
    p.add_argument(
        "--paced", type=int, default=200, help="single interactions timed one at a time (200)"
    )
    p.add_argument(
        "--paced-gap-ms",
        type=float,
        default=30.0,
        help="pause after each single interaction is processed (default 30 ms)",
    )
    p.add_argument(
        "--rates", default="50,100,200,500", help="request rates in req/s, comma-separated"
    )
    p.add_argument("--duration", type=float, default=15.0, help="seconds per rate (default 15)")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=5.0,
        help="each request's deadline after its scheduled send (the worker answers an expired "
        "request with an error instead of serving it; bounds the backlog under overload)",
    )
    p.add_argument(
        "--stop-p99-ms",
        type=float,
        default=1000.0,
        help="stop raising the rate once p99 (failures counted as infinite) exceeds this",
    )
    p.add_argument("--slo-ms", type=float, default=100.0, help="p99 target for 'sustained'")
    p.add_argument(
        "--refine",
        type=int,
        default=2,
        help="extra rates to measure after the ladder: halving below the lowest rate if none "
        "held the p99 target, else bisecting between the highest that held and the next "
        "(default 2; 0 = only the ladder)",
    )
    p.add_argument(
        "--min-rate", type=float, default=5.0, help="lowest rate a refinement tries (default 5)"
    )
    p.add_argument("--cold-share", type=float, default=0.1, help="share of unknown users")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--now-ms",
        type=int,
        help="request timestamp (default: one hour after the data's last event)",
    )
    p.add_argument(
        "--inprocess-requests",
        type=int,
        default=1000,
        help="at most this many of the lowest rate's requests run in-process (default 1,000)",
    )
    p.add_argument(
        "--idle-s", type=float, default=5.0, help="idle CPU baseline, seconds (default 5)"
    )
    p.add_argument(
        "--triton-timeout", type=float, default=600.0, help="tritonserver start-up limit (s)"
    )
    p.add_argument("--label", help="result name suffix (default: from --data)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = p.parse_args(argv)
    try:
        args.rates = [float(r) for r in str(args.rates).split(",") if r.strip()]
    except ValueError:
        p.error("--rates takes comma-separated numbers, e.g. 50,100,200")
    if not args.rates or any(r <= 0 for r in args.rates):
        p.error("--rates must be positive")
    args.rates = sorted(args.rates)
    if args.workers < 1 or args.partitions < 1 or args.instances < 1:
        p.error("--workers, --partitions and --instances must be >= 1")
    if args.events < 1 or args.paced < 0 or args.duration <= 0:
        p.error("--events must be >= 1, --paced >= 0, --duration > 0")
    if not 0.0 <= args.cold_share <= 1.0:
        p.error("--cold-share must be in [0, 1]")
    return args


# --- Prometheus text, histograms -------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset], float]


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        with contextlib.suppress(ValueError):
            out[(m.group(1), labels)] = out.get((m.group(1), labels), 0.0) + float(m.group(3))
    return out


def scrape(ports: Sequence[int]) -> Samples:
    """All workers' samples, summed over workers."""
    total: Samples = {}
    for port in ports:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            for key, value in parse_metrics(r.read().decode()).items():
                total[key] = total.get(key, 0.0) + value
    return total


def histogram(samples: Samples, name: str, **labels: str) -> dict[str, Any]:
    """Cumulative buckets {upper bound: count}, count and sum of one histogram series."""
    want = set(labels.items())
    buckets: dict[float, float] = {}
    count = total = 0.0
    for (metric, lab), value in samples.items():
        d = dict(lab)
        if not want <= set(lab):
            continue
        if metric == f"{name}_bucket" and "le" in d:
            buckets[math.inf if d["le"] == "+Inf" else float(d["le"])] = value
        elif metric == f"{name}_count":
            count = value
        elif metric == f"{name}_sum":
            total = value
    return {"buckets": dict(sorted(buckets.items())), "count": count, "sum": total}


def histogram_diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {
        "buckets": {
            le: after["buckets"][le] - before["buckets"].get(le, 0.0) for le in after["buckets"]
        },
        "count": after["count"] - before["count"],
        "sum": after["sum"] - before["sum"],
    }


def bucket_quantile(h: dict[str, Any], q: float) -> tuple[float | None, bool]:
    """Like PromQL histogram_quantile: linear within the bucket holding the rank. Returns
    (seconds, above_top): above_top when the rank falls in +Inf (value = highest finite bound)."""
    buckets = h["buckets"]
    total = buckets.get(math.inf, h["count"])
    if total <= 0:
        return None, False
    rank = q * total
    lower, below = 0.0, 0.0
    finite = [b for b in buckets if b != math.inf]
    for bound, cum in buckets.items():
        if cum >= rank:
            if bound == math.inf:
                return (finite[-1] if finite else None), True
            if cum == below:
                return bound, False
            return lower + (bound - lower) * (rank - below) / (cum - below), False
        lower, below = bound, cum
    return (finite[-1] if finite else None), True


def bucket_summary(h: dict[str, Any]) -> dict[str, Any]:
    """p50/p90/p99 in ms estimated from histogram buckets, and the exact mean (sum / count)."""
    out: dict[str, Any] = {"n": int(round(h["count"])), "estimate": "from histogram buckets"}
    if h["count"] <= 0:
        return out
    out["mean_ms"] = round(h["sum"] / h["count"] * 1000, 2)
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        value, above = bucket_quantile(h, q)
        out[f"{name}_ms"] = None if value is None else round(value * 1000, 2)
        if above:
            out[f"{name}_above_top_bucket"] = True
    out["bucket_bounds_ms"] = [b * 1000 for b in h["buckets"] if b != math.inf]
    return out


# --- CPU accounting --------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """CPU seconds of a process (all its threads), or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / _TICK, sum(values) / _TICK


class CpuMeter:
    """CPU seconds per named process (a Triton stub per stage, the workers with their
    children), snapshotted at phase boundaries; `%` = percent of one core over the interval."""

    def __init__(self):
        self.roots: dict[str, tuple[int, bool]] = {}  # name → (pid, include children)

    def add(self, name: str, pid: int, tree: bool = False) -> None:
        self.roots[name] = (pid, tree)

    def snapshot(self) -> dict[str, Any]:
        values: dict[str, float] = {}
        for name, (pid, tree) in self.roots.items():
            if name == "tritonserver":
                values[name] = cpu_seconds(pid)
                for child in children(pid):
                    m = re.search(r"/([^/\s]+)/\d+/model\.py", cmdline(child))
                    key = f"triton stub {m.group(1)}" if m else "triton other"
                    values[key] = values.get(key, 0.0) + cpu_seconds(child)
            elif tree:  # a stream worker: its event-loop thread apart from the rest
                whole = cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))
                main = cpu_seconds(pid, pid)
                values[f"{name}: event-loop thread"] = main
                values[f"{name}: other threads"] = whole - main
            else:
                values[name] = cpu_seconds(pid)
        busy, total = machine_busy_seconds()
        return {"t": time.perf_counter(), "cpu": values, "busy": busy, "total": total}

    @staticmethod
    def usage(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        wall = max(b["t"] - a["t"], 1e-9)
        pct = {
            name: round((b["cpu"][name] - a["cpu"].get(name, 0.0)) / wall * 100, 1)
            for name in b["cpu"]
        }
        ours = round(sum(pct.values()), 1)
        machine = round((b["busy"] - a["busy"]) / wall * 100, 1)
        return {
            "wall_s": round(wall, 2),
            "percent_of_one_core": pct,
            "ours_total": ours,
            "machine_busy": machine,
            "others": round(max(machine - ours, 0.0), 1),
        }


# --- response recorder -----------------------------------------------------------------------


class Arrivals:
    """Consumes the recommendations topic in a background thread and keeps, per request id,
    the arrival time (perf_counter) of its first response, the response, and duplicates."""

    def __init__(self, settings, bootstrap: str):
        from confluent_kafka import Consumer

        from streams.kafka import client_config
        from streams.topics import serde_for, topic_name

        conf = client_config(settings, bootstrap) | {
            "group.id": f"bench-e2e-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
        self._consumer = Consumer(conf)
        self._consumer.subscribe([topic_name(settings, "recommendations")])
        self._serde = serde_for(settings, "recommendations")
        self.first: dict[str, tuple[float, dict]] = {}
        self.duplicates = 0
        self.undecodable = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="e2e-arrivals", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> Arrivals:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        with contextlib.suppress(Exception):
            self._consumer.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                msg = self._consumer.poll(0.1)
                if msg is None:
                    continue
                arrived = time.perf_counter()
                if msg.error():
                    continue
                try:
                    record = self._serde.decode(msg.value())
                except ValueError:
                    self.undecodable += 1
                    continue
                with self._changed:
                    rid = record["request_id"]
                    if rid in self.first:
                        self.duplicates += 1
                    else:
                        self.first[rid] = (arrived, record)
                    self._changed.notify_all()
        except BaseException as e:  # reported by wait()
            self.error = e

    def wait(self, ids: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not ids <= self.first.keys():
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None:
                    break
                self._changed.wait(min(left, 0.5))
            if self.error is not None:
                raise BenchmarkFailure(f"response consumer failed: {self.error}")
            return ids <= self.first.keys()

    def count(self, ids: set[str]) -> int:
        with self._changed:
            return len(ids & self.first.keys())


# --- data ------------------------------------------------------------------------------------


def interaction(event_id: str, user: str, item: str, ts_ms: int) -> dict:
    return {
        "event_id": event_id,
        "user_id": user,
        "item_id": item,
        "event_type": "rating",
        "value": None,
        "timestamp_ms": int(ts_ms),
        "session_id": None,
        "context": {},
    }


def known_ids(artifacts: Path) -> tuple[list[str], list[str]]:
    import pandas as pd

    users = sorted(pd.read_parquet(artifacts / "state" / "user_activity.parquet")["user_id"])
    items = sorted(json.loads((artifacts / "items.json").read_text()))
    return users, items


def burst_events(
    spec: str, artifacts: Path, n: int, seed: int, users: list[str], items: list[str]
) -> tuple[list[dict], dict[str, Any]]:
    """The data's hold-out interactions in time order (what the offline evaluation replays),
    then synthetic events over known users and items after its end if `n` is larger."""
    from bench.serving import data_dir
    from models.data import load, temporal_split

    manifest = json.loads((artifacts / "manifest.json").read_text())
    dataset = load(spec, data_dir())
    split = temporal_split(dataset.interactions, manifest["config"]["split_quantile"])
    test = split.test.iloc[:n]
    events = [
        interaction(f"e2e-burst-{i}", str(u), str(it), int(ts) * 1000)
        for i, (u, it, ts) in enumerate(
            zip(test["user_id"], test["item_id"], test["timestamp"], strict=True)
        )
    ]
    rng = np.random.default_rng(seed)
    end_ms = int(dataset.interactions["timestamp"].max()) * 1000
    extra = n - len(events)
    for j in range(extra):
        i = len(events)
        u, it = users[rng.integers(len(users))], items[rng.integers(len(items))]
        events.append(interaction(f"e2e-burst-{i}", u, it, end_ms + 1000 * (j + 1)))
    source = {
        "holdout_events": len(test),
        "synthetic_events": max(extra, 0),
        "holdout_users": int(test["user_id"].nunique()),
    }
    return events, source


def request_record(
    rid: str, user: str, k: int, now_ms: int, deadline_ms: int | None = None
) -> dict:
    return {
        "request_id": rid,
        "user_id": user,
        "k": k,
        "exclude": [],
        "context": {"source": "bench-e2e"},
        "temperature": 0.0,
        "seed": 1,
        "deadline_ms": deadline_ms,
        "timestamp_ms": now_ms,
    }


# --- phase 1: interactions ---------------------------------------------------------------------


@contextlib.contextmanager
def quiet_gc():
    """The cyclic collector off for a timed section (it can pause this process for tens of
    ms once the benchmark holds many objects; setup objects are frozen beforehand)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def wait_acked(acked: Callable[[], int], target: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while acked() < target:
        if time.monotonic() > deadline:
            raise BenchmarkFailure(
                f"processed counter at {acked():,}, expected {target:,} within {timeout:.0f} s"
            )
        time.sleep(0.005)


def run_burst(
    events: list[dict], settings, bootstrap: str, state, ports: list[int], phases: Phases
) -> dict[str, Any]:
    from streams.kafka import EventProducer
    from streams.topics import record_key, serde_for

    serde = serde_for(settings, "interactions")
    encoded = [(serde.encode(e), record_key("interactions", e)) for e in events]
    producer = EventProducer(settings, bootstrap)
    # one untimed event first: the producer's connection and idempotence set-up are not timed
    count0 = histogram(scrape(ports), "streamrec_feature_freshness_seconds")["count"]
    base = state.acked()
    producer.send("interactions", {**events[0], "event_id": f"e2e-burst-warm-{uuid.uuid4().hex}"})
    producer.flush()
    wait_acked(state.acked, base + 1, 60)
    n = len(events)
    base = state.acked()
    before = wait_histogram(ports, "streamrec_feature_freshness_seconds", count0 + 1, {})
    batches_before = histogram(scrape(ports), "streamrec_batch_size", processor="interactions")
    timeline: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            done = state.acked() - base
            timeline.append((time.perf_counter(), done))
            if done >= n:
                return
            time.sleep(0.01)

    poller = threading.Thread(target=poll, name="e2e-acked", daemon=True)
    t0 = time.perf_counter()
    poller.start()
    for value, key in encoded:
        while True:
            try:
                producer.send_raw("interactions", value, key)
                break
            except BufferError:  # local queue full: let librdkafka deliver, then retry
                producer._producer.poll(0.01)  # noqa: SLF001
    produced = time.perf_counter() - t0
    producer.flush(120)
    flushed = time.perf_counter() - t0
    phases.log(
        f"  produced {n:,} interactions in {produced:,.2f} s ({n / produced:,.0f}/s), "
        f"all delivered after {flushed:,.2f} s"
    )
    last_log = time.monotonic()
    deadline = time.monotonic() + max(120.0, n / 50)
    while poller.is_alive():
        poller.join(0.5)
        if time.monotonic() - last_log > 5 and timeline:
            last_log = time.monotonic()
            t, done = timeline[-1]
            phases.log(f"  processed {done:,}/{n:,} after {t - t0:,.1f} s")
        if time.monotonic() > deadline:
            stop.set()
            raise BenchmarkFailure(
                f"only {timeline[-1][1] if timeline else 0:,}/{n:,} interactions processed"
            )
    done_t = next(t for t, d in timeline if d >= n)
    total_s = done_t - t0
    producer.close()
    after = wait_histogram(ports, "streamrec_feature_freshness_seconds", before["count"] + n, {})
    batches = histogram_diff(
        histogram(scrape(ports), "streamrec_batch_size", processor="interactions"),
        batches_before,
    )
    # steady rate: between 10 % and 90 % of the events processed
    lo = next(t for t, d in timeline if d >= 0.1 * n)
    hi = next(t for t, d in timeline if d >= 0.9 * n)
    first = next((t for t, d in timeline if d > 0), done_t)
    fresh = bucket_summary(histogram_diff(after, before))
    # Client-side view of the same: every event was produced within `produced` s of t0, so the
    # time until q of them were processed is their freshness quantile to within that (and the
    # 10 ms polling of the counter).
    fresh["client_timeline_ms"] = {
        f"p{round(q * 100)}": round((next(t for t, d in timeline if d >= q * n) - t0) * 1000, 1)
        for q in (0.5, 0.9, 0.99)
    }
    return {
        "events": n,
        "produce_s": round(produced, 3),
        "produce_rate_per_s": round(n / produced, 1),
        "delivered_s": round(flushed, 3),
        "first_processed_s": round(first - t0, 3),
        "all_processed_s": round(total_s, 3),
        "events_per_s": round(n / total_s, 1),
        "events_per_s_10_to_90pct": round(0.8 * n / (hi - lo), 1) if hi > lo else None,
        "freshness": fresh,
        "batches": {
            "count": int(batches["count"]),
            "mean_size": round(batches["sum"] / batches["count"], 1) if batches["count"] else None,
        },
        "processed_timeline_s": [
            [round(t - t0, 2), d] for k, (t, d) in enumerate(timeline) if k % 50 == 0
        ]
        + [[round(total_s, 2), n]],
    }


def wait_histogram(
    ports: list[int], name: str, count: float, labels: dict[str, str], timeout: float = 10.0
) -> dict[str, Any]:
    """Scrape until the histogram has `count` observations (the worker observes a batch just
    after acknowledging it) or the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        h = histogram(scrape(ports), name, **labels)
        if h["count"] >= count or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


def run_paced(
    n: int,
    gap_s: float,
    settings,
    bootstrap: str,
    state,
    ports: list[int],
    users: list[str],
    items: list[str],
    start_ms: int,
    seed: int,
    phases: Phases,
) -> dict[str, Any]:
    from streams.kafka import EventProducer

    rng = np.random.default_rng(seed + 7)
    producer = EventProducer(settings, bootstrap)
    # one untimed event first: the producer's connection and idempotence set-up are not timed
    count0 = histogram(scrape(ports), "streamrec_feature_freshness_seconds")["count"]
    base = state.acked()
    warm = interaction(f"e2e-paced-warm-{uuid.uuid4().hex[:8]}", users[0], items[0], start_ms)
    producer.send("interactions", warm)
    producer.flush()
    wait_acked(state.acked, base + 1, 60)
    before = wait_histogram(ports, "streamrec_feature_freshness_seconds", count0 + 1, {})
    latencies: list[float] = []
    timeouts = 0
    with quiet_gc():
        for i in range(n):
            u, it = users[rng.integers(len(users))], items[rng.integers(len(items))]
            record = interaction(
                f"e2e-paced-{uuid.uuid4().hex[:8]}-{i}", u, it, start_ms + i * 1000
            )
            base = state.acked()
            t0 = time.perf_counter()
            producer.send("interactions", record)
            deadline = t0 + 10.0
            while state.acked() <= base:
                if time.perf_counter() > deadline:
                    timeouts += 1
                    break
                time.sleep(0.001)
            else:
                latencies.append((time.perf_counter() - t0) * 1000)
            if (i + 1) % 50 == 0:
                phases.log(
                    f"  {i + 1}/{n} single interactions, "
                    f"median so far {np.median(latencies):,.1f} ms"
                )
            time.sleep(gap_s)
    producer.close()
    after = wait_histogram(ports, "streamrec_feature_freshness_seconds", before["count"] + n, {})
    return {
        "events": n,
        "gap_ms": gap_s * 1000,
        "direct_ms": summarize(latencies),
        "timeouts": timeouts,
        "histogram": bucket_summary(histogram_diff(after, before)),
        "_latencies": latencies,
    }


# --- phase 2: requests at steady rates ---------------------------------------------------------


def build_rate_requests(
    artifacts: Path, n: int, args: argparse.Namespace, now_ms: int, prefix: str, seed: int
) -> list[dict]:
    from bench.serving import build_requests

    return build_requests(artifacts, n, args.cold_share, args.k, now_ms, seed, prefix)


def run_rate(
    rate: float,
    requests: list[dict],
    settings,
    bootstrap: str,
    arrivals: Arrivals,
    ports: list[int],
    cpu: CpuMeter,
    args: argparse.Namespace,
    phases: Phases,
) -> dict[str, Any]:
    """Send `requests` open loop at `rate`; wait for the answers (or their deadlines)."""
    from streams.kafka import EventProducer
    from streams.topics import record_key, serde_for

    serde = serde_for(settings, "requests")
    producer = EventProducer(settings, bootstrap)
    # one untimed request first: the producer's connection and idempotence set-up (hundreds of
    # ms on a busy machine) must not land on the first scheduled requests
    warm = request_record(f"warm-{uuid.uuid4().hex[:8]}", requests[0]["user_id"], args.k, 0)
    producer.send("requests", warm | {"timestamp_ms": requests[0]["timestamp_ms"]})
    producer.flush()
    arrivals.wait({warm["request_id"]}, 30)
    n = len(requests)
    ids = {r["request_id"] for r in requests}
    scheduled = [0.0] * n
    sent = [0.0] * n
    errors: list[BaseException] = []
    before = scrape(ports)
    ready = threading.Event()
    start_box: list[float] = []

    def send() -> None:
        try:
            ready.wait()
            t0 = start_box[0]
            epoch0 = time.time() - (time.perf_counter() - t0)  # epoch of t0
            for i, r in enumerate(requests):
                at = t0 + i / rate
                while (left := at - time.perf_counter()) > 0:
                    time.sleep(left if left > 0.002 else left / 2)
                deadline_ms = int((epoch0 + i / rate + args.deadline_s) * 1000)
                value = serde.encode({**r, "deadline_ms": deadline_ms})
                sent[i] = time.perf_counter()
                scheduled[i] = at
                producer.send_raw("requests", value, record_key("requests", r))
            producer.flush(60)
        except BaseException as e:  # reported after the join
            errors.append(e)

    thread = threading.Thread(target=send, name=f"e2e-send-{rate:g}", daemon=True)
    thread.start()
    cpu_start = cpu.snapshot()
    start_box.append(time.perf_counter() + 0.05)
    with quiet_gc():  # no collector pause in this process may delay a send or an arrival
        ready.set()
        thread.join()
        cpu_end = cpu.snapshot()  # over the send window: the steady load
    if errors:
        raise BenchmarkFailure(f"request producer failed: {errors[0]}")
    send_window = sent[-1] - scheduled[0]
    got = arrivals.count(ids)
    phases.log(
        f"  sent {n:,} requests in {send_window:,.1f} s ({n / send_window:,.1f}/s); "
        f"{got:,} answered so far; waiting for the rest"
    )
    with quiet_gc():
        complete = arrivals.wait(ids, args.deadline_s + 10.0)
    time.sleep(0.5)  # late duplicates
    after = scrape(ports)
    producer.close()

    ok_lat, err_lat, stages, outside, errors_by = [], [], {}, [], {}
    worst: list[tuple[float, int, dict]] = []
    all_lat: list[float] = []
    paths: dict[str, int] = {}
    arrivals_ok: list[float] = []
    with arrivals._changed:  # noqa: SLF001 - a consistent view
        first = {rid: arrivals.first[rid] for rid in ids if rid in arrivals.first}
    for i, r in enumerate(requests):
        hit = first.get(r["request_id"])
        if hit is None:
            all_lat.append(math.inf)
            continue
        arrived, resp = hit
        ms = (arrived - scheduled[i]) * 1000
        all_lat.append(ms)
        if resp["status"] != "ok":
            err_lat.append(ms)
            reason = re.sub(r"\d+", "N", resp["error"] or "")[:80]
            errors_by[reason] = errors_by.get(reason, 0) + 1
            continue
        ok_lat.append(ms)
        arrivals_ok.append(arrived)
        worst.append((ms, i, resp))
        paths[resp["path"]] = paths.get(resp["path"], 0) + 1
        total = 0.0
        for s in resp["stages"]:
            stages.setdefault(s["name"], []).append(s["duration_ms"])
            total += s["duration_ms"]
        outside.append(ms - total)
    missing = n - len(first)
    by_second: dict[int, list[float]] = {}
    for i, ms in enumerate(all_lat):
        by_second.setdefault(int(scheduled[i] - scheduled[0]), []).append(ms)
    per_second = [
        {
            "second": sec,
            "sent": len(v),
            "answered": sum(not math.isinf(x) for x in v),
            "p50_ms": finite(float(np.percentile(v, 50, method="higher"))),
            "max_ms": finite(float(max(v))),
        }
        for sec, v in sorted(by_second.items())
    ]
    span = (max(arrivals_ok) - scheduled[0]) if arrivals_ok else None
    worker_h = histogram_diff(
        histogram(after, "streamrec_request_latency_seconds", stage="end_to_end"),
        histogram(before, "streamrec_request_latency_seconds", stage="end_to_end"),
    )
    p_all = np.percentile(np.asarray(all_lat), [50, 99], method="higher") if all_lat else [0, 0]
    lag = [(s - c) * 1000 for s, c in zip(sent, scheduled, strict=True)]
    result = {
        "rate": rate,
        "requests": n,
        "duration_s": round(n / rate, 2),
        "send_window_s": round(send_window, 3),
        "send_rate": round(n / send_window, 2) if send_window > 0 else None,
        "send_lag_ms": summarize(lag),
        "ok": len(ok_lat),
        "errors": len(err_lat),
        "error_reasons": errors_by,
        "missing": missing,
        "complete": complete,
        "duplicates_total": arrivals.duplicates,
        "achieved_rps": round(len(ok_lat) / span, 2) if span else 0.0,
        "latency_ms": summarize(ok_lat),
        "error_latency_ms": summarize(err_lat),
        "p50_all_ms": None if math.isinf(p_all[0]) else round(float(p_all[0]), 3),
        "p99_all_ms": None if math.isinf(p_all[1]) else round(float(p_all[1]), 3),
        "worker_end_to_end": bucket_summary(worker_h),
        "stages_p50_ms": {k: round(float(np.median(v)), 3) for k, v in stages.items()},
        "stages_p99_ms": {k: round(float(np.percentile(v, 99)), 3) for k, v in stages.items()},
        "outside_stages_p50_ms": round(float(np.median(outside)), 3) if outside else None,
        "outside_stages_p99_ms": round(float(np.percentile(outside, 99)), 3) if outside else None,
        "paths": paths,
        "per_second": per_second,
        "slowest": [
            {
                "sent_at_s": round(scheduled[i] - scheduled[0], 3),
                "latency_ms": round(ms, 1),
                "send_lag_ms": round(lag[i], 1),
                "stages_ms": round(sum(st["duration_ms"] for st in resp["stages"]), 1),
                "slowest_stage": max(resp["stages"], key=lambda st: st["duration_ms"])["name"],
                "user_id": resp["user_id"],
                "path": resp["path"],
            }
            for ms, i, resp in sorted(worst, key=lambda w: -w[0])[:5]
        ],
        "cpu": CpuMeter.usage(cpu_start, cpu_end),
        "_first": {rid: first[rid][1] for rid in first},
        "_p99_all": float(p_all[1]),
    }
    return result


def finite(x: float, digits: int = 1) -> float | None:
    """JSON has no infinity: a missing response's latency is reported as null."""
    return None if math.isinf(x) else round(x, digits)


def sustained(level: dict[str, Any], slo_ms: float) -> bool:
    """Every request answered ok, p99 under the target, throughput kept up with the offer."""
    return (
        level["missing"] == 0
        and level["errors"] == 0
        and level["latency_ms"].get("p99", math.inf) < slo_ms
        and level["achieved_rps"] >= 0.95 * level["rate"]
    )


# --- phase 3: in-process ---------------------------------------------------------------------


def run_in_process(local, requests: list[dict], warm: list[dict], phases: Phases) -> dict[str, Any]:
    from serving.operators import OPERATORS, decode, request_tensors

    for r in warm:
        local.run(request_tensors(r))
    latencies, outputs = [], []
    every = max(1, len(requests) // 4)
    for i, r in enumerate(requests):
        tensors = request_tensors(r)
        t0 = time.perf_counter()
        out = local.run(tensors)
        latencies.append((time.perf_counter() - t0) * 1000)
        outputs.append(out)
        if (i + 1) % every == 0:
            phases.log(
                f"  in-process: {i + 1}/{len(requests)}, p50 so far {np.median(latencies):,.2f} ms"
            )
    stages = {op.name: [float(o[op.stats_name()][2]) for o in outputs] for op in OPERATORS}
    outside = [
        lat - sum(float(o[op.stats_name()][2]) for op in OPERATORS)
        for lat, o in zip(latencies, outputs, strict=True)
    ]
    return {
        "requests": len(requests),
        "latency_ms": summarize(latencies),
        "stages_p50_ms": {k: round(float(np.median(v)), 3) for k, v in stages.items()},
        "stages_p99_ms": {k: round(float(np.percentile(v, 99)), 3) for k, v in stages.items()},
        "outside_stages_p50_ms": round(float(np.median(outside)), 3),
        "_items": {
            r["request_id"]: decode(o["items"]) for r, o in zip(requests, outputs, strict=True)
        },
    }


def compare_answers(e2e: dict[str, dict], local: dict[str, list[str]]) -> dict[str, Any]:
    checked = mismatches = 0
    examples = []
    for rid, items in local.items():
        resp = e2e.get(rid)
        if resp is None or resp["status"] != "ok":
            continue
        checked += 1
        served = [i["item_id"] for i in resp["items"]]
        if served != items:
            mismatches += 1
            if len(examples) < 3:
                examples.append(f"{rid}: served {served[:5]}… in-process {items[:5]}…")
    return {"checked": checked, "mismatches": mismatches, "examples": examples}


# --- plot (a tiny PNG writer: no plotting library in the environment) ----------------------

_FONT = {  # 5×7 capitals, digits and a little punctuation; rows top to bottom
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110",
    "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100",
    "Z": "11111 00001 00010 00100 01000 10000 11111",
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    ".": "00000 00000 00000 00000 00000 01100 01100",
    ",": "00000 00000 00000 00000 01100 00100 01000",
    "/": "00000 00001 00010 00100 01000 10000 00000",
    "(": "00010 00100 01000 01000 01000 00100 00010",
    ")": "01000 00100 00010 00010 00010 00100 01000",
    "-": "00000 00000 00000 11111 00000 00000 00000",
    ":": "00000 01100 01100 00000 01100 01100 00000",
    "=": "00000 00000 11111 00000 11111 00000 00000",
    "<": "00010 00100 01000 10000 01000 00100 00010",
    ">": "01000 00100 00010 00001 00010 00100 01000",
    "%": "11000 11001 00010 00100 01000 10011 00011",
    " ": "00000 00000 00000 00000 00000 00000 00000",
}


class Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        for y in range(min(y0, y1), max(y0, y1) + 1):
            for x in range(min(x0, x1), max(x0, x1) + 1):
                self.dot(x, y, color)

    def line(self, x0, y0, x1, y1, color, width: int = 1, dash: int = 0) -> None:
        x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        r = width // 2
        for s in range(steps + 1):
            if dash and (s // dash) % 2:
                continue
            x = x0 + (x1 - x0) * s / steps
            y = y0 + (y1 - y0) * s / steps
            self.rect(
                int(round(x)) - r, int(round(y)) - r, int(round(x)) + r, int(round(y)) + r, color
            )

    def text(self, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 2) -> int:
        """Draw `s` with its top-left at (x, y); returns the width drawn."""
        for n, ch in enumerate(s.upper()):
            rows = _FONT.get(ch, _FONT[" "]).split()
            for ry, row in enumerate(rows):
                for rx, bit in enumerate(row):
                    if bit == "1":
                        bx = x + n * 6 * scale + rx * scale
                        self.rect(
                            bx, y + ry * scale, bx + scale - 1, y + ry * scale + scale - 1, color
                        )
        return len(s) * 6 * scale

    @staticmethod
    def text_width(s: str, scale: int = 2) -> int:
        return len(s) * 6 * scale

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        stride = self.w * 3
        raw = b"".join(
            b"\x00" + bytes(self.px[y * stride : (y + 1) * stride]) for y in range(self.h)
        )
        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def plot_latency(result: dict[str, Any], path: Path) -> Path:
    """p50 and p99 (log scale) against the offered request rate; the in-process p50 and the
    p99 target as horizontal lines."""
    rates = result["requests"]["rates"]
    inproc = result["in_process"]["latency_ms"].get("p50")
    slo = result["config"]["slo_ms"]
    points = {
        "P50": [(r["rate"], r["latency_ms"].get("p50")) for r in rates],
        "P99": [(r["rate"], r["latency_ms"].get("p99")) for r in rates],
    }
    values = [v for series in points.values() for _, v in series if v] + [slo]
    if inproc:
        values.append(inproc)
    lo = 10 ** math.floor(math.log10(max(min(values), 1e-3)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    if hi <= lo:
        hi = lo * 10
    w, h = 960, 600
    left, right, top, bottom = 110, 40, 70, 90
    c = Canvas(w, h)
    max_rate = max(r["rate"] for r in rates) * 1.08
    pw, ph = w - left - right, h - top - bottom

    def px(rate: float) -> float:
        return left + rate / max_rate * pw

    def py(ms: float) -> float:
        return top + ph - (math.log10(ms) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph

    grey, black = (200, 200, 200), (0, 0, 0)
    decade = lo
    while decade <= hi * 1.0001:
        y = py(decade)
        c.line(left, y, left + pw, y, grey)
        label = f"{decade:g}"
        c.text(left - 12 - c.text_width(label), int(y) - 7, label)
        decade *= 10
    for r in rates:
        x = px(r["rate"])
        c.line(x, top, x, top + ph, (235, 235, 235))
        label = f"{r['rate']:g}"
        c.text(int(x) - c.text_width(label) // 2, top + ph + 12, label)
    c.line(left, top, left, top + ph, black, 2)
    c.line(left, top + ph, left + pw, top + ph, black, 2)
    c.line(left, py(slo), left + pw, py(slo), (0, 150, 0), 2, dash=8)
    if inproc:
        c.line(left, py(inproc), left + pw, py(inproc), (120, 120, 120), 2, dash=4)
    colors = {"P50": (31, 119, 180), "P99": (214, 39, 40)}
    for name, series in points.items():
        pts = [(px(r), py(v)) for r, v in series if v]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            c.line(x0, y0, x1, y1, colors[name], 3)
        for x, y in pts:
            c.rect(int(x) - 5, int(y) - 5, int(x) + 5, int(y) + 5, colors[name])
    title = f"END-TO-END LATENCY VS REQUEST RATE ({result['label']})"
    c.text((w - c.text_width(title)) // 2, 20, title)
    xlabel = "OFFERED REQUEST RATE (REQ/S)"
    c.text((w - c.text_width(xlabel)) // 2, h - 40, xlabel)
    c.text(10, top - 30, "LATENCY MS (LOG)")
    legend = [
        ("P50 END TO END", colors["P50"]),
        ("P99 END TO END", colors["P99"]),
        (f"P99 TARGET {slo:g} MS", (0, 150, 0)),
    ]
    if inproc:
        legend.append((f"IN-PROCESS P50 {inproc:.1f} MS", (120, 120, 120)))
    ly = top + 10
    for label, color in legend:
        c.rect(left + 20, ly + 3, left + 44, ly + 9, color)
        c.text(left + 52, ly, label, color=color)
        ly += 22
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(c.png())
    tmp.replace(path)
    return path


# --- report ------------------------------------------------------------------------------------


def markdown_report(r: dict[str, Any]) -> str:
    m, cfg = r["machine"], r["config"]
    b, p = r["interactions"]["burst"], r["interactions"]["paced"]
    fr = b["freshness"]
    a = r["artifacts"]
    lines = [
        f"# End-to-end benchmark: {r['label']}",
        "",
        f"{r['started']} · {m.get('cpu_model', m['machine'])} · {m['cpus_usable']} CPUs · "
        f"load average at start {m['load_average_at_start']}, at end "
        f"{r['load_average_at_end']} · Python {m['python']} · commit "
        f"{m.get('git_commit', '?')} · {r['wall_s']:,.0f} s in all.",
        "",
        f"Artifacts {a['version']} ({a['items']:,} items, {a['users']:,} users, index "
        f"{a['index'].get('type')}). Embedded broker, Valkey and tritonserver started by the "
        f"benchmark; {cfg['workers']} stream worker(s), {cfg['partitions']} partitions, "
        f"{cfg['instances']} Triton instance(s) per stage. Other work may have shared the "
        "machine: figures are medians and p99 of one run; ratios are from the same run.",
        "",
        "## 1. Interactions: throughput and feature freshness",
        "",
        f"Burst of {b['events']:,} interactions ({r['interactions']['source']['holdout_events']:,}"
        f" from the hold-out, {r['interactions']['source']['synthetic_events']:,} synthetic) "
        "produced as fast as possible; processed = the `acked` counter in Valkey (state, seen "
        "set, popularity and the Feast projection written).",
        "",
        markdown_table(
            ["measure", "value"],
            [
                ["events", b["events"]],
                ["produce time (s)", b["produce_s"]],
                ["first processed after (s)", b["first_processed_s"]],
                ["all processed after (s)", b["all_processed_s"]],
                ["events/s (first produce → all processed)", b["events_per_s"]],
                ["events/s (10 % → 90 % processed)", b["events_per_s_10_to_90pct"]],
                [
                    "micro-batches / mean batch size",
                    f"{b['batches']['count']:,} / {fmt(b['batches']['mean_size'], 1)}",
                ],
                ["freshness p50 under the burst (ms, bucket estimate)", bucket_cell(fr, "p50")],
                ["freshness p99 under the burst (ms, bucket estimate)", bucket_cell(fr, "p99")],
                [
                    "time until 50 % / 90 % / 99 % processed (ms, client-side)",
                    " / ".join(fmt(v, 0) for v in fr.get("client_timeline_ms", {}).values()),
                ],
                [
                    "freshness mean under the burst (ms, exact sum/count)",
                    b["freshness"].get("mean_ms"),
                ],
            ],
        ),
        "",
        f"Single interactions, one at a time ({p['events']} events, {p['gap_ms']:g} ms pause "
        "after each is processed): produce → `acked` incremented, measured by the client "
        "(exact), beside the worker's histogram for the same events (bucket estimate; bucket "
        "bounds "
        + ", ".join(f"{x:g}" for x in p["histogram"].get("bucket_bounds_ms", []))
        + " ms).",
        "",
        markdown_table(
            ["freshness (ms)", "n", "p50", "p90", "p99", "max", "mean"],
            [
                [
                    "client: produce → acked (exact)",
                    p["direct_ms"].get("n"),
                    p["direct_ms"].get("p50"),
                    p["direct_ms"].get("p90"),
                    p["direct_ms"].get("p99"),
                    p["direct_ms"].get("max"),
                    p["direct_ms"].get("mean"),
                ],
                [
                    "worker histogram (bucket estimate)",
                    p["histogram"].get("n"),
                    bucket_cell(p["histogram"], "p50"),
                    bucket_cell(p["histogram"], "p90"),
                    bucket_cell(p["histogram"], "p99"),
                    None,
                    p["histogram"].get("mean_ms"),
                ],
            ],
        ),
        "",
        "## 2. Requests at steady rates (open loop)",
        "",
        "Rates: the ladder " + ", ".join(f"{x:g}" for x in cfg["rates"]) + " req/s, raised "
        f"until p99 all > {cfg['stop_p99_ms']:g} ms, then up to {cfg['refine']} refinement "
        "rate(s) (halving below the ladder if no rate held the p99 target, else bisecting "
        "between the highest that held and the next). "
        f"Each rate for {cfg['duration_s']:g} s; latency = arrival of the response at the "
        "benchmark's consumer − the request's scheduled send time; "
        f"{cfg['cold_share']:.0%} unknown users, k={cfg['k']}, temperature 0, deadline "
        f"{cfg['deadline_s']:g} s after the scheduled send. Percentiles over the ok responses; "
        "'p99 all' counts errors and missing responses as failures (∞). "
        'Worker p50/p99: the worker\'s own `streamrec_request_latency_seconds{stage="end_to_end"}`'
        " (produce → response sent, bucket estimate). 'Send lag': how late the benchmark's "
        "sender was against the schedule (included in the latency; the benchmark runs its "
        "timed sections with Python's cyclic collector off).",
        "",
    ]
    rows = []
    for x in r["requests"]["rates"]:
        lat = x["latency_ms"]
        rows.append(
            [
                x["rate"],
                x["requests"],
                x["achieved_rps"],
                lat.get("p50"),
                lat.get("p90"),
                lat.get("p99"),
                lat.get("max"),
                x["p99_all_ms"] if x["p99_all_ms"] is not None else "∞",
                x["errors"],
                x["missing"],
                bucket_cell(x["worker_end_to_end"], "p50"),
                bucket_cell(x["worker_end_to_end"], "p99"),
                x["send_lag_ms"].get("p99"),
                "yes" if x["sustained"] else "no",
            ]
        )
    lines += [
        markdown_table(
            [
                "offered req/s",
                "requests",
                "achieved req/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "p99 all ms",
                "errors",
                "missing",
                "worker p50",
                "worker p99",
                "send lag p99 ms",
                f"p99 < {cfg['slo_ms']:g} ms held",
            ],
            rows,
        ),
        "",
    ]
    req = r["requests"]
    best = req["highest_rate_p99_under_slo"]
    lines += [
        f"**Highest rate sustained with p99 < {cfg['slo_ms']:g} ms** (all answered ok, achieved "
        f"≥ 95 % of offered): {fmt(best) + ' req/s' if best else 'none of the rates tested'}."
        + (
            f" Stopped raising the rate after {req['stopped_after']:g} req/s: {req['stop_reason']}."
            if req.get("stopped_after")
            else ""
        ),
        "",
    ]
    errs = {reason: n for x in req["rates"] for reason, n in x["error_reasons"].items()}
    if errs:
        lines += [
            "Error responses: " + "; ".join(f"{n}× {reason}" for reason, n in errs.items()) + ".",
            "",
        ]
    ip = r["in_process"]
    lines += [
        "## 3. In-process graph vs end to end (same requests, same Valkey state)",
        "",
        "The in-process graph ran after the stream workers were stopped (tritonserver, broker "
        "and Valkey idle but up), on the lowest rate's requests, sequentially.",
        "",
        markdown_table(
            ["runtime", "requests", "p50 ms", "p90 ms", "p99 ms", "e2e p50 / in-process p50"],
            [
                [
                    "in-process (LocalRecommender, sequential)",
                    ip["requests"],
                    ip["latency_ms"].get("p50"),
                    ip["latency_ms"].get("p90"),
                    ip["latency_ms"].get("p99"),
                    1.0,
                ]
            ]
            + [
                [
                    f"end to end at {x['rate']:g} req/s",
                    x["ok"],
                    x["latency_ms"].get("p50"),
                    x["latency_ms"].get("p90"),
                    x["latency_ms"].get("p99"),
                    r["ratios"]["e2e_p50_over_in_process_p50"].get(f"{x['rate']:g}"),
                ]
                for x in req["rates"]
            ],
        ),
        "",
        f"Answers: the in-process top-k equals the served one on "
        f"{r['parity']['checked'] - r['parity']['mismatches']}/{r['parity']['checked']} "
        "requests (same request, same state).",
        "",
        "## 4. Per-stage medians (ms, from the responses' `stages`)",
        "",
    ]
    names = list(ip["stages_p50_ms"])
    headers = ["stage", "in-process"] + [f"{x['rate']:g} req/s" for x in req["rates"]]
    stage_rows = [
        [name, ip["stages_p50_ms"][name]] + [x["stages_p50_ms"].get(name) for x in req["rates"]]
        for name in names
    ]
    stage_rows.append(
        ["sum of stages", round(sum(ip["stages_p50_ms"].values()), 3)]
        + [
            round(sum(x["stages_p50_ms"].values()), 3) if x["stages_p50_ms"] else None
            for x in req["rates"]
        ]
    )
    stage_rows.append(
        ["outside the stages", ip["outside_stages_p50_ms"]]
        + [x["outside_stages_p50_ms"] for x in req["rates"]]
    )
    stage_rows.append(
        ["end to end (p50)", ip["latency_ms"].get("p50")]
        + [x["latency_ms"].get("p50") for x in req["rates"]]
    )
    lines += [
        markdown_table(headers, stage_rows),
        "",
        "'Outside the stages' = latency − the sum of the stage durations of the same request: "
        "Kafka both ways, the worker's batching and Avro, gRPC, the ensemble's scheduling and "
        "queueing for the Python-backend stubs (in-process: the graph's own glue).",
        "",
        "## CPU by process (% of one core, mean over each phase)",
        "",
    ]
    cpu_phases = r["cpu"]
    procs = sorted(
        {name for c in cpu_phases.values() for name in c["percent_of_one_core"]},
        key=lambda n: -max(c["percent_of_one_core"].get(n, 0.0) for c in cpu_phases.values()),
    )
    cpu_rows = [
        [name] + [c["percent_of_one_core"].get(name) for c in cpu_phases.values()] for name in procs
    ]
    cpu_rows.append(["all of the above"] + [c["ours_total"] for c in cpu_phases.values()])
    cpu_rows.append(["whole machine (busy)"] + [c["machine_busy"] for c in cpu_phases.values()])
    cpu_rows.append(["other work on the machine"] + [c["others"] for c in cpu_phases.values()])
    lines += [
        markdown_table(["process"] + list(cpu_phases), cpu_rows),
        "",
        f"The machine has {m['cpus_usable']} CPUs ({m['cpus_usable'] * 100} % in all). "
        "'bench' includes the benchmark's own producer and response consumer; during the "
        "in-process phase it is the graph itself. The embedded broker answers empty fetches "
        "at once (it does not hold them for fetch.wait.max.ms), so every idle consumer "
        "(the worker's, the benchmark's) polls it in a tight loop. A worker's 'other threads' are "
        "Faust's Kafka consumer thread (that loop), the `asyncio.to_thread` pool running the "
        "interaction batches (Valkey, Feast writes) and the gRPC and metrics threads.",
        "",
        "## Phases (s)",
        "",
        markdown_table(["phase", "seconds"], [[k, v] for k, v in r["phases"].items()]),
    ]
    if r.get("plot"):
        lines += ["", f"![latency against request rate]({Path(r['plot']).name})"]
    return "\n".join(lines)


def bucket_cell(h: dict[str, Any], name: str) -> Any:
    """A bucket estimate for a table: '> top bound' when it fell in the +Inf bucket."""
    value = h.get(f"{name}_ms")
    if value is not None and h.get(f"{name}_above_top_bucket"):
        return f"> {fmt(value, 0)}"
    return value


# --- main --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.serving import artifact_meta, data_dir, data_label, default_now_ms, ensure_artifacts
    from models.feature_load import load_features
    from serving.client import LocalRecommender, serving_config
    from serving.state import RedisState
    from serving.triton_export import export_repository
    from streamrec.config import Settings, TopicNames
    from streamrec.stack.servers import start_kafka, start_redis, start_triton, stop_service
    from streams.topics import create_topics
    from streams.workers import Workers

    label = args.label or data_label(args.data)
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    machine = machine_info()
    train_args = argparse.Namespace(
        artifacts=args.artifacts,
        retrain=args.retrain,
        data=args.data,
        train_config="auto",
    )
    with MemorySampler(interval=2.0) as sampler:
        phases = Phases(sampler)
        phases.log(
            f"[bold]e2e benchmark[/bold] {label}: {machine['cpus_usable']} CPUs, "
            f"load average {machine['load_average_at_start']}"
        )
        artifacts = ensure_artifacts(train_args, phases)
        meta = artifact_meta(artifacts)
        phases.log(f"artifacts {meta['version']}: {meta['items']:,} items, {meta['users']:,} users")
        now_ms, now_source = (
            (args.now_ms, "--now-ms") if args.now_ms else default_now_ms(artifacts, meta)
        )
        users, items = known_ids(artifacts)
        events, source = burst_events(args.data, artifacts, args.events, args.seed, users, items)
        phases.log(
            f"  burst: {source['holdout_events']:,} hold-out + {source['synthetic_events']:,} "
            "synthetic interactions"
        )

        tmp = Path(tempfile.mkdtemp(prefix=f"streamrec-e2e-{label}-"))
        services = []
        workers = None
        cpu = CpuMeter()
        cpu.add("bench (this process)", os.getpid())
        cpu_phases: dict[str, dict[str, Any]] = {}
        ok = False
        try:
            with phases.phase("start broker and valkey"):
                kafka = start_kafka(tmp / "kafka", 60)
                services.append(kafka)
                redis = start_redis(tmp / "valkey", 30)
                services.append(redis)
            phases.log(
                f"  broker {kafka.endpoint} (pid {kafka.pid}), valkey {redis.endpoint} "
                f"(pid {redis.pid})"
            )
            cpu.add("kafka broker", kafka.pid)
            cpu.add("valkey", redis.pid)
            project = "streamrec"
            prefix = f"e2e{uuid.uuid4().hex[:6]}"
            # the worker finds its artifacts as <artifact_dir>/current
            (tmp / "artifacts").mkdir()
            (tmp / "artifacts" / "current").symlink_to(artifacts, target_is_directory=True)
            settings = Settings(
                kafka_bootstrap=kafka.endpoint,
                redis_url=redis.endpoint,
                triton_url=None,
                run_dir=tmp / "run",
                artifact_dir=tmp / "artifacts",
                data_dir=data_dir(),
                partitions=args.partitions,
                feast_project=project,
                worker_group=f"{prefix}-workers",
                topics=TopicNames(
                    **{r: f"{prefix}-{n}" for r, n in TopicNames().model_dump().items()}
                ),
            )
            with phases.phase("load features", "(Feast materialize + seen/popularity state)"):
                load_features(artifacts, redis.endpoint, settings.feature_repo(), project)
            config = serving_config({"redis_url": redis.endpoint, "feast_project": project})
            with phases.phase("start tritonserver", f"(limit {args.triton_timeout:.0f} s)"):
                repository = export_repository(
                    artifacts, tmp / "triton" / "models", config, instances=args.instances
                )
                triton = start_triton(tmp / "triton", args.triton_timeout, repository=repository)
                services.append(triton)
            phases.log(f"  tritonserver {triton.endpoint} (pid {triton.pid})")
            cpu.add("tritonserver", triton.pid)
            settings = settings.model_copy(update={"triton_url": triton.endpoint})
            create_topics(settings, kafka.endpoint)
            with phases.phase("start stream workers", f"({args.workers})"):
                workers = Workers(settings)
                # Faust keeps its data directory in the working directory unless told otherwise
                saved = os.environ.get("F_DATADIR")
                os.environ["F_DATADIR"] = str(tmp / "faust-data")
                try:
                    running = workers.start(args.workers, timeout=300)
                finally:
                    if saved is None:
                        os.environ.pop("F_DATADIR", None)
                    else:
                        os.environ["F_DATADIR"] = saved
            ports = [w.metrics_port for w in running]
            for n, w in enumerate(running):
                cpu.add(f"stream worker {n}", w.pid, tree=True)
            phases.log(
                "  workers "
                + ", ".join(f"pid {w.pid} (metrics :{w.metrics_port})" for w in running)
            )
            state = RedisState(redis.endpoint, prefix=project)

            with (
                phases.phase("warm up", "(interactions and requests through every part)"),
                Arrivals(settings, kafka.endpoint) as arrivals,
            ):
                warm_up(settings, kafka.endpoint, state, arrivals, users, items, now_ms, args)
            if args.idle_s > 0:
                snap = cpu.snapshot()
                with phases.phase("idle", f"({args.idle_s:g} s, no traffic, no client)"):
                    time.sleep(args.idle_s)
                cpu_phases["idle (no traffic)"] = CpuMeter.usage(snap, cpu.snapshot())
                idle = cpu_phases["idle (no traffic)"]["percent_of_one_core"]
                phases.log(
                    "  idle CPU: " + ", ".join(f"{k} {v:g} %" for k, v in idle.items() if v >= 1.0)
                )

            gc.collect()
            gc.freeze()  # what the setup built is never collected: shorter pauses from here on
            snap = cpu.snapshot()
            with phases.phase("interaction burst", f"({len(events):,} events)"):
                burst = run_burst(events, settings, kafka.endpoint, state, ports, phases)
            cpu_phases["interaction burst"] = CpuMeter.usage(snap, cpu.snapshot())
            fr = burst["freshness"]
            phases.log(
                f"  {burst['events_per_s']:,.0f} events/s "
                f"({burst['events_per_s_10_to_90pct'] or 0:,.0f}/s from 10 % to 90 %); "
                f"freshness p50 ≈ {fmt(fr.get('p50_ms'))} ms, p99 ≈ {fmt(fr.get('p99_ms'))} ms"
            )
            end_ms = max(e["timestamp_ms"] for e in events)
            snap = cpu.snapshot()
            with phases.phase("single interactions", f"({args.paced}, paced)"):
                paced = run_paced(
                    args.paced,
                    args.paced_gap_ms / 1000,
                    settings,
                    kafka.endpoint,
                    state,
                    ports,
                    users,
                    items,
                    end_ms + 60_000,
                    args.seed,
                    phases,
                )
            cpu_phases["single interactions"] = CpuMeter.usage(snap, cpu.snapshot())
            d = paced["direct_ms"]
            phases.log(
                f"  produce → acked: p50 {fmt(d.get('p50'))} ms, p99 {fmt(d.get('p99'))} ms "
                f"(histogram p50 ≈ {fmt(paced['histogram'].get('p50_ms'))} ms)"
            )

            rates: list[dict[str, Any]] = []
            stop_reason = stopped_after = None
            with Arrivals(settings, kafka.endpoint) as arrivals:
                with phases.phase("response consumer", "(joins its group; 10 requests)"):
                    warm_up_requests(settings, kafka.endpoint, arrivals, users, now_ms, args, 10)

                def measure(rate: float, kind: str) -> dict[str, Any]:
                    n = max(1, int(round(rate * args.duration)))
                    reqs = build_rate_requests(
                        artifacts, n, args, now_ms, f"r{rate:g}", args.seed + 100 + len(rates)
                    )
                    with phases.phase(f"{rate:g} req/s", f"({n:,} requests, open loop, {kind})"):
                        level = run_rate(
                            rate, reqs, settings, kafka.endpoint, arrivals, ports, cpu, args, phases
                        )
                    level["_requests"] = reqs
                    level["kind"] = kind
                    level["sustained"] = sustained(level, args.slo_ms)
                    rates.append(level)
                    cpu_phases[f"{rate:g} req/s"] = level["cpu"]
                    lat = level["latency_ms"]
                    phases.log(
                        f"  {rate:g} req/s: achieved {level['achieved_rps']:,.1f}/s, p50 "
                        f"{fmt(lat.get('p50'))} ms, p99 {fmt(lat.get('p99'))} ms, "
                        f"{level['errors']} errors, {level['missing']} missing"
                        + (f" — sustained under {args.slo_ms:g} ms" if level["sustained"] else "")
                    )
                    time.sleep(2.0)
                    return level

                for idx, rate in enumerate(args.rates):
                    level = measure(rate, "ladder")
                    if level["_p99_all"] > args.stop_p99_ms:
                        p99_all, failed = level["_p99_all"], level["errors"] + level["missing"]
                        stopped_after = rate
                        stop_reason = (
                            f"p99 {'∞' if math.isinf(p99_all) else fmt(p99_all)}"
                            f" ms > {args.stop_p99_ms:g} ms"
                            + (f" ({failed} errors or missing)" if failed else "")
                        )
                        if idx + 1 < len(args.rates):
                            phases.log(f"  [yellow]stop raising the rate: {stop_reason}[/yellow]")
                        break
                # where the p99 target is crossed: lower rates if none held it, else bisect
                for _ in range(args.refine):
                    tested = {x["rate"] for x in rates}
                    held = [x["rate"] for x in rates if x["sustained"]]
                    if not held:
                        rate = round(min(tested) / 2, 1)
                        if rate < args.min_rate:
                            break
                    else:
                        above = [r for r in tested if r > max(held)]
                        if not above:
                            break
                        rate = float(round((max(held) + min(above)) / 2))
                        if rate in tested or min(above) - max(held) < 0.1 * max(held):
                            break
                    measure(rate, "refine")

            # The workers idle at a sizeable share of a core (see the idle phase): stop them,
            # so that the in-process baseline runs on the machine the e2e run had minus them.
            with phases.phase("stop stream workers"):
                workers.stop_all()
            with phases.phase("build in-process graph"):
                local = LocalRecommender(artifacts, config)
            rates.sort(key=lambda x: x["rate"])
            base = rates[0]
            same = base["_requests"][: args.inprocess_requests]
            warm = build_rate_requests(artifacts, 20, args, now_ms, "warm-local", args.seed + 99)
            snap = cpu.snapshot()
            with phases.phase("in-process sequential", f"({len(same)} requests)"):
                in_process = run_in_process(local, same, warm, phases)
            cpu_phases["in-process sequential"] = CpuMeter.usage(snap, cpu.snapshot())
            parity = compare_answers(base["_first"], in_process["_items"])
            phases.log(
                f"  in-process p50 {fmt(in_process['latency_ms']['p50'])} ms; answers equal on "
                f"{parity['checked'] - parity['mismatches']}/{parity['checked']}"
            )
            ok = True
        finally:
            if workers is not None and workers.running():
                phases.log("stopping stream workers")
                with contextlib.suppress(Exception):
                    workers.stop_all()
            for service in reversed(services):
                phases.log(f"stopping {service.name} (pid {service.pid})")
                stop_service(service)
            if ok and not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                phases.log(f"directory kept: {tmp}")

    ip50 = in_process["latency_ms"]["p50"]
    slo_ok = [x["rate"] for x in rates if x["sustained"]]
    result = {
        "benchmark": "e2e",
        "label": label,
        "started": started,
        "machine": machine,
        "config": {
            "data": args.data,
            "workers": args.workers,
            "partitions": args.partitions,
            "instances": args.instances,
            "events": args.events,
            "paced": args.paced,
            "paced_gap_ms": args.paced_gap_ms,
            "rates": args.rates,
            "refine": args.refine,
            "min_rate": args.min_rate,
            "duration_s": args.duration,
            "deadline_s": args.deadline_s,
            "stop_p99_ms": args.stop_p99_ms,
            "slo_ms": args.slo_ms,
            "cold_share": args.cold_share,
            "k": args.k,
            "temperature": 0.0,
            "seed": args.seed,
            "now_ms": now_ms,
            "now_ms_source": now_source,
            "interaction_batch": settings.interaction_batch,
            "request_concurrency": settings.request_concurrency,
        },
        "artifacts": {k: v for k, v in meta.items() if k != "training"},
        "interactions": {"source": source, "burst": burst, "paced": paced},
        "requests": {
            "rates": rates,
            "highest_rate_p99_under_slo": max(slo_ok) if slo_ok else None,
            "stopped_after": stopped_after,
            "stop_reason": stop_reason,
        },
        "in_process": in_process,
        "ratios": {
            "e2e_p50_over_in_process_p50": {
                f"{x['rate']:g}": ratio(x["latency_ms"].get("p50"), ip50) for x in rates
            },
            "e2e_p99_over_in_process_p99": {
                f"{x['rate']:g}": ratio(x["latency_ms"].get("p99"), in_process["latency_ms"]["p99"])
                for x in rates
            },
        },
        "parity": parity,
        "cpu": cpu_phases,
        "phases": phases.seconds,
        "memory": phases.memory,
        "wall_s": round(phases.elapsed(), 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    return result


def warm_up(settings, bootstrap, state, arrivals, users, items, now_ms, args) -> None:
    """A few interactions and requests on every partition: partitions assigned, the Feast and
    ONNX code paths and the Triton stubs warm before anything is timed."""
    from streams.kafka import EventProducer

    producer = EventProducer(settings, bootstrap)
    rng = np.random.default_rng(args.seed + 1)
    base = state.acked()
    n_events = 40
    for i in range(n_events):
        item = items[rng.integers(len(items))]
        record = interaction(
            f"e2e-warm-{uuid.uuid4().hex[:6]}-{i}", f"bench-warm-{i % 8}", item, now_ms + i
        )
        producer.send("interactions", record)
    producer.close()
    wait_acked(state.acked, base + n_events, 120)
    warm_up_requests(settings, bootstrap, arrivals, users, now_ms, args, 40)


def warm_up_requests(settings, bootstrap, arrivals, users, now_ms, args, n: int) -> None:
    """`n` requests, 50 ms apart, all answered (the response consumer has its partitions)."""
    from streams.kafka import EventProducer

    producer = EventProducer(settings, bootstrap)
    rng = np.random.default_rng(args.seed + 2)
    ids = set()
    for i in range(n):
        user = users[rng.integers(len(users))] if i % 10 else f"bench-warm-unknown-{i}"
        r = request_record(f"warm-{uuid.uuid4().hex[:8]}", user, args.k, now_ms)
        ids.add(r["request_id"])
        producer.send("requests", r)
        producer.flush()
        time.sleep(0.05)
    producer.close()
    if not arrivals.wait(ids, 120):
        raise BenchmarkFailure(f"warm-up requests: {arrivals.count(ids)}/{n} answered in 120 s")


def main(argv: list[str] | None = None) -> int:
    from streamrec.stack.process import StartupError

    args = parse_args(argv)
    try:
        result = run(args)
    except (BenchmarkFailure, StartupError) as e:
        console.print(f"[bold red]benchmark failed:[/bold red] {e}")
        return 1
    if not args.no_plot:
        result["plot"] = str(plot_latency(result, RESULTS / "e2e-latency.png"))
    result = public(result)
    markdown = markdown_report(result)
    json_path, md_path = write_results(f"e2e-{result['label']}", result, markdown)
    console.print()
    console.print(markdown, markup=False)
    console.print()
    written = [json_path, md_path] + ([Path(result["plot"])] if result.get("plot") else [])
    console.print(
        "wrote "
        + ", ".join(str(p.relative_to(ROOT)) for p in written)
        + f" ({result['wall_s']:,.0f} s in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
