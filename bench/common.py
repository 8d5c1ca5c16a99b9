"""Helpers shared by the benchmarks: latency summaries, machine facts, Markdown tables, result
files, timed phases with progress output, and memory sampling of this process tree.

Only the standard library, numpy and rich; nothing here imports the app.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / ".work"

console = Console(highlight=False, soft_wrap=True)


# --- figures ---------------------------------------------------------------------------------


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """Latency summary in ms: count, mean, min, p50, p90, p99, max (linear interpolation)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "n": int(a.size),
        "mean": round(float(a.mean()), 3),
        "min": round(float(a.min()), 3),
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(a.max()), 3),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; numbers right-aligned, text left-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric, strict=True)
    ]
    return "\n".join([line(headers), line(rule), *(line(r) for r in cells)])


# --- machine and result files ----------------------------------------------------------------


def meminfo_mb() -> dict[str, float]:
    """MemTotal / MemAvailable of the machine in MiB."""
    out = {}
    with contextlib.suppress(OSError):
        for row in Path("/proc/meminfo").read_text().splitlines():
            key, value = row.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "memory_mb": meminfo_mb(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError):
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                info["cpu_model"] = row.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if commit:
            info["git_commit"] = commit
    return info


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_results(name: str, data: dict[str, Any], markdown: str, directory: Path = RESULTS):
    """Write `<name>.json` and `<name>.md` atomically (via `*.tmp`); return both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in (
        (".json", json.dumps(data, indent=2, default=_json_default) + "\n"),
        (".md", markdown.rstrip() + "\n"),
    ):
        path = directory / f"{name}{suffix}"
        tmp = directory / f"{name}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]


# --- process memory --------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident set size of one process in MiB (0 if it is gone)."""
    try:
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """Live descendants of `pid` (any depth)."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X"):
            parent_of[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        found.extend(kids)
        frontier.extend(kids)
    return found


def tree_rss_mb(pid: int) -> float:
    return rss_mb(pid) + sum(rss_mb(c) for c in children(pid))


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


class MemorySampler:
    """Samples the RSS of this process and of all its descendants (servers, stubs, the training
    child) every `interval` s; `peak()` and `mark()` give the peak since the last mark."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._lock = threading.Lock()
        self._peak_self = self._peak_tree = 0.0
        self._min_available = float("inf")
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> tuple[float, float]:
        me = os.getpid()
        own = rss_mb(me)
        tree = own + sum(rss_mb(c) for c in children(me))
        available = meminfo_mb().get("MemAvailable", float("inf"))
        with self._lock:
            self._peak_self = max(self._peak_self, own)
            self._peak_tree = max(self._peak_tree, tree)
            self._min_available = min(self._min_available, available)
        return own, tree

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self._paused.is_set():
                continue
            with contextlib.suppress(Exception):
                self.sample()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No background sampling inside (a sample walks /proc and takes the GIL: keep it out
        of latency measurements); the phase's start and end are still sampled."""
        self._paused.set()
        try:
            yield
        finally:
            self._paused.clear()

    def mark(self) -> dict[str, float]:
        """Peak RSS (self, whole tree) and the lowest MemAvailable since the last mark, in MiB."""
        self.sample()
        with self._lock:
            out = {
                "peak_rss_self_mb": round(self._peak_self, 1),
                "peak_rss_tree_mb": round(self._peak_tree, 1),
                "min_mem_available_mb": round(self._min_available, 1),
            }
            self._peak_self = self._peak_tree = 0.0
            self._min_available = float("inf")
        return out


# --- phases ----------------------------------------------------------------------------------


@dataclass
class Phases:
    """Named, timed phases; each prints when it starts and ends (with memory if sampled)."""

    sampler: MemorySampler | None = None
    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)

    def log(self, message: str) -> None:
        console.print(f"[dim]{self.elapsed():7.1f}s[/dim] {message}")
        sys.stdout.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @contextlib.contextmanager
    def phase(self, name: str, detail: str = "", measure: bool = False) -> Iterator[None]:
        """`measure=True`: a latency measurement; background memory sampling pauses."""
        self.log(f"[bold cyan]▶ {name}[/bold cyan] {detail}".rstrip())
        if self.sampler:
            self.sampler.mark()
        quiet = self.sampler.paused() if self.sampler and measure else contextlib.nullcontext()
        t0 = time.perf_counter()
        ok = False
        try:
            with quiet:
                yield
            ok = True
        finally:
            dt = time.perf_counter() - t0
            self.seconds[name] = round(self.seconds.get(name, 0.0) + dt, 2)
            mem = ""
            if self.sampler:
                self.memory[name] = self.sampler.mark()
                m = self.memory[name]
                mem = (
                    f" (peak RSS: bench {m['peak_rss_self_mb']:,.0f} MiB, "
                    f"all processes {m['peak_rss_tree_mb']:,.0f} MiB)"
                )
            state = "[green]✔[/green]" if ok else "[red]✘[/red]"
            self.log(f"{state} {name}: {dt:,.1f} s{mem}")


class GcTimer:
    """Python's garbage collections inside the block (this process): count and ms per
    generation, longest pause."""

    def __init__(self) -> None:
        self.pauses: list[tuple[str | None, int, float]] = []
        self.tag: str | None = None  # set by the caller: collections are attributed to it
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            ms = (time.perf_counter() - self._t0) * 1000
            self.pauses.append((self.tag, int(info["generation"]), ms))

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self, tag: str | None = None) -> dict[str, Any]:
        """Collections (of one `tag`, or all when None) per generation, and the longest."""
        pauses = [(g, ms) for t, g, ms in self.pauses if tag is None or t == tag]
        out: dict[str, Any] = {}
        for gen in (0, 1, 2):
            ms = [p for g, p in pauses if g == gen]
            out[f"gen{gen}"] = {"count": len(ms), "total_ms": round(sum(ms), 2)}
        out["max_pause_ms"] = round(max((p for _, p in pauses), default=0.0), 2)
        return out


def full_gc_ms() -> dict[str, Any]:
    """How long one full collection takes now, and how many objects the collector tracks."""
    tracked = len(gc.get_objects())
    t0 = time.perf_counter()
    gc.collect()
    return {
        "tracked_objects": tracked,
        "full_collect_ms": round((time.perf_counter() - t0) * 1000, 1),
    }


def public(d: Any) -> Any:
    """Drop the private (`_`-prefixed) keys used for raw samples."""
    if isinstance(d, dict):
        return {k: public(v) for k, v in d.items() if not str(k).startswith("_")}
    if isinstance(d, list):
        return [public(v) for v in d]
    return d
