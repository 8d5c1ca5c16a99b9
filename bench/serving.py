"""The serving graph in-process (batch 1 vs B) and on tritonserver (per layout; N requests in
flight), every answer checked against the in-process reference, on the product's parts (an
EmbeddedStack, `deploy`, serving.client). Method: bench/README.md. Writes
bench/results/serving-<label>.{json,md}; a mismatch fails the run."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import sys
import time
from typing import Any

import numpy as np
import pandas as pd
import psutil
import redis

from bench import common
from bench.common import Block, ratio, summarize, table
from schemas.artifacts import Artifacts
from serving.client import AsyncTritonRecommender, LocalRecommender, TritonRecommender
from serving.operators import GRAPH, decode, request_tensors
from serving.triton_export import LAYOUTS
from streamrec.deploy import deploy
from streamrec.stack import EmbeddedStack

MIB, SCORE_TOLERANCE, P = 2**20, 1e-5, ("p50", "p90", "p99", "mean")
Tensors = dict[str, np.ndarray]
Answers = list[tuple[int, Tensors]]  # (request index, outputs)
OPTIONS = [
    ("--artifacts", common.ARTIFACTS, "a trained version, or a root with `current`"),
    ("--label", None, "results: serving-<label>.* (default: the artifacts' data set)"),
    ("--requests", 320, "distinct requests in the seeded list (10 % cold-start)"),
    ("--batch", 32, "the batch size B compared with 1"),
    ("--batches", 100, "in-process: groups of B requests, 1 by 1 and as a batch"),
    ("--layout-batches", 25, "the same per Triton layout, on both runtimes"),
    ("--layouts", "stages,fused,executor", "Triton layouts, in turn"),
    ("--throughput-layout", "executor", "the layout measured with requests in flight"),
    ("--in-flight", "1,2,4,8,16,32", "requests in flight, a throughput level each"),
    ("--throughput-seconds", 6.0, "measured seconds per throughput level"),
    ("--p99-target-ms", 100.0, "the highest rate within this p99 is reported"),
    ("--seed", 0, "seed of the request list and of the groups"),
    ("--instances", 1, "Triton instances per model"),
    ("--max-batch", 64, "Triton max_batch_size"),
    ("--queue-delay-us", 200, "Triton dynamic batcher's max queue delay"),
    ("--keep", False, "keep the stack's directory (logs)"),
]


def triton_processes(pid: int) -> dict[str, list[int]]:
    """tritonserver and its Python-backend stubs, by model (`stub <model>`)."""
    out = {"tritonserver": [pid]}
    for child in psutil.Process(pid).children(recursive=True):
        found = re.search(r"/([^/\s]+)/\d+/model\.py", " ".join(child.cmdline()))
        out.setdefault(f"stub {found[1]}" if found else f"child {child.pid}", []).append(child.pid)
    return out


def rss_mb(pids: list[int]) -> float:
    return round(sum(psutil.Process(pid).memory_info().rss for pid in pids) / MIB, 1)


class Marks(list):
    """Seconds per part from a product's `step(name)` hook, called as each part starts; a part
    ends at the next mark or at `seconds()`."""

    def __call__(self, name: str) -> None:
        self.append((name, time.perf_counter()))

    def seconds(self) -> list[list[Any]]:
        ends = [t for _, t in self[1:]] + [time.perf_counter()]
        return [[name, round(end - t, 2)] for (name, t), end in zip(self, ends, strict=True)]


class Series:
    """One runtime at one batch size: ms per request (a request's latency at batch 1, a batch's
    wall time / its size otherwise) and every answer with its request index."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self.answers: Answers = []

    def run(self, rec: Any, size: int, tensors: list[Tensors], idx: list[int]) -> None:
        """The requests `idx` on `rec`: one by one (size 1) or as one batch."""
        for part in [[i] for i in idx] if size == 1 else [idx]:
            t0, batch = time.perf_counter(), [tensors[i] for i in part]
            outs = rec.run_batch(batch) if size > 1 else [rec.run(batch[0])]
            self.ms.append((time.perf_counter() - t0) * 1000 / len(part))
            self.answers.extend(zip(part, outs, strict=True))

    def summary(self) -> dict[str, Any]:
        return (s := summarize(self.ms)) | {"rps": round(1000 / s["mean"], 1)}

    def stats(self, op: Any) -> np.ndarray:
        """The operator's stats output of every answer: in, out, ms, batch size."""
        return np.stack([out[op.stats_name()] for _, out in self.answers]).astype(np.float64)

    def formed(self) -> float:
        """The median batch size the first operator ran in, over the requests."""
        return float(np.median(self.stats(GRAPH.operators[0])[:, 3]))

    def stages(self) -> dict[str, dict[str, Any]]:
        """Per stage: ms per request (its call's ms / batch size), candidates in → out."""
        out, total = {}, np.zeros(len(self.answers))
        for op in GRAPH.operators:
            total += (per := (s := self.stats(op))[:, 2] / s[:, 3])
            flow = f"{np.median(s[:, 0]):,.0f} → {np.median(s[:, 1]):,.0f}"
            out[op.name] = summarize(per) | {"flow": flow}
        return out | {"sum_of_stages": summarize(total) | {"flow": ""}}


def difference(ref: Tensors, got: Tensors) -> str | None:
    """Why an answer is not the reference's (items, path, removed exact; scores close), or None."""
    for name in ("items", "path", "removed"):
        if decode(ref[name]) != decode(got[name]):
            return f"{name} {decode(got[name])} != in-process {decode(ref[name])}"
    diff = float(np.max(np.abs(got["item_scores"] - ref["item_scores"]), initial=0.0))
    return f"scores differ by up to {diff:.2e}" if diff > SCORE_TOLERANCE else None


class ServingBench:
    """One run on its own stack: timed phases, the steps' figures, the parity counts."""

    def __init__(self, args: argparse.Namespace, stack: EmbeddedStack) -> None:
        self.args, self.stack, self.artifacts = args, stack, Artifacts(args.artifacts)
        self.r, self.phases = common.run_info(args.label), common.Phases()
        self.sections: dict[str, list[Block]] = {}  # the steps' parts of the report
        self.layouts: dict[str, dict[Any, Any]] = {}
        self.parity: dict[str, list[int]] = {}  # label: [answers, differing]
        self.examples: list[str] = []  # the first differences of each label

    def prepare(self) -> None:
        """Valkey loaded by `deploy`, the in-process runtime with the item features (else loaded
        by the first request), each part timed by the product's step hooks; the requests (known
        users drawn uniformly and 10 % never seen, an hour after the training state's end),
        answered in-process one by one (the reference); the groups of B requests."""
        a, path, load, build = self.args, self.artifacts.path, Marks(), Marks()
        with self.phases.phase("load features"):
            load("import feast")
            import feast  # noqa: F401 (its first import takes seconds)

            load("deploy: state snapshot into Feast and Redis, Triton repository exported")
            self.config = deploy(self.stack.settings, self.stack, path, start=False).config
            self.load_s = load.seconds()
        with self.phases.phase("build in-process runtime"):
            self.local = LocalRecommender(path, self.config, step=build)
            build("item features (first use)")
            len(self.local.runtime.operators[0].items.features)
            self.build_s = build.seconds()
        self.rss = rss_mb([psutil.Process().pid])
        users = pd.read_parquet(self.artifacts.state("user_activity"))
        popular = pd.read_parquet(self.artifacts.state("item_stats"))["popularity_ms"]
        now = int(max(users["last_event_ms"].max(), popular.max())) + 3_600_000
        known, rng = sorted(users["user_id"]), np.random.default_rng(a.seed + 1)
        self.requests = common.requests(known, a.requests, a.seed, 0.1, now, "serving")
        count = max(a.batches, a.layout_batches)
        self.groups = [rng.choice(a.requests, a.batch, False).tolist() for _ in range(count)]
        with self.phases.phase("reference answers"):
            self.tensors = [request_tensors(r) for r in self.requests]
            self.reference = [self.local.run(t) for t in self.tensors]
            for idx in self.groups[:2]:  # warm-up at batch B
                self.local.run_batch([self.tensors[i] for i in idx])
        paths = [(decode(o["path"])[0], o["stats_retrieval"][1]) for o in self.reference]
        self.cold = sum(p == "cold_start" for p, _ in paths)
        self.short = sum(p == "personalized" and n < self.config["candidates"] for p, n in paths)

    def check(self, label: str, answers: Answers) -> None:
        """Every answer against the reference (see `difference`)."""
        problems = [(i, difference(self.reference[i], got)) for i, got in answers]
        problems = [(self.requests[i]["user_id"], p) for i, p in problems if p]
        counts = self.parity.setdefault(label, [0, 0])
        counts[0], counts[1] = counts[0] + len(answers), counts[1] + len(problems)
        self.examples += [f"{label}, {user}: {p}" for user, p in problems[:2]]

    def interleaved(self, runtimes: dict[str, Any], count: int, label: str = "") -> dict:
        """The first `count` groups on every runtime at batch 1 and B, the order rotating per
        group: all see the same background load, so their ratios hold when it drifts."""
        units = [(f"{n} {b}", rec, b) for b in (1, self.args.batch) for n, rec in runtimes.items()]
        series = {name: Series() for name, _, _ in units}
        for j, idx in enumerate(self.groups[:count]):
            for name, rec, size in units[j % len(units) :] + units[: j % len(units)]:
                series[name].run(rec, size, self.tensors, idx)
        for name, s in series.items():
            self.check(label + name, s.answers)
        return series

    def in_process(self) -> None:
        """The in-process graph at batch 1 and batch B over the same groups, interleaved."""
        B = self.args.batch
        with self.phases.phase(f"in-process batch 1 vs {B}"):
            series = self.interleaved({"in-process": self.local}, self.args.batches)
        one, big = series["in-process 1"], series[f"in-process {B}"]
        s1, sb, st1, stb = one.summary(), big.summary(), one.stages(), big.stages()
        rows = [[str(n), s["n"], *(s[k] for k in (*P, "rps"))] for n, s in ((1, s1), (B, sb))]
        rows.append([f"ratio {B} / 1", None, *(ratio(sb[k], s1[k]) for k in (*P, "rps"))])
        stages = []
        for (op, a), b in zip(st1.items(), stb.values(), strict=True):
            stages.append([op, a["p50"], a["p99"], b["p50"], b["p99"], ratio(b["p50"], a["p50"])])
            stages[-1].append(a["flow"])
        headers = f"stage|batch 1 p50|batch 1 p99|batch {B} p50|batch {B} p99|p50 ratio|"
        self.sections["in_process"] = [
            f"## In-process graph: batch 1 vs batch {B} (ms per request)",
            table("batch|calls|p50|p90|p99|mean|req/s", rows),
            "Per stage (ms per request = the stage's time in a call / its batch size):",
            table(headers + "candidates in → out (median)", stages),
        ]

    def layout(self, layout: str) -> None:
        """One tritonserver with `layout`: start-up, Triton vs in-process at batch 1 and B, the
        throughput levels on --throughput-layout, its processes' RSS; then it is stopped."""
        a, path = self.args, self.artifacts.path
        export = {"instances": a.instances, "max_batch": a.max_batch}
        export |= {"queue_delay_us": a.queue_delay_us, "layout": layout}
        with self.phases.phase(f"{layout}: start tritonserver"):
            url = deploy(self.stack.settings, self.stack, path, load=False, **export).triton
        out = self.layouts[layout] = {}
        client, t0 = TritonRecommender(url, timeout=120.0), time.perf_counter()
        client.run(self.tensors[0])  # it loads the item features table
        out["first"] = round(time.perf_counter() - t0, 2)
        Series().run(client, 1, self.tensors, list(range(20)))  # warm-up, then at batch B:
        Series().run(client, a.batch, self.tensors, self.groups[0])
        with self.phases.phase(f"{layout}: Triton vs in-process"):
            runtimes = {"in-process": self.local, "triton": client}
            series = self.interleaved(runtimes, a.layout_batches, f"{layout}: ")
        client.close()
        for b in (1, a.batch):
            local, remote = series[f"in-process {b}"], series[f"triton {b}"]
            out[b] = [local.summary(), remote.summary(), remote.formed()]
        pid = self.stack.services()["triton"].pid
        if layout == a.throughput_layout:
            self.throughput(url, pid)
        rss = {k: rss_mb(pids) for k, pids in triton_processes(pid).items()}
        out["rss"] = rss | {"total": round(sum(rss.values()), 1)}
        self.stack.down(("triton",))

    def throughput(self, url: str, pid: int) -> None:
        """A closed loop per --in-flight level; the highest rate with p99 within the target."""
        groups = {"bench (client)": [psutil.Process().pid]} | triton_processes(pid)
        groups["valkey"] = self.stack.services()["redis"].pids
        levels, target = [], self.args.p99_target_ms
        for n in self.args.in_flight:
            with self.phases.phase(f"throughput: {n} in flight"):
                levels.append(asyncio.run(self.closed_loop(url, n, groups)))
        best = max((lv for lv in levels if lv[4] <= target), key=lambda lv: lv[2], default=None)
        cpu = "".join(f"CPU-ms/req {g}|" for g in [*groups, "total"])
        found = f"**{best[2]:,.1f} req/s** ({best[0]} in flight)." if best else "none."
        self.sections["throughput"] = [
            f"## Throughput on Triton ({self.args.throughput_layout} layout, requests in flight)",
            table(f"in flight|requests|req/s|p50 ms|p99 ms|batch formed|{cpu}cores busy", levels),
            f"Highest rate with p99 ≤ {target:g} ms: {found}",
        ]

    async def closed_loop(self, url: str, in_flight: int, groups: dict) -> list[Any]:
        """`in_flight` asyncio workers on one gRPC channel, each sending its next request when
        its last one is answered; the processes' CPU time over the measured seconds."""
        rec, requests, series = AsyncTritonRecommender(url), itertools.count(), Series()
        measured = self.args.throughput_seconds  # after a warm-up of up to 2 s

        async def worker(until: float, record: bool) -> None:
            while time.perf_counter() < until:
                i, t0 = next(requests) % len(self.tensors), time.perf_counter()
                out = await rec.run(self.tensors[i], 120.0)
                if record:
                    series.ms.append((time.perf_counter() - t0) * 1000)
                    series.answers.append((i, out))

        await rec.connect()
        for record, seconds in ((False, min(2.0, measured / 4)), (True, measured)):
            before = common.cpu_snapshot(groups)
            until = before[0] + seconds
            await asyncio.gather(*(worker(until, record) for _ in range(in_flight)))
        after, n = common.cpu_snapshot(groups), len(series.ms)
        await rec.close()
        self.check(f"throughput {in_flight} in flight", series.answers)
        spent, wall, s = common.cpu_spent(before, after), after[0] - before[0], summarize(series.ms)
        cpu = [round(v * 1000 / n, 2) for v in spent.values()]  # ms per request, by group
        figures = [in_flight, n, round(n / wall, 1), s["p50"], s["p99"], series.formed(), *cpu]
        return figures + [round(sum(cpu), 2), round(sum(spent.values()) / wall, 2)]

    def report(self) -> list[Block]:
        """The report's blocks: the run, the steps' sections, start-up, memory, correctness."""
        a, r, c, d = self.args, self.r, self.config, self.artifacts.manifest["data"]
        ix = self.artifacts.manifest["index"]
        intro = (
            f"Artifacts `{self.artifacts.version}`: {d['items']:,} items, {d['users']:,} users, "
            f"{d['interactions']:,} events, index {ix['type']} (recall vs exact@100 "
            f"{ix.get('recall_vs_exact@100', 0):.3f}). {a.requests} distinct requests, {self.cold} "
            f"of them cold-start users, {self.short} personalized ones for which retrieval found "
            f"fewer than {c['candidates']} items; k=10, temperature 0, {c['candidates']} "
            f"candidates. Triton: {a.instances} instance(s) per model, max_batch_size "
            f"{a.max_batch}, dynamic batching with {a.queue_delay_us} µs queue delay, gRPC."
        )
        rows = []  # Triton vs in-process per layout
        for b in (1, self.args.batch):
            fastest = min(self.layouts, key=lambda n: self.layouts[n][b][1]["p50"])
            for name, lay in self.layouts.items():
                (loc, tri, formed), pair = lay[b], ("p50", "p99")
                figures = [x for k in pair for x in (loc[k], tri[k], ratio(tri[k], loc[k]))]
                rows.append([name, b, *figures, formed, "✔" if name == fastest else ""])
        headers = "layout|batch|in-process p50|Triton p50|ratio p50|in-process p99|Triton p99|"
        headers += "ratio p99|batch Triton formed|fastest"
        title = "## Triton vs in-process at the same batch size, per layout (ms per request)"
        steps = [*self.sections["in_process"], title, table(headers, rows)]
        steps += self.sections["throughput"]
        return [common.header("Serving benchmark", r), intro, *steps] + self.appendix()

    def appendix(self) -> list[Block]:
        """Start-up, memory and correctness."""
        seconds, client = self.phases.seconds, redis.Redis.from_url(self.stack.endpoint("redis"))
        starts = [
            [n, seconds[f"{n}: start tritonserver"], x["first"]] for n, x in self.layouts.items()
        ]
        rss = [["bench process, in-process runtime built", self.rss]]
        rss.append(["bench process, at the end", rss_mb([psutil.Process().pid])])
        for n, x in self.layouts.items():
            rss += [[f"triton {n}: {k}", v] for k, v in x["rss"].items()]
        rss.append(["valkey RSS", rss_mb(self.stack.services()["redis"].pids)])
        rss.append(["valkey used_memory", round(client.info("memory")["used_memory"] / MIB, 1)])
        total, differ = (sum(c[i] for c in self.parity.values()) for i in (0, 1))
        first = ["First differences:", "\n".join(f"- {e}" for e in self.examples[:12])]
        return [
            "## Start-up (s)",
            table("in-process build|seconds", self.build_s),
            table("layout|server start|first request", starts),
            table("load features|seconds", self.load_s),
            table("phase|seconds", [list(kv) for kv in seconds.items()]),
            "## Memory (RSS MiB)",
            table("process|MiB", rss),
            f"Valkey keys: {client.dbsize():,}.",
            "## Correctness",
            f"{total:,} answers checked against the in-process batch-1 reference (items and "
            f"order exact, path, removed counts, scores within 1e-5): **{differ:,} mismatches**.",
            table("answers|checked|differ", [[k, *v] for k, v in self.parity.items()]),
        ] + (first if self.examples else [])


def main(argv: list[str] | None = None) -> int:
    """The steps on a stack of their own (stopped at the end); the report written."""
    p = common.parser("python -m bench.serving", __doc__, OPTIONS)
    args = p.parse_args(argv)
    args.layouts = args.layouts.split(",")
    args.in_flight = common.numbers(p, "--in-flight", args.in_flight, int)
    if set(args.layouts) - set(LAYOUTS) or args.throughput_layout not in args.layouts:
        p.error(f"--layouts: some of {', '.join(LAYOUTS)}, --throughput-layout among them")
    if not 2 <= args.batch <= args.requests or min(args.batches, args.layout_batches) < 1:
        p.error("--batch must be between 2 and --requests, --batches and --layout-batches >= 1")
    args.artifacts = common.artifacts(args.artifacts)
    args.label = args.label or Artifacts(args.artifacts).manifest["dataset"]
    with common.embedded_stack(f"serving-{args.label}", args.keep) as stack:
        b = ServingBench(args, stack)
        b.prepare()
        b.in_process()
        for layout in args.layouts:
            b.layout(layout)
        b.r = common.finished(b.r)
        blocks = b.report()  # Valkey still up: its memory
    r = b.r | {"config": vars(args), "artifacts": b.artifacts.manifest, "parity": b.parity}
    common.publish(f"serving-{args.label}", r | {"report": blocks}, blocks)
    if b.examples:
        common.console.print("[bold red]benchmark failed:[/bold red] answers differ")
    return 1 if b.examples else 0


if __name__ == "__main__":
    sys.exit(main())
