"""Serving benchmark: the operator graph in-process and on tritonserver (gRPC), one data set.

    .venv/bin/python -m bench.serving                       # ML-100K (trains once, cached)
    .venv/bin/python -m bench.serving --data synthetic:50000,1000000,1000000

One run: artifacts (reused from `bench/.work/<data>/` or trained there in a child process) →
Valkey + feature load → in-process runtime → a fixed, seeded request list (known users and ~10 %
unknown ones, k=10, temperature 0), answered once in-process one by one: the reference → then

1. the in-process graph at batch 1 and batch B (default 32) over the same groups of requests,
   interleaved: ms per request and per stage (from the `stats_<op>` outputs);
2. per Triton layout (stages, fused, executor: one tritonserver after another on the same
   Valkey), Triton vs in-process at batch 1 and B, interleaved group by group;
3. on the executor layout, N requests in flight (closed loop, asyncio gRPC): req/s, p50, p99,
   the highest rate with p99 within the target, CPU-ms per request by process;
4. every answer of every step checked against the reference (items exact, path and removed
   counts equal, scores within 1e-5)

→ `bench/results/serving-<label>.{json,md}`. Servers run on free 127.0.0.1 ports in a temporary
directory and are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import (
    ROOT,
    WORK,
    MemorySampler,
    Phases,
    children,
    cmdline,
    console,
    fmt,
    full_gc_ms,
    machine_info,
    markdown_table,
    public,
    ratio,
    rss_mb,
    summarize,
    write_results,
)
from schemas.records import RecommendationRequest

# A fast training configuration for large synthetic catalogs (the model quality is not the
# point of this benchmark; the catalog size is).
FAST_TRAIN = {
    "retrieval_epochs": 1,
    "ranker_epochs": 1,
    "eval_points_per_user": 1,
    "eval_max_users": 200,
}
META = "bench-meta.json"  # written next to the artifacts by the training child
SCORE_TOLERANCE = 1e-5
Tensors = dict[str, np.ndarray]


class BenchmarkFailure(RuntimeError):
    pass


# --- arguments -------------------------------------------------------------------------------


def _ints(p: argparse.ArgumentParser, text: str, flag: str) -> list[int]:
    try:
        values = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        p.error(f"{flag} takes comma-separated integers")
    if not values or min(values) < 1:
        p.error(f"{flag} values must be >= 1")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from serving.triton_export import LAYOUTS

    p = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description=(
            "The streamrec serving graph in-process (batch 1 vs batch B) and on tritonserver "
            "(per model layout, vs in-process at the same batch size; throughput with N "
            "requests in flight, CPU per process), every answer checked against in-process. "
            "Writes bench/results/serving-<label>.json and .md."
        ),
    )
    p.add_argument(
        "--data",
        default="ml-100k",
        help="ml-100k (default), synthetic:USERS,ITEMS,EVENTS[,SEED], or a RecBole directory",
    )
    p.add_argument(
        "--artifacts",
        type=Path,
        help="a trained artifact version (or an artifact root with `current`) to reuse; "
        "default: train once into bench/.work/<data>/artifacts and reuse that",
    )
    p.add_argument("--retrain", action="store_true", help="train again even if cached")
    p.add_argument(
        "--train-config",
        choices=("auto", "fast", "default"),
        default="auto",
        help="fast = 1 retrieval epoch, 1 ranker epoch, evaluation on 200 users x 1 point; "
        "auto = default for ml-100k, fast otherwise",
    )
    p.add_argument("--requests", type=int, default=320, help="distinct requests in the list")
    p.add_argument("--batch", type=int, default=32, help="the batch size compared with 1")
    p.add_argument(
        "--batches",
        type=int,
        default=100,
        help="in-process step: groups of --batch requests (drawn from the list), each run "
        "one by one and as one batch",
    )
    p.add_argument("--layout-batches", type=int, default=25, help="the same, per Triton layout")
    p.add_argument(
        "--layouts",
        default="stages,fused,executor",
        help=f"Triton model layouts, run one after another ({', '.join(LAYOUTS)})",
    )
    p.add_argument(
        "--throughput-layout",
        default="executor",
        help="the layout whose server is also measured with requests in flight",
    )
    p.add_argument(
        "--in-flight", default="1,2,4,8,16,32", help="requests in flight per throughput level"
    )
    p.add_argument(
        "--throughput-seconds", type=float, default=6.0, help="measured seconds per level"
    )
    p.add_argument("--p99-target-ms", type=float, default=100.0)
    p.add_argument("--warmup", type=int, default=20, help="warm-up requests per Triton server")
    p.add_argument("--cold-share", type=float, default=0.1, help="share of unknown users")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the request list and groups")
    p.add_argument(
        "--now-ms",
        type=int,
        help="request timestamp (default: one hour after the data's last event)",
    )
    p.add_argument("--instances", type=int, default=1, help="Triton instances per model")
    p.add_argument("--max-batch", type=int, default=64, help="Triton max_batch_size")
    p.add_argument(
        "--queue-delay-us", type=int, default=200, help="dynamic batcher max queue delay"
    )
    p.add_argument(
        "--triton-timeout", type=float, default=900.0, help="tritonserver start-up limit (s)"
    )
    p.add_argument(
        "--client-timeout", type=float, default=120.0, help="per-request gRPC timeout (s)"
    )
    p.add_argument("--label", help="result name suffix (default: from --data)")
    p.add_argument("--keep", action="store_true", help="keep the temporary server directory (logs)")
    args = p.parse_args(argv)
    args.in_flight = _ints(p, args.in_flight, "--in-flight")
    args.layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    if not args.layouts or set(args.layouts) - set(LAYOUTS):
        p.error(f"--layouts takes some of {', '.join(LAYOUTS)}")
    if args.throughput_layout not in args.layouts:
        p.error("--throughput-layout must be one of --layouts")
    if min(args.requests, args.batches, args.layout_batches) < 1:
        p.error("--requests, --batches and --layout-batches must be >= 1")
    if not 2 <= args.batch <= args.requests:
        p.error("--batch must be between 2 and --requests")
    if args.warmup < 0 or args.throughput_seconds <= 0:
        p.error("--warmup must be >= 0 and --throughput-seconds > 0")
    if not 0.0 <= args.cold_share <= 1.0:
        p.error("--cold-share must be in [0, 1]")
    return args


def data_label(spec: str) -> str:
    """A file-name-safe name of a data spec: ml-100k, synthetic-50000-1000000-1000000, ..."""
    path = Path(spec)
    if not spec.startswith("synthetic:") and spec != "ml-100k" and path.is_dir():
        spec = path.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-")


def data_dir() -> Path:
    return Path(os.environ.get("STREAMREC_DATA_DIR", ROOT / ".streamrec" / "data"))


# --- artifacts -------------------------------------------------------------------------------


def _train_worker(spec: str, artifact_root: str, cache: str, fast: bool) -> None:
    """In a child process (so TensorFlow's memory is gone before serving starts)."""
    import platform

    from models.data import load
    from models.train import TrainConfig, train

    t0 = time.perf_counter()
    marks: list[tuple[float, str]] = []

    def step(message: str) -> None:
        now = time.perf_counter()
        marks.append((now, message))
        console.print(f"[dim]  train {now - t0:7.1f}s[/dim] {message}")
        sys.stdout.flush()

    step(f"loading data {spec}")
    dataset = load(spec, Path(cache))
    loaded = time.perf_counter()
    inter = dataset.interactions
    console.print(
        f"[dim]  train {loaded - t0:7.1f}s[/dim] data: {len(inter):,} events, "
        f"{inter['user_id'].nunique():,} users, {len(dataset.items):,} items"
    )
    cfg = TrainConfig(**FAST_TRAIN) if fast else TrainConfig()
    out = train(dataset, Path(artifact_root), cfg, step=step)
    end = time.perf_counter()
    steps = [
        {"step": m, "seconds": round(nxt - t, 2)}
        for (t, m), (nxt, _) in zip(marks, [*marks[1:], (end, "")], strict=True)
    ]
    meta = {
        "data_spec": spec,
        "dataset": dataset.name,
        "data_end_s": int(inter["timestamp"].max()),
        "events": len(inter),
        "users": int(inter["user_id"].nunique()),
        "items": len(dataset.items),
        "train_config": "fast" if fast else "default",
        "load_data_s": round(loaded - t0, 2),
        "train_s": round(end - loaded, 2),
        "steps": steps,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "python": platform.python_version(),
    }
    (out / META).write_text(json.dumps(meta, indent=2))


def _resolve(path: Path) -> Path:
    path = path.expanduser()
    if (path / "manifest.json").exists():
        return path.resolve()
    if (path / "current" / "manifest.json").exists():
        return (path / "current").resolve()
    raise BenchmarkFailure(f"{path} holds no manifest.json (nor current/manifest.json)")


def ensure_artifacts(args: argparse.Namespace, phases: Phases) -> Path:
    if args.artifacts:
        artifacts = _resolve(args.artifacts)
        phases.log(f"reusing artifacts {artifacts}")
        return artifacts
    root = WORK / data_label(args.data) / "artifacts"
    if not args.retrain and (root / "current" / "manifest.json").exists():
        artifacts = (root / "current").resolve()
        phases.log(f"reusing cached artifacts {artifacts} (--retrain to train again)")
        return artifacts
    fast = args.train_config == "fast" or (args.train_config == "auto" and args.data != "ml-100k")
    root.mkdir(parents=True, exist_ok=True)
    with phases.phase("train", f"{args.data} ({'fast' if fast else 'default'} config) → {root}"):
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(
            target=_train_worker,
            args=(
                args.data,
                str(root),
                str(data_dir()),
                fast,
            ),
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise BenchmarkFailure(f"training failed (exit code {child.exitcode})")
    return (root / "current").resolve()


def artifact_meta(artifacts: Path) -> dict[str, Any]:
    manifest = json.loads((artifacts / "manifest.json").read_text())
    meta_path = artifacts / META
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    sizes = {
        p.name: round(p.stat().st_size / 2**20, 1)
        for p in sorted(artifacts.iterdir())
        if p.is_file() and p.suffix in (".faiss", ".json", ".onnx")
    }
    return {
        "path": str(artifacts),
        "version": manifest["version"],
        "dataset": manifest["dataset"],
        "items": manifest["data"]["items"],
        "users": manifest["data"]["users"],
        "interactions": manifest["data"]["interactions"],
        "index": manifest["index"],
        "train_seconds": manifest.get("train_seconds"),
        "train_config": manifest.get("config"),
        "file_sizes_mb": sizes,
        "training": meta,
    }


def default_now_ms(artifacts: Path, meta: dict[str, Any]) -> tuple[int, str]:
    """One hour after the data's last event (from the training meta), else after the state."""
    import pandas as pd

    end_s = meta.get("training", {}).get("data_end_s")
    if end_s:
        return (int(end_s) + 3600) * 1000, "last event of the data + 1 h"
    state = artifacts / "state"
    last = max(
        int(pd.read_parquet(state / "user_activity.parquet")["last_event_ms"].max()),
        int(pd.read_parquet(state / "item_stats.parquet")["popularity_ms"].max()),
    )
    return last + 3_600_000, "last event of the training state + 1 h (no bench meta)"


@contextlib.contextmanager
def timed_calls(targets: list[tuple[Any, str, str]], seconds: dict[str, float]):
    """Time every call of `owner.attr` (as `label`) inside the block; nothing else changes."""
    originals = []
    for owner, attr, label in targets:
        fn = getattr(owner, attr)

        def wrapper(*a, _fn=fn, _label=label, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                seconds[_label] = round(seconds.get(_label, 0.0) + time.perf_counter() - t0, 2)

        setattr(owner, attr, wrapper)
        originals.append((owner, attr, fn))
    try:
        yield
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)


# --- requests --------------------------------------------------------------------------------


def build_requests(
    artifacts: Path, n: int, cold_share: float, k: int, now_ms: int, seed: int, prefix: str
) -> list[dict]:
    """`n` requests: known users (with stream activity in the training state) drawn uniformly,
    and a `cold_share` of users the system has never seen."""
    import pandas as pd

    known = sorted(pd.read_parquet(artifacts / "state" / "user_activity.parquet")["user_id"])
    rng = np.random.default_rng(seed)
    cold = rng.random(n) < cold_share
    picks = rng.integers(0, len(known), n)
    return [
        RecommendationRequest(
            f"bench-unknown-{prefix}-{i}" if cold[i] else known[picks[i]],
            k,
            temperature=0.0,
            seed=1,
            timestamp_ms=now_ms,
            request_id=f"{prefix}-{i}",
        ).to_record()
        for i in range(n)
    ]


# --- runtimes --------------------------------------------------------------------------------


def build_local(artifacts: Path, config: dict[str, Any], phases: Phases):
    """A LocalRecommender whose item table and operators are built one by one, each timed."""
    from serving.client import LocalRecommender, serving_config
    from serving.graph import LocalRuntime
    from serving.operators import GRAPH

    seconds: dict[str, float] = {}

    def timed(name: str, build: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        built = build()
        seconds[name] = round(time.perf_counter() - t0, 2)
        phases.log(f"  built {name} in {seconds[name]:,.2f} s")
        return built

    class TimedLocalRecommender(LocalRecommender):
        # Mirrors LocalRecommender.__init__ (GRAPH.build), with a timer around each part.
        def __init__(self, artifacts: Path, config: dict[str, Any]):
            full = serving_config(config)
            items = timed("item table", partial(GRAPH.items, artifacts, full))
            ops = [timed(op.name, partial(op, artifacts, full, items)) for op in GRAPH.operators]
            # Otherwise loaded by the first request (on Triton too: see first_request_s).
            timed("item features (first use)", lambda: items.features)
            self.items = items
            self.runtime = LocalRuntime(GRAPH, ops)
            self.version = json.loads((artifacts / "manifest.json").read_text())["version"]
            self.build_seconds = seconds

    return TimedLocalRecommender(artifacts, config)


_LOG_LINE = re.compile(
    r"^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+) .*?\"(loading: |successfully loaded ')"
)


def triton_load_seconds(log: Path) -> dict[str, float]:
    """Seconds from 'loading: <model>' to "successfully loaded '<model>'" in the server log."""
    started: dict[str, float] = {}
    loaded: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = _LOG_LINE.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(2), "%H:%M:%S.%f")
        seconds = t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6
        if m.group(3) == "loading: ":
            name = line.split("loading: ", 1)[1].split(":")[0]
            started.setdefault(name, seconds)
        else:
            name = line.split("successfully loaded '", 1)[1].split("'")[0]
            loaded[name] = seconds
    return {
        name: round((loaded[name] - started[name]) % 86400, 2) for name in loaded if name in started
    }


def stub_name(cmd: str, pid: int) -> str:
    """`stub <model>` for a Python-backend stub's command line, else `child <pid>`."""
    m = re.search(r"/([^/\s]+)/\d+/model\.py", cmd)
    return f"stub {m.group(1)}" if m else f"child {pid}"


def triton_memory(pid: int) -> dict[str, float]:
    """RSS of tritonserver and of each Python-backend stub (by model), MiB."""
    out = {"tritonserver": round(rss_mb(pid), 1)}
    for child in children(pid):
        name = stub_name(cmdline(child), child)
        out[name] = round(out.get(name, 0.0) + rss_mb(child), 1)
    out["total"] = round(sum(v for k, v in out.items()), 1)
    return out


def valkey_memory(url: str, pid: int) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    info = client.info("memory")
    out = {
        "rss_mb": round(rss_mb(pid), 1),
        "used_memory_mb": round(info["used_memory"] / 2**20, 1),
        "keys": int(client.dbsize()),
    }
    client.close()
    return out


# --- measurement -----------------------------------------------------------------------------


def request_groups(n_requests: int, size: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` groups of `size` distinct request indices, drawn from the list (seeded)."""
    rng = np.random.default_rng(seed)
    return [rng.choice(n_requests, size=size, replace=False) for _ in range(count)]


@dataclass
class Series:
    """One runtime at one batch size: ms per request (a request's latency at batch 1, a batch's
    wall time / its size otherwise), each call's first outputs (for the stage stats), and
    every answer with its request index."""

    ms: list[float] = field(default_factory=list)
    calls: list[Tensors] = field(default_factory=list)
    answers: list[tuple[int, Tensors]] = field(default_factory=list)

    def add(self, indices: Iterable[int], outputs: list[Tensors], ms: float) -> None:
        self.ms.append(ms)
        self.calls.append(outputs[0])
        self.answers.extend(zip((int(i) for i in indices), outputs, strict=True))

    def summary(self) -> dict[str, Any]:
        """Latency summary of the per-request ms, and req/s = 1000 / mean."""
        s = summarize(self.ms)
        return s | {"calls": len(self.calls), "rps": round(1000 / s["mean"], 1)}


def run_group(rec: Any, size: int, tensors: list[Tensors], idx: np.ndarray, out: Series) -> None:
    """The requests `idx` on `rec`: one by one (size 1) or as one batch."""
    if size == 1:
        for i in idx:
            t0 = time.perf_counter()
            answer = rec.run(tensors[i])
            out.add([i], [answer], (time.perf_counter() - t0) * 1000)
        return
    t0 = time.perf_counter()
    answers = rec.run_batch([tensors[i] for i in idx])
    out.add(idx, answers, (time.perf_counter() - t0) * 1000 / len(idx))


Unit = Callable[[np.ndarray, Series], None]


def measure_interleaved(
    units: dict[str, Unit], groups: list[np.ndarray], phases: Phases
) -> dict[str, Series]:
    """Each group on every unit back to back, the order rotating per group, so that all units
    see the same background load (a 2-core machine shared with others): the ratios between
    them stay meaningful when the load drifts."""
    names = list(units)
    series = {name: Series() for name in names}
    every = max(1, len(groups) // 4)
    for j, idx in enumerate(groups):
        shift = j % len(names)
        for name in names[shift:] + names[:shift]:
            units[name](idx, series[name])
        if (j + 1) % every == 0 or j + 1 == len(groups):
            so_far = ", ".join(f"{n} {np.median(s.ms):,.2f}" for n, s in series.items())
            phases.log(f"  {j + 1}/{len(groups)} groups, ms/request p50 so far: {so_far}")
    return series


def stage_stats(calls: list[Tensors]) -> dict[str, Any]:
    """Per-stage ms per request (a call's stage time / its batch size: p50, p99, mean) and
    candidate counts (median in → out), from the stats_* outputs."""
    from serving.operators import OPERATORS

    out: dict[str, Any] = {}
    total = np.zeros(len(calls))
    for op in OPERATORS:
        stats = np.stack([c[op.stats_name()] for c in calls]).astype(np.float64)
        per_request = stats[:, 2] / stats[:, 3]
        total += per_request
        s = summarize(per_request.tolist())
        out[op.name] = {
            "p50_ms": s["p50"],
            "p99_ms": s["p99"],
            "mean_ms": s["mean"],
            "in_median": float(np.median(stats[:, 0])),
            "out_median": float(np.median(stats[:, 1])),
        }
    s = summarize(total.tolist())
    out["sum_of_stages"] = {"p50_ms": s["p50"], "p99_ms": s["p99"], "mean_ms": s["mean"]}
    return out


def formed_batch(answers: list[tuple[int, Tensors]]) -> float:
    """The median batch size the first operator ran in, over the requests."""
    from serving.operators import OPERATORS

    name = OPERATORS[0].stats_name()
    return float(np.median([out[name][3] for _, out in answers]))


def process_groups(triton_pid: int, valkey_pid: int) -> dict[str, list[psutil.Process]]:
    """The processes whose CPU time the throughput step reports, by role."""
    server = psutil.Process(triton_pid)
    groups = {"bench (client)": [psutil.Process()], "tritonserver": [server]}
    for child in server.children(recursive=True):
        groups.setdefault(stub_name(" ".join(child.cmdline()), child.pid), []).append(child)
    return groups | {"valkey": [psutil.Process(valkey_pid)]}


def cpu_seconds(groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """User + system CPU seconds of each group so far."""
    out = {}
    for name, procs in groups.items():
        out[name] = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                out[name] += times.user + times.system
    return out


async def closed_loop(
    url: str,
    tensors: list[Tensors],
    in_flight: int,
    seconds: float,
    timeout: float,
    groups: dict[str, list[psutil.Process]],
) -> dict[str, Any]:
    """`in_flight` asyncio workers on one gRPC channel, each sending its next request when the
    last one is answered (request i is tensors[i % len]); a short warm-up, then `seconds`
    measured, with the processes' CPU time before and after."""
    from serving.client import AsyncTritonRecommender

    rec = AsyncTritonRecommender(url)
    counter = itertools.count()
    latencies: list[float] = []
    answers: list[tuple[int, Tensors]] = []

    async def worker(until: float, record: bool) -> None:
        while time.perf_counter() < until:
            i = next(counter) % len(tensors)
            t0 = time.perf_counter()
            out = await rec.run(tensors[i], timeout)
            if record:
                latencies.append((time.perf_counter() - t0) * 1000)
                answers.append((i, out))

    try:
        await rec.connect()
        warm_until = time.perf_counter() + min(2.0, seconds / 4)
        await asyncio.gather(*(worker(warm_until, False) for _ in range(in_flight)))
        before = cpu_seconds(groups)
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds, True) for _ in range(in_flight)))
        wall = time.perf_counter() - start
        after = cpu_seconds(groups)
    finally:
        await rec.close()
    used = {name: after[name] - before[name] for name in groups}
    cpu_ms = {name: round(s * 1000 / len(latencies), 2) for name, s in used.items()}
    return {
        "in_flight": in_flight,
        "requests": len(latencies),
        "wall_s": round(wall, 2),
        "rps": round(len(latencies) / wall, 1),
        "latency_ms": summarize(latencies),
        "formed_batch_median": formed_batch(answers),
        "cpu_ms_per_request": cpu_ms | {"total": round(sum(cpu_ms.values()), 2)},
        "cores_busy": round(sum(used.values()) / wall, 2),
        "_answers": answers,
    }


class Parity:
    """Every answer checked against the in-process batch-1 reference: items and their order
    exact, path and removed counts equal, scores within SCORE_TOLERANCE."""

    def __init__(self, reference: list[Tensors], requests: list[dict]):
        self.reference = reference
        self.requests = requests
        self.checked: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.examples: list[str] = []  # the first 2 of each label

    def check(self, label: str, answers: list[tuple[int, Tensors]]) -> None:
        failed = 0
        for i, got in answers:
            problem = difference(self.reference[i], got)
            if problem:
                failed += 1
                if failed <= 2:
                    self.examples.append(f"{label}, {self.requests[i]['user_id']}: {problem}")
        self.checked[label] = self.checked.get(label, 0) + len(answers)
        self.failed[label] = self.failed.get(label, 0) + failed

    def summary(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "failed": self.failed,
            "answers_checked": sum(self.checked.values()),
            "mismatches": sum(self.failed.values()),
            "examples": self.examples,
        }


def difference(ref: Tensors, got: Tensors) -> str | None:
    """How `got` differs from `ref`, or None."""
    from serving.operators import decode

    a, b = decode(ref["items"]), decode(got["items"])
    if a != b:
        return f"items {b} != in-process {a}"
    if decode(ref["path"]) != decode(got["path"]):
        return f"path {decode(got['path'])} != {decode(ref['path'])}"
    if ref["removed"].tolist() != got["removed"].tolist():
        return f"removed {got['removed']} != {ref['removed']}"
    diff = float(np.max(np.abs(got["item_scores"] - ref["item_scores"]), initial=0.0))
    return f"scores differ by up to {diff:.2e}" if diff > SCORE_TOLERANCE else None


# --- steps -----------------------------------------------------------------------------------


@dataclass
class Bench:
    """What the steps share: the started Valkey, the in-process runtime, the request list."""

    args: argparse.Namespace
    phases: Phases
    artifacts: Path
    config: dict[str, Any]
    tmp: Path
    redis: Any  # streamrec.stack.servers.Service
    local: Any  # serving.client.LocalRecommender
    tensors: list[Tensors]
    groups: list[np.ndarray]
    parity: Parity

    def units(self, runtimes: dict[str, Any]) -> dict[str, Unit]:
        """Each runtime at batch 1 and batch B, as `<name> <size>`."""
        return {
            f"{name} {size}": partial(run_group, rec, size, self.tensors)
            for size in (1, self.args.batch)
            for name, rec in runtimes.items()
        }


def in_process_step(b: Bench) -> dict[str, Any]:
    """The in-process graph at batch 1 and batch B over the same groups, interleaved."""
    with b.phases.phase(
        f"in-process batch 1 vs {b.args.batch}",
        f"({b.args.batches} groups of {b.args.batch} requests)",
        measure=True,
    ):
        groups = b.groups[: b.args.batches]
        series = measure_interleaved(b.units({"in-process": b.local}), groups, b.phases)
    out = {}
    for name, s in series.items():
        b.parity.check(name, s.answers)
        out[name.split()[-1]] = {"per_request_ms": s.summary(), "stages": stage_stats(s.calls)}
    return out


def explain_step(b: Bench) -> dict[str, Any]:
    """What explanations cost: every request at batch 1 in-process with and without `explain`
    (alternating which goes first), and the encoded response's size."""
    from schemas.serde import make_serde
    from serving.operators import response_record

    serde = make_serde("responses", "recommendation_response")
    ms: dict[str, list[float]] = {"off": [], "on": []}
    size: dict[str, list[int]] = {"off": [], "on": []}
    identical = 0
    with b.phases.phase("explain off / on", f"({len(b.tensors)} requests, batch 1)", measure=True):
        for n, (request, t) in enumerate(zip(b.parity.requests, b.tensors, strict=True)):
            out = {}
            for mode in ("off", "on") if n % 2 else ("on", "off"):
                tensors = t | {"explain": np.array([int(mode == "on")], np.int32)}
                t0 = time.perf_counter()
                out[mode] = b.local.run(tensors)
                ms[mode].append((time.perf_counter() - t0) * 1000)
                record = response_record(request | {"explain": mode == "on"}, out[mode])
                size[mode].append(len(serde.encode(record)))
            identical += out["on"]["items"].tolist() == out["off"]["items"].tolist()
    return {
        mode: {
            "per_request_ms": summarize(ms[mode]),
            "response_bytes": float(np.median(size[mode])),
        }
        for mode in ms
    } | {"identical_answers": identical, "requests": len(b.tensors)}


def explain_lines(r: dict[str, Any]) -> list[str]:
    e = r.get("explain")
    if not e:
        return []
    rows = [
        [
            mode,
            e[mode]["per_request_ms"]["p50"],
            e[mode]["per_request_ms"]["p99"],
            e[mode]["response_bytes"],
        ]
        for mode in ("off", "on")
    ]
    return [
        "",
        "## Explanations: their cost (in-process, batch 1, alternating)",
        "",
        markdown_table(["explain", "p50 ms", "p99 ms", "response bytes (median)"], rows),
        "",
        f"p50 ratio on/off: {fmt(ratio(rows[1][1], rows[0][1]))}; answers identical with and "
        f"without: {e['identical_answers']} of {e['requests']}.",
    ]


def layout_step(b: Bench, layout: str) -> dict[str, Any]:
    """One tritonserver with `layout`: Triton vs in-process at batch 1 and B, interleaved; the
    throughput step too on --throughput-layout. The server is stopped afterwards."""
    from serving.client import TritonRecommender
    from serving.triton_export import export_repository
    from streamrec.stack.servers import start_triton, stop_service

    root = b.tmp / "triton" / layout
    with b.phases.phase(f"{layout}: start tritonserver", f"(limit {b.args.triton_timeout:.0f} s)"):
        repository = export_repository(
            b.artifacts,
            root / "models",
            b.config,
            instances=b.args.instances,
            layout=layout,
            max_batch=b.args.max_batch,
            queue_delay_us=b.args.queue_delay_us,
        )
        triton = start_triton(root, b.args.triton_timeout, repository=repository)
    try:
        out = {
            "start_s": b.phases.seconds[f"{layout}: start tritonserver"],
            "model_load_s": triton_load_seconds(Path(triton.log)),
            "memory_mb": triton_memory(triton.pid),
        }
        client = TritonRecommender(triton.endpoint, timeout=b.args.client_timeout)
        try:
            out["first_request_s"] = warm_up(b, client)
            out |= compare(b, layout, client)
        finally:
            client.close()
        if layout == b.args.throughput_layout:
            out["throughput"] = throughput_step(b, triton.endpoint, triton.pid)
        out["memory_after_mb"] = triton_memory(triton.pid)
    finally:
        b.phases.log(f"stopping tritonserver (pid {triton.pid})")
        stop_service(triton)
    return out


def warm_up(b: Bench, client: Any) -> float:
    """Seconds of the first request (it loads the item features), then --warmup requests one
    by one and two batches."""
    t0 = time.perf_counter()
    client.run(b.tensors[0])
    first = round(time.perf_counter() - t0, 2)
    for t in b.tensors[: b.args.warmup]:
        client.run(t)
    for idx in b.groups[:2]:
        client.run_batch([b.tensors[i] for i in idx])
    return first


def compare(b: Bench, layout: str, client: Any) -> dict[str, Any]:
    """Triton vs in-process at batch 1 and B on the same groups, interleaved."""
    groups = b.groups[: b.args.layout_batches]
    with b.phases.phase(
        f"{layout}: Triton vs in-process",
        f"({len(groups)} groups of {b.args.batch}, batch 1 and {b.args.batch})",
        measure=True,
    ):
        runtimes = {"in-process": b.local, "triton": client}
        series = measure_interleaved(b.units(runtimes), groups, b.phases)
    for name, s in series.items():
        b.parity.check(f"{layout}: {name}", s.answers)
    out = {}
    for size in (1, b.args.batch):
        local = series[f"in-process {size}"].summary()
        triton = series[f"triton {size}"].summary()
        out[str(size)] = {
            "in_process": local,
            "triton": triton,
            "ratio_p50": ratio(triton["p50"], local["p50"]),
            "ratio_p99": ratio(triton["p99"], local["p99"]),
            "triton_formed_batch_median": formed_batch(series[f"triton {size}"].answers),
        }
    return {"batch": out}


def throughput_step(b: Bench, url: str, triton_pid: int) -> dict[str, Any]:
    """Closed loop with each --in-flight level; the highest rate with p99 within the target."""
    groups = process_groups(triton_pid, b.redis.pid)
    levels = []
    for n in b.args.in_flight:
        with b.phases.phase(
            f"throughput: {n} in flight", f"({b.args.throughput_seconds:g} s)", measure=True
        ):
            level = asyncio.run(
                closed_loop(
                    url,
                    b.tensors,
                    n,
                    b.args.throughput_seconds,
                    b.args.client_timeout,
                    groups,
                )
            )
        b.parity.check(f"throughput {n} in flight", level.pop("_answers"))
        lat = level["latency_ms"]
        b.phases.log(
            f"  {n} in flight: {level['rps']:,.1f} req/s, p50 {lat['p50']:,.1f} ms, "
            f"p99 {lat['p99']:,.1f} ms, {level['cpu_ms_per_request']['total']:,.1f} CPU-ms/req"
        )
        levels.append(level)
    within = [lv for lv in levels if lv["latency_ms"]["p99"] <= b.args.p99_target_ms]
    best = max(within, key=lambda lv: lv["rps"], default=None)
    return {
        "p99_target_ms": b.args.p99_target_ms,
        "levels": levels,
        "best": {"in_flight": best["in_flight"], "rps": best["rps"]} if best else None,
    }


def catalog_step(b: Bench) -> dict[str, Any]:
    """New items at the full catalog, after every answer was checked: the served path
    (`LiveItems._add_items`: feature rows, item tower, index add, vectors) for 1 and 1,000
    items, then `ItemIndex.add` alone, in ms."""
    items = b.local.items
    genres = json.loads((b.artifacts / "manifest.json").read_text()).get("genres") or []
    rng = np.random.default_rng(b.args.seed)
    out: dict[str, Any] = {"items_before": len(items.ids)}
    with b.phases.phase("catalog: add new items"):
        for n in (1, 1000):
            profiles = {
                f"bench-new-{n}-{i}": {
                    "title": f"Bench film {n} {i}",
                    "year": int(rng.integers(1950, 2025)),
                    "genres": list(rng.choice(genres, 2, replace=False)) if genres else [],
                }
                for i in range(n)
            }
            t0 = time.perf_counter()
            items._add_items(profiles)
            out[f"served_add_{n}_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            vectors = rng.normal(size=(n, items.index.index.d)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            t0 = time.perf_counter()
            items.index.add(vectors, [f"bench-index-{n}-{i}" for i in range(n)])
            out[f"index_add_{n}_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return out


def catalog_lines(r: dict[str, Any]) -> list[str]:
    a, c = r["artifacts"], r.get("catalog") or {}
    index = a["index"]
    load = r.get("load_features_s") or {}
    build = r["startup"]["in_process_build_s"]
    first = {name: lay.get("first_request_s") for name, lay in r["layouts"].items()}
    rows = [
        ["duplicate item vectors (bit-identical rows)", _pct(index.get("duplicate_vectors"))],
        ["index recall vs exact @100", index.get("recall_vs_exact@100")],
        ["index build (s)", index.get("build_seconds")],
        ["Feast online load (s)", load.get("load_offline (parquet, apply, write)")],
        ["in-process stage start: item table + first-use features + retrieval (s)",
         round(sum(build.get(k, 0) for k in ("item table", "item features (first use)",
                                             "retrieval")), 2)],
        *[[f"Triton {n}: first answer after start (s)", s] for n, s in first.items()],
        *[[f"{k.replace('_', ' ')}", v] for k, v in c.items() if k != "items_before"],
        ["training (s)", (a.get("training") or {}).get("train_s")],
    ]  # fmt: skip
    return [
        f"## Catalog ({index['type']}, {index['items']:,} items)",
        "",
        markdown_table(["", "value"], rows),
        "",
        "New items (ms): `served add` = the serving process's catalog add (feature rows, item "
        "tower, index add, vectors table); `index add` = `ItemIndex.add` alone.",
        "",
    ]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def load_features_timed(artifacts: Path, url: str, tmp: Path, phases: Phases) -> dict[str, float]:
    """Feast online load + seen/popularity state into Valkey, with its main calls timed."""
    from state.load import load_features

    load_s: dict[str, float] = {}
    with phases.phase("load features", "(Feast online store + seen/popularity state)"):
        t0 = time.perf_counter()
        import feast

        import state.feature_store
        import state.load
        from state.store import RedisState

        load_s["import feast"] = round(time.perf_counter() - t0, 2)
        timed = [
            (state.load, "load_offline", "load_offline (parquet, apply, write)"),
            (feast.FeatureStore, "apply", "  feast apply"),
            (state.feature_store, "write_online_bulk", "  Feast layout bulk write (3 views)"),
            (RedisState, "load", "RedisState.load (seen sets, popularity)"),
        ]
        load_s.update({label: 0.0 for _, _, label in timed})
        with timed_calls(timed, load_s):
            load_features(artifacts, url, repo_dir=tmp / "feature_repo")
    for name, sec in load_s.items():
        phases.log(f"  {name}: {sec:,.1f} s")
    return load_s


def log_parity(parity: dict[str, Any], phases: Phases) -> None:
    if not parity["mismatches"]:
        phases.log(f"[green]parity ok[/green]: {parity['answers_checked']:,} answers")
        return
    failed = ", ".join(f"{label} {n}" for label, n in parity["failed"].items() if n)
    phases.log(
        f"[bold red]parity failed[/bold red]: {parity['mismatches']:,} of "
        f"{parity['answers_checked']:,} answers differ from the reference ({failed}):\n  "
        + "\n  ".join(parity["examples"][:12])
    )


def path_counts(reference: list[Tensors], candidates: int) -> dict[str, int]:
    """Requests per path, and personalized ones whose retrieval found < `candidates` items."""
    from serving.operators import decode

    paths: dict[str, int] = {}
    short = 0
    for out in reference:
        p = decode(out["path"])[0]
        paths[p] = paths.get(p, 0) + 1
        short += p == "personalized" and int(out["stats_retrieval"][1]) < candidates
    return paths | {"personalized_retrieval_short": short}


# --- report ----------------------------------------------------------------------------------


def top_level_steps(steps: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Training steps with their sub-steps (indented messages, e.g. epochs) folded in."""
    out: list[list[Any]] = []
    for s in steps:
        if s["step"].startswith((" ", "data:")) and out:
            out[-1][1] += s["seconds"]
        else:
            out.append([s["step"], s["seconds"]])
    return [(name, round(sec, 2)) for name, sec in out]


def _latency_row(name: str, s: dict[str, Any]) -> list[Any]:
    return [name, s["calls"], s["p50"], s["p90"], s["p99"], s["mean"], s["rps"]]


def header_lines(r: dict[str, Any]) -> list[str]:
    m, a, cfg = r["machine"], r["artifacts"], r["config"]
    return [
        f"# Serving benchmark: {r['label']}",
        "",
        f"{r['started']} · {m['cpus_usable']} CPUs ({m.get('cpu_model', '?')}) · "
        f"{m['memory_mb'].get('MemTotal', 0) / 1024:,.0f} GiB · Python {m['python']} · "
        f"load average (1/5/15 min) at start {m['load_average_at_start']}, at end "
        f"{r.get('load_average_at_end')} · commit {m.get('git_commit', '?')}",
        "",
        f"Artifacts `{a['version']}`: {a['items']:,} items, {a['users']:,} users, "
        f"{a['interactions']:,} events, index {a['index']['type']} "
        f"(recall vs exact@100 {a['index'].get('recall_vs_exact@100', 0):.3f}). "
        f"{cfg['requests']} distinct requests, {r['paths'].get('cold_start', 0)} of them "
        f"cold-start users, {r['paths'].get('personalized_retrieval_short', 0)} personalized "
        f"ones for which retrieval found fewer than {cfg['serving']['candidates']} items; "
        f"k={cfg['k']}, temperature 0, {cfg['serving']['candidates']} candidates. Triton: "
        f"{cfg['instances']} instance(s) per model, max_batch_size {cfg['max_batch']}, "
        f"dynamic batching with {cfg['queue_delay_us']} µs queue delay, gRPC.",
        "",
    ]


def in_process_lines(r: dict[str, Any]) -> list[str]:
    b = str(r["config"]["batch"])
    one, big = r["in_process"]["1"], r["in_process"][b]
    s1, sb = one["per_request_ms"], big["per_request_ms"]
    stages = [
        [
            name,
            one["stages"][name]["p50_ms"],
            one["stages"][name]["p99_ms"],
            big["stages"][name]["p50_ms"],
            big["stages"][name]["p99_ms"],
            ratio(big["stages"][name]["p50_ms"], one["stages"][name]["p50_ms"]),
            f"{one['stages'][name]['in_median']:,.0f} → {one['stages'][name]['out_median']:,.0f}"
            if "in_median" in one["stages"][name]
            else "",
        ]
        for name in one["stages"]
    ]
    return [
        f"## In-process graph: batch 1 vs batch {b} (ms per request)",
        "",
        markdown_table(
            ["batch", "calls", "p50", "p90", "p99", "mean", "req/s"],
            [
                _latency_row("1", s1),
                _latency_row(b, sb),
                [f"ratio {b} / 1", None]
                + [ratio(sb[k], s1[k]) for k in ("p50", "p90", "p99", "mean", "rps")],
            ],
        ),
        "",
        f"The same {sb['calls']} groups of {b} requests ran one by one and as one batch, "
        f"interleaved. Batch 1: each request's latency; batch {b}: the batch's wall time / {b} "
        "(one sample per batch); req/s = 1000 / mean.",
        "",
        "Per stage (ms per request = the stage's time in a call / its batch size, from the "
        "stats_* outputs):",
        "",
        markdown_table(
            [
                "stage",
                "batch 1 p50",
                "batch 1 p99",
                f"batch {b} p50",
                f"batch {b} p99",
                "p50 ratio",
                "candidates in → out (median)",
            ],
            stages,
        ),
        "",
    ]


def layout_lines(r: dict[str, Any]) -> list[str]:
    cfg = r["config"]
    rows = []
    for size in ("1", str(cfg["batch"])):
        for layout, lay in r["layouts"].items():
            c = lay["batch"][size]
            rows.append(
                [
                    layout,
                    int(size),
                    c["in_process"]["p50"],
                    c["triton"]["p50"],
                    c["ratio_p50"],
                    c["in_process"]["p99"],
                    c["triton"]["p99"],
                    c["ratio_p99"],
                    c["triton_formed_batch_median"],
                    "✔" if r["fastest_layout"][size] == layout else "",
                ]
            )
    return [
        "## Triton vs in-process at the same batch size, per layout (ms per request)",
        "",
        markdown_table(
            [
                "layout",
                "batch",
                "in-process p50",
                "Triton p50",
                "ratio p50",
                "in-process p99",
                "Triton p99",
                "ratio p99",
                "batch Triton formed",
                "fastest",
            ],
            rows,
        ),
        "",
        f"One tritonserver per layout, one after another on the same Valkey; per layout "
        f"{cfg['layout_batches']} groups of {cfg['batch']} requests ran on both runtimes, one by "
        f"one and as a batch, interleaved (ratio = Triton / in-process). Triton batch "
        f"{cfg['batch']}: the requests sent at once (async_infer), batched by Triton's dynamic "
        "batcher; `batch Triton formed` = the median batch the first operator ran in. "
        "Fastest = lowest Triton p50 at that batch size. Layouts: executor = one model runs all "
        "six operators; fused = candidates | ranking; stages = one model per operator.",
        "",
    ]


def throughput_lines(r: dict[str, Any]) -> list[str]:
    t, cfg = r["throughput"], r["config"]
    roles = list(t["levels"][0]["cpu_ms_per_request"])
    rows = [
        [
            lv["in_flight"],
            lv["requests"],
            lv["rps"],
            lv["latency_ms"]["p50"],
            lv["latency_ms"]["p99"],
            lv["formed_batch_median"],
            *(lv["cpu_ms_per_request"][role] for role in roles),
            lv["cores_busy"],
        ]
        for lv in t["levels"]
    ]
    best = t["best"]
    verdict = (
        f"Highest rate with p99 ≤ {t['p99_target_ms']:g} ms: **{best['rps']:,.1f} req/s** "
        f"({best['in_flight']} in flight)."
        if best
        else f"No level kept p99 ≤ {t['p99_target_ms']:g} ms."
    )
    return [
        f"## Throughput on Triton ({t['layout']} layout, requests in flight)",
        "",
        markdown_table(
            ["in flight", "requests", "req/s", "p50 ms", "p99 ms", "batch formed"]
            + [f"CPU-ms/req {role}" for role in roles]
            + ["cores busy"],
            rows,
        ),
        "",
        verdict,
        "",
        f"Closed loop: N asyncio workers on one gRPC channel, each sending the next request "
        f"when its last one is answered, {cfg['throughput_seconds']:g} s per level after a "
        "short warm-up. CPU-ms per request: user + system CPU time of each process (psutil) "
        "over the level / requests answered; cores busy = all of it / wall time.",
        "",
    ]


def startup_lines(r: dict[str, Any]) -> list[str]:
    layouts = r["layouts"]
    lines = [
        "## Start-up and phases (s)",
        "",
        markdown_table(
            ["in-process build", "seconds"], list(r["startup"]["in_process_build_s"].items())
        ),
        "",
        markdown_table(
            ["layout", "server start", "first request", "model loads"],
            [
                [
                    name,
                    lay["start_s"],
                    lay["first_request_s"],
                    ", ".join(f"{m} {s:g}" for m, s in lay["model_load_s"].items()),
                ]
                for name, lay in layouts.items()
            ],
        ),
        "",
        "First request: it loads the item features table (in-process: `item features (first "
        "use)`).",
        "",
        markdown_table(
            ["phase", "seconds", "peak RSS bench MiB", "peak RSS all processes MiB"],
            [
                [
                    name,
                    sec,
                    r["memory"]["phases"].get(name, {}).get("peak_rss_self_mb"),
                    r["memory"]["phases"].get(name, {}).get("peak_rss_tree_mb"),
                ]
                for name, sec in r["phases"].items()
            ],
        ),
        "",
    ]
    if r.get("load_features_s"):
        lines += [
            "`load features` broken down (calls timed inside state.load.load_features):",
            "",
            markdown_table(["call", "seconds"], list(r["load_features_s"].items())),
            "",
        ]
    training = r["artifacts"].get("training") or {}
    steps = top_level_steps(training.get("steps") or [])
    if steps:
        lines += [
            f"Training (cached run, {training['train_config']} config): data "
            f"{training['load_data_s']} s, train {training['train_s']} s, peak RSS "
            f"{training.get('peak_rss_mb', 0):,.0f} MiB.",
            "",
            markdown_table(["training step", "seconds"], [[name[:90], sec] for name, sec in steps]),
            "",
        ]
    return lines


def memory_lines(r: dict[str, Any]) -> list[str]:
    mem, a = r["memory"], r["artifacts"]
    rows = [
        ["bench process, in-process runtime built", mem["bench_rss_mb"]],
        ["bench process, at the end", mem["bench_rss_after_mb"]],
    ]
    for layout, lay in r["layouts"].items():
        rows += [[f"triton {layout}: {k}", v] for k, v in lay["memory_after_mb"].items()]
    rows += [
        ["valkey RSS", mem["valkey"]["rss_mb"]],
        ["valkey used_memory", mem["valkey"]["used_memory_mb"]],
    ]
    gc_state = r["gc"]["in_process_runtime_loaded"]
    return [
        "## Memory (RSS MiB)",
        "",
        markdown_table(["process", "MiB"], rows),
        "",
        "Triton: each layout's processes after its measurements (the item features table is "
        "loaded by the first request); right after start-up in the JSON (`memory_mb`).",
        "",
        f"Valkey keys: {mem['valkey']['keys']:,}. Artifact files (MiB): "
        + ", ".join(f"{k} {v:,}" for k, v in a["file_sizes_mb"].items())
        + f". Bench process with the in-process runtime loaded: "
        f"{gc_state['tracked_objects']:,} GC-tracked objects; one full collection takes "
        f"{gc_state['full_collect_ms']:,} ms.",
        "",
    ]


def parity_lines(r: dict[str, Any]) -> list[str]:
    p = r["parity"]
    lines = [
        "## Correctness",
        "",
        f"{p['answers_checked']:,} answers checked against the in-process batch-1 reference "
        "(items and order exact, path, removed counts, scores within 1e-5): "
        f"**{p['mismatches']:,} mismatches**.",
        "",
        markdown_table(
            ["answers", "checked", "differ"],
            [[label, n, p["failed"][label]] for label, n in p["checked"].items()],
        ),
    ]
    if p["examples"]:
        lines += ["", "First differences:", "", *(f"- {e}" for e in p["examples"][:12])]
    return lines


def markdown_report(r: dict[str, Any]) -> str:
    sections = (
        header_lines,
        catalog_lines,
        in_process_lines,
        explain_lines,
        layout_lines,
        throughput_lines,
        startup_lines,
        memory_lines,
        parity_lines,
    )
    return "\n".join(line for section in sections for line in section(r))


# --- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from serving.client import serving_config
    from serving.operators import request_tensors
    from streamrec.stack.servers import start_redis, stop_service

    label = args.label or data_label(args.data)
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    machine = machine_info()
    with MemorySampler() as sampler:
        phases = Phases(sampler)
        phases.log(
            f"[bold]serving benchmark[/bold] {label}: {machine['cpus_usable']} CPUs, "
            f"load average {machine['load_average_at_start']}"
        )
        artifacts = ensure_artifacts(args, phases)
        meta = artifact_meta(artifacts)
        phases.log(
            f"artifacts {meta['version']}: {meta['items']:,} items, {meta['users']:,} users, "
            f"index {meta['index']['type']}"
        )
        now_ms, now_source = (
            (args.now_ms, "--now-ms") if args.now_ms else default_now_ms(artifacts, meta)
        )
        if os.environ.pop("STREAMREC_REDIS_URL", None):
            # The operators prefer it over the exported redis_url (serving/operators.py).
            phases.log("[yellow]ignoring STREAMREC_REDIS_URL: the benchmark has its own[/yellow]")
        tmp = Path(tempfile.mkdtemp(prefix=f"streamrec-bench-{label}-"))
        redis = None
        ok = False
        try:
            with phases.phase("start valkey"):
                redis = start_redis(tmp / "redis", 30)
            phases.log(f"  valkey {redis.endpoint} (pid {redis.pid})")
            load_s = load_features_timed(artifacts, redis.endpoint, tmp, phases)
            config = serving_config({"redis_url": redis.endpoint})
            with phases.phase("build in-process runtime"):
                local = build_local(artifacts, config, phases)
            bench_rss = round(rss_mb(os.getpid()), 1)
            gc_state = full_gc_ms()
            phases.log(
                f"  bench process: {bench_rss:,.0f} MiB, {gc_state['tracked_objects']:,} "
                f"GC-tracked objects, a full collection takes {gc_state['full_collect_ms']} ms"
            )
            groups = request_groups(
                args.requests, args.batch, max(args.batches, args.layout_batches), args.seed
            )
            with phases.phase("reference answers", f"({args.requests} requests, in-process)"):
                requests = build_requests(
                    artifacts, args.requests, args.cold_share, args.k, now_ms, args.seed, "r"
                )
                tensors = [request_tensors(r) for r in requests]
                reference = [local.run(t) for t in tensors]
                for idx in groups[:2]:  # warm-up at batch size B
                    local.run_batch([tensors[i] for i in idx])
            b = Bench(
                args=args,
                phases=phases,
                artifacts=artifacts,
                config=config,
                tmp=tmp,
                redis=redis,
                local=local,
                tensors=tensors,
                groups=groups,
                parity=Parity(reference, requests),
            )
            in_process = in_process_step(b)
            explain = explain_step(b)
            layouts = {layout: layout_step(b, layout) for layout in args.layouts}
            parity = b.parity.summary()
            log_parity(parity, phases)
            catalog = catalog_step(b)
            memory = {
                "bench_rss_mb": bench_rss,
                "bench_rss_after_mb": round(rss_mb(os.getpid()), 1),
                "valkey": valkey_memory(redis.endpoint, redis.pid),
            }
            ok = True
        finally:
            if redis is not None:
                phases.log(f"stopping valkey (pid {redis.pid})")
                stop_service(redis)
            if ok and not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                phases.log(f"server directory kept: {tmp}")

    memory["phases"] = phases.memory
    batch = str(args.batch)
    result = {
        "benchmark": "serving",
        "label": label,
        "started": started,
        "machine": machine,
        "config": {
            "data": args.data,
            "requests": args.requests,
            "batch": args.batch,
            "batches": args.batches,
            "layout_batches": args.layout_batches,
            "layouts": args.layouts,
            "in_flight": args.in_flight,
            "throughput_seconds": args.throughput_seconds,
            "p99_target_ms": args.p99_target_ms,
            "warmup": args.warmup,
            "cold_share": args.cold_share,
            "k": args.k,
            "temperature": 0.0,
            "seed": args.seed,
            "now_ms": now_ms,
            "now_ms_source": now_source,
            "instances": args.instances,
            "max_batch": args.max_batch,
            "queue_delay_us": args.queue_delay_us,
            "client_timeout_s": args.client_timeout,
            "serving": {k: v for k, v in config.items() if k != "redis_url"},
        },
        "artifacts": meta,
        "paths": path_counts(reference, int(config["candidates"])),
        "in_process": in_process,
        "explain": explain,
        "layouts": layouts,
        "fastest_layout": {
            size: min(layouts, key=lambda n: layouts[n]["batch"][size]["triton"]["p50"])
            for size in ("1", batch)
        },
        "throughput": {
            "layout": args.throughput_layout,
            **layouts[args.throughput_layout].pop("throughput"),
        },
        "startup": {"in_process_build_s": local.build_seconds},
        "catalog": catalog,
        "load_features_s": load_s,
        "gc": {"in_process_runtime_loaded": gc_state},
        "phases": phases.seconds,
        "memory": memory,
        "parity": parity,
        "wall_s": round(phases.elapsed(), 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    return public(result)


def main(argv: list[str] | None = None) -> int:
    from streamrec.stack.process import StartupError

    args = parse_args(argv)
    try:
        result = run(args)
    except (BenchmarkFailure, StartupError) as e:
        console.print(f"[bold red]benchmark failed:[/bold red] {e}")
        return 1
    markdown = markdown_report(result)
    json_path, md_path = write_results(f"serving-{result['label']}", result, markdown)
    console.print()
    console.print(markdown, markup=False)
    console.print()
    console.print(
        f"wrote {json_path.relative_to(ROOT)} and {md_path.relative_to(ROOT)} "
        f"({result['wall_s']:,.0f} s in all)"
    )
    if result["parity"]["mismatches"]:
        console.print("[bold red]benchmark failed:[/bold red] answers differ (see Correctness)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
