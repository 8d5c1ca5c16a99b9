"""End-to-end benchmark: Kafka → stream worker(s) → Triton ensemble → Kafka.

    .venv/bin/python -m bench.e2e --artifacts .streamrec/artifacts/<version>   # ~6 minutes
    .venv/bin/python -m bench.e2e --quick --artifacts ...                      # ~2 minutes

On an embedded stack of its own: idle CPU, an interaction burst, an open-loop sweep of request
rates, overload, CPU per request by process (bench/README.md explains each table). Writes
bench/results/e2e-<label>.{json,md} and bench/results/e2e-latency.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import os
import re
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench import common
from bench.common import Block, Phases, Snapshot, cells, fmt, summarize, table
from models.data import load, temporal_split
from schemas.artifacts import Artifacts
from schemas.records import Interaction
from state.store import RedisState
from streamrec.deploy import deploy
from streamrec.stack import EmbeddedStack
from streamrec.workers import Workers
from streams.kafka import EventProducer, client_config
from streams.replay import Recorder
from streams.topics import create_topics, record_key, serde_for, topic_name

READER_BACKOFF_S = 0.002  # the response reader's longest wait after an empty fetch
FRESHNESS = "streamrec_feature_freshness_seconds"
SERVING = ["stream worker", "broker", "tritonserver", "triton stubs", "valkey"]
ROLES = [*SERVING, "load generator", "bench consumer"]
QUICK = {"rates": "25,50,100", "duration": 5.0, "warmup_s": 1.0, "refine": 1, "events": 5000}
QUICK |= {"idle_s": 10.0}
SHARED = [  # the stack, the burst and the sweep (bench.scale's too)
    ("--artifacts", common.ARTIFACTS, "a trained version, or a root whose `current` is used"),
    ("--data", "ml-100k", "data set whose hold-out is the burst"),
    ("--partitions", 4, "partitions per topic"),
    ("--redis-cluster-nodes", 0, "Valkey: 0 one server, N a local cluster of N primaries"),
    ("--triton-timeout", 600.0, "tritonserver start-up limit, s"),
    ("--events", 20_000, "interactions in a burst (the hold-out, then synthetic ones)"),
    ("--rates", "25,50,100,200,300,400", "ladder of request rates, req/s, raised while steady"),
    ("--duration", 15.0, "measured seconds per rate"),
    ("--warmup-s", 2.0, "seconds sent at each rate before the measured ones"),
    ("--refine", 2, "rates tried after the ladder where p99 crosses --slo-ms (bisecting)"),
    ("--slo-ms", 100.0, "the p99 target, ms"),
    ("--deadline-ms", 1000.0, "each request's deadline after its send; then answered `expired`"),
    ("--cold-share", 0.1, "share of requests from unknown users"),
    ("--k", 10, "items per request"),
    ("--seed", 0, "seed of requests and synthetic events"),
    ("--label", None, "result name suffix (default: from --data)"),
    ("--keep", False, "keep the temporary directory (logs)"),
]
OPTIONS = [
    ("--workers", 1, "stream worker processes"),
    ("--instances", 1, "Triton instances per operator"),
    ("--overload", "2,4", "multiples of the highest sustainable rate measured as overload"),
    ("--idle-s", 20.0, "seconds of the idle CPU baseline"),
    ("--no-plot", False, "do not write the PNG plot"),
    ("--quick", False, f"a ~2 minute smoke run: {QUICK}"),
]


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> Any:
    """The arguments, with the rates as numbers, the label and the artifacts' version."""
    args = p.parse_args(argv)
    args.rates = common.numbers(p, "--rates", args.rates)
    suffix = "-quick" if getattr(args, "quick", False) else ""
    args.label = args.label or re.sub(r"[^A-Za-z0-9._-]+", "-", args.data) + suffix
    args.artifacts = common.artifacts(args.artifacts)
    return args


# The load generator: a process of its own (no GIL shared with the response reader) sending
# pre-encoded requests on a fixed schedule (confluent-kafka, `linger.ms=0`), whatever the answers.
Message = tuple[bytes | None, bytes]  # key, value
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


def histogram(samples: list[Any], name: str, **labels: str) -> tuple[list, list, float, float]:
    """Upper bounds, cumulative bucket counts, count and sum of a histogram over all workers."""
    h: dict[Any, float] = {}
    for s in samples:
        if s.name.startswith(name) and labels.items() <= s.labels.items():
            key = float(s.labels["le"]) if "le" in s.labels else s.name.rsplit("_", 1)[1]
            h[key] = h.get(key, 0.0) + s.value
    bounds = sorted(k for k in h if isinstance(k, float))
    return bounds, [h[b] for b in bounds], h.get("count", 0.0), h.get("sum", 0.0)


def bucket_summary(after: list[Any], before: list[Any], name: str, **labels: str) -> dict:
    """p50/p90/p99 (ms) of the observations between two scrapes, from the buckets as PromQL's
    histogram_quantile ('> top bound' in the +Inf bucket), and the exact mean."""
    bounds, cum, n, total = histogram(after, name, **labels)
    _, cum0, n0, total0 = histogram(before, name, **labels)
    cum, n = [c - c0 for c, c0 in zip(cum, cum0 or [0] * len(cum), strict=True)], n - n0
    out: dict[str, Any] = {"n": round(n)}
    for q in (0.5, 0.9, 0.99) if n > 0 else ():
        i = next(i for i, c in enumerate(cum) if c >= q * n)
        lo, below = (bounds[i - 1], cum[i - 1]) if i else (0.0, 0.0)
        value = lo + (bounds[i] - lo) * (q * n - below) / max(cum[i] - below, 1e-9)
        top = i == len(bounds) - 1  # the +Inf bucket
        out[f"p{q * 100:g}_ms"] = f"> {bounds[-2] * 1000:,.0f}" if top else round(value * 1000, 2)
    return out | ({"mean_ms": round((total - total0) / n * 1000, 2)} if n > 0 else {})


def cpu_usage(a: Snapshot, b: Snapshot, count: int = 0, idle: dict | None = None) -> dict:
    """% of one core by role, the machine's busy %; with `count`, CPU-ms per answer (or event) by
    role, in all, and the serving side's less what it burns idle (`idle`: % of a core by role)."""
    wall, spent = max(b[0] - a[0], 1e-9), common.cpu_spent(a, b)
    out = {"percent_of_one_core": {r: round(s / wall * 100, 1) for r, s in spent.items()}}
    out["machine_busy"] = round((b[2] - a[2]) / wall * 100, 1)
    if count:
        ms = {r: s * 1000 / count for r, s in spent.items()}
        above = sum(ms[r] - (idle or {}).get(r, 0) * wall * 10 / count for r in SERVING)
        out |= {"count": count, "cpu_ms": {r: round(v, 3) for r, v in ms.items()}}
        out |= {"total_cpu_ms": round(sum(ms.values()), 2), "serving_above_idle": round(above, 2)}
    return out


def interaction(event_id: str, user: str, item: str, ts_ms: int) -> dict:
    return Interaction(user, item, "rating", timestamp_ms=int(ts_ms), event_id=event_id).to_record()


class System:
    """The running stack and workers, the instruments around them and the measurements."""

    def __init__(self, args: argparse.Namespace, stack: EmbeddedStack, phases: Phases) -> None:
        self.args, self.stack, self.settings, self.phases = args, stack, stack.settings, phases
        self.workers, self.cpu = Workers(self.settings), {}  # cpu: phase → CPU by role
        self.recorder: Recorder | None = None
        self.generator: Generator | None = None

    def start(self, workers: int) -> None:
        """Broker and Valkey, the topics, the artifacts deployed (state, Triton), the workers;
        the known users and items, the requests' time (an hour after the data's last event)."""
        args, settings = self.args, self.settings
        with self.phases.phase("start broker and valkey"):
            self.bootstrap = self.stack.up(("kafka", "redis"))["kafka"].endpoint
            create_topics(settings, self.bootstrap)
            self.producer = EventProducer(settings, self.bootstrap)
        with self.phases.phase("deploy", "(state into Feast and Valkey, tritonserver)"):
            deploy(settings, self.stack, args.artifacts, instances=getattr(args, "instances", 1))
        with self.phases.phase("start stream workers", f"({workers})"):
            self.workers.start(workers, timeout=300)
        a, self.dataset = Artifacts(args.artifacts), load(args.data, settings.data_dir)
        self.users = sorted(pd.read_parquet(a.state("user_activity"))["user_id"])
        self.items = sorted(a.read(a.ITEMS))
        self.now_ms = (int(self.dataset.interactions["timestamp"].max()) + 3600) * 1000
        self.state = RedisState(self.stack.endpoint("redis"), prefix=settings.feast_project)

    def processes(self) -> dict[str, list[int]]:
        """PIDs by role: the workers with their children, the servers, Triton's Python-backend
        stubs, the request generator and this process (the response reader)."""

        def tree(pid: int) -> list[int]:
            with contextlib.suppress(psutil.NoSuchProcess):
                return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
            return []

        s, generator = self.stack.services(), [self.generator.pid] if self.generator else []
        workers = [p for w in self.workers.running() for p in tree(w.pid)]
        servers = [[s["kafka"].pid], [s["triton"].pid], tree(s["triton"].pid)[1:], s["redis"].pids]
        return dict(zip(ROLES, [workers, *servers, generator, [os.getpid()]], strict=True))

    def measured(self, name: str, detail: str, work: Callable[[], Any], count: int = 0) -> Any:
        """`work()` as a phase, with the CPU each process spent in it (per one of `count`)."""
        before = common.cpu_snapshot(self.processes())
        with self.phases.phase(name, detail):
            out = work()
        self.cpu[name] = cpu_usage(before, common.cpu_snapshot(self.processes()), count)
        return out

    @contextlib.contextmanager
    def traffic(self) -> Iterator[None]:
        """The response reader (warmed up in its group) and the request generator."""
        with Recorder(self.settings, self.bootstrap, READER_BACKOFF_S) as self.recorder:
            with self.phases.phase("response reader", "(joins its group)"):
                self.warm_up("reader")
            self.generator = Generator(client_config(self.settings, self.bootstrap))
            try:
                yield
            finally:
                self.generator.close()

    def scrape(self, count: float = 0) -> list[Any]:
        """The samples of every live worker's /metrics; with `count`, again until the freshness
        histogram holds that many (a worker observes a batch just after acking it), ≤ 10 s."""
        deadline = time.monotonic() + 10
        while True:
            out = []
            for w in self.workers.running():
                with contextlib.suppress(OSError):
                    url = f"http://127.0.0.1:{w.metrics_port}/metrics"
                    text = urllib.request.urlopen(url, timeout=5).read().decode()
                    out += [s for f in text_string_to_metric_families(text) for s in f.samples]
            if histogram(out, FRESHNESS)[2] >= count or time.monotonic() > deadline:
                return out
            time.sleep(0.1)

    def requests(self, n: int, prefix: str, seed: int) -> list[dict]:
        a = self.args
        return common.requests(self.users, n, seed, a.cold_share, self.now_ms, prefix, a.k)

    def synthetic(self, n: int, tag: str, seed: int) -> list[dict]:
        """`n` interactions of known users with known items, drawn uniformly."""
        pairs = np.random.default_rng(seed).integers(0, [len(self.users), len(self.items)], (n, 2))
        ui = [(self.users[u], self.items[i]) for u, i in pairs]
        return [interaction(f"{tag}-{i}", u, item, self.now_ms) for i, (u, item) in enumerate(ui)]

    def warm_up(self, tag: str) -> None:
        """Interactions and requests through every part (partitions assigned, the Feast and ONNX
        code paths and the Triton stubs warm, the response reader in its group)."""
        base, requests = self.state.acked(), self.requests(40, f"warm-{tag}", self.args.seed + 2)
        for event in self.synthetic(40, f"warm-{tag}", self.args.seed + 3):
            self.producer.send("interactions", event)
        for r in requests:
            self.producer.send("requests", r | {"deadline_ms": int(time.time() * 1000) + 30_000})
            self.producer.flush()
            time.sleep(0.05)
        answered = self.recorder.wait({r["request_id"] for r in requests}, 120)
        if not answered or self.state.acked() < base + 40:
            raise RuntimeError("the warm-up's interactions or requests were not all processed")

    def burst(self, tag: str) -> dict[str, Any]:
        """The hold-out's interactions in time order (then synthetic ones) produced at once after
        one alone, timed until `acked()` grew by all of them; the figures, the table's rows."""
        n, serde = self.args.events, serde_for(self.settings, "interactions")
        quantile = Artifacts(self.args.artifacts).manifest["config"]["split_quantile"]
        test = temporal_split(self.dataset.interactions, quantile).test.iloc[:n]
        users, items = test.user_id.astype(str), test.item_id.astype(str)
        rows = zip(users, items, test.timestamp * 1e3, strict=True)
        events = [interaction(f"burst-{tag}-{i}", *row) for i, row in enumerate(rows)]
        events += self.synthetic(n - len(events), f"burst-{tag}-s", self.args.seed)
        encoded = [(serde.encode(e), record_key("interactions", e)) for e in events]
        count = histogram(self.scrape(), FRESHNESS)[2] + 1
        self.producer.send("interactions", events[0] | {"event_id": f"burst-{tag}-first"})
        before = self.scrape(count)  # once the workers observed that one
        base, timeline, t0 = self.state.acked(), [(0.0, 0)], time.perf_counter()
        for i, (value, key) in enumerate(encoded):
            self.producer.send_raw("interactions", value, key)
            if i % 500 == 0:  # the first are processed while the last are produced
                timeline.append((time.perf_counter() - t0, self.state.acked() - base))
        produced = time.perf_counter() - t0
        while (done := self.state.acked() - base) < n and timeline[-1][0] < max(120, n / 50):
            timeline.append((time.perf_counter() - t0, done))
            time.sleep(0.01)
        if done < n:
            raise RuntimeError(f"only {done:,}/{n:,} interactions processed")
        timeline.append((time.perf_counter() - t0, n))
        after = self.scrape(histogram(before, FRESHNESS)[2] + n)
        at = {q: next(t for t, d in timeline if d >= q * n) for q in (1 / n, 0.1, 0.5, 0.9, 0.99)}
        f = bucket_summary(after, before, FRESHNESS)
        b = {"events": n, "holdout_events": len(test), "freshness": f}
        b["events_per_s"] = round(n / timeline[-1][0], 1)
        b["events_per_s_10_to_90pct"] = round(0.8 * n / max(at[0.9] - at[0.1], 1e-3), 1)
        # client-side: all were produced within `produced` s of the start, so the time until a
        # share was processed is that freshness quantile to within it (and 10 ms of polling)
        client = " / ".join(f"{at[q] * 1000:,.0f}" for q in (0.5, 0.9, 0.99))
        b["rows"] = [
            ["produce time (s)", round(produced, 3)],
            ["first processed after (s)", round(at[1 / n], 3)],
            ["all processed after (s)", round(timeline[-1][0], 3)],
            ["events/s (first produce → all processed)", b["events_per_s"]],
            ["events/s (10 % → 90 % processed)", b["events_per_s_10_to_90pct"]],
            ["freshness p50 under the burst (ms, bucket estimate)", f.get("p50_ms")],
            ["freshness p99 under the burst (ms, bucket estimate)", f.get("p99_ms")],
            ["time until 50 % / 90 % / 99 % processed (ms, client-side)", client],
            ["freshness mean under the burst (ms, exact sum/count)", f.get("mean_ms")],
        ]
        return b

    def run_step(self, rate: float, kind: str, requests: list[dict], warmup_n: int) -> dict:
        """Send `requests` open loop at `rate`, wait for every answer (≤ the deadline + 10 s); the
        figures of those after the first `warmup_n` (the step's warm-up)."""
        ids, serde = [r["request_id"] for r in requests], serde_for(self.settings, "requests")
        start = time.perf_counter() + 0.3 + len(ids) * 50e-6  # time to encode, hand over
        deadline = (time.time() - time.perf_counter() + start) * 1000 + self.args.deadline_ms
        values = [
            r | {"deadline_ms": int(deadline + i * 1e3 / rate)} for i, r in enumerate(requests)
        ]
        messages = [(record_key("requests", r), serde.encode(r)) for r in values]
        before, cpu = self.scrape(), common.cpu_snapshot(self.processes())
        gc.disable()  # no collector pause in this process may delay an arrival's time
        try:
            sent = self.generator.send(topic_name(self.settings, "requests"), messages, rate, start)
            self.recorder.wait(set(ids), self.args.deadline_ms / 1000 + 10)
        finally:
            gc.enable()
        rec, after = self.recorder, self.scrape()
        idle = self.cpu.get("idle (no traffic)", {}).get("percent_of_one_core")
        answers = {r: (rec.arrived[r], rec.responses[r][0]) for r in ids if r in rec.responses}
        cpu = cpu_usage(cpu, common.cpu_snapshot(self.processes()), len(answers), idle)
        e2e = bucket_summary(after, before, "streamrec_request_latency_seconds", stage="end_to_end")
        lag = summarize([(s - start - i / rate) * 1000 for i, s in enumerate(sent)])
        hits = [
            (answers[r], s) for r, s in list(zip(ids, sent, strict=True))[warmup_n:] if r in answers
        ]
        ok = [(a, (a - s) * 1000) for (a, x), s in hits if x["status"] == "ok"]
        other = [f"{x['status']}: {x['error'] or ''}" for (_, x), _ in hits if x["status"] != "ok"]
        reasons = Counter(re.sub(r"\d+", "N", reason)[:90] for reason in other)
        expired = sum(n for reason, n in reasons.items() if reason.startswith("expired"))
        # requests in flight (sent, not yet answered) every 100 ms; their least-squares slope /s
        t0, t1, measured = sent[warmup_n], sent[-1], len(ids) - warmup_n
        grid, arrived = np.arange(t0, t1, 0.1), np.sort([a for a, _ in answers.values()])
        flying = np.searchsorted(sent, grid, "right") - np.searchsorted(arrived, grid, "right")
        growth = float(np.polyfit(grid - t0, flying, 1)[0]) if grid.size > 1 else 0.0
        achieved = round(len(ok) / (max(a for a, _ in ok) - t0), 2) if ok else 0.0
        latency = summarize([ms for _, ms in ok])
        steady = achieved >= 0.95 * rate and growth <= max(0.02 * rate, 1.0)
        sustainable = steady and latency.get("p99", float("inf")) <= self.args.slo_ms
        step = {"rate": rate, "kind": kind, "requests": measured, "achieved_rps": achieved}
        step |= {"sent_rps": round((measured - 1) / max(t1 - t0, 1e-9), 2), "latency_ms": latency}
        step |= {"ok": len(ok), "expired": expired, "error": len(other) - expired}
        step |= {"unanswered": measured - len(ok) - len(other), "error_reasons": dict(reasons)}
        step |= {"backlog_growth_per_s": round(growth, 2), "steady": steady}
        step |= {"sustainable": sustainable, "send_lag_ms": lag, "worker_end_to_end": e2e}
        return step | {"cpu": cpu, "_sent": sent, "_answers": answers}

    def measure(self, rate: float, kind: str, steps: list[dict]) -> dict[str, Any]:
        """One step at `rate` (warm-up first), appended to `steps`, with a line of progress."""
        args, name = self.args, f"{rate:g} req/s {kind}"
        n = max(2, round(rate * (args.warmup_s + args.duration)))
        reqs = self.requests(n, f"{rate:g}-{time.time_ns()}", args.seed + len(steps))
        with self.phases.phase(name, f"({n:,} requests)"):
            step = self.run_step(rate, kind, reqs, min(round(rate * args.warmup_s), n - 1))
        self.cpu[name], p99, bad = step["cpu"], step["latency_ms"].get("p99"), step["expired"]
        steps.append(step)
        self.phases.log(f"  {step['achieved_rps']:,.1f} ok/s, p99 {fmt(p99)} ms, {bad} expired")
        time.sleep(1.0)  # between steps
        return step

    def sweep(self) -> dict[str, Any]:
        """The ladder of rates, raised until one is not steady, then up to `--refine` rates
        where p99 crosses the target: halving below the ladder if none held, else bisecting."""
        steps: list[dict[str, Any]] = []
        for rate in self.args.rates:
            if not self.measure(rate, "ladder", steps)["steady"]:
                break
        for _ in range(self.args.refine):
            tried, held = {x["rate"] for x in steps}, [x["rate"] for x in steps if x["sustainable"]]
            above = min((r for r in tried if held and r > max(held)), default=None)
            close = held and (above is None or above - max(held) < 0.1 * max(held))
            rate = float(round((max(held) + above) / 2)) if held and not close else min(tried) / 2
            if close or rate in tried or rate < 5:  # req/s
                break
            self.measure(round(rate, 1), "refine", steps)
        held = [x["rate"] for x in steps if x["sustainable"]]
        steps.sort(key=lambda x: x["rate"])
        return {"steps": steps, "highest_sustainable_rps": max(held, default=None)}


@contextlib.contextmanager
def running_system(args: argparse.Namespace, phases: Phases, workers: int) -> Iterator[System]:
    """The system on an embedded stack of its own, started; stopped on the way out."""
    given = {"partitions": args.partitions, "redis_cluster_nodes": args.redis_cluster_nodes}
    given |= {"triton_start_timeout": args.triton_timeout}
    with common.embedded_stack(args.label, args.keep, args.artifacts, **given) as stack:
        live = System(args, stack, phases)
        try:
            live.start(workers)
            yield live
        finally:
            live.workers.stop_all()
            with contextlib.suppress(AttributeError, RuntimeError):
                live.producer.close()  # before the broker goes


STEP = "kind rate sent_rps achieved_rps latency_ms.p50 latency_ms.p90 latency_ms.p99 ok expired"
STEP += " error unanswered backlog_growth_per_s send_lag_ms.p99 worker_end_to_end.p99_ms steady"
STEP += " sustainable"
STEP_HEADERS = "step|offered req/s|sent req/s|achieved ok/s|p50 ms|p90 ms|p99 ms|ok|expired|error"
STEP_HEADERS += "|unanswered|backlog growth /s|send lag p99 ms|worker p99 ms|steady|p99 ≤ {:g} ms"


def report(r: dict[str, Any]) -> list[Block]:
    """The report's blocks; bench/README.md explains each table."""
    cfg, a, b, sweep, over = r["config"], r["artifacts"], r["burst"], r["sweep"], r["overload"]
    best, steps = sweep["highest_sustainable_rps"], sweep["steps"]
    reasons: Counter[str] = Counter()
    for x in steps + over["steps"]:
        reasons.update(x["error_reasons"])
    others = "; ".join(f"{n:,}× {reason}" for reason, n in reasons.items())
    cpu, idle = [x["cpu"] for x in steps + over["steps"]], r["cpu"]["idle (no traffic)"]
    cpu_rows = [[role, *(c["cpu_ms"].get(role) for c in cpu)] for role in ROLES]
    cpu_rows.append(["all of the above", *(c["total_cpu_ms"] for c in cpu)])
    cpu_rows.append(["answered requests", *(c["count"] for c in cpu)])
    cpu_rows.append(["serving side above idle", *(c["serving_above_idle"] for c in cpu)])
    idle_rows = [[p, idle["percent_of_one_core"][p]] for p in SERVING]
    idle_rows.append(["whole machine (busy)", idle["machine_busy"]])
    columns = [f"{x['rate']:g} req/s {x['kind']}" for x in steps + over["steps"]]
    return [
        common.header("End-to-end benchmark", r),
        f"Artifacts {a['version']} ({a['data']['items']:,} items, {a['data']['users']:,} users, "
        f"index {a['index']['type']}). Broker, Valkey and tritonserver started by the benchmark; "
        f"{cfg['workers']} stream worker(s), {cfg['partitions']} partitions, {cfg['instances']} "
        "Triton instance(s) per stage.",
        "## 1. Interactions: throughput and feature freshness",
        f"Burst of {b['events']:,} interactions ({b['holdout_events']:,} from the hold-out, "
        f"{b['events'] - b['holdout_events']:,} synthetic) produced as fast as possible.",
        table("measure|value", b["rows"]),
        "## 2. Requests over Kafka: open-loop rate sweep",
        f"Ladder {', '.join(f'{x:g}' for x in cfg['rates'])} req/s, then up to {cfg['refine']} "
        f"refinement rate(s); {cfg['warmup_s']:g} s of warm-up, then {cfg['duration']:g} s "
        f"measured. {cfg['cold_share']:.0%} unknown users, k={cfg['k']}, temperature 0, "
        f"deadline {cfg['deadline_ms']:,.0f} ms after the scheduled send.",
        table(STEP_HEADERS.format(cfg["slo_ms"]), [cells(x, STEP) for x in steps]),
        f"**Highest steady rate with p99 ≤ {cfg['slo_ms']:g} ms: "
        + (f"{best:,.2f} req/s.**" if best else "none of the rates tried.**"),
        "## 3. Overload",
        f"Multiples of {over['base_rps']:,.2f} req/s: the highest steady rate, else the lowest.",
        table(STEP_HEADERS.format(cfg["slo_ms"]), [cells(x, STEP) for x in over["steps"]]),
        f"Answers other than `ok` (all steps): {others}." if reasons else "",
        "## 4. CPU-ms per request by process",
        "CPU time (user + system) from the start of a step to its last answer, per answer.",
        table("|".join(["process", *columns]), cpu_rows),
        "## 5. Idle CPU",
        f"No traffic for {cfg['idle_s']:g} s after the warm-up: % of one core.",
        table("process|% of one core", idle_rows),
        f"![latency against request rate]({r['plot']})" if "plot" in r else "",
    ]


def plot_latency(r: dict[str, Any], path: Path) -> str:
    """p50 and p99 of the ok answers (log scale) against the offered rate, sweep and overload;
    the p99 target as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(r["sweep"]["steps"] + r["overload"]["steps"], key=lambda x: x["rate"])
    fig, ax = plt.subplots(figsize=(9.6, 6.0))
    for name, color in (("p50", "tab:blue"), ("p99", "tab:red")):
        points = [(s["rate"], s["latency_ms"][name]) for s in steps if s["latency_ms"].get(name)]
        ax.plot(*zip(*points, strict=True), "o-", color=color, label=f"{name} end to end")
    slo = r["config"]["slo_ms"]
    ax.axhline(slo, color="tab:green", linestyle="--", label=f"p99 target {slo:g} ms")
    ax.set(yscale="log", xlabel="offered request rate (req/s)", ylabel="latency (ms)")
    ax.set_title(f"End-to-end latency vs request rate ({r['label']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name


def main(argv: list[str] | None = None) -> int:
    p = common.parser("python -m bench.e2e", __doc__, SHARED + OPTIONS)
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**QUICK)  # options given explicitly still win
    args = parse(p, argv)
    args.overload = common.numbers(p, "--overload", args.overload)
    phases, r = Phases(), common.run_info(args.label)
    with running_system(args, phases, args.workers) as live:
        reader = Recorder(live.settings, live.bootstrap, READER_BACKOFF_S)
        with phases.phase("warm up"), reader as live.recorder:
            live.warm_up("start")
        live.measured("idle (no traffic)", f"({args.idle_s:g} s)", lambda: time.sleep(args.idle_s))
        gc.collect()
        gc.freeze()  # what the setup built is never collected: shorter pauses from here on
        r["burst"] = live.measured("interaction burst", "", lambda: live.burst("e2e"))
        with live.traffic():
            r["sweep"] = live.sweep()
            base = r["sweep"]["highest_sustainable_rps"] or r["sweep"]["steps"][0]["rate"]
            r["overload"] = {"base_rps": base, "steps": []}
            for multiple in args.overload:  # of the highest sustainable rate, else the lowest
                rate, steps = round(base * multiple, 1), r["overload"]["steps"]
                live.measure(rate, f"{multiple:g}× overload", steps)
    manifest = Artifacts(args.artifacts).manifest
    r |= {"config": vars(args), "artifacts": {k: manifest[k] for k in ("version", "data", "index")}}
    r = common.finished(r | {"cpu": live.cpu, "phases": phases.seconds})
    r |= {} if args.no_plot else {"plot": plot_latency(r, common.RESULTS / "e2e-latency.png")}
    common.publish(f"e2e-{r['label']}", r, report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
