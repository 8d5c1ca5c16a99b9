"""Helpers shared by the benchmarks: option tables, the artifacts and an embedded stack of a run's
own, seeded requests, CPU time by process, latency summaries, Markdown reports and result files,
timed phases."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console

from schemas.artifacts import Artifacts, current_artifacts
from schemas.records import RecommendationRequest
from schemas.settings import Settings
from streamrec.stack import EmbeddedStack

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ARTIFACTS = Path(os.environ.get("STREAMREC_BENCH_ARTIFACTS", ".streamrec/artifacts"))
Option = tuple[str, Any, str]  # flag, default (its type is the option's; False: a switch), help
Block = str | dict[str, Any]  # of a report: a paragraph, or a table {"headers", "rows"}
Snapshot = tuple[float, dict[str, dict[int, float]], float]  # time, role → pid → CPU s, machine

console = Console(highlight=False, soft_wrap=True)


def parser(prog: str, doc: str, options: list[Option], **defaults: Any) -> argparse.ArgumentParser:
    """An option per (flag, default, help) triple; `defaults` (by name) replace the table's."""
    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog, description=doc, formatter_class=formatter)
    for flag, default, text in options:
        default = defaults.get(flag[2:].replace("-", "_"), default)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=text)
        else:
            text += "" if default in (None, "") else f" ({default})"
            kind = str if default is None else type(default)
            p.add_argument(flag, type=kind, default=default, help=text.replace("%", "%%"))
    return p


def numbers(p: argparse.ArgumentParser, flag: str, text: str, kind: type = float) -> list:
    """Comma-separated positive numbers, sorted; else the parser's error."""
    with contextlib.suppress(ValueError):
        if min(values := sorted(kind(x) for x in text.split(","))) > 0:
            return values
    p.error(f"{flag} takes comma-separated positive numbers, e.g. 1,2,4")


def artifacts(path: Path) -> Path:
    """A trained version, or the `current` one of a root."""
    return path.resolve() if (path / Artifacts.MANIFEST).exists() else current_artifacts(path)


@contextlib.contextmanager
def embedded_stack(
    label: str, keep: bool, served: Path | None = None, **settings: Any
) -> Iterator[EmbeddedStack]:
    """An EmbeddedStack (not up yet) of its own in a temporary directory (`served`: the workers'
    `current` artifacts), stopped by PID at the end; the directory kept if `keep` or failed."""
    os.environ.pop("STREAMREC_REDIS_URL", None)  # the in-process operators would prefer it
    tmp = Path(tempfile.mkdtemp(prefix=f"streamrec-bench-{label}-"))
    if served:
        (tmp / "artifacts").mkdir()
        (tmp / "artifacts" / "current").symlink_to(served, target_is_directory=True)
        settings["artifact_dir"] = tmp / "artifacts"
    endpoints = dict.fromkeys(("kafka_bootstrap", "redis_url", "triton_url"))
    stack = EmbeddedStack(Settings(**endpoints, run_dir=tmp / "run", **settings))
    try:
        yield stack
    except BaseException:
        keep = True
        raise
    finally:
        stack.down()
        if keep:
            console.print(f"directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def requests(
    users: list[str], n: int, seed: int, cold_share: float, now_ms: int, prefix: str, k: int = 10
) -> list[dict]:
    """`n` request records at `now_ms` (k items, temperature 0): known users drawn uniformly and
    a `cold_share` of never-seen ones."""
    rng, fixed = np.random.default_rng(seed), {"k": k, "temperature": 0.0, "seed": 1}
    cold, picks = rng.random(n) < cold_share, rng.integers(len(users), size=n)
    out, fixed = [], fixed | {"timestamp_ms": now_ms}
    for i in range(n):
        user = f"bench-unknown-{prefix}-{i}" if cold[i] else users[picks[i]]
        out.append(RecommendationRequest(user, **fixed, request_id=f"{prefix}-{i}").to_record())
    return out


def cpu_snapshot(processes: dict[str, list[int]]) -> Snapshot:
    """CPU seconds (user + system) of every process by role, and of the whole machine."""
    seconds: dict[str, dict[int, float]] = {}
    for role, pids in processes.items():
        seconds[role] = {}
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                seconds[role][pid] = sum(psutil.Process(pid).cpu_times()[:2])
    m = psutil.cpu_times()
    return time.perf_counter(), seconds, sum(m) - m.idle - m.iowait


def cpu_spent(a: Snapshot, b: Snapshot) -> dict[str, float]:
    """CPU seconds of each role between two snapshots (a process new in `b` from its start)."""
    return {r: sum(s - a[1].get(r, {}).get(p, 0) for p, s in ps.items()) for r, ps in b[1].items()}


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


def cells(x: dict[str, Any], keys: str) -> list[Any]:
    """Figures of `x` by space-separated keys (`a.b`: nested; yes/no for booleans)."""
    out = []
    for key in keys.split():
        value = x
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out.append(("no", "yes")[value] if isinstance(value, bool) else value)
    return out


def table(headers: str, rows: list[list[Any]]) -> dict[str, Any]:
    """A report's table: `|`-separated headers, rows of cells."""
    return {"headers": headers.split("|"), "rows": rows}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; numbers right-aligned, text left-aligned."""
    cells, cols = [list(headers)] + [[fmt(c) for c in row] for row in rows], range(len(headers))
    numeric = [bool(rows) and all(isinstance(r[i], int | float | None) for r in rows) for i in cols]
    widths = [max(len(r[i]) for r in cells) for i in cols]
    rule = [("-" * (w - 1) + ":") if numeric[i] else "-" * w for i, w in enumerate(widths)]
    justify = [str.rjust if n else str.ljust for n in numeric]
    lines = [[justify[i](r[i], widths[i]) for i in cols] for r in cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in [lines[0], rule, *lines[1:]])


def run_info(label: str) -> dict[str, Any]:
    """A result's first keys: its label, when it started, the machine and the commit."""
    git = ["git", "rev-parse", "--short", "HEAD"]
    m = {"cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": platform.machine()}
    m |= {"python": platform.python_version(), "memory_mb": psutil.virtual_memory().total >> 20}
    m |= {"load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    with contextlib.suppress(OSError, IndexError):
        models = [r for r in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in r]
        m["cpu_model"] = models[0].split(":", 1)[1].strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, timeout=5).stdout
        m["git_commit"] = commit.strip() or "?"
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    return {"label": label, "started": started, "machine": m, "_t0": time.time()}


def finished(r: dict[str, Any]) -> dict[str, Any]:
    """`r` with the run's wall time and the load average at its end."""
    wall = round(time.time() - r["_t0"], 1)
    return r | {"wall_s": wall, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


def header(title: str, r: dict[str, Any]) -> str:
    """A report's title and the line on its run and machine."""
    m = r["machine"]
    return (
        f"# {title}: {r['label']}\n\n{r['started']} · {m['cpu_model']} · {m['cpus_usable']} "
        f"CPUs · {m['memory_mb'] / 1024:,.0f} GiB · load average at start "
        f"{m['load_average_at_start']}, at end {r['load_average_at_end']} · Python "
        f"{m['python']} · commit {m.get('git_commit', '?')} · {r['wall_s']:,.0f} s in all."
    )


def publish(name: str, r: dict[str, Any], blocks: list[Block]) -> None:
    """Print the report; write `<name>.json` (`r` less `_` keys) and `<name>.md` atomically."""

    def public(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: public(v) for k, v in d.items() if not str(k).startswith("_")}
        return [public(v) for v in d] if isinstance(d, list) else d

    tables = [b if isinstance(b, str) else markdown_table(b["headers"], b["rows"]) for b in blocks]
    markdown = "\n\n".join(b for b in tables if b)
    as_json = json.dumps(public(r), indent=2, default=str)  # Paths
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in {".json": as_json, ".md": markdown}.items():
        (RESULTS / f"{name}{suffix}.tmp").write_text(text + "\n")
        (RESULTS / f"{name}{suffix}.tmp").replace(RESULTS / f"{name}{suffix}")
    console.print(markdown, markup=False)
    console.print(f"wrote {RESULTS / name}.json and .md")


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
