"""The serving graph in-process (batch 1 vs B) and on tritonserver (per layout; N requests in
flight), every answer checked against the in-process reference, on the product's parts (an
EmbeddedStack, `deploy`, serving.client). Method: bench/README.md. Writes
bench/results/serving-<label>.{json,md}; a mismatch fails the run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import redis

from bench.common import console, machine_info, markdown_table, ratio, summarize, write_results
from schemas.artifacts import current_artifacts
from schemas.records import RecommendationRequest
from schemas.settings import Settings
from serving.client import AsyncTritonRecommender, LocalRecommender, TritonRecommender
from serving.operators import GRAPH, decode, request_tensors
from serving.triton_export import LAYOUTS
from streamrec.deploy import deploy
from streamrec.stack import EmbeddedStack
from streamrec.stack.process import StartupError

MIB, SCORE_TOLERANCE, P = 2**20, 1e-5, ("p50", "p90", "p99", "mean")
Tensors = dict[str, np.ndarray]
Answers = list[tuple[int, Tensors]]  # (request index, outputs)
Block = str | dict[str, Any]  # of the report: a paragraph, or a table (headers, rows)


def int_list(text: str) -> list[int]:
    if min(values := [int(v) for v in text.split(",")]) < 1:
        raise argparse.ArgumentTypeError("values must be >= 1")
    return values


OPTIONS = [
    ("--artifacts", Path, ".streamrec/artifacts", "a trained version, or a root with `current`"),
    ("--label", str, None, "results: serving-<label>.* (default: the artifacts' data set)"),
    ("--requests", int, 320, "distinct requests in the seeded list (10 %% cold-start)"),
    ("--batch", int, 32, "the batch size B compared with 1"),
    ("--batches", int, 100, "in-process: groups of B requests, 1 by 1 and as a batch"),
    ("--layout-batches", int, 25, "the same per Triton layout, on both runtimes"),
    ("--layouts", lambda s: s.split(","), "stages,fused,executor", "Triton layouts, in turn"),
    ("--throughput-layout", str, "executor", "the layout measured with requests in flight"),
    ("--in-flight", int_list, "1,2,4,8,16,32", "requests in flight, a throughput level each"),
    ("--throughput-seconds", float, 6.0, "measured seconds per throughput level"),
    ("--p99-target-ms", float, 100.0, "the highest rate within this p99 is reported"),
    ("--seed", int, 0, "seed of the request list and of the groups"),
    ("--instances", int, 1, "Triton instances per model"),
    ("--max-batch", int, 64, "Triton max_batch_size"),
    ("--queue-delay-us", int, 200, "Triton dynamic batcher's max queue delay"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("python -m bench.serving", description=__doc__)
    for flag, kind, default, text in OPTIONS:
        text += "" if default is None else f" (default: {default})"
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--keep", action="store_true", help="keep the stack's directory (logs)")
    args = p.parse_args(argv)
    if set(args.layouts) - set(LAYOUTS) or args.throughput_layout not in args.layouts:
        p.error(f"--layouts: some of {', '.join(LAYOUTS)}, --throughput-layout among them")
    if not 2 <= args.batch <= args.requests or min(args.batches, args.layout_batches) < 1:
        p.error("--batch must be between 2 and --requests, --batches and --layout-batches >= 1")
    return args


def rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / MIB


def triton_processes(pid: int) -> dict[str, list[psutil.Process]]:
    """tritonserver and its Python-backend stubs, by model (`stub <model>`)."""
    out: dict[str, list[psutil.Process]] = {"tritonserver": [psutil.Process(pid)]}
    for child in out["tritonserver"][0].children(recursive=True):
        found = re.search(r"/([^/\s]+)/\d+/model\.py", " ".join(child.cmdline()))
        out.setdefault(f"stub {found[1]}" if found else f"child {child.pid}", []).append(child)
    return out


def cpu_seconds(groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """User + system CPU seconds of each group of processes so far."""
    return {k: sum(sum(p.cpu_times()[:2]) for p in procs) for k, procs in groups.items()}


class Marks(list):
    """Seconds per part from a product's `step(name)` hook, called as each part starts; a part
    ends at the next mark or at `seconds()`."""

    def __call__(self, name: str) -> None:
        self.append((name, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        ends = [t for _, t in self[1:]] + [time.perf_counter()]
        return {name: round(end - t, 2) for (name, t), end in zip(self, ends, strict=True)}


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


def table(headers: str, rows: list[list[Any]]) -> dict[str, Any]:
    """A report table: `|`-separated headers, rows of cells."""
    return {"headers": headers.split("|"), "rows": rows}


class ServingBench:
    """One run on its own stack: timed phases, the steps' figures, the parity counts."""

    def __init__(self, args: argparse.Namespace, stack: EmbeddedStack, artifacts: Path) -> None:
        self.args, self.stack, self.artifacts = args, stack, artifacts
        self.manifest = json.loads((artifacts / "manifest.json").read_text())
        self.t0, self.seconds = time.perf_counter(), {}
        self.machine, self.started = machine_info(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.sections: dict[str, list[Block]] = {}  # the steps' parts of the report
        self.layouts: dict[str, dict[Any, Any]] = {}
        self.parity: dict[str, list[int]] = {}  # label: [answers, differing]
        self.examples: list[str] = []  # the first differences of each label

    def log(self, message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - self.t0:7.1f}s[/dim] {message}")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.log(f"[bold cyan]▶ {name}[/bold cyan]")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.log(f"{name}: {self.seconds[name]:,.1f} s")

    def prepare(self) -> None:
        """Valkey loaded by `deploy`, the in-process runtime with the item features (else loaded
        by the first request), each part timed by the product's step hooks."""
        load, build = Marks(), Marks()
        with self.phase("start valkey"):
            self.stack.up(("redis",))
        with self.phase("load features"):
            load("import feast")
            import feast  # noqa: F401 (its first import takes seconds)

            load("deploy: state snapshot into Feast and Redis, Triton repository exported")
            settings, stack = self.stack.settings, self.stack
            self.config = deploy(settings, stack, self.artifacts, start=False).config
            self.load_s = load.seconds()
        with self.phase("build in-process runtime"):
            self.local = LocalRecommender(self.artifacts, self.config, step=build)
            build("item features (first use)")
            len(self.local.runtime.operators[0].items.features)
            self.build_s = build.seconds()
        self.rss = round(rss_mb(psutil.Process()), 1)

    def answer_reference(self) -> None:
        """Known users drawn uniformly and 10 % never seen, an hour after the training state's
        end, answered in-process one by one; the groups of B requests the steps run."""
        a, state, rng = self.args, self.artifacts / "state", np.random.default_rng(self.args.seed)
        users = pd.read_parquet(state / "user_activity.parquet")
        popular = pd.read_parquet(state / "item_stats.parquet")["popularity_ms"]
        now = int(max(users["last_event_ms"].max(), popular.max())) + 3_600_000
        known, cold = sorted(users["user_id"]), rng.random(a.requests) < 0.1
        ids = [f"bench-unknown-{i}" if c else rng.choice(known) for i, c in enumerate(cold)]
        count = max(a.batches, a.layout_batches)
        self.groups = [rng.choice(a.requests, a.batch, False).tolist() for _ in range(count)]
        with self.phase("reference answers"):
            request = partial(
                RecommendationRequest, k=10, temperature=0.0, seed=1, timestamp_ms=now
            )
            self.requests = [request(u).to_record() for u in ids]
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
        with self.phase(f"in-process batch 1 vs {B}"):
            series = self.interleaved({"in-process": self.local}, self.args.batches)
        one, big = series["in-process 1"], series[f"in-process {B}"]
        s1, sb, st1, stb = one.summary(), big.summary(), one.stages(), big.stages()
        rows = [[str(n), s["n"], *(s[k] for k in (*P, "rps"))] for n, s in ((1, s1), (B, sb))]
        rows.append([f"ratio {B} / 1", None, *(ratio(sb[k], s1[k]) for k in (*P, "rps"))])
        stages = [[op, a["p50"], a["p99"], b["p50"], b["p99"], ratio(b["p50"], a["p50"]), a["flow"]]
                  for (op, a), b in zip(st1.items(), stb.values(), strict=True)]  # fmt: skip
        self.sections["in_process"] = [
            f"## In-process graph: batch 1 vs batch {B} (ms per request)",
            table("batch|calls|p50|p90|p99|mean|req/s", rows),
            "Per stage (ms per request = the stage's time in a call / its batch size):",
            table(f"stage|batch 1 p50|batch 1 p99|batch {B} p50|batch {B} p99|p50 ratio|"
                  "candidates in → out (median)", stages),
        ]  # fmt: skip

    def layout(self, layout: str) -> None:
        """One tritonserver with `layout`: start-up, Triton vs in-process at batch 1 and B, the
        throughput levels on --throughput-layout, its processes' RSS; then it is stopped."""
        a = self.args
        with self.phase(f"{layout}: start tritonserver"):
            url = deploy(self.stack.settings, self.stack, self.artifacts, load=False, layout=layout,
                         instances=a.instances, max_batch=a.max_batch,
                         queue_delay_us=a.queue_delay_us).triton  # fmt: skip
        out = self.layouts[layout] = {}
        client, t0 = TritonRecommender(url, timeout=120.0), time.perf_counter()
        client.run(self.tensors[0])  # it loads the item features table
        out["first"] = round(time.perf_counter() - t0, 2)
        Series().run(client, 1, self.tensors, list(range(20)))  # warm-up, then at batch B:
        Series().run(client, a.batch, self.tensors, self.groups[0])
        with self.phase(f"{layout}: Triton vs in-process"):
            runtimes = {"in-process": self.local, "triton": client}
            series = self.interleaved(runtimes, a.layout_batches, f"{layout}: ")
        client.close()
        for b in (1, a.batch):
            local, remote = series[f"in-process {b}"], series[f"triton {b}"]
            out[b] = [local.summary(), remote.summary(), remote.formed()]
        pid = self.stack.services()["triton"].pid
        if layout == a.throughput_layout:
            self.throughput(url, pid)
        rss = {k: round(sum(map(rss_mb, ps)), 1) for k, ps in triton_processes(pid).items()}
        out["rss"] = rss | {"total": round(sum(rss.values()), 1)}
        self.stack.down(("triton",))

    def throughput(self, url: str, pid: int) -> None:
        """A closed loop per --in-flight level; the highest rate with p99 within the target."""
        groups = {"bench (client)": [psutil.Process()]} | triton_processes(pid)
        groups["valkey"] = [psutil.Process(p) for p in self.stack.services()["redis"].pids]
        levels, target = [], self.args.p99_target_ms
        for n in self.args.in_flight:
            with self.phase(f"throughput: {n} in flight"):
                levels.append(asyncio.run(self.closed_loop(url, n, groups)))
        best = max((lv for lv in levels if lv[4] <= target), key=lambda lv: lv[2], default=None)
        cpu = "".join(f"CPU-ms/req {g}|" for g in [*groups, "total"])
        self.sections["throughput"] = [
            f"## Throughput on Triton ({self.args.throughput_layout} layout, requests in flight)",
            table(f"in flight|requests|req/s|p50 ms|p99 ms|batch formed|{cpu}cores busy", levels),
            f"Highest rate with p99 ≤ {target:g} ms: **{best[2]:,.1f} req/s** ({best[0]} in "
            "flight)." if best else f"No level kept p99 ≤ {target:g} ms.",
        ]  # fmt: skip

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
            before, start = cpu_seconds(groups), time.perf_counter()
            until = start + seconds
            await asyncio.gather(*(worker(until, record) for _ in range(in_flight)))
        wall, after, n = time.perf_counter() - start, cpu_seconds(groups), len(series.ms)
        await rec.close()
        self.check(f"throughput {in_flight} in flight", series.answers)
        cpu = [round((after[k] - before[k]) * 1000 / n, 2) for k in groups]
        busy = round((sum(after.values()) - sum(before.values())) / wall, 2)
        s = summarize(series.ms)
        return [in_flight, n, round(n / wall, 1), s["p50"], s["p99"], series.formed(), *cpu,
                round(sum(cpu), 2), busy]  # fmt: skip

    def header(self) -> list[Block]:
        a, m, d, ix = self.args, self.machine, self.manifest["data"], self.manifest["index"]
        c = self.config
        return [
            f"# Serving benchmark: {a.label}",
            f"{self.started} · {m['cpus_usable']} CPUs "
            f"({m.get('cpu_model')}) · {m['memory_mb'].get('MemTotal', 0) / 1024:,.0f} GiB · "
            f"Python {m['python']} · load average (1/5/15 min) at start "
            f"{m['load_average_at_start']}, at end {[round(x, 2) for x in os.getloadavg()]} · "
            f"commit {m.get('git_commit')}",
            f"Artifacts `{self.manifest['version']}`: {d['items']:,} items, {d['users']:,} users, "
            f"{d['interactions']:,} events, index {ix['type']} (recall vs exact@100 "
            f"{ix.get('recall_vs_exact@100', 0):.3f}). {a.requests} distinct requests, {self.cold} "
            f"of them cold-start users, {self.short} personalized ones for which retrieval found "
            f"fewer than {c['candidates']} items; k=10, temperature 0, {c['candidates']} "
            f"candidates. Triton: {a.instances} instance(s) per model, max_batch_size "
            f"{a.max_batch}, dynamic batching with {a.queue_delay_us} µs queue delay, gRPC.",
        ]

    def layout_section(self) -> list[Block]:
        rows = []
        for b in (1, self.args.batch):
            fastest = min(self.layouts, key=lambda n: self.layouts[n][b][1]["p50"])
            for name, lay in self.layouts.items():
                (loc, tri, formed), pair = lay[b], ("p50", "p99")
                figures = [x for k in pair for x in (loc[k], tri[k], ratio(tri[k], loc[k]))]
                rows.append([name, b, *figures, formed, "✔" if name == fastest else ""])
        return [
            "## Triton vs in-process at the same batch size, per layout (ms per request)",
            table("layout|batch|in-process p50|Triton p50|ratio p50|in-process p99|Triton p99|"
                  "ratio p99|batch Triton formed|fastest", rows),
        ]  # fmt: skip

    def startup(self) -> list[Block]:
        seconds, lays = self.seconds, self.layouts
        starts = [[n, seconds[f"{n}: start tritonserver"], x["first"]] for n, x in lays.items()]
        return [
            "## Start-up (s)",
            table("in-process build|seconds", [list(kv) for kv in self.build_s.items()]),
            table("layout|server start|first request", starts),
            table("load features|seconds", [list(kv) for kv in self.load_s.items()]),
            table("phase|seconds", [list(kv) for kv in self.seconds.items()]),
        ]

    def memory(self) -> list[Block]:
        client = redis.Redis.from_url(self.stack.endpoint("redis"))
        valkey = sum(rss_mb(psutil.Process(p)) for p in self.stack.services()["redis"].pids)
        used = client.info("memory")["used_memory"] / MIB
        rows = [["bench process, in-process runtime built", self.rss],
                ["bench process, at the end", round(rss_mb(psutil.Process()), 1)]]  # fmt: skip
        for n, x in self.layouts.items():
            rows += [[f"triton {n}: {k}", v] for k, v in x["rss"].items()]
        rows += [["valkey RSS", round(valkey, 1)], ["valkey used_memory", round(used, 1)]]
        keys = f"Valkey keys: {client.dbsize():,}."
        return ["## Memory (RSS MiB)", table("process|MiB", rows), keys]

    def correctness(self) -> list[Block]:
        total, differ = (sum(c[i] for c in self.parity.values()) for i in (0, 1))
        first = ["First differences:", "\n".join(f"- {e}" for e in self.examples[:12])]
        return [
            "## Correctness",
            f"{total:,} answers checked against the in-process batch-1 reference (items and "
            f"order exact, path, removed counts, scores within 1e-5): **{differ:,} mismatches**.",
            table("answers|checked|differ", [[k, *v] for k, v in self.parity.items()]),
        ] + (first if self.examples else [])

    def report(self) -> list[Block]:
        s = self.sections
        return (self.header() + s["in_process"] + self.layout_section() + s["throughput"]
                + self.startup() + self.memory() + self.correctness())  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """The steps on a stack of their own (stopped at the end); the report written."""
    args = parse_args(argv)
    os.environ.pop("STREAMREC_REDIS_URL", None)  # the operators would prefer it to the stack's
    run_dir = Path(tempfile.mkdtemp(prefix="streamrec-bench-serving-"))
    settings = Settings(run_dir=run_dir, kafka_bootstrap=None, redis_url=None, triton_url=None)
    try:
        path = args.artifacts
        path = path if (path / "manifest.json").exists() else current_artifacts(path)
        b = ServingBench(args, EmbeddedStack(settings), path.resolve())
        args.label = args.label or b.manifest["dataset"]
        b.prepare()
        b.answer_reference()
        b.in_process()
        for layout in args.layouts:
            b.layout(layout)
        blocks = b.report()
    except (FileNotFoundError, StartupError) as e:
        console.print(f"[bold red]benchmark failed:[/bold red] {e}")
        return 1
    finally:
        stopped = ", ".join(EmbeddedStack(settings).down())
        console.print(f"stopped {stopped}; run directory {run_dir}")
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    render = [x if isinstance(x, str) else markdown_table(x["headers"], x["rows"]) for x in blocks]
    result = {"config": vars(args), "artifacts": b.manifest, "parity": b.parity, "report": blocks}
    paths = write_results(f"serving-{args.label}", result, "\n\n".join(render))
    console.print("\n\n".join(render), markup=False)
    console.print(f"wrote {paths[0]} and {paths[1]}")
    if b.examples:
        console.print("[bold red]benchmark failed:[/bold red] answers differ (see Correctness)")
    return 1 if b.examples else 0


if __name__ == "__main__":
    sys.exit(main())
