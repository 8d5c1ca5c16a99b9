"""End-to-end benchmark: Kafka → Faust stream worker(s) → Triton ensemble → Kafka, one data set.

    .venv/bin/python -m bench.e2e                           # ML-100K (trains once, cached)
    .venv/bin/python -m bench.e2e --quick                   # a ~2 minute smoke run
    STREAMREC_BENCH_ARTIFACTS=.streamrec/dev/artifacts/current .venv/bin/python -m bench.e2e
    .venv/bin/python -m bench.e2e --rates 20,50,100 --workers 2

One run, on an embedded stack the benchmark starts itself (broker, Valkey, tritonserver and
stream workers on free 127.0.0.1 ports, in a temporary directory, stopped by PID at the end):

1. Idle CPU: no traffic for `--idle-s` after the warm-up; % of a core by process.
2. Interactions: a burst of N events produced as fast as possible (the data's hold-out, padded
   with synthetic events over known users and items if N is larger); events/s from the first
   produce until the processed counter (`RedisState.acked()`) has grown by N; feature freshness
   from the workers' `streamrec_feature_freshness_seconds` histogram (bucket estimate); then
   single interactions produced one at a time, timed from produce to `acked()` incrementing.
3. Requests, open loop (`bench.loadgen`): a producer process sends pre-encoded requests on a
   fixed schedule, this process consumes the responses; latency = response received − request
   produced, per request id. Known users and a share of unknown ones, k=10, temperature 0.
   The ladder of rates is raised until a rate is not steady (achieved < 95 % of offered, or a
   growing backlog), then up to `--refine` rates locate where p99 crosses `--slo-ms`; then
   overload at `--overload` multiples of the highest sustainable rate (goodput, p99, answers
   `expired`). Each request carries a deadline (`--deadline-ms`), so an overloaded rate drains
   as expired answers instead of minutes of backlog. CPU-ms per answered request by process.
4. The in-process graph (`LocalRecommender`) on the same requests, sequentially, on the same
   Valkey state; the end-to-end / in-process ratio of the medians; per-stage medians.
5. `bench/results/e2e-<data>.{json,md}` and a plot `bench/results/e2e-latency.png`
   (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    RESULTS,
    ROOT,
    MemorySampler,
    Phases,
    console,
    fmt,
    machine_info,
    markdown_table,
    public,
    ratio,
    summarize,
    write_results,
)
from bench.loadgen import (
    CpuAccount,
    Generator,
    Message,
    schedule_start,
    stack_processes,
    step_figures,
)
from schemas.records import Interaction, RecommendationRequest


class BenchmarkFailure(RuntimeError):
    pass


# --- arguments -------------------------------------------------------------------------------


QUICK = {  # --quick: a smoke run of about two minutes
    "rates": "25,50,100",
    "duration": 5.0,
    "warmup_s": 1.0,
    "refine": 1,
    "events": 5000,
    "paced": 50,
    "idle_s": 10.0,
    "generator_check_s": 1.0,
    "inprocess_requests": 200,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=(
            "End-to-end benchmark of the streaming recommender on an embedded stack it starts "
            "itself: interaction throughput and feature freshness, an open-loop sweep of "
            "request rates over Kafka, overload, CPU per request and at idle by process, the "
            "in-process graph on the same requests and per-stage timings. Writes "
            "bench/results/e2e-<data>.json, .md and bench/results/e2e-latency.png."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a ~2 minute smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    p.add_argument(
        "--data", default="ml-100k", help="data set (default ml-100k); see bench.serving"
    )
    p.add_argument(
        "--artifacts",
        type=Path,
        default=os.environ.get("STREAMREC_BENCH_ARTIFACTS") or None,
        help="a trained artifact version (or an artifact root with `current`) to reuse, e.g. "
        ".streamrec/dev/artifacts/current (default: $STREAMREC_BENCH_ARTIFACTS, else train "
        "once into bench/.work/<data>/artifacts and reuse that)",
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
        "--rates",
        default="25,50,100,200,300,400",
        help="the ladder of request rates in req/s, comma-separated (default 25,...,400)",
    )
    p.add_argument(
        "--duration", type=float, default=15.0, help="measured seconds per rate (default 15)"
    )
    p.add_argument(
        "--warmup-s",
        type=float,
        default=2.0,
        help="seconds sent at each rate before the measured ones (default 2)",
    )
    p.add_argument(
        "--pause-s", type=float, default=1.0, help="pause between rate steps (default 1 s)"
    )
    p.add_argument(
        "--deadline-ms",
        type=float,
        help="each request's deadline after its scheduled send (default: the settings' "
        "request_deadline_ms); the worker answers a request past it as expired instead of "
        "serving it, which bounds the backlog under overload",
    )
    p.add_argument("--slo-ms", type=float, default=100.0, help="p99 target (default 100 ms)")
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
    p.add_argument(
        "--overload",
        default="2,4",
        help="multiples of the highest sustainable rate measured as overload (default 2,4)",
    )
    p.add_argument(
        "--generator-check-s",
        type=float,
        default=3.0,
        help="seconds the generator sends at the highest ladder rate to a topic nothing "
        "consumes, to show it keeps that schedule (default 3; 0 = skip)",
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
        "--idle-s", type=float, default=20.0, help="idle CPU baseline, seconds (default 20)"
    )
    p.add_argument(
        "--triton-timeout", type=float, default=600.0, help="tritonserver start-up limit (s)"
    )
    p.add_argument("--label", help="result name suffix (default: from --data)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**QUICK)  # options given explicitly still win
    args = p.parse_args(argv)
    try:
        args.rates = sorted(float(r) for r in str(args.rates).split(",") if r.strip())
        args.overload = [float(x) for x in str(args.overload).split(",") if x.strip()]
    except ValueError:
        p.error("--rates and --overload take comma-separated numbers, e.g. 50,100,200")
    if not args.rates or any(r <= 0 for r in args.rates) or any(x <= 0 for x in args.overload):
        p.error("--rates and --overload must be positive")
    if args.workers < 1 or args.partitions < 1 or args.instances < 1:
        p.error("--workers, --partitions and --instances must be >= 1")
    if args.events < 1 or args.paced < 0 or args.duration <= 0 or args.warmup_s < 0:
        p.error("--events must be >= 1, --paced >= 0, --duration > 0, --warmup-s >= 0")
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


# --- response recorder -----------------------------------------------------------------------


class Arrivals:
    """Consumes the recommendations topic in a background thread and keeps, per request id,
    the arrival time (perf_counter) of its first response, the response, and duplicates."""

    def __init__(self, settings, bootstrap: str):
        from streams.topics import serde_for, topic_name

        self._settings, self._bootstrap = settings, bootstrap
        self._topic = topic_name(settings, "recommendations")
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

    def _run(self) -> None:
        try:
            asyncio.run(self._consume())
        except BaseException as e:  # reported by wait()
            self.error = e

    async def _consume(self) -> None:
        """aiokafka with the worker's spacing of empty fetches: the embedded broker answers them
        at once, and a consumer polling it in a tight loop (librdkafka's does) takes a core
        between itself and the broker from the system being measured."""
        from aiokafka import AIOKafkaConsumer

        from streams.kafka import aiokafka_settings, space_out_empty_fetches

        # A shorter cap than the worker's: the instrument should add little latency (up to
        # 2 ms an answer) while costing the measured system only a few % of a core.
        space_out_empty_fetches(0.002)
        consumer = AIOKafkaConsumer(
            self._topic,
            bootstrap_servers=self._bootstrap,
            group_id=f"bench-e2e-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **aiokafka_settings(self._settings),
        )
        await consumer.start()
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=100)
                arrived = time.perf_counter()
                for msg in (m for batch in batches.values() for m in batch):
                    self._arrived(arrived, msg.value)
        finally:
            await consumer.stop()

    def _arrived(self, arrived: float, value: bytes) -> None:
        try:
            record = self._serde.decode(value)
        except ValueError:
            self.undecodable += 1
            return
        with self._changed:
            rid = record["request_id"]
            if rid in self.first:
                self.duplicates += 1
            else:
                self.first[rid] = (arrived, record)
            self._changed.notify_all()

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

    def answers(self, ids: Sequence[str]) -> dict[str, tuple[float, dict]]:
        """Request id → (arrival, response) of those of `ids` answered so far."""
        with self._changed:
            return {rid: self.first[rid] for rid in ids if rid in self.first}


# --- data ------------------------------------------------------------------------------------


def interaction(event_id: str, user: str, item: str, ts_ms: int) -> dict:
    return Interaction(user, item, "rating", timestamp_ms=int(ts_ms), event_id=event_id).to_record()


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
    return RecommendationRequest(
        user,
        k,
        context={"source": "bench-e2e"},
        temperature=0.0,
        seed=1,
        deadline_ms=deadline_ms,
        timestamp_ms=now_ms,
        request_id=rid,
    ).to_record()


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


@dataclass
class RequestLoad:
    """What every request step needs: the stack's endpoints, the response consumer, the
    request generator and the CPU account (with the idle baseline, once measured)."""

    settings: Any
    bootstrap: str
    arrivals: Arrivals
    generator: Generator
    cpu: CpuAccount
    ports: list[int]
    args: argparse.Namespace
    phases: Phases
    idle_pct: dict[str, float]


def encode_requests(
    settings, requests: list[dict], rate: float, start: float, deadline_ms: float
) -> list[Message]:
    """(key, Avro value) per request; request i's deadline is `deadline_ms` after its
    scheduled send (`start + i / rate`, perf_counter) in epoch ms."""
    from streams.topics import record_key, serde_for

    serde = serde_for(settings, "requests")
    epoch0 = time.time() - time.perf_counter() + start
    return [
        (
            record_key("requests", r),
            serde.encode({**r, "deadline_ms": int((epoch0 + i / rate) * 1000 + deadline_ms)}),
        )
        for i, r in enumerate(requests)
    ]


def run_step(
    load: RequestLoad, rate: float, kind: str, requests: list[dict], warmup_n: int
) -> dict[str, Any]:
    """Send `requests` open loop at `rate` from the generator process, wait for every answer
    (or until the deadlines have passed and a margin more), then the step's figures."""
    from streams.topics import topic_name

    args, arrivals = load.args, load.arrivals
    ids = [r["request_id"] for r in requests]
    start = schedule_start(len(requests))
    messages = encode_requests(load.settings, requests, rate, start, args.deadline_ms)
    topic = topic_name(load.settings, "requests")
    before = scrape(load.ports)
    cpu_a = load.cpu.snapshot()
    with quiet_gc():  # no collector pause in this process may delay an arrival's timestamp
        sent, failed = load.generator.send(topic, messages, rate, start)
        load.phases.log(
            f"  sent {len(ids):,} requests in {sent[-1] - sent[0]:,.1f} s; "
            f"{arrivals.count(set(ids)):,} answered so far"
        )
        complete = arrivals.wait(set(ids), args.deadline_ms / 1000 + 10.0)
    cpu_b = load.cpu.snapshot()
    after = scrape(load.ports)
    answers = arrivals.answers(ids)
    figures = step_figures(rate, ids, sent, start, warmup_n, answers, args.slo_ms)
    worker_h = histogram_diff(
        histogram(after, "streamrec_request_latency_seconds", stage="end_to_end"),
        histogram(before, "streamrec_request_latency_seconds", stage="end_to_end"),
    )
    return {
        "rate": rate,
        "kind": kind,
        **figures,
        **response_details(requests[warmup_n:], sent[warmup_n:], answers),
        "complete": complete,
        "failed_deliveries": failed,
        "duplicates_total": arrivals.duplicates,
        "worker_end_to_end": bucket_summary(worker_h),
        "per_second": per_second(ids, sent, answers),
        "cpu": CpuAccount.usage(cpu_a, cpu_b),
        "cpu_per_request": CpuAccount.per_request(cpu_a, cpu_b, len(answers), load.idle_pct),
        "_first": {rid: a[1] for rid, a in answers.items()},
        "_requests": requests[warmup_n:],
        "_sent": sent,  # send times (perf_counter) of all `requests`, warm-up included
    }


def response_details(
    requests: list[dict], sent: list[float], answers: dict[str, tuple[float, dict]]
) -> dict[str, Any]:
    """Per-stage timings of the ok answers, the time outside the stages, serving paths, the
    reasons of non-ok answers and the slowest requests."""
    stages: dict[str, list[float]] = {}
    outside: list[float] = []
    paths: dict[str, int] = {}
    reasons: dict[str, int] = {}
    slowest: list[tuple[float, float, dict]] = []
    for r, s in zip(requests, sent, strict=True):
        hit = answers.get(r["request_id"])
        if hit is None:
            continue
        arrived, resp = hit
        if resp["status"] != "ok":
            reason = f"{resp['status']}: " + re.sub(r"\d+", "N", resp["error"] or "")[:80]
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        ms = (arrived - s) * 1000
        paths[resp["path"]] = paths.get(resp["path"], 0) + 1
        for st in resp["stages"]:
            stages.setdefault(st["name"], []).append(st["duration_ms"])
        outside.append(ms - sum(st["duration_ms"] for st in resp["stages"]))
        slowest.append((ms, s - sent[0], resp))
    return {
        "error_reasons": reasons,
        "stages_p50_ms": {k: round(float(np.median(v)), 3) for k, v in stages.items()},
        "stages_p99_ms": {k: round(float(np.percentile(v, 99)), 3) for k, v in stages.items()},
        "outside_stages_p50_ms": round(float(np.median(outside)), 3) if outside else None,
        "outside_stages_p99_ms": round(float(np.percentile(outside, 99)), 3) if outside else None,
        "paths": paths,
        "slowest": [
            {
                "sent_at_s": round(at, 3),
                "latency_ms": round(ms, 1),
                "stages_ms": round(sum(st["duration_ms"] for st in resp["stages"]), 1),
                "slowest_stage": max(resp["stages"], key=lambda st: st["duration_ms"])["name"],
                "user_id": resp["user_id"],
                "path": resp["path"],
            }
            for ms, at, resp in sorted(slowest, key=lambda w: -w[0])[:5]
        ],
    }


def per_second(
    ids: list[str], sent: list[float], answers: dict[str, tuple[float, dict]]
) -> list[dict[str, Any]]:
    """Per second of the step (warm-up included): requests sent, answered, still in flight at
    the second's end, the median and the worst latency (unanswered = null)."""
    arrived = np.sort([a for a, _ in answers.values()])
    by_second: dict[int, list[float]] = {}
    for rid, s in zip(ids, sent, strict=True):
        hit = answers.get(rid)
        ms = (hit[0] - s) * 1000 if hit else math.inf
        by_second.setdefault(int(s - sent[0]), []).append(ms)
    out = []
    for sec, v in sorted(by_second.items()):
        end = sent[0] + sec + 1
        in_flight = int(
            np.searchsorted(sent, end, "right") - np.searchsorted(arrived, end, "right")
        )
        out.append(
            {
                "second": sec,
                "sent": len(v),
                "answered": sum(not math.isinf(x) for x in v),
                "in_flight_at_end": in_flight,
                "p50_ms": finite(float(np.percentile(v, 50, method="higher"))),
                "max_ms": finite(float(max(v))),
            }
        )
    return out


def step_requests(
    artifacts: Path, rate: float, args: argparse.Namespace, now_ms: int, seed: int
) -> tuple[list[dict], int]:
    """The step's requests (warm-up first) and how many of them are warm-up."""
    n = max(2, round(rate * (args.warmup_s + args.duration)))
    reqs = build_rate_requests(artifacts, n, args, now_ms, f"r{rate:g}-{seed}", seed)
    return reqs, min(round(rate * args.warmup_s), n - 1)


def measure(
    load: RequestLoad, artifacts: Path, rate: float, kind: str, now_ms: int, steps: list
) -> dict[str, Any]:
    """One step at `rate`, appended to `steps`, with a line of progress."""
    args = load.args
    reqs, warmup_n = step_requests(artifacts, rate, args, now_ms, args.seed + 100 + len(steps))
    detail = f"({len(reqs):,} requests, {args.warmup_s:g} s warm-up + {args.duration:g} s, {kind})"
    with load.phases.phase(f"{rate:g} req/s {kind}", detail, measure=True):
        step = run_step(load, rate, kind, reqs, warmup_n)
    steps.append(step)
    lat = step["latency_ms"]
    load.phases.log(
        f"  {rate:g} req/s: achieved {step['achieved_rps']:,.1f}/s, p50 {fmt(lat.get('p50'))} "
        f"ms, p99 {fmt(lat.get('p99'))} ms, {step['expired']} expired, {step['error']} errors, "
        f"{step['unanswered']} unanswered, backlog {step['backlog_growth_per_s']:+.1f}/s"
        + (" — steady" if step["steady"] else "")
        + (f", p99 ≤ {args.slo_ms:g} ms" if step["sustainable"] else "")
    )
    if step["error_reasons"]:
        reason, n = max(step["error_reasons"].items(), key=lambda kv: kv[1])
        load.phases.log(f"  most frequent answer other than ok: {n:,}× {reason}")
    time.sleep(args.pause_s)
    return step


def rate_sweep(load: RequestLoad, artifacts: Path, now_ms: int) -> dict[str, Any]:
    """The ladder of rates, raised until a rate is not steady, then up to `--refine` rates
    where the p99 target is crossed (halving below the ladder if no rate held it, else
    bisecting between the highest that held and the next)."""
    args = load.args
    steps: list[dict[str, Any]] = []
    stop_reason = None
    for idx, rate in enumerate(args.rates):
        step = measure(load, artifacts, rate, "ladder", now_ms, steps)
        if not step["steady"]:
            stop_reason = (
                f"not steady at {rate:g} req/s (achieved {step['achieved_rps']:g}/s, backlog "
                f"{step['backlog_growth_per_s']:+g}/s)"
            )
            if idx + 1 < len(args.rates):
                load.phases.log(f"  [yellow]stop raising the rate: {stop_reason}[/yellow]")
            break
    for _ in range(args.refine):
        rate = refinement(steps, args.min_rate)
        if rate is None:
            break
        measure(load, artifacts, rate, "refine", now_ms, steps)
    steps.sort(key=lambda x: x["rate"])
    held = [x["rate"] for x in steps if x["sustainable"]]
    return {
        "steps": steps,
        "highest_sustainable_rps": max(held) if held else None,
        "stop_reason": stop_reason,
    }


def refinement(steps: list[dict[str, Any]], min_rate: float) -> float | None:
    """The next rate to try, or None when the crossing is located closely enough."""
    tested = {x["rate"] for x in steps}
    held = [x["rate"] for x in steps if x["sustainable"]]
    if not held:
        rate = round(min(tested) / 2, 1)
        return rate if rate >= min_rate else None
    above = [r for r in tested if r > max(held)]
    if not above or min(above) - max(held) < 0.1 * max(held):
        return None
    rate = float(round((max(held) + min(above)) / 2))
    return None if rate in tested else rate


def overload(
    load: RequestLoad, artifacts: Path, now_ms: int, sweep: dict[str, Any]
) -> dict[str, Any]:
    """Steps at `--overload` multiples of the highest sustainable rate (of the lowest rate
    tried if none held the target): goodput, p99 of the ok answers, answers expired."""
    base = sweep["highest_sustainable_rps"] or min(x["rate"] for x in sweep["steps"])
    steps: list[dict[str, Any]] = []
    for multiple in load.args.overload:
        step = measure(load, artifacts, round(base * multiple, 1), "overload", now_ms, steps)
        step["multiple"] = multiple
    return {
        "base_rps": base,
        "base": "highest sustainable" if sweep["highest_sustainable_rps"] else "lowest tried",
        "steps": steps,
    }


def run_generator_check(load: RequestLoad, artifacts: Path, now_ms: int) -> dict[str, Any] | None:
    """The generator check at the highest ladder rate, as a phase (None when skipped)."""
    args = load.args
    if args.generator_check_s <= 0:
        return None
    rate = max(args.rates)
    n = max(2, round(rate * args.generator_check_s))
    reqs = build_rate_requests(artifacts, n, args, now_ms, "generator-check", args.seed + 98)
    with load.phases.phase("generator check", f"({n:,} requests at {rate:g}/s, not consumed)"):
        check = generator_check(load, reqs, rate)
    load.phases.log(
        f"  sent {check['sent_rps']:,.1f}/s of {rate:g}/s offered, lateness p99 "
        f"{fmt(check['send_lag_ms'].get('p99'))} ms"
    )
    return check


def generator_check(load: RequestLoad, requests: list[dict], rate: float) -> dict[str, Any]:
    """Can the generator keep the schedule at `rate`? The same requests sent to a topic that
    nothing consumes, for `--generator-check-s` seconds: achieved send rate and lateness."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from streams.kafka import client_config
    from streams.topics import topic_name

    scratch = topic_name(load.settings, "requests") + "-generator-check"
    admin = AdminClient(client_config(load.settings, load.bootstrap))
    for fut in admin.create_topics([NewTopic(scratch, 1, 1)]).values():
        fut.result(30)
    start = schedule_start(len(requests))
    messages = encode_requests(load.settings, requests, rate, start, load.args.deadline_ms)
    cpu_a = load.cpu.snapshot()
    sent, failed = load.generator.send(scratch, messages, rate, start)
    cpu_b = load.cpu.snapshot()
    window = sent[-1] - sent[0]
    lag = [(s - (start + i / rate)) * 1000 for i, s in enumerate(sent)]
    return {
        "offered_rps": rate,
        "requests": len(sent),
        "sent_rps": round((len(sent) - 1) / window, 1) if window > 0 else None,
        "send_lag_ms": summarize(lag),
        "failed_deliveries": failed,
        "generator_cpu_ms_per_request": round(
            CpuAccount.spent(cpu_a, cpu_b).get("load generator", 0.0) * 1000 / len(sent), 3
        ),
    }


def finite(x: float, digits: int = 1) -> float | None:
    """JSON has no infinity: a missing response's latency is reported as null."""
    return None if math.isinf(x) else round(x, digits)


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


# --- plot --------------------------------------------------------------------------------------


def plot_latency(result: dict[str, Any], path: Path) -> Path:
    """p50 and p99 of the ok answers (log scale) against the offered request rate, sweep and
    overload; the in-process p50 and the p99 target as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    req = result["requests"]
    steps = sorted(req["sweep"]["steps"] + req["overload"]["steps"], key=lambda x: x["rate"])
    fig, ax = plt.subplots(figsize=(9.6, 6.0))
    for name, color in (("p50", "tab:blue"), ("p99", "tab:red")):
        points = [(s["rate"], s["latency_ms"].get(name)) for s in steps]
        points = [(x, y) for x, y in points if y]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", color=color, label=f"{name} end to end")
    slo = result["config"]["slo_ms"]
    ax.axhline(slo, color="tab:green", linestyle="--", label=f"p99 target {slo:g} ms")
    if inproc := result["in_process"]["latency_ms"].get("p50"):
        ax.axhline(inproc, color="grey", linestyle=":", label=f"in-process p50 {inproc:.1f} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"End-to-end latency vs request rate ({result['label']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
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
    ]
    lines += sweep_section(r) + overload_section(r) + cpu_per_request_section(r) + idle_section(r)
    ip = r["in_process"]
    steps = r["requests"]["sweep"]["steps"]
    lines += [
        "## 6. In-process graph vs end to end (same requests, same Valkey state)",
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
                for x in steps
            ],
        ),
        "",
        f"Answers: the in-process top-k equals the served one on "
        f"{r['parity']['checked'] - r['parity']['mismatches']}/{r['parity']['checked']} "
        "requests (same request, same state).",
        "",
        "## 7. Per-stage medians (ms, from the responses' `stages`)",
        "",
    ]
    names = list(ip["stages_p50_ms"])
    headers = ["stage", "in-process"] + [f"{x['rate']:g} req/s" for x in steps]
    stage_rows = [
        [name, ip["stages_p50_ms"][name]] + [x["stages_p50_ms"].get(name) for x in steps]
        for name in names
    ]
    stage_rows.append(
        ["sum of stages", round(sum(ip["stages_p50_ms"].values()), 3)]
        + [
            round(sum(x["stages_p50_ms"].values()), 3) if x["stages_p50_ms"] else None
            for x in steps
        ]
    )
    stage_rows.append(
        ["outside the stages", ip["outside_stages_p50_ms"]]
        + [x["outside_stages_p50_ms"] for x in steps]
    )
    stage_rows.append(
        ["end to end (p50)", ip["latency_ms"].get("p50")]
        + [x["latency_ms"].get("p50") for x in steps]
    )
    lines += [
        markdown_table(headers, stage_rows),
        "",
        "'Outside the stages' = latency − the sum of the stage durations of the same request: "
        "Kafka both ways, the worker's batching and Avro, gRPC, the ensemble's scheduling and "
        "queueing for the Python-backend stubs (in-process: the graph's own glue).",
        "",
        "## 8. CPU by process (% of one core, mean over each phase)",
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
        "'bench consumer' is this process: the response consumer, and during the interaction "
        "phases their producer, during the in-process phase the graph itself. A request "
        "step's column spans its warm-up, its measured seconds and the wait for its last "
        "answer.",
        "",
        "## Phases (s)",
        "",
        markdown_table(["phase", "seconds"], [[k, v] for k, v in r["phases"].items()]),
    ]
    if r.get("plot"):
        lines += ["", f"![latency against request rate]({Path(r['plot']).name})"]
    return "\n".join(lines)


def step_row(x: dict[str, Any]) -> list[Any]:
    lat = x["latency_ms"]
    return [
        x["kind"],
        x["rate"],
        x["sent_rps"],
        x["achieved_rps"],
        lat.get("p50"),
        lat.get("p90"),
        lat.get("p99"),
        x["ok"],
        x["expired"],
        x["error"],
        x["unanswered"],
        x["backlog_growth_per_s"],
        x["send_lag_ms"].get("p99"),
        bucket_cell(x["worker_end_to_end"], "p99"),
        "yes" if x["steady"] else "no",
        "yes" if x["sustainable"] else "no",
    ]


STEP_HEADERS = [
    "step",
    "offered req/s",
    "sent req/s",
    "achieved ok/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "ok",
    "expired",
    "error",
    "unanswered",
    "backlog growth /s",
    "send lag p99 ms",
    "worker p99 ms",
    "steady",
]


def sweep_section(r: dict[str, Any]) -> list[str]:
    cfg, req = r["config"], r["requests"]
    sweep = req["sweep"]
    best = sweep["highest_sustainable_rps"]
    lines = [
        "## 2. Requests over Kafka: open-loop rate sweep",
        "",
        "A producer process of its own (confluent-kafka, `linger.ms=0`) sends pre-encoded "
        "requests on the requests topic on a fixed schedule, without waiting for answers; the "
        "benchmark's consumer reads the recommendations topic. Latency = response received − "
        "request produced, per request id; percentiles over the `ok` answers. Ladder "
        + ", ".join(f"{x:g}" for x in cfg["rates"])
        + f" req/s, raised until a rate is not steady, then up to {cfg['refine']} refinement "
        f"rate(s). Each rate: {cfg['warmup_s']:g} s of warm-up at that rate (not counted), "
        f"then {cfg['duration_s']:g} s measured. {cfg['cold_share']:.0%} unknown users, "
        f"k={cfg['k']}, temperature 0, each request's deadline {fmt(cfg['deadline_ms'], 0)} ms "
        "after its scheduled send. *Steady*: achieved ≥ 95 % of offered and the requests in "
        "flight not growing (least-squares slope ≤ max(2 % of the rate, 1)/s). *Unanswered*: "
        "no response within the deadline + 10 s. *Worker p99*: the worker's own "
        '`streamrec_request_latency_seconds{stage="end_to_end"}` (bucket estimate).',
        "",
        markdown_table(
            STEP_HEADERS + [f"p99 ≤ {cfg['slo_ms']:g} ms"], [step_row(x) for x in sweep["steps"]]
        ),
        "",
        f"**Highest steady rate with p99 ≤ {cfg['slo_ms']:g} ms: "
        f"{fmt(best) + ' req/s' if best else 'none of the rates tried'}.**"
        + (f" Stopped raising the rate: {sweep['stop_reason']}." if sweep["stop_reason"] else ""),
        "",
    ]
    check = req["generator_check"]
    if check:
        lag = check["send_lag_ms"]
        lines += [
            f"Generator check: at {check['offered_rps']:g} req/s offered to a topic nothing "
            f"consumes, one Python process sent {fmt(check['sent_rps'], 1)} req/s (lateness "
            f"against the schedule p50 {fmt(lag.get('p50'))} ms, p99 {fmt(lag.get('p99'))} ms, "
            f"max {fmt(lag.get('max'))} ms; {check['failed_deliveries']} failed deliveries; "
            f"{fmt(check['generator_cpu_ms_per_request'], 3)} CPU-ms per request).",
            "",
        ]
    return lines


def overload_section(r: dict[str, Any]) -> list[str]:
    over = r["requests"]["overload"]
    rows = [
        [
            f"{x['multiple']:g}×",
            x["rate"],
            x["achieved_rps"],
            x["latency_ms"].get("p50"),
            x["latency_ms"].get("p99"),
            x["ok"],
            x["expired"],
            x["error"],
            x["unanswered"],
            x["backlog_growth_per_s"],
        ]
        for x in over["steps"]
    ]
    reasons: dict[str, int] = {}
    for x in r["requests"]["sweep"]["steps"] + over["steps"]:
        for reason, n in x["error_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    lines = [
        "## 3. Overload",
        "",
        f"Multiples of the {over['base']} rate ({fmt(over['base_rps'])} req/s), measured like "
        "the sweep. Goodput = `ok` answers per second; p99 over the `ok` answers; *expired*: "
        "answered with status `expired` (older than their deadline when the worker took them).",
        "",
        markdown_table(
            [
                "multiple",
                "offered req/s",
                "goodput ok/s",
                "p50 ok ms",
                "p99 ok ms",
                "ok",
                "expired",
                "error",
                "unanswered",
                "backlog growth /s",
            ],
            rows,
        ),
        "",
    ]
    if reasons:
        lines += [
            "Answers other than `ok` (all steps): "
            + "; ".join(f"{n:,}× {reason}" for reason, n in reasons.items())
            + ".",
            "",
        ]
    return lines


CPU_ROLES = [
    "stream worker",
    "broker",
    "tritonserver",
    "triton stubs",
    "valkey",
    "load generator",
    "bench consumer",
]


def cpu_per_request_section(r: dict[str, Any]) -> list[str]:
    steps = r["requests"]["sweep"]["steps"] + r["requests"]["overload"]["steps"]
    headers = ["process"] + [f"{x['rate']:g} req/s {x['kind']}" for x in steps]
    rows = [
        [role] + [x["cpu_per_request"]["cpu_ms"].get(role) for x in steps] for role in CPU_ROLES
    ]
    rows.append(["all of the above"] + [x["cpu_per_request"]["total_cpu_ms"] for x in steps])
    rows.append(["answered requests"] + [x["cpu_per_request"]["answered"] for x in steps])
    serving = ("stream worker", "broker", "tritonserver", "triton stubs", "valkey")
    rows.append(
        ["serving side above idle"]
        + [
            round(sum(x["cpu_per_request"]["cpu_ms_above_idle"].get(k, 0.0) for k in serving), 2)
            for x in steps
        ]
    )
    return [
        "## 4. CPU-ms per request by process",
        "",
        "CPU time (user + system, psutil) of each process between the start of a step (warm-up "
        "included) and its last answer, divided by the requests answered in it (any status). "
        "*Triton stubs*: tritonserver's Python-backend stub processes (one per stage and "
        "instance). *Load generator*: the producer process; *bench consumer*: the benchmark's "
        "response consumer. *Serving side above idle*: worker, broker, Triton and Valkey less "
        "what they burn with no traffic (section 5) over the same time.",
        "",
        markdown_table(headers, rows),
        "",
    ]


def idle_section(r: dict[str, Any]) -> list[str]:
    idle = r.get("idle_cpu")
    if not idle:
        return []
    pct = idle["percent_of_one_core"]
    rows = [[role, pct.get(role)] for role in CPU_ROLES[:5]]
    rows.append(["whole machine (busy)", idle["machine_busy"]])
    return [
        "## 5. Idle CPU",
        "",
        f"No traffic for {idle['wall_s']:g} s after the warm-up, no client connected: % of one "
        "core. The embedded broker answers empty fetches at once (it does not hold them for "
        "`fetch.wait.max.ms`), so an idle consumer (the worker's) polls it in a tight loop.",
        "",
        markdown_table(["process", "% of one core"], rows),
        "",
    ]


def bucket_cell(h: dict[str, Any], name: str) -> Any:
    """A bucket estimate for a table: '> top bound' when it fell in the +Inf bucket."""
    value = h.get(f"{name}_ms")
    if value is not None and h.get(f"{name}_above_top_bucket"):
        return f"> {fmt(value, 0)}"
    return value


# --- main --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.serving import artifact_meta, data_label, default_now_ms, ensure_artifacts
    from serving.client import LocalRecommender
    from state.store import RedisState
    from streamrec.stack.servers import stop_service
    from streamrec.workers import Workers
    from streams.kafka import client_config

    label = args.label or data_label(args.data) + ("-quick" if args.quick else "")
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
        generator: Generator | None = None
        service_pids: dict[str, int] = {}

        def discover() -> dict[str, list[int]]:
            worker_pids = [w.pid for w in workers.running()] if workers else []
            return stack_processes(service_pids, worker_pids, generator and generator.pid)

        cpu = CpuAccount(discover)
        cpu_phases: dict[str, dict[str, Any]] = {}
        ok = False
        try:
            settings, config = start_services(args, artifacts, tmp, phases, services, service_pids)
            bootstrap = settings.kafka_bootstrap
            with phases.phase("start stream workers", f"({args.workers})"):
                workers = Workers(settings)
                running = start_workers(workers, args.workers, tmp)
            ports = [w.metrics_port for w in running]
            phases.log(
                "  workers "
                + ", ".join(f"pid {w.pid} (metrics :{w.metrics_port})" for w in running)
            )
            state = RedisState(settings.redis_url, prefix=settings.feast_project)

            with (
                phases.phase("warm up", "(interactions and requests through every part)"),
                Arrivals(settings, bootstrap) as arrivals,
            ):
                warm_up(settings, bootstrap, state, arrivals, users, items, now_ms, args)
            if args.idle_s > 0:
                snap = cpu.snapshot()
                with phases.phase("idle", f"({args.idle_s:g} s, no traffic, no client)"):
                    time.sleep(args.idle_s)
                cpu_phases["idle (no traffic)"] = CpuAccount.usage(snap, cpu.snapshot())
            idle = cpu_phases.get("idle (no traffic)", {}).get("percent_of_one_core", {})
            phases.log("  idle CPU: " + ", ".join(f"{k} {v:g} %" for k, v in idle.items()))

            gc.collect()
            gc.freeze()  # what the setup built is never collected: shorter pauses from here on
            snap = cpu.snapshot()
            with phases.phase("interaction burst", f"({len(events):,} events)"):
                burst = run_burst(events, settings, bootstrap, state, ports, phases)
            cpu_phases["interaction burst"] = CpuAccount.usage(snap, cpu.snapshot())
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
                    bootstrap,
                    state,
                    ports,
                    users,
                    items,
                    end_ms + 60_000,
                    args.seed,
                    phases,
                )
            cpu_phases["single interactions"] = CpuAccount.usage(snap, cpu.snapshot())
            d = paced["direct_ms"]
            phases.log(
                f"  produce → acked: p50 {fmt(d.get('p50'))} ms, p99 {fmt(d.get('p99'))} ms "
                f"(histogram p50 ≈ {fmt(paced['histogram'].get('p50_ms'))} ms)"
            )

            with Arrivals(settings, bootstrap) as arrivals:
                with phases.phase("response consumer", "(joins its group; 10 requests)"):
                    warm_up_requests(settings, bootstrap, arrivals, users, now_ms, args, 10)
                generator = Generator(client_config(settings, bootstrap))
                load = RequestLoad(
                    settings, bootstrap, arrivals, generator, cpu, ports, args, phases, idle
                )
                try:
                    check = run_generator_check(load, artifacts, now_ms)
                    sweep = rate_sweep(load, artifacts, now_ms)
                    over = overload(load, artifacts, now_ms, sweep)
                finally:
                    generator.close()
            for step in sweep["steps"] + over["steps"]:
                cpu_phases[f"{step['rate']:g} req/s {step['kind']}"] = step["cpu"]

            # The workers idle at a sizeable share of a core (see the idle phase): stop them,
            # so that the in-process baseline runs on the machine the e2e run had minus them.
            with phases.phase("stop stream workers"):
                workers.stop_all()
            with phases.phase("build in-process graph"):
                local = LocalRecommender(artifacts, config)
            base = sweep["steps"][0]
            same = base["_requests"][: args.inprocess_requests]
            warm = build_rate_requests(artifacts, 20, args, now_ms, "warm-local", args.seed + 99)
            snap = cpu.snapshot()
            with phases.phase("in-process sequential", f"({len(same)} requests)"):
                in_process = run_in_process(local, same, warm, phases)
            cpu_phases["in-process sequential"] = CpuAccount.usage(snap, cpu.snapshot())
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

    ip = in_process["latency_ms"]
    result = {
        "benchmark": "e2e",
        "label": label,
        "started": started,
        "machine": machine,
        "config": {
            "data": args.data,
            "quick": args.quick,
            "workers": args.workers,
            "partitions": args.partitions,
            "instances": args.instances,
            "events": args.events,
            "paced": args.paced,
            "paced_gap_ms": args.paced_gap_ms,
            "rates": args.rates,
            "refine": args.refine,
            "min_rate": args.min_rate,
            "overload": args.overload,
            "duration_s": args.duration,
            "warmup_s": args.warmup_s,
            "deadline_ms": args.deadline_ms,
            "slo_ms": args.slo_ms,
            "idle_s": args.idle_s,
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
        "requests": {"generator_check": check, "sweep": sweep, "overload": over},
        "idle_cpu": cpu_phases.get("idle (no traffic)"),
        "in_process": in_process,
        "ratios": {
            "e2e_p50_over_in_process_p50": {
                f"{x['rate']:g}": ratio(x["latency_ms"].get("p50"), ip["p50"])
                for x in sweep["steps"]
            },
            "e2e_p99_over_in_process_p99": {
                f"{x['rate']:g}": ratio(x["latency_ms"].get("p99"), ip["p99"])
                for x in sweep["steps"]
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


def start_services(
    args: argparse.Namespace,
    artifacts: Path,
    tmp: Path,
    phases: Phases,
    services: list,
    service_pids: dict[str, int],
) -> tuple[Any, dict[str, Any]]:
    """Broker, Valkey (features loaded) and tritonserver in `tmp`, each appended to `services`
    and `service_pids` as it starts (the caller stops them), and the topics with
    `args.partitions` partitions. Returns the workers' settings and the serving config."""
    from bench.serving import data_dir
    from schemas.settings import Settings, TopicNames
    from serving.client import serving_config
    from serving.triton_export import export_repository
    from state.load import load_features
    from streamrec.stack.servers import start_kafka, start_redis, start_triton
    from streams.topics import create_topics

    with phases.phase("start broker and valkey"):
        kafka = start_kafka(tmp / "kafka", 60)
        services.append(kafka)
        cluster = getattr(args, "redis_cluster_nodes", 0)  # bench.scale's option
        redis = start_redis(tmp / "valkey", 30, cluster_nodes=cluster)
        services.append(redis)
    phases.log(
        f"  broker {kafka.endpoint} (pid {kafka.pid}), valkey {redis.endpoint} (pid {redis.pid})"
    )
    service_pids |= {"broker": kafka.pid, "valkey": redis.pids}
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
        topics=TopicNames(**{r: f"{prefix}-{n}" for r, n in TopicNames().model_dump().items()}),
    )
    if args.deadline_ms is None:
        args.deadline_ms = float(settings.request_deadline_ms)
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
    service_pids["triton"] = triton.pid
    settings = settings.model_copy(update={"triton_url": triton.endpoint})
    create_topics(settings, kafka.endpoint)
    return settings, config


def start_workers(workers, n: int, tmp: Path) -> list:
    """Start `n` more stream workers (Faust's data directory in `tmp`); all running ones."""
    # Faust keeps its data directory in the working directory unless told otherwise
    saved = os.environ.get("F_DATADIR")
    os.environ["F_DATADIR"] = str(tmp / "faust-data")
    try:
        return workers.start(n, timeout=300)
    finally:
        if saved is None:
            os.environ.pop("F_DATADIR", None)
        else:
            os.environ["F_DATADIR"] = saved


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
        deadline = int(time.time() * 1000) + 30_000
        r = request_record(f"warm-{uuid.uuid4().hex[:8]}", user, args.k, now_ms, deadline)
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
