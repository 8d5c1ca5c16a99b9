"""Serving benchmark: the four-stage graph in-process vs on tritonserver (gRPC), one data set.

    .venv/bin/python -m bench.serving                       # ML-100K (trains once, cached)
    .venv/bin/python -m bench.serving --data synthetic:50000,1000000,1000000

One run: artifacts (reused from `bench/.work/<data>/` or trained there in a child process) →
Valkey + feature load → in-process runtime → Triton repository + tritonserver → a fixed, seeded
request list (known users and ~10 % unknown ones, k=10, temperature 0) → sequential latency of
both runtimes, Triton with concurrent clients, per-stage timings → a check that Triton answers
exactly as the in-process runtime → `bench/results/serving-<data>.{json,md}`.

Servers run on free 127.0.0.1 ports in a temporary directory and are stopped by PID.
"""

from __future__ import annotations

import argparse
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
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    ROOT,
    WORK,
    GcTimer,
    MemorySampler,
    Phases,
    children,
    cmdline,
    console,
    full_gc_ms,
    machine_info,
    markdown_table,
    public,
    ratio,
    rss_mb,
    summarize,
    tree_rss_mb,
    write_results,
)

# A fast training configuration for large synthetic catalogs (the model quality is not the
# point of this benchmark; the catalog size is).
FAST_TRAIN = {
    "retrieval_epochs": 1,
    "ranker_epochs": 1,
    "eval_points_per_user": 1,
    "eval_max_users": 200,
}
META = "bench-meta.json"  # written next to the artifacts by the training child


class BenchmarkFailure(RuntimeError):
    pass


# --- arguments -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description=(
            "Latency and throughput of the streamrec serving graph: in-process runtime vs "
            "tritonserver over gRPC (sequential and with concurrent clients), per-stage "
            "timings, and a check that both answer identically. Writes "
            "bench/results/serving-<data>.json and .md."
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
    p.add_argument("--requests", type=int, default=300, help="sequential requests per runtime")
    p.add_argument("--warmup", type=int, default=20, help="warm-up requests per runtime/client")
    p.add_argument(
        "--order",
        choices=("interleaved", "blocked"),
        default="interleaved",
        help="sequential runs: each request on both runtimes back to back, alternating which "
        "goes first (default; robust to drifting background load), or all in-process "
        "requests, then all Triton requests",
    )
    p.add_argument(
        "--concurrency",
        default="1,4,8",
        help="comma-separated numbers of concurrent Triton clients (threads)",
    )
    p.add_argument(
        "--concurrent-requests",
        type=int,
        default=300,
        help="requests per concurrency level (shared by its clients)",
    )
    p.add_argument("--cold-share", type=float, default=0.1, help="share of unknown users")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the request list")
    p.add_argument(
        "--now-ms",
        type=int,
        help="request timestamp (default: one hour after the data's last event)",
    )
    p.add_argument("--instances", type=int, default=1, help="Triton instances per operator")
    p.add_argument(
        "--triton-timeout", type=float, default=900.0, help="tritonserver start-up limit (s)"
    )
    p.add_argument(
        "--client-timeout", type=float, default=120.0, help="per-request gRPC timeout (s)"
    )
    p.add_argument("--label", help="result name suffix (default: from --data)")
    p.add_argument("--keep", action="store_true", help="keep the temporary server directory (logs)")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    except ValueError:
        p.error("--concurrency takes comma-separated integers, e.g. 1,4,8")
    if any(c < 1 for c in args.concurrency):
        p.error("--concurrency values must be >= 1")
    if args.requests < 1 or args.warmup < 0 or args.concurrent_requests < 1:
        p.error("--requests and --concurrent-requests must be >= 1, --warmup >= 0")
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
        {
            "request_id": f"{prefix}-{i}",
            "user_id": f"bench-unknown-{prefix}-{i}" if cold[i] else known[picks[i]],
            "k": k,
            "exclude": [],
            "temperature": 0.0,
            "seed": 1,
            "timestamp_ms": now_ms,
        }
        for i in range(n)
    ]


# --- runtimes --------------------------------------------------------------------------------


def build_local(artifacts: Path, config: dict[str, Any], phases: Phases):
    """A LocalRecommender whose operators are built one by one, each timed."""
    from serving.client import LocalRecommender, serving_config
    from serving.graph import LocalRuntime
    from serving.operators import GRAPH

    class TimedLocalRecommender(LocalRecommender):
        # Mirrors LocalRecommender.__init__ (GRAPH.build), with a timer around each operator.
        def __init__(self, artifacts: Path, config: dict[str, Any]):
            full = serving_config(config)
            self.build_seconds: dict[str, float] = {}
            ops = []
            for op in GRAPH.operators:
                t0 = time.perf_counter()
                ops.append(op(artifacts, full))
                self.build_seconds[op.name] = round(time.perf_counter() - t0, 2)
                phases.log(f"  built {op.name} in {self.build_seconds[op.name]:,.2f} s")
            self.runtime = LocalRuntime(GRAPH, ops)
            self.version = json.loads((artifacts / "manifest.json").read_text())["version"]

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


def triton_memory(pid: int) -> dict[str, float]:
    """RSS of tritonserver and of each Python-backend stub (by model), MiB."""
    out = {"tritonserver": round(rss_mb(pid), 1)}
    for child in children(pid):
        cmd = cmdline(child)
        m = re.search(r"/([^/\s]+)/\d+/model\.py", cmd)
        name = f"stub {m.group(1)}" if m else f"child {child}"
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


def _items(outputs: dict[str, np.ndarray]) -> list[str]:
    from serving.operators import decode

    return decode(outputs["items"])


def measure_sequential(
    name: str, run, tensors: list[dict], warmup: list[dict], phases: Phases
) -> dict[str, Any]:
    for t in warmup:
        run(t)
    latencies, outputs = [], []
    every = max(1, len(tensors) // 5)
    start = time.perf_counter()
    for i, t in enumerate(tensors):
        t0 = time.perf_counter()
        out = run(t)
        latencies.append((time.perf_counter() - t0) * 1000)
        outputs.append(out)
        if (i + 1) % every == 0 or i + 1 == len(tensors):
            phases.log(
                f"  {name}: {i + 1}/{len(tensors)} requests, "
                f"p50 so far {np.median(latencies):,.2f} ms"
            )
    wall = time.perf_counter() - start
    return {
        "latency_ms": summarize(latencies),
        "requests": len(tensors),
        "wall_s": round(wall, 3),
        "rps": round(len(tensors) / wall, 2),
        "_latencies": latencies,
        "_outputs": outputs,
    }


def measure_interleaved(
    runs: dict[str, Any],
    tensors: list[dict],
    warmup: list[dict],
    phases: Phases,
    gc_timer: GcTimer | None = None,
) -> dict[str, dict[str, Any]]:
    """Each request on every runtime back to back, the order rotating per request, so that
    all runtimes see the same background load (a 2-core machine shared with others): the
    ratios between them stay meaningful when the load drifts. req/s = 1000 / mean latency."""
    names = list(runs)
    for t in warmup:
        for name in names:
            runs[name](t)
    latencies: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, list[dict]] = {n: [] for n in names}
    every = max(1, len(tensors) // 5)
    for i, t in enumerate(tensors):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            if gc_timer:
                gc_timer.tag = name
            t0 = time.perf_counter()
            out = runs[name](t)
            latencies[name].append((time.perf_counter() - t0) * 1000)
            outputs[name].append(out)
        if gc_timer:
            gc_timer.tag = None
        if (i + 1) % every == 0 or i + 1 == len(tensors):
            so_far = ", ".join(f"{n} {np.median(latencies[n]):,.2f} ms" for n in names)
            phases.log(f"  {i + 1}/{len(tensors)} requests each, p50 so far: {so_far}")
    return {
        name: {
            "latency_ms": summarize(latencies[name]),
            "requests": len(tensors),
            "wall_s": round(sum(latencies[name]) / 1000, 3),
            "rps": round(1000 * len(tensors) / sum(latencies[name]), 2),
            "_latencies": latencies[name],
            "_outputs": outputs[name],
        }
        for name in names
    }


def measure_concurrent(
    url: str,
    clients: int,
    tensors: list[dict],
    total: int,
    warmup: int,
    timeout: float,
) -> dict[str, Any]:
    """`clients` threads, one TritonRecommender each, share `total` requests (request i is
    tensors[i % len(tensors)]); throughput over the wall time from a common start."""
    from serving.client import TritonRecommender

    recs = [TritonRecommender(url, timeout=timeout) for _ in range(clients)]
    try:
        for n, rec in enumerate(recs):
            for i in range(max(1, warmup // clients)):
                rec.run(tensors[(n + i) % len(tensors)])
        counter = itertools.count()
        latencies: list[list[float]] = [[] for _ in recs]
        items: dict[int, list[str]] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(clients + 1)

        def worker(n: int) -> None:
            barrier.wait()
            try:
                while (i := next(counter)) < total:
                    t0 = time.perf_counter()
                    out = recs[n].run(tensors[i % len(tensors)])
                    latencies[n].append((time.perf_counter() - t0) * 1000)
                    items[i] = _items(out)
            except BaseException as e:  # reported after the join
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        if errors:
            raise BenchmarkFailure(f"{clients} clients: {type(errors[0]).__name__}: {errors[0]}")
    finally:
        for rec in recs:
            with contextlib.suppress(Exception):
                rec.close()
    flat = [x for lat in latencies for x in lat]
    return {
        "clients": clients,
        "requests": total,
        "wall_s": round(wall, 3),
        "rps": round(total / wall, 2),
        "latency_ms": summarize(flat),
        "_items": items,
    }


def stage_stats(outputs: list[dict[str, np.ndarray]], latencies: list[float]) -> dict[str, Any]:
    """Per-stage ms (p50, p99) and candidate counts (median in → out) from the stats_* outputs,
    plus the time outside the stages (end-to-end latency − sum of the stages)."""
    from serving.operators import OPERATORS

    out: dict[str, Any] = {}
    total = np.zeros(len(outputs))
    for op in OPERATORS:
        stats = np.stack([o[op.stats_name()] for o in outputs]).astype(np.float64)
        total += stats[:, 2]
        s = summarize(stats[:, 2])
        out[op.name] = {
            "p50_ms": s["p50"],
            "p99_ms": s["p99"],
            "mean_ms": s["mean"],
            "in_median": float(np.median(stats[:, 0])),
            "out_median": float(np.median(stats[:, 1])),
            "out_min": float(stats[:, 1].min()),
        }
    s = summarize(total)
    out["sum_of_stages"] = {"p50_ms": s["p50"], "p99_ms": s["p99"], "mean_ms": s["mean"]}
    s = summarize(np.asarray(latencies) - total)
    out["outside_stages"] = {"p50_ms": s["p50"], "p99_ms": s["p99"], "mean_ms": s["mean"]}
    return out


def check_parity(
    reference: list[dict[str, np.ndarray]],
    served: list[dict[str, np.ndarray]],
    requests: list[dict],
    concurrent: list[dict[str, Any]],
) -> dict[str, Any]:
    """Triton's top-k (items, order, path, removed; scores to 1e-5) must equal in-process."""
    from serving.operators import decode

    problems: list[str] = []
    for req, ref, got in zip(requests, reference, served, strict=True):
        a, b = _items(ref), _items(got)
        if a != b:
            problems.append(f"{req['user_id']}: items {b} != in-process {a}")
        elif decode(ref["path"]) != decode(got["path"]):
            problems.append(f"{req['user_id']}: path {decode(got['path'])}")
        elif ref["removed"].tolist() != got["removed"].tolist():
            problems.append(f"{req['user_id']}: removed {got['removed']} != {ref['removed']}")
        elif not np.allclose(got["item_scores"], ref["item_scores"], rtol=1e-5, atol=1e-6):
            diff = float(np.max(np.abs(got["item_scores"] - ref["item_scores"])))
            problems.append(f"{req['user_id']}: scores differ by up to {diff:.2e}")
    checked_concurrent = 0
    for level in concurrent:
        for i, items in level["_items"].items():
            checked_concurrent += 1
            ref = _items(reference[i % len(reference)])
            if items != ref:
                user = requests[i % len(requests)]["user_id"]
                problems.append(f"{level['clients']} clients, {user}: {items} != {ref}")
    return {
        "sequential_checked": len(requests),
        "concurrent_checked": checked_concurrent,
        "mismatches": len(problems),
        "examples": problems[:10],
    }


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


def markdown_report(r: dict[str, Any]) -> str:
    m, a, cfg = r["machine"], r["artifacts"], r["config"]
    seq, ratios = r["sequential"], r["ratios"]
    lines = [
        f"# Serving benchmark: {r['label']}",
        "",
        f"{r['started']} · {m['cpus_usable']} CPUs ({m.get('cpu_model', '?')}) · "
        f"{m['memory_mb'].get('MemTotal', 0) / 1024:,.0f} GiB · Python {m['python']} · "
        f"load average (1/5/15 min) at start {m['load_average_at_start']}, at end "
        f"{r.get('load_average_at_end')} · commit "
        f"{m.get('git_commit', '?')}",
        "",
        f"Artifacts `{a['version']}`: {a['items']:,} items, {a['users']:,} users, "
        f"{a['interactions']:,} events, index {a['index']['type']} "
        f"(recall vs exact@100 {a['index'].get('recall_vs_exact@100', 0):.3f}). "
        f"Requests: {cfg['requests']} sequential per runtime after {cfg['warmup']} warm-up "
        f"({cfg.get('order', 'blocked')}), "
        f"{r['paths'].get('cold_start', 0)} of them cold-start users, "
        f"{r['paths'].get('personalized_retrieval_short', 0)} personalized ones for which "
        f"retrieval found fewer than {cfg['serving']['candidates']} items; k={cfg['k']}, "
        f"temperature 0, {cfg['serving']['candidates']} candidates; Triton "
        f"{cfg['instances']} instance(s) per operator, gRPC.",
        "",
        "## Sequential latency (one client, ms)",
        "",
        markdown_table(
            ["runtime", "requests", "p50", "p90", "p99", "mean", "req/s"],
            [
                [
                    name,
                    seq[key]["requests"],
                    seq[key]["latency_ms"]["p50"],
                    seq[key]["latency_ms"]["p90"],
                    seq[key]["latency_ms"]["p99"],
                    seq[key]["latency_ms"]["mean"],
                    seq[key]["rps"],
                ]
                for name, key in (("in-process", "in_process"), ("Triton gRPC", "triton"))
            ]
            + [
                [
                    "ratio Triton / in-process",
                    None,
                    ratios["p50"],
                    ratios["p90"],
                    ratios["p99"],
                    ratios["mean"],
                    ratios["rps"],
                ]
            ],
        ),
        "",
        (
            "Interleaved: each request ran on both runtimes back to back (alternating which "
            "first); req/s = 1000 / mean latency."
            if cfg.get("order") == "interleaved"
            else "Blocked: all in-process requests, then all Triton requests; req/s over wall time."
        ),
        "",
        "## Triton with concurrent clients (threads, one gRPC client each)",
        "",
        markdown_table(
            ["clients", "requests", "req/s", "p50 ms", "p99 ms", "req/s vs 1 client"],
            [
                [
                    c["clients"],
                    c["requests"],
                    c["rps"],
                    c["latency_ms"]["p50"],
                    c["latency_ms"]["p99"],
                    c.get("rps_vs_first"),
                ]
                for c in r["concurrency"]
            ],
        ),
        "",
        "## Per-stage time (ms, from the stats_* outputs, sequential runs)",
        "",
    ]
    local, triton = r["stages"]["in_process"], r["stages"]["triton"]
    rows = []
    for name in local:
        counts = (
            f"{local[name]['in_median']:,.0f} → {local[name]['out_median']:,.0f} "
            f"(min {local[name].get('out_min', 0):,.0f})"
            if "in_median" in local[name]
            else ""
        )
        rows.append(
            [
                name,
                local[name]["p50_ms"],
                local[name]["p99_ms"],
                triton[name]["p50_ms"],
                triton[name]["p99_ms"],
                counts,
            ]
        )
    lines += [
        markdown_table(
            [
                "stage",
                "in-process p50",
                "in-process p99",
                "Triton p50",
                "Triton p99",
                "candidates in → out: median (min out)",
            ],
            rows,
        ),
        "",
        "`outside_stages` = end-to-end latency − sum of the stages (Triton: gRPC, ensemble "
        "scheduling and tensor transfer between the Python-backend stubs).",
        "",
        "## Start-up and phases (s)",
        "",
    ]
    build = r["startup"]["in_process_build_s"]
    load = r["startup"]["triton_model_load_s"]
    lines += [
        markdown_table(
            ["operator", "in-process build", "Triton model load"],
            [[name, build.get(name), load.get(name)] for name in build],
        ),
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
            "`load features` broken down (calls timed inside models.feature_load.load_features):",
            "",
            markdown_table(["call", "seconds"], list(r["load_features_s"].items())),
            "",
        ]
    training = a.get("training") or {}
    steps = top_level_steps(training.get("steps") or [])
    if steps:
        lines += [
            f"Training (cached run, {training['train_config']} config): data "
            f"{training['load_data_s']} s, train {training['train_s']} s, peak RSS "
            f"{training.get('peak_rss_mb', 0):,.0f} MiB.",
            "",
            markdown_table(
                ["training step", "seconds"],
                [[name[:90], seconds] for name, seconds in steps],
            ),
            "",
        ]
    mem = r["memory"]
    mem_rows = [["bench process (in-process runtime loaded)", mem["bench_rss_mb"]]]
    mem_rows += [[f"triton: {k}", v] for k, v in mem["triton"].items()]
    mem_rows += [
        ["valkey RSS", mem["valkey"]["rss_mb"]],
        ["valkey used_memory", mem["valkey"]["used_memory_mb"]],
    ]
    gc_info = r.get("gc") or {}
    gc_lines = []
    if gc_info:
        loaded = gc_info["in_process_runtime_loaded"]
        during = gc_info["during"].get("in_process_sequential", {})
        gc_lines = [
            f"Bench process with the in-process runtime loaded: "
            f"{loaded['tracked_objects']:,} GC-tracked objects; one full collection takes "
            f"{loaded['full_collect_ms']:,} ms. During the in-process sequential run: "
            + ", ".join(
                f"{during[g]['count']} gen{g[-1]} collections ({during[g]['total_ms']:,} ms)"
                for g in ("gen0", "gen1", "gen2")
                if g in during
            )
            + f", longest pause {during.get('max_pause_ms', 0)} ms.",
            "",
        ]
    lines += [
        "## Memory (RSS MiB, after start-up)",
        "",
        markdown_table(["process", "MiB"], mem_rows),
        "",
        f"Valkey keys: {mem['valkey']['keys']:,}. Artifact files (MiB): "
        + ", ".join(f"{k} {v:,}" for k, v in a["file_sizes_mb"].items())
        + ".",
        "",
        *gc_lines,
        "## Correctness",
        "",
        f"Triton's top-k equals the in-process runtime's on {r['parity']['sequential_checked']} "
        f"sequential requests (items, order, path, removed counts, scores to 1e-5) and on "
        f"{r['parity']['concurrent_checked']} concurrent ones (items): "
        f"{r['parity']['mismatches']} mismatches.",
    ]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from models.feature_load import load_features
    from serving.client import TritonRecommender, serving_config
    from serving.operators import decode, request_tensors
    from serving.triton_export import export_repository
    from streamrec.stack.servers import start_redis, start_triton, stop_service

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
        services = []
        clients = []
        ok = False
        try:
            with phases.phase("start valkey"):
                redis = start_redis(tmp / "redis", 30)
                services.append(redis)
            phases.log(f"  valkey {redis.endpoint} (pid {redis.pid})")
            load_s: dict[str, float] = {}
            with phases.phase("load features", "(Feast materialize + seen/popularity state)"):
                t0 = time.perf_counter()
                import feast

                import models.feature_load
                from serving.state import RedisState

                load_s["import feast"] = round(time.perf_counter() - t0, 2)
                timed = [
                    (models.feature_load, "load_offline", "load_offline (parquet, apply, mat.)"),
                    (feast.FeatureStore, "apply", "  feast apply"),
                    (feast.FeatureStore, "materialize", "  feast materialize (4 views)"),
                    (RedisState, "load", "RedisState.load (seen sets, popularity)"),
                ]
                load_s.update({label: 0.0 for _, _, label in timed})
                with timed_calls(timed, load_s):
                    load_features(artifacts, redis.endpoint, repo_dir=tmp / "feature_repo")
            for name, sec in load_s.items():
                phases.log(f"  {name}: {sec:,.1f} s")
            config = serving_config({"redis_url": redis.endpoint})

            with phases.phase("build in-process runtime"):
                local = build_local(artifacts, config, phases)
            bench_rss = round(rss_mb(os.getpid()), 1)
            gc_state = full_gc_ms()
            phases.log(
                f"  bench process: {bench_rss:,.0f} MiB, {gc_state['tracked_objects']:,} "
                f"GC-tracked objects, a full collection takes {gc_state['full_collect_ms']} ms"
            )

            with phases.phase("export triton repository"):
                repository = export_repository(
                    artifacts, tmp / "triton" / "models", config, instances=args.instances
                )
            with phases.phase("start tritonserver", f"(limit {args.triton_timeout:.0f} s)"):
                triton = start_triton(tmp / "triton", args.triton_timeout, repository=repository)
                services.append(triton)
            phases.log(f"  tritonserver {triton.endpoint} (pid {triton.pid})")
            model_load_s = triton_load_seconds(Path(triton.log))
            memory = {
                "bench_rss_mb": bench_rss,
                "triton": triton_memory(triton.pid),
                "valkey": valkey_memory(redis.endpoint, redis.pid),
            }
            phases.log(
                f"  RSS: bench {bench_rss:,.0f} MiB, triton (all) "
                f"{memory['triton']['total']:,.0f} MiB, valkey "
                f"{memory['valkey']['rss_mb']:,.0f} MiB"
            )

            with phases.phase("build requests"):
                requests = build_requests(
                    artifacts, args.requests, args.cold_share, args.k, now_ms, args.seed, "r"
                )
                warm = build_requests(
                    artifacts, args.warmup, args.cold_share, args.k, now_ms, args.seed + 1, "w"
                )
                tensors = [request_tensors(r) for r in requests]
                warm_tensors = [request_tensors(r) for r in warm]
            n_cold = sum(r["user_id"].startswith("bench-unknown-") for r in requests)
            phases.log(f"  {len(requests)} requests ({n_cold} unknown users), now_ms {now_ms}")

            gc_during = {}
            triton_client = TritonRecommender(triton.endpoint, timeout=args.client_timeout)
            clients.append(triton_client)
            if args.order == "interleaved":
                with (
                    phases.phase(
                        "sequential, interleaved",
                        f"({args.requests} requests on each runtime, alternating)",
                        measure=True,
                    ),
                    GcTimer() as gct,
                ):
                    both = measure_interleaved(
                        {"in-process": local.run, "triton": triton_client.run},
                        tensors,
                        warm_tensors,
                        phases,
                        gct,
                    )
                seq_local, seq_triton = both["in-process"], both["triton"]
                gc_during["in_process_sequential"] = gct.summary("in-process")
                gc_during["triton_sequential_client"] = gct.summary("triton")
            else:
                with (
                    phases.phase(
                        "in-process sequential", f"({args.requests} requests)", measure=True
                    ),
                    GcTimer() as gct,
                ):
                    seq_local = measure_sequential(
                        "in-process", local.run, tensors, warm_tensors, phases
                    )
                gc_during["in_process_sequential"] = gct.summary()
                with (
                    phases.phase("triton sequential", f"({args.requests} requests)", measure=True),
                    GcTimer() as gct,
                ):
                    seq_triton = measure_sequential(
                        "triton", triton_client.run, tensors, warm_tensors, phases
                    )
                gc_during["triton_sequential_client"] = gct.summary()
            concurrency = []
            for c in args.concurrency:
                with phases.phase(
                    f"triton {c} clients", f"({args.concurrent_requests} requests)", measure=True
                ):
                    level = measure_concurrent(
                        triton.endpoint,
                        c,
                        tensors,
                        args.concurrent_requests,
                        args.warmup,
                        args.client_timeout,
                    )
                lat = level["latency_ms"]
                phases.log(
                    f"  {c} clients: {level['rps']:,.1f} req/s, "
                    f"p50 {lat['p50']:,.2f} ms, p99 {lat['p99']:,.2f} ms"
                )
                concurrency.append(level)
            for level in concurrency:
                level["rps_vs_first"] = ratio(level["rps"], concurrency[0]["rps"])

            parity = check_parity(
                seq_local["_outputs"], seq_triton["_outputs"], requests, concurrency
            )
            if parity["mismatches"]:
                raise BenchmarkFailure(
                    f"Triton disagrees with the in-process runtime on {parity['mismatches']} "
                    "requests:\n  " + "\n  ".join(parity["examples"])
                )
            phases.log(
                f"[green]parity ok[/green]: {parity['sequential_checked']} sequential + "
                f"{parity['concurrent_checked']} concurrent answers identical"
            )
            paths: dict[str, int] = {}
            short = 0  # personalized requests whose retrieval found fewer than `candidates`
            for out in seq_local["_outputs"]:
                p = decode(out["path"])[0]
                paths[p] = paths.get(p, 0) + 1
                found = int(out["stats_retrieval"][1])
                short += p == "personalized" and found < int(config["candidates"])
            paths["personalized_retrieval_short"] = short
            memory["triton_after"] = triton_memory(triton.pid)
            memory["bench_rss_after_mb"] = round(rss_mb(os.getpid()), 1)
            memory["tree_rss_after_mb"] = round(tree_rss_mb(os.getpid()), 1)
            ok = True
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    client.close()
            for service in reversed(services):
                phases.log(f"stopping {service.name} (pid {service.pid})")
                stop_service(service)
            if ok and not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                phases.log(f"server directory kept: {tmp}")

    lat_l, lat_t = seq_local["latency_ms"], seq_triton["latency_ms"]
    memory["phases"] = phases.memory
    result = {
        "benchmark": "serving",
        "label": label,
        "started": started,
        "machine": machine,
        "config": {
            "data": args.data,
            "requests": args.requests,
            "warmup": args.warmup,
            "order": args.order,
            "concurrency": args.concurrency,
            "concurrent_requests": args.concurrent_requests,
            "cold_share": args.cold_share,
            "k": args.k,
            "temperature": 0.0,
            "seed": args.seed,
            "now_ms": now_ms,
            "now_ms_source": now_source,
            "instances": args.instances,
            "client_timeout_s": args.client_timeout,
            "serving": {k: v for k, v in config.items() if k != "redis_url"},
        },
        "artifacts": meta,
        "paths": paths,
        "sequential": {"in_process": seq_local, "triton": seq_triton},
        "ratios": {key: ratio(lat_t[key], lat_l[key]) for key in ("p50", "p90", "p99", "mean")}
        | {"rps": ratio(seq_triton["rps"], seq_local["rps"])},
        "concurrency": concurrency,
        "stages": {
            "in_process": stage_stats(seq_local["_outputs"], seq_local["_latencies"]),
            "triton": stage_stats(seq_triton["_outputs"], seq_triton["_latencies"]),
        },
        "startup": {"in_process_build_s": local.build_seconds, "triton_model_load_s": model_load_s},
        "load_features_s": load_s,
        "gc": {"in_process_runtime_loaded": gc_state, "during": gc_during},
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
