"""Helpers shared by the benchmarks: latency summaries, machine facts, Markdown tables, result
files and timed phases. Nothing here imports the app."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / ".work"

console = Console(highlight=False, soft_wrap=True)


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """Latency summary in ms: count, mean, min, p50, p90, p99, max (linear interpolation)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    figures = {"mean": a.mean(), "min": a.min(), "p50": p50, "p90": p90, "p99": p99, "max": a.max()}
    return {"n": int(a.size)} | {k: round(float(v), 3) for k, v in figures.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; numbers right-aligned, text left-aligned."""
    cells, cols = [list(headers)] + [[fmt(c) for c in row] for row in rows], range(len(headers))
    numeric = [bool(rows) and all(isinstance(r[i], int | float | None) for r in rows) for i in cols]
    widths = [max(len(r[i]) for r in cells) for i in cols]
    rule = [("-" * (w - 1) + ":") if numeric[i] else "-" * w for i, w in enumerate(widths)]
    lines = [
        [(str.rjust if numeric[i] else str.ljust)(r[i], widths[i]) for i in cols] for r in cells
    ]
    return "\n".join("| " + " | ".join(line) + " |" for line in [lines[0], rule, *lines[1:]])


def machine_info() -> dict[str, Any]:
    memory, git = psutil.virtual_memory(), ["git", "rev-parse", "--short", "HEAD"]
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "memory_mb": {"MemTotal": memory.total >> 20, "MemAvailable": memory.available >> 20},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError, IndexError):
        models = [r for r in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in r]
        info["cpu_model"] = models[0].split(":", 1)[1].strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, timeout=5).stdout
        info |= {"git_commit": commit.strip()} if commit.strip() else {}
    return info


def write_results(
    name: str, data: dict[str, Any], markdown: str, directory: Path = RESULTS
) -> tuple[Path, Path]:
    """Write `<name>.json` and `<name>.md` atomically (via `*.tmp`); return both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    as_json = json.dumps(
        data, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)
    )
    texts = {".json": as_json, ".md": markdown.rstrip()}
    for suffix, text in texts.items():
        (directory / f"{name}{suffix}.tmp").write_text(text + "\n")
        (directory / f"{name}{suffix}.tmp").replace(directory / f"{name}{suffix}")
    return directory / f"{name}.json", directory / f"{name}.md"


def public(d: Any) -> Any:
    """Drop the private (`_`-prefixed) keys that hold raw samples."""
    if isinstance(d, dict):
        return {k: public(v) for k, v in d.items() if not str(k).startswith("_")}
    return [public(v) for v in d] if isinstance(d, list) else d


class Phases:
    """Named, timed phases; each prints when it starts and when it ends."""

    def __init__(self) -> None:
        self.started, self.seconds = time.perf_counter(), {}

    def log(self, message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - self.started:7.1f}s[/dim] {message}")

    @contextlib.contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        self.log(f"[bold cyan]▶ {name}[/bold cyan] {detail}".rstrip())
        t0, state = time.perf_counter(), "[red]✘[/red]"
        try:
            yield
            state = "[green]✔[/green]"
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 2)
            self.log(f"{state} {name}: {time.perf_counter() - t0:,.1f} s")
