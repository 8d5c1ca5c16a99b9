"""Many workers: 1, 2 and 4 stream workers on one embedded stack, 8 partitions per topic.

    .venv/bin/python -m bench.scale --artifacts DIR                        # ~20 minutes
    .venv/bin/python -m bench.scale --artifacts DIR --workers 1,2 --rates 50,100 --duration 3 \\
        --events 2000 --leave-s 5 --tail-s 3 --steady-rate 50 --label short   # a few minutes

bench.e2e's burst and sweep for each worker count; under a steady load, each join, a rolling
restart and two leaves (bench/README.md explains the tables). Writes scale-<label>.{json,md}.
"""

from __future__ import annotations

import argparse
import ast
import functools
import re
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, e2e
from bench.common import Block, Phases, cells, fmt, summarize, table
from streamrec.stack.process import stop
from streams.topics import topic_name

LINE = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] \[\d+\] \[\w+\]:? (.*)$", re.M)
REBALANCE = re.compile(r"rebalanc|rejoin|IllegalGeneration|UnknownMemberId", re.I)
OPTIONS = [
    ("--workers", "1,2,4", "worker counts, rising"),
    ("--steady-rate", 100.0, "req/s of the load during joins, restarts and leaves"),
    ("--leave-s", 20.0, "seconds from a leave until its replacement starts"),
    ("--tail-s", 10.0, "seconds of load after the last event"),
    ("--note", "", "a sentence for the report (what else ran, which code)"),
]
DEFAULTS = {"partitions": 8, "rates": "50,100,200,300,400,600", "duration": 8.0}
EVENT = "seconds exit_s action_s assigned_by_others rebalance_warnings last_assigned_after_s"
EVENT += " rebalance_s held longest_gap_ms latency not_ok unanswered last_over_slo_after_s"


def start_one(live: e2e.System) -> dict[str, Any]:
    w = live.workers.start(1, timeout=300)[-1]
    return {"slot": w.slot, "log": w.log}


def leave(live: e2e.System, slot: int, kill: bool = False, wait_s: float = 0.0) -> dict:
    """The worker of `slot` stopped (SIGTERM, or SIGKILL: a crash); without `wait_s` started
    again at once in its slot (a restart)."""
    w, t0 = next(w for w in live.workers.running() if w.slot == slot), time.perf_counter()
    live.workers.kill(w) if kill else stop(w.pid, grace=15)
    gone = {"exit_s": round(time.perf_counter() - t0, 2)}
    time.sleep(wait_s)
    return gone | ({} if wait_s else start_one(live))


def log_lines(logs: set[str], topic: str) -> list[tuple[float, str, str, set[int] | None]]:
    """(wall time, log, text, request partitions of a `partitions assigned` line) per line."""
    out = []
    for log in logs:
        for m in LINE.finditer(Path(log).read_text(errors="replace")):
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            text, held = m.group(2), None
            if text.startswith("partitions assigned: "):
                value = text.split(": ", 1)[1].strip()
                held = set(({} if value == "none" else ast.literal_eval(value)).get(topic, []))
            out.append((t, log, text, held))
    return sorted(out, key=lambda x: x[0])


def window(ids: list, sent: list, answers: dict, t0: float, t1: float, slo_ms: float) -> dict:
    """The requests sent in [t0, t1): latency of the ok ones, the others; the longest gap
    between answers arriving in it."""
    hits = [(answers.get(r), s) for r, s in zip(ids, sent, strict=True) if t0 <= s < t1]
    ok = [(h[0] - s) * 1000 for h, s in hits if h and h[1]["status"] == "ok"]
    late = [h[0] for h, s in hits if h and (h[1]["status"] != "ok" or (h[0] - s) * 1e3 > slo_ms)]
    arrived = sorted(a for a, _ in answers.values() if t0 <= a < t1)
    out = {"seconds": round(t1 - t0, 1), "unanswered": sum(h is None for h, _ in hits)}
    out["latency"] = " / ".join(fmt(summarize(ok).get(q)) for q in ("p50", "p99", "max"))
    out["not_ok"] = sum(h is not None for h, _ in hits) - len(ok)
    out["last_over_slo_after_s"] = round(max(late) - t0, 2) if late else None
    return out | {"longest_gap_ms": round(float(np.diff([t0, *arrived, t1]).max()) * 1000, 1)}


def event(m: dict, nxt: dict, lines: list, figures: dict) -> dict[str, Any]:
    """Log figures from an event to the next: assignments and rebalance warnings of the workers
    the event did not start, the request partitions each live worker holds at the end."""
    w0, w1 = m["wall"], m["wall"] + figures["seconds"]
    others = [x for x in lines if w0 <= x[0] < w1 and x[1] != m.get("log")]
    latest = {log: held for t, log, _, held in lines if t < w1 and held is not None}
    assigned = [t for t, _, _, held in lines if w0 <= t < w1 and held is not None]
    warned = [t for t, _, text, _ in others if REBALANCE.search(text)]
    first = next((t for t in warned if assigned and assigned[-1] >= t), None)
    out = {k: v for k, v in m.items() if k not in ("t", "wall", "live", "log")} | figures
    out["held"] = " ".join(f"{slot}:{len(latest.get(log, ()))}" for slot, log in nxt["live"])
    out |= {"assigned_by_others": sum(x[3] is not None for x in others)}
    out |= {"rebalance_warnings": len(warned)}
    out["last_assigned_after_s"] = round(assigned[-1] - w0, 2) if assigned else None
    return out | {"rebalance_s": round(assigned[-1] - first, 2) if first is not None else None}


def under_load(live: e2e.System, name: str, actions: list, est_s: float) -> dict[str, Any]:
    """A steady load for 3 s + `est_s` + --tail-s while `actions` ((label, fn) pairs) run one
    after another from 3 s in; figures per action, from its start to the next one's."""
    args, marks, seconds = live.args, [], 3.0 + est_s + live.args.tail_s
    reqs = live.requests(round(args.steady_rate * seconds), name.replace(" ", "-"), args.seed)

    def play() -> None:
        time.sleep(3.0)
        for label, act in [*actions, ("done", dict)]:
            slots = sorted((w.slot, w.log) for w in live.workers.running())
            t0 = time.perf_counter()
            marks.append({"event": label, "t": t0, "wall": time.time(), "live": slots})
            try:
                marks[-1] |= act()
            except Exception as e:  # noqa: BLE001 - reported with the event; the load goes on
                marks[-1]["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            marks[-1]["action_s"] = round(time.perf_counter() - t0, 2)

    thread = threading.Thread(target=play, daemon=True)
    with live.phases.phase(name, f"({args.steady_rate:g} req/s for {seconds:.0f} s)"):
        thread.start()
        step = live.run_step(args.steady_rate, name, reqs, 0)
        thread.join(300)
    ids, sent, answers = [r["request_id"] for r in reqs], step["_sent"], step["_answers"]
    logs = {w.log for w in live.workers.running()} | {m["log"] for m in marks if "log" in m}
    lines, events = log_lines(logs, topic_name(live.settings, "requests")), []
    for m, nxt in zip(marks, marks[1:], strict=False):
        t1 = max(sent[-1], nxt["t"]) if nxt["event"] == "done" else nxt["t"]
        events.append(event(m, nxt, lines, window(ids, sent, answers, m["t"], t1, args.slo_ms)))
    before = window(ids, sent, answers, sent[0], marks[0]["t"], args.slo_ms)
    totals = {k: step[k] for k in ("requests", "ok", "expired", "error", "unanswered")}
    return {"name": name, "before": before, "events": events} | totals


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Each worker count's burst and sweep (joining the workers under load), a rolling restart
    and the two leaves."""
    phases, r, joins, counts = Phases(), common.run_info(args.label), [], {}
    with e2e.running_system(args, phases, args.counts[0]) as live, live.traffic():
        start = functools.partial(start_one, live)
        start_s = round(phases.seconds["start stream workers"] / args.counts[0], 1)
        est = 2 * start_s + 5  # seconds a worker takes to start under load, estimated
        for n in args.counts:
            if (have := len(live.workers.running())) < n:
                acts = [(f"worker {i + 1} starts", start) for i in range(have, n)]
                joins.append(under_load(live, f"join {have} → {n}", acts, est * (n - have)))
                est = max(est, *(e["action_s"] + 5 for e in joins[-1]["events"]))
            tag, name = f"w{n}", f"burst, {n} worker(s)"
            live.warm_up(tag)
            burst = live.measured(name, "", functools.partial(live.burst, tag), args.events)
            steps = live.sweep()["steps"]
            held = [x for x in steps if x["sustainable"]]
            best = max(held, key=lambda x: x["rate"]) if held else {"latency_ms": {}, "cpu": {}}
            sweep = [(x["rate"], fmt(x["latency_ms"].get("p99"), 0), x["steady"]) for x in steps]
            sweep = [f"{rt:g}: {p99}" + ("" if ok else " (not steady)") for rt, p99, ok in sweep]
            counts[n] = {"burst": burst, "highest": best, "sweep": ", ".join(sweep)}
            counts[n]["cpu_ms_per_event"] = live.cpu[name]["cpu_ms"]
        slots = sorted(w.slot for w in live.workers.running())
        acts = [(f"restart slot {s}", functools.partial(leave, live, s)) for s in slots]
        r["rolling_restart"] = under_load(live, "rolling restart", acts, (est + 5) * len(slots))
        r["leaves"], last, wait = [], slots[-1], args.leave_s
        for kill, sig in ((False, "SIGTERM"), (True, "SIGKILL")):
            acts = [(f"{sig} slot {last}", functools.partial(leave, live, last, kill, wait))]
            acts.append((f"replacement in slot {last}", start))
            r["leaves"].append(under_load(live, f"leave by {sig}", acts, wait + est + 5))
    r |= {"by_workers": counts, "joins": joins, "config": vars(args), "worker_start_s": start_s}
    return common.finished(r)


COUNT = "workers|events/s|events/s 10→90 %|× 1 worker|req/s, p99 ≤ {slo_ms:g} ms|× 1 worker"
COUNT += "|p50 / p99 ms there|CPU-ms/req worker|broker|Triton + stubs|Valkey|serving total"
COUNT += "|CPU-ms/event worker / broker / Valkey|sweep (req/s: p99 ms)"
EVENTS = "event|s|exit s|action s|assigned (others)|rebalance warnings|last assigned after s"
EVENTS += "|rebalance s|held|gap ms|p50 / p99 / max ms|not ok|unanswered|last over SLO after s"


def report(r: dict[str, Any]) -> list[Block]:
    """The report's blocks; bench/README.md explains each table."""
    m, cfg, rr, by = r["machine"], r["config"], r["rolling_restart"], r["by_workers"]
    one, counts = by[min(by)], []
    for n, x in by.items():  # throughput, the highest rate held and CPU-ms per request there
        b, best, rate = x["burst"], x["highest"], x["highest"].get("rate")
        cpu = best["cpu"].get("cpu_ms", {})
        serving = [cpu.get(k) for k in e2e.SERVING]
        triton, total = (round(sum(v), 2) if cpu else None for v in (serving[2:4], serving))
        ratios = [common.ratio(b["events_per_s"], one["burst"]["events_per_s"])]
        ratios.append(common.ratio(rate, one["highest"].get("rate")))
        per_event = [x["cpu_ms_per_event"][k] for k in ("stream worker", "broker", "valkey")]
        row = [n, b["events_per_s"], b["events_per_s_10_to_90pct"], fmt(ratios[0]), rate]
        row += [fmt(ratios[1]), " / ".join(fmt(best["latency_ms"].get(q)) for q in ("p50", "p99"))]
        row += [serving[0], serving[1], triton, serving[4], total]
        counts.append(row + [" / ".join(fmt(v, 3) for v in per_event), x["sweep"]])
    events, loads = [], [*r["joins"], rr, *r["leaves"]]
    for load in loads:
        events.append([f"*{load['name']}: before*", *cells(load["before"], EVENT)])
        for e in load["events"]:
            failed = f" (failed: {e['failed']})" if "failed" in e else ""
            events.append([e["event"] + failed, *cells(e, EVENT)])
    return [
        common.header("Many workers", r),
        f"One embedded stack, {cfg['partitions']} partitions per topic, workers added between "
        f"measurements. **The machine has {m['cpus_usable']} cores**, shared by the workers, "
        "broker, Triton, Valkey, the load generator and the response reader (and other work on "
        f"the machine): 4 workers cannot scale linearly here. {cfg['note']}",
        "## Throughput by worker count",
        f"Events/s: a burst of {cfg['events']:,} interactions. Req/s: the open-loop sweep, "
        f"{cfg['warmup_s']:g} + {cfg['duration']:g} s a step; CPU-ms per answered request at "
        "the highest rate that held the target.",
        table(COUNT.format(**cfg), counts),
        "## Joins, rolling restart and leaves under a steady load",
        f"{cfg['steady_rate']:g} req/s open loop; a row covers its event until the next.",
        table(EVENTS, events),
        f"Rolling restart in all: {rr['requests']:,} requests, {rr['ok']:,} ok, {rr['expired']:,} "
        f"expired, {rr['error']:,} errors, {rr['unanswered']:,} unanswered. A worker starts in "
        f"{r['worker_start_s']:g} s (unloaded, until ready).",
    ]


def main(argv: list[str] | None = None) -> int:
    p = common.parser("python -m bench.scale", __doc__, e2e.SHARED + OPTIONS, **DEFAULTS)
    args = e2e.parse(p, argv)
    args.counts = common.numbers(p, "--workers", args.workers, int)
    r = run(args)
    common.publish(f"scale-{r['label']}", r, report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
