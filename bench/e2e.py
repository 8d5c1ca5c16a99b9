"""End-to-end benchmark: Kafka → Faust stream worker(s) → Triton ensemble → Kafka.

    .venv/bin/python -m bench.e2e --artifacts .streamrec/artifacts/<version>   # ~6 minutes
    .venv/bin/python -m bench.e2e --quick --artifacts ...                      # ~2 minutes

On an embedded stack of its own: idle CPU; an interaction burst and single interactions; an
open-loop sweep of request rates (bench.loadgen's producer process, `streams.replay.Recorder`
reading the answers), then overload; CPU per request by process; the in-process graph on the
same requests. bench/README.md explains each table. Writes bench/results/e2e-<label>.{json,md}
and bench/results/e2e-latency.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench import common, loadgen
from bench.common import Phases, fmt, markdown_table, summarize
from models.data import load, temporal_split
from schemas.artifacts import Artifacts, current_artifacts
from schemas.records import Interaction, RecommendationRequest
from schemas.settings import Settings
from serving.client import LocalRecommender
from serving.operators import OPERATORS, decode, request_tensors
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
QUICK |= {"paced": 50, "idle_s": 10.0, "inprocess_requests": 200}
SHARED = [  # option, default, help: the stack, the burst and the sweep (bench.scale's too)
    ("--data", "ml-100k", "data set whose hold-out is the burst"),
    ("--partitions", 4, "partitions per topic"),
    ("--redis-cluster-nodes", 0, "Valkey: 0 one server, N a local cluster of N primaries"),
    ("--triton-timeout", 600.0, "tritonserver start-up limit, s"),
    ("--events", 20_000, "interactions in a burst (the hold-out, then synthetic ones)"),
    ("--rates", "25,50,100,200,300,400", "ladder of request rates, req/s, raised while steady"),
    ("--duration", 15.0, "measured seconds per rate"),
    ("--warmup-s", 2.0, "seconds sent at each rate before the measured ones"),
    ("--pause-s", 1.0, "pause between rate steps, s"),
    ("--refine", 2, "rates tried after the ladder where p99 crosses --slo-ms (bisecting)"),
    ("--min-rate", 5.0, "lowest rate a refinement tries (halving if no rate held)"),
    ("--slo-ms", 100.0, "the p99 target, ms"),
    ("--deadline-ms", 1000.0, "each request's deadline after its send; then answered `expired`"),
    ("--cold-share", 0.1, "share of requests from unknown users"),
    ("--k", 10, "items per request"),
    ("--seed", 0, "seed of requests and synthetic events"),
]
OPTIONS = [
    ("--workers", 1, "stream worker processes"),
    ("--instances", 1, "Triton instances per operator"),
    ("--paced", 200, "single interactions timed one by one"),
    ("--paced-gap-ms", 30.0, "pause after each single interaction, ms"),
    ("--overload", "2,4", "multiples of the highest sustainable rate measured as overload"),
    ("--inprocess-requests", 1000, "at most this many of the lowest rate's requests in-process"),
    ("--idle-s", 20.0, "seconds of the idle CPU baseline"),
]


def parser(prog: str, doc: str, options: list, defaults: dict) -> argparse.ArgumentParser:
    """SHARED and `options` ((flag, default, help) triples); `defaults` overrides SHARED's."""
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog, description=doc, formatter_class=raw)
    root = os.environ.get("STREAMREC_BENCH_ARTIFACTS", ".streamrec/artifacts")
    text = "a trained version, or a root whose `current` is used; nothing is trained here"
    p.add_argument("--artifacts", type=Path, default=root, help=f"{text} ({root})")
    for flag, default, text in SHARED + options:
        default = defaults.get(flag[2:].replace("-", "_"), default)
        text += f" ({default})" if default != "" else ""
        p.add_argument(flag, type=type(default), default=default, help=text)
    p.add_argument("--label", help="result name suffix (default: from --data)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> Any:
    """The arguments, with rates as numbers, the label and the artifact version."""
    args = p.parse_args(argv)
    if not re.fullmatch(r"[\d.]+(,[\d.]+)*", args.rates):
        p.error("--rates takes comma-separated numbers, e.g. 50,100,200")
    args.rates = sorted(float(r) for r in args.rates.split(","))
    suffix = "-quick" if getattr(args, "quick", False) else ""
    args.label = args.label or re.sub(r"[^A-Za-z0-9._-]+", "-", args.data) + suffix
    given = Path(args.artifacts)
    manifest = (given / Artifacts.MANIFEST).exists()
    args.artifacts = given.resolve() if manifest else current_artifacts(given)
    return args


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
    out: dict[str, Any] = {"n": round(n), "bucket_bounds_ms": [b * 1000 for b in bounds[:-1]]}
    for q in (0.5, 0.9, 0.99) if n > 0 else ():
        i = next(i for i, c in enumerate(cum) if c >= q * n)
        lo, below = (bounds[i - 1], cum[i - 1]) if i else (0.0, 0.0)
        value = lo + (bounds[i] - lo) * (q * n - below) / max(cum[i] - below, 1e-9)
        top = i == len(bounds) - 1  # the +Inf bucket
        out[f"p{q * 100:g}_ms"] = f"> {bounds[-2] * 1000:,.0f}" if top else round(value * 1000, 2)
    return out | ({"mean_ms": round((total - total0) / n * 1000, 2)} if n > 0 else {})


def cells(x: dict[str, Any], keys: str) -> list[Any]:
    """Figures of `x` by space-separated keys (`a.b`: nested; yes/no for booleans)."""
    out = []
    for key in keys.split():
        value = x
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out.append(("no", "yes")[value] if isinstance(value, bool) else value)
    return out


def interaction(event_id: str, user: str, item: str, ts_ms: int) -> dict:
    return Interaction(user, item, "rating", timestamp_ms=int(ts_ms), event_id=event_id).to_record()


class System:
    """The running stack and workers, the instruments around them and the measurements."""

    bootstrap: str
    producer: EventProducer
    config: dict[str, Any]  # the serving config the Triton models were exported with
    dataset: Any  # models.data.Dataset of --data
    users: list[str]
    items: list[str]
    now_ms: int  # the requests' time
    state: RedisState

    def __init__(self, args: argparse.Namespace, settings: Settings, phases: Phases) -> None:
        self.args, self.settings, self.phases = args, settings, phases
        self.stack, self.workers = EmbeddedStack(settings), Workers(settings)
        self.recorder: Recorder | None = None
        self.generator: loadgen.Generator | None = None
        self.cpu: dict[str, dict] = {}  # phase → CPU by role

    def start(self, workers: int) -> None:
        """Broker and Valkey, the topics, the artifacts deployed (state, Triton), the workers;
        the known users and items, the requests' time (an hour after the data's last event)."""
        args, settings = self.args, self.settings
        with self.phases.phase("start broker and valkey"):
            self.bootstrap = self.stack.up(("kafka", "redis"))["kafka"].endpoint
            create_topics(settings, self.bootstrap)
            self.producer = EventProducer(settings, self.bootstrap)
        with self.phases.phase("deploy", "(state into Feast and Valkey, tritonserver)"):
            instances = getattr(args, "instances", 1)
            self.config = deploy(settings, self.stack, args.artifacts, instances=instances).config
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

    def measured(self, name: str, detail: str, work: Callable[[], Any]) -> Any:
        """`work()` as a phase, with the CPU each process spent in it."""
        before = loadgen.cpu_snapshot(self.processes)
        with self.phases.phase(name, detail):
            out = work()
        self.cpu[name] = loadgen.cpu_usage(before, loadgen.cpu_snapshot(self.processes))
        return out

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

    def answers(self, ids: list[str]) -> dict[str, tuple[float, dict]]:
        """Request id → (arrival, first response) of those of `ids` answered so far."""
        rec = self.recorder
        return {r: (rec.arrived[r], rec.responses[r][0]) for r in ids if r in rec.responses}

    def requests(self, n: int, prefix: str, seed: int) -> list[dict]:
        """Known users drawn uniformly and a `--cold-share` of unknown ones."""
        rng, fixed = np.random.default_rng(seed), {"k": self.args.k, "temperature": 0.0}
        cold, picks = rng.random(n) < self.args.cold_share, rng.integers(len(self.users), size=n)
        fixed |= {"seed": 1, "timestamp_ms": self.now_ms}
        out = []
        for i in range(n):
            user = f"bench-unknown-{prefix}-{i}" if cold[i] else self.users[picks[i]]
            out.append(RecommendationRequest(user, **fixed, request_id=f"{prefix}-{i}").to_record())
        return out

    def synthetic(self, n: int, tag: str, seed: int) -> list[dict]:
        """`n` interactions of known users with known items, drawn uniformly."""
        pairs = np.random.default_rng(seed).integers(0, [len(self.users), len(self.items)], (n, 2))
        users, items = [self.users[u] for u, _ in pairs], [self.items[i] for _, i in pairs]
        return [
            interaction(f"{tag}-{i}", *ui, self.now_ms)
            for i, ui in enumerate(zip(users, items, strict=True))
        ]

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

    def timed_one(self, record: dict) -> float | None:
        """Produce one interaction; ms until `acked()` counted it (None: not within 10 s)."""
        base, t0 = self.state.acked(), time.perf_counter()
        self.producer.send("interactions", record)
        while self.state.acked() <= base:
            if time.perf_counter() - t0 > 10:
                return None
            time.sleep(0.001)
        return (time.perf_counter() - t0) * 1000

    def first_one(self, event: dict) -> list[Any]:
        """One interaction, untimed; the metrics once the workers observed it."""
        count = histogram(self.scrape(), FRESHNESS)[2] + 1
        self.timed_one(event | {"event_id": event["event_id"] + "-first"})
        return self.scrape(count)

    def burst(self, tag: str) -> dict[str, Any]:
        """The hold-out's interactions in time order (synthetic ones after it if --events asks
        for more) produced at once; timed until `acked()` grew by all of them."""
        n, serde = self.args.events, serde_for(self.settings, "interactions")
        quantile = Artifacts(self.args.artifacts).manifest["config"]["split_quantile"]
        test = temporal_split(self.dataset.interactions, quantile).test.iloc[:n]
        users, items = test.user_id.astype(str), test.item_id.astype(str)
        rows = zip(users, items, test.timestamp * 1e3, strict=True)
        events = [interaction(f"burst-{tag}-{i}", *row) for i, row in enumerate(rows)]
        events += self.synthetic(n - len(events), f"burst-{tag}-s", self.args.seed)
        encoded = [(serde.encode(e), record_key("interactions", e)) for e in events]
        before, base, timeline = self.first_one(events[0]), self.state.acked(), [(0.0, 0)]
        t0 = time.perf_counter()
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
        return burst_figures(n, len(test), produced, timeline, after, before)

    def paced(self) -> dict[str, Any]:
        """Single interactions one at a time: produce → `acked()` counted it, beside the
        worker's freshness histogram of the same events."""
        events = self.synthetic(self.args.paced + 1, "paced", self.args.seed + 7)
        before, ms = self.first_one(events[0]), []
        for event in events[1:]:
            ms.append(self.timed_one(event))
            time.sleep(self.args.paced_gap_ms / 1000)
        h = bucket_summary(
            self.scrape(histogram(before, FRESHNESS)[2] + len(ms)), before, FRESHNESS
        )
        direct = summarize([x for x in ms if x is not None]) | {"timeouts": ms.count(None)}
        client = ["client: produce → acked (exact)", *cells(direct, "n p50 p90 p99 max mean")]
        worker = [
            "worker histogram (bucket estimate)",
            *cells(h, "n p50_ms p90_ms p99_ms max mean_ms"),
        ]
        return {"direct_ms": direct, "histogram": h, "rows": [client, worker]}

    def run_step(self, rate: float, kind: str, requests: list[dict], warmup_n: int) -> dict:
        """Send `requests` open loop at `rate` from the generator process, wait for every
        answer (at most the deadline and 10 s more), then the step's figures."""
        ids, serde = [r["request_id"] for r in requests], serde_for(self.settings, "requests")
        start = time.perf_counter() + 0.3 + len(ids) * 50e-6  # time to encode, hand over
        deadline = (time.time() - time.perf_counter() + start) * 1000 + self.args.deadline_ms
        values = [{"deadline_ms": int(deadline + i * 1000 / rate)} for i in range(len(ids))]
        messages = [
            (record_key("requests", r), serde.encode(r | v))
            for r, v in zip(requests, values, strict=True)
        ]
        before, cpu = self.scrape(), loadgen.cpu_snapshot(self.processes)
        gc.disable()  # no collector pause in this process may delay an arrival's time
        try:
            sent = self.generator.send(topic_name(self.settings, "requests"), messages, rate, start)
            self.recorder.wait(set(ids), self.args.deadline_ms / 1000 + 10)
        finally:
            gc.enable()
        answers, after, idle = self.answers(ids), self.scrape(), self.cpu.get("idle (no traffic)")
        idle = idle["percent_of_one_core"] if idle else {}
        cpu = loadgen.cpu_usage(cpu, loadgen.cpu_snapshot(self.processes), len(answers), idle)
        e2e = bucket_summary(after, before, "streamrec_request_latency_seconds", stage="end_to_end")
        lag = summarize([(s - start - i / rate) * 1000 for i, s in enumerate(sent)])
        step = loadgen.step_figures(rate, ids, sent, warmup_n, answers, self.args.slo_ms)
        step |= {"rate": rate, "kind": kind, "send_lag_ms": lag, "worker_end_to_end": e2e}
        raw = {"_answers": {r: a[1] for r, a in answers.items()}, "_requests": requests[warmup_n:]}
        return step | {"cpu": cpu, "_sent": sent} | raw

    def measure(self, rate: float, kind: str, steps: list[dict]) -> dict[str, Any]:
        """One step at `rate` (warm-up first), appended to `steps`, with a line of progress."""
        args, name = self.args, f"{rate:g} req/s {kind}"
        n = max(2, round(rate * (args.warmup_s + args.duration)))
        reqs = self.requests(n, f"{kind}-{rate:g}-{time.time_ns()}", args.seed + len(steps))
        with self.phases.phase(name, f"({n:,} requests)"):
            step = self.run_step(rate, kind, reqs, min(round(rate * args.warmup_s), n - 1))
        self.cpu[name], lat = step["cpu"], step["latency_ms"]
        steps.append(step)
        self.phases.log(
            f"  achieved {step['achieved_rps']:,.1f}/s, p50 {fmt(lat.get('p50'))} ms, p99 "
            f"{fmt(lat.get('p99'))} ms, {step['expired']} expired, {step['error']} errors, "
            f"{step['unanswered']} unanswered, backlog {step['backlog_growth_per_s']:+.1f}/s"
        )
        time.sleep(args.pause_s)
        return step

    def sweep(self) -> dict[str, Any]:
        """The ladder of rates, raised until one is not steady, then up to `--refine` rates
        where p99 crosses the target: halving below the ladder if none held, else bisecting."""
        steps: list[dict[str, Any]] = []
        stop = None
        for rate in self.args.rates:
            if not (step := self.measure(rate, "ladder", steps))["steady"]:
                stop = f"not steady at {rate:g} req/s (achieved {step['achieved_rps']:g}/s, "
                stop += f"backlog {step['backlog_growth_per_s']:+g}/s)"
                break
        for _ in range(self.args.refine):
            tried, held = {x["rate"] for x in steps}, [x["rate"] for x in steps if x["sustainable"]]
            above = min((r for r in tried if held and r > max(held)), default=None)
            close = held and (above is None or above - max(held) < 0.1 * max(held))
            rate = float(round((max(held) + above) / 2)) if held and not close else min(tried) / 2
            if close or rate in tried or rate < self.args.min_rate:
                break
            self.measure(round(rate, 1), "refine", steps)
        held = [x["rate"] for x in steps if x["sustainable"]]
        steps.sort(key=lambda x: x["rate"])
        return {
            "steps": steps,
            "highest_sustainable_rps": max(held, default=None),
            "stop_reason": stop,
        }

    def overload(self, sweep: dict[str, Any]) -> dict[str, Any]:
        """Steps at `--overload` multiples of the highest sustainable rate (else the lowest)."""
        base, steps = sweep["highest_sustainable_rps"] or sweep["steps"][0]["rate"], []
        for multiple in self.args.overload:
            self.measure(round(base * multiple, 1), "overload", steps)["multiple"] = multiple
        kind = "highest sustainable" if sweep["highest_sustainable_rps"] else "lowest tried"
        return {"base_rps": base, "base": kind, "steps": steps}

    def in_process(self, step: dict[str, Any]) -> dict[str, Any]:
        """`step`'s requests through the graph in this process, one by one (20 first to warm
        up), and how many answers equal the served ones."""
        local, requests = LocalRecommender(self.args.artifacts, self.config), step["_requests"]
        requests, ms, outputs = requests[: self.args.inprocess_requests], [], []
        for r in requests[:20] + requests:
            t0 = time.perf_counter()
            outputs.append(local.run(request_tensors(r)))
            ms.append((time.perf_counter() - t0) * 1000)
        ms, outputs, served = ms[20:], outputs[20:], step["_answers"]
        stages = {op.name: [float(o[op.stats_name()][2]) for o in outputs] for op in OPERATORS}
        outside = np.array(ms) - np.sum(list(stages.values()), axis=0)
        ok = {
            r: [i["item_id"] for i in a["items"]] for r, a in served.items() if a["status"] == "ok"
        }
        same = [
            ok.get(r["request_id"]) == decode(o["items"])
            for r, o in zip(requests, outputs, strict=True)
        ]
        return {
            "requests": len(requests),
            "latency_ms": summarize(ms),
            "stages_p50_ms": {k: round(float(np.median(v)), 3) for k, v in stages.items()},
            "outside_stages_p50_ms": round(float(np.median(outside)), 3),
            "parity": {"checked": sum(r["request_id"] in ok for r in requests), "equal": sum(same)},
        }


def burst_figures(
    n: int, holdout: int, produced: float, timeline: list, after: list, before: list
) -> dict:
    """The burst's figures and the rows of its table."""
    at = {q: next(t for t, d in timeline if d >= q * n) for q in (1 / n, 0.1, 0.5, 0.9, 0.99)}
    f = bucket_summary(after, before, FRESHNESS)
    _, _, batches, size = histogram(after, "streamrec_batch_size", processor="interactions")
    _, _, batches0, size0 = histogram(before, "streamrec_batch_size", processor="interactions")
    b = {"events": n, "holdout_events": holdout, "events_per_s": round(n / timeline[-1][0], 1)}
    b["events_per_s_10_to_90pct"] = round(0.8 * n / max(at[0.9] - at[0.1], 1e-3), 1)
    # client-side: all were produced within produce_s of the start, so the time until a share
    # was processed is that freshness quantile to within it (and 10 ms of polling)
    client = " / ".join(f"{at[q] * 1000:,.0f}" for q in (0.5, 0.9, 0.99))
    return b | {
        "freshness": f,
        "rows": [
            ["events", n],
            ["produce time (s)", round(produced, 3)],
            ["first processed after (s)", round(at[1 / n], 3)],
            ["all processed after (s)", round(timeline[-1][0], 3)],
            ["events/s (first produce → all processed)", b["events_per_s"]],
            ["events/s (10 % → 90 % processed)", b["events_per_s_10_to_90pct"]],
            [
                "micro-batches / mean batch size",
                f"{batches - batches0:,.0f} / {(size - size0) / max(batches - batches0, 1):.1f}",
            ],
            ["freshness p50 under the burst (ms, bucket estimate)", f.get("p50_ms")],
            ["freshness p99 under the burst (ms, bucket estimate)", f.get("p99_ms")],
            ["time until 50 % / 90 % / 99 % processed (ms, client-side)", client],
            ["freshness mean under the burst (ms, exact sum/count)", f.get("mean_ms")],
        ],
    }


@contextlib.contextmanager
def running_system(args: argparse.Namespace, phases: Phases, workers: int) -> Iterator[System]:
    """The system in a temporary directory, started; everything stopped by PID on the way out
    (the directory kept with --keep or after a failure)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"streamrec-bench-{args.label}-"))
    (tmp / "artifacts").mkdir()  # the workers serve <artifact_dir>/current
    (tmp / "artifacts" / "current").symlink_to(args.artifacts, target_is_directory=True)
    given = {"partitions": args.partitions, "redis_cluster_nodes": args.redis_cluster_nodes}
    given |= {"triton_start_timeout": args.triton_timeout, "run_dir": tmp / "run"}
    embedded = dict.fromkeys(("kafka_bootstrap", "redis_url", "triton_url"))
    live = System(args, Settings(**embedded, **given, artifact_dir=tmp / "artifacts"), phases)
    try:
        live.start(workers)
        yield live
    except BaseException:
        args.keep = True
        raise
    finally:
        live.workers.stop_all()
        with contextlib.suppress(AttributeError, RuntimeError):
            live.producer.close()  # before the broker goes
        live.stack.down()
        if args.keep:
            phases.log(f"directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# --- report ----------------------------------------------------------------------------------


def table(title: str, text: str, headers: str, rows: list[list[Any]]) -> list[str]:
    """A section of a report: its title, text and table (`headers` separated by |)."""
    return [f"## {title}", "", text, "", markdown_table(headers.split("|"), rows), ""]


def header(r: dict[str, Any], title: str) -> str:
    m = r["machine"]
    return (
        f"# {title}: {r['label']}\n\n{r['started']} · {m.get('cpu_model', m['machine'])} · "
        f"{m['cpus_usable']} CPUs · load average at start {m['load_average_at_start']}, at end "
        f"{r['load_average_at_end']} · Python {m['python']} · commit {m.get('git_commit', '?')} "
        f"· {r['wall_s']:,.0f} s in all."
    )


STEP = "kind rate sent_rps achieved_rps latency_ms.p50 latency_ms.p90 latency_ms.p99 ok expired"
STEP += " error unanswered backlog_growth_per_s send_lag_ms.p99 worker_end_to_end.p99_ms steady"
OVER = "rate achieved_rps latency_ms.p50 latency_ms.p99 ok expired error unanswered"


def report(r: dict[str, Any]) -> str:
    cfg, a, b, p = r["config"], r["artifacts"], r["burst"], r["paced"]
    sweep, over = r["sweep"], r["overload"]
    reasons: dict[str, int] = {}
    for x in sweep["steps"] + over["steps"]:
        for reason, n in x["error_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    best, stop = sweep["highest_sustainable_rps"], sweep["stop_reason"]
    others = "; ".join(f"{n:,}× {reason}" for reason, n in reasons.items())
    ladder, bounds = ", ".join(f"{x:g}" for x in cfg["rates"]), p["histogram"]["bucket_bounds_ms"]
    headers = "step|offered req/s|sent req/s|achieved ok/s|p50 ms|p90 ms|p99 ms|ok|expired|error"
    headers += "|unanswered|backlog growth /s|send lag p99 ms|worker p99 ms|steady"
    headers += f"|p99 ≤ {cfg['slo_ms']:g} ms"
    over_rows = [
        [f"{x['multiple']:g}×", *cells(x, OVER + " backlog_growth_per_s")] for x in over["steps"]
    ]
    lines = [
        header(r, "End-to-end benchmark"),
        "",
        f"Artifacts {a['version']} ({a['data']['items']:,} items, {a['data']['users']:,} users, "
        f"index {a['index']['type']}). Broker, Valkey and tritonserver started by the benchmark; "
        f"{cfg['workers']} stream worker(s), {cfg['partitions']} partitions, {cfg['instances']} "
        "Triton instance(s) per stage. Medians and p99 of one run; ratios from the same run. "
        "bench/README.md explains each table.",
        "",
        *table(
            "1. Interactions: throughput and feature freshness",
            f"Burst of {b['events']:,} interactions ({b['holdout_events']:,} from the hold-out, "
            f"{b['events'] - b['holdout_events']:,} synthetic) produced as fast as possible.",
            "measure|value",
            b["rows"],
        ),
        f"Single interactions one at a time ({cfg['paced']} events, {cfg['paced_gap_ms']:g} ms "
        f"apart; histogram bounds {', '.join(f'{x:g}' for x in bounds)} ms):",
        "",
        markdown_table(["freshness (ms)", "n", "p50", "p90", "p99", "max", "mean"], p["rows"]),
        "",
        *table(
            "2. Requests over Kafka: open-loop rate sweep",
            f"Ladder {ladder} req/s, then up to {cfg['refine']} refinement rate(s); "
            f"{cfg['warmup_s']:g} s of warm-up, then {cfg['duration']:g} s measured. "
            f"{cfg['cold_share']:.0%} unknown users, k={cfg['k']}, temperature 0, deadline "
            f"{cfg['deadline_ms']:,.0f} ms after the scheduled send.",
            headers,
            [cells(x, STEP + " sustainable") for x in sweep["steps"]],
        ),
        f"**Highest steady rate with p99 ≤ {cfg['slo_ms']:g} ms: "
        + (f"{best:,.2f} req/s.**" if best else "none of the rates tried.**")
        + (f" Stopped raising the rate: {stop}." if stop else ""),
        "",
        *table(
            "3. Overload",
            f"Multiples of the {over['base']} rate ({over['base_rps']:,.2f} req/s).",
            "multiple|offered req/s|goodput ok/s|p50 ok ms|p99 ok ms|ok|expired|error|unanswered"
            "|backlog growth /s",
            over_rows,
        ),
        *([f"Answers other than `ok` (all steps): {others}.", ""] if reasons else []),
    ]
    plot = [f"\n![latency against request rate]({Path(r['plot']).name})"] if "plot" in r else []
    return "\n".join(lines + cpu_lines(r) + in_process_lines(r) + phase_lines(r) + plot)


def cpu_lines(r: dict[str, Any]) -> list[str]:
    steps, idle = r["sweep"]["steps"] + r["overload"]["steps"], r["cpu"]["idle (no traffic)"]
    per = [x["cpu"] for x in steps]
    rows = [[role, *(c["cpu_ms"].get(role) for c in per)] for role in ROLES]
    rows.append(["all of the above", *(c["total_cpu_ms"] for c in per)])
    rows.append(["answered requests", *(c["answered"] for c in per)])
    above = [round(sum(c["cpu_ms_above_idle"][k] for k in SERVING), 2) for c in per]
    idle_rows = [[p, idle["percent_of_one_core"][p]] for p in SERVING]
    return [
        *table(
            "4. CPU-ms per request by process",
            "CPU time (user + system) from the start of a step to its last answer, per answer.",
            "|".join(["process", *(f"{x['rate']:g} req/s {x['kind']}" for x in steps)]),
            [*rows, ["serving side above idle", *above]],
        ),
        *table(
            "5. Idle CPU",
            f"No traffic for {r['config']['idle_s']:g} s after the warm-up: % of one core.",
            "process|% of one core",
            [*idle_rows, ["whole machine (busy)", idle["machine_busy"]]],
        ),
    ]


def in_process_lines(r: dict[str, Any]) -> list[str]:
    ip, steps = r["in_process"], r["sweep"]["steps"]
    lat, p50 = "latency_ms.p50 latency_ms.p90 latency_ms.p99", ip["latency_ms"]["p50"]
    rows = [["in-process (LocalRecommender, sequential)", ip["requests"], *cells(ip, lat), 1.0]]
    for x in steps:
        e2e = common.ratio(x["latency_ms"].get("p50"), p50)
        rows.append([f"end to end at {x['rate']:g} req/s", x["ok"], *cells(x, lat), e2e])
    columns = [ip, *steps]
    stages = [[k, *(c["stages_p50_ms"].get(k) for c in columns)] for k in ip["stages_p50_ms"]]
    stages.append(["sum of stages", *(round(sum(c["stages_p50_ms"].values()), 3) for c in columns)])
    stages.append(["outside the stages", *(c["outside_stages_p50_ms"] for c in columns)])
    stages.append(["end to end (p50)", *(c["latency_ms"].get("p50") for c in columns)])
    return [
        *table(
            "6. In-process graph vs end to end (same requests, same Valkey state)",
            "After the stream workers stopped: the lowest rate's requests, one by one, in-process.",
            "runtime|requests|p50 ms|p90 ms|p99 ms|e2e p50 / in-process p50",
            rows,
        ),
        "Answers: the in-process top-k equals the served one on {equal}/{checked} requests "
        "(same request, same state).".format(**ip["parity"]),
        "",
        *table(
            "7. Per-stage medians (ms, from the responses' `stages`)",
            "Outside the stages: Kafka both ways, batching, Avro, gRPC, Triton's scheduling.",
            "|".join(["stage", "in-process", *(f"{x['rate']:g} req/s" for x in steps)]),
            stages,
        ),
    ]


def phase_lines(r: dict[str, Any]) -> list[str]:
    cpu, pct = r["cpu"].values(), [c["percent_of_one_core"] for c in r["cpu"].values()]
    rows = [
        [p, *(c.get(p) for c in pct)]
        for p in sorted(ROLES, key=lambda p: -max(c.get(p, 0) for c in pct))
    ]
    rows.append(["all of the above", *(c["ours_total"] for c in cpu)])
    rows.append(["whole machine (busy)", *(c["machine_busy"] for c in cpu)])
    rows.append(["other work on the machine", *(c["others"] for c in cpu)])
    return [
        *table(
            "8. CPU by process (% of one core, mean over each phase)",
            f"{r['machine']['cpus_usable']} CPUs on the machine; 'bench consumer' is this process.",
            "|".join(["process", *r["cpu"]]),
            rows,
        ),
        "## Phases (s)",
        "",
        markdown_table(["phase", "seconds"], [*r["phases"].items()]),
    ]


# --- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    phases, r = Phases(), {"label": args.label, "machine": common.machine_info()}
    r |= {"started": datetime.now().astimezone().isoformat(timespec="seconds")}
    with running_system(args, phases, args.workers) as live:
        reader = Recorder(live.settings, live.bootstrap, READER_BACKOFF_S)
        with phases.phase("warm up"), reader as live.recorder:
            live.warm_up("start")
        live.measured("idle (no traffic)", f"({args.idle_s:g} s)", lambda: time.sleep(args.idle_s))
        gc.collect()
        gc.freeze()  # what the setup built is never collected: shorter pauses from here on
        r["burst"] = live.measured(
            "interaction burst", f"({args.events:,})", lambda: live.burst("e2e")
        )
        r["paced"] = live.measured("single interactions", f"({args.paced})", live.paced)
        with Recorder(live.settings, live.bootstrap, READER_BACKOFF_S) as live.recorder:
            with phases.phase("response reader", "(joins its group)"):
                live.warm_up("reader")
            live.generator = loadgen.Generator(client_config(live.settings, live.bootstrap))
            r["sweep"] = live.sweep()
            r["overload"] = live.overload(r["sweep"])
            live.generator.close()
        with phases.phase("stop stream workers"):  # the in-process graph gets their machine
            live.workers.stop_all()
        lowest = r["sweep"]["steps"][0]
        r["in_process"] = live.measured(
            "in-process sequential", "", lambda: live.in_process(lowest)
        )
    manifest = Artifacts(args.artifacts).manifest
    r |= {"config": vars(args), "artifacts": {k: manifest[k] for k in ("version", "data", "index")}}
    r |= {
        "cpu": live.cpu,
        "phases": phases.seconds,
        "wall_s": round(time.perf_counter() - phases.started, 1),
    }
    return r | {"load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


def plot_latency(r: dict[str, Any], path: Path) -> str:
    """p50 and p99 of the ok answers (log scale) against the offered rate, sweep and overload;
    the in-process p50 and the p99 target as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(r["sweep"]["steps"] + r["overload"]["steps"], key=lambda x: x["rate"])
    fig, ax = plt.subplots(figsize=(9.6, 6.0))
    for name, color in (("p50", "tab:blue"), ("p99", "tab:red")):
        points = [(s["rate"], s["latency_ms"][name]) for s in steps if s["latency_ms"].get(name)]
        ax.plot(*zip(*points, strict=True), "o-", color=color, label=f"{name} end to end")
    slo, inproc = r["config"]["slo_ms"], r["in_process"]["latency_ms"]["p50"]
    ax.axhline(slo, color="tab:green", linestyle="--", label=f"p99 target {slo:g} ms")
    ax.axhline(inproc, color="grey", linestyle=":", label=f"in-process p50 {inproc:.1f} ms")
    ax.set(yscale="log", xlabel="offered request rate (req/s)", ylabel="latency (ms)")
    ax.set_title(f"End-to-end latency vs request rate ({r['label']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.e2e", __doc__, OPTIONS, {})
    p.add_argument("--quick", action="store_true", help=f"a ~2 minute smoke run: {QUICK}")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**QUICK)  # options given explicitly still win
    args = parse(p, argv)
    args.overload = [float(x) for x in args.overload.split(",")]
    r = run(args)
    r |= {} if args.no_plot else {"plot": plot_latency(r, common.RESULTS / "e2e-latency.png")}
    markdown = report(r := common.public(r))
    paths = common.write_results(f"e2e-{r['label']}", r, markdown)
    common.console.print(markdown, markup=False)
    common.console.print("wrote " + ", ".join(map(str, [*paths, r.get("plot", "")])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
