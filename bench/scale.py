"""Many workers: 1, 2 and 4 stream workers on one embedded stack, 8 partitions per topic.

    .venv/bin/python -m bench.scale        # ML-100K, ~20 minutes; --help for the options

Reuses bench.e2e: its stack start, burst (events/s by `RedisState.acked()`), rate sweep (highest
steady rate with p99 ≤ --slo-ms, CPU-ms per request by process), generator and response reader.
Under a steady open-loop load: each join, a rolling restart (SIGTERM, then started again in its
static membership slot), a leave by SIGTERM and by SIGKILL (then a replacement in the slot);
per event the workers' "partitions assigned" and rebalance log lines and the answers' gaps and
latency. Writes bench/results/scale-<data>.{json,md}.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import e2e
from bench.common import (  # noqa: I001
    Phases,
    console,
    fmt,
    machine_info,
    markdown_table,
    public,
    summarize,
    write_results,
)
from bench.loadgen import CpuAccount, Generator, stack_processes

SERVING = ("stream worker", "broker", "tritonserver", "triton stubs", "valkey")
LINE = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] \[\d+\] \[\w+\]:? (.*)$", re.M)
REBALANCE = re.compile(r"rebalanc|rejoin|IllegalGeneration|UnknownMemberId", re.I)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--data", default="ml-100k", help="data set (default ml-100k)")
    add("--artifacts", type=Path, default=os.environ.get("STREAMREC_BENCH_ARTIFACTS"))
    add("--workers", default="1,2,4", help="worker counts, rising (default 1,2,4)")
    add("--partitions", type=int, default=8, help="partitions per topic (default 8)")
    add("--events", type=int, default=20_000, help="interactions per burst (default 20,000)")
    add("--rates", default="50,100,200,300,400,600", help="rate ladder in req/s")
    add("--duration", type=float, default=8.0, help="measured s per rate (default 8)")
    add("--warmup-s", type=float, default=2.0, help="warm-up s per rate (default 2)")
    add("--refine", type=int, default=2, help="refinement rates after the ladder (default 2)")
    add("--slo-ms", type=float, default=100.0, help="p99 target (default 100 ms)")
    add("--steady-rate", type=float, default=100.0, help="req/s during events (default 100)")
    add("--leave-s", type=float, default=20.0, help="s until a replacement starts (default 20)")
    add("--tail-s", type=float, default=10.0, help="load after the last event (default 10 s)")
    add(
        "--redis-cluster-nodes",
        type=int,
        default=0,
        help="Valkey: 0 one server (default), N a local cluster of N primaries",
    )
    add("--label", help="result name suffix (default: from --data)")
    add("--keep", action="store_true", help="keep the temporary directory (worker logs)")
    add("--note", default="", help="a sentence for the report (what else ran, which code)")
    mine = p.parse_args(argv)
    args = argparse.Namespace(**(vars(e2e.parse_args([])) | vars(mine)))  # e2e's defaults
    args.counts = sorted(int(x) for x in mine.workers.split(","))
    args.rates = sorted(float(x) for x in mine.rates.split(","))
    return args


def log_lines(logs: list[Path], topic: str) -> list[tuple[float, str, str, set[int] | None]]:
    """(wall time, log, text, request partitions if a "partitions assigned" line) per line."""
    out = []
    for log in logs:
        for m in LINE.finditer(log.read_text(errors="replace")):
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            held = None
            if (text := m.group(2)).startswith("partitions assigned: "):
                value = text.split(": ", 1)[1].strip()
                held = set(({} if value == "none" else ast.literal_eval(value)).get(topic, []))
            out.append((t, str(log), text, held))
    return sorted(out, key=lambda x: x[0])


def window(ids, sent, answers, t0: float, t1: float, slo_ms: float) -> dict[str, Any]:
    """The requests sent in [t0, t1) and the longest gap between answers in it."""
    ok_ms, not_ok, unanswered, bad = [], 0, 0, []
    for rid, s in zip(ids, sent, strict=True):
        if t0 <= s < t1 and (hit := answers.get(rid)) is None:
            unanswered += 1
        elif t0 <= s < t1:
            ok = hit[1]["status"] == "ok"
            ok_ms += [(hit[0] - s) * 1000] if ok else []
            not_ok += not ok
            bad += [hit[0]] if not ok or (hit[0] - s) * 1000 > slo_ms else []
    arrived = sorted(a for a, _ in answers.values() if t0 <= a < t1)
    lat = summarize(ok_ms)
    return {
        "seconds": round(t1 - t0, 1),
        **{f"{q}_ms": lat.get(q) for q in ("p50", "p99", "max")},
        "not_ok": not_ok,
        "unanswered": unanswered,
        "last_over_slo_after_s": round(max(bad) - t0, 2) if bad else None,
        "longest_gap_ms": round(float(np.diff([t0, *arrived, t1]).max()) * 1000, 1),
    }


def under_load(ctx, name: str, actions: list, est_s: float) -> dict[str, Any]:
    """A steady load for 3 s + `est_s` + `--tail-s` while `actions` ((label, fn) pairs) run
    one after another from 3 s in; figures per action, from its start to the next one's."""
    from streamrec.stack.process import pid_alive
    from streams.topics import topic_name

    args, load, workers = ctx["args"], ctx["load"], ctx["workers"]
    load.ports = []  # no metrics scraped: a restarted worker's port is gone
    seconds = 3.0 + est_s + args.tail_s
    n = round(args.steady_rate * seconds)
    reqs = e2e.build_rate_requests(ctx["artifacts"], n, args, ctx["now_ms"], name, args.seed)
    marks: list[dict[str, Any]] = []

    def mark(label: str) -> dict[str, Any]:
        live = sorted((w.slot, w.log) for w in workers.running())
        marks.append({"event": label, "t": time.perf_counter(), "wall": time.time(), "live": live})
        return marks[-1]

    def play() -> None:
        time.sleep(3.0)
        for label, fn in actions:
            m = mark(label)
            try:
                m |= fn() or {}
            except Exception as e:  # noqa: BLE001 - reported with the event, the load goes on
                m["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            m["action_s"] = round(time.perf_counter() - m["t"], 2)
        mark("done")

    thread = threading.Thread(target=play, name=f"scale-{name}", daemon=True)
    with load.phases.phase(name, f"({args.steady_rate:g} req/s for {seconds:.0f} s)"):
        thread.start()
        step = e2e.run_step(load, args.steady_rate, name, reqs, 0)
        thread.join(300)
    ids, sent = [r["request_id"] for r in reqs], step["_sent"]
    answers = load.arrivals.answers(ids)
    lines = log_lines(sorted(workers.root.glob("*.log")), topic_name(load.settings, "requests"))
    events = []
    for m, nxt in zip(marks, marks[1:], strict=False):
        t1 = nxt["t"] if nxt["event"] != "done" else max(sent[-1], nxt["t"])
        w0, w1 = m["wall"], m["wall"] + (t1 - m["t"])
        others = [x for x in lines if w0 <= x[0] < w1 and x[1] != m.get("log")]
        latest = {log: p for t, log, _, p in lines if t < w1 and p is not None}
        assigned = [t for t, _, _, p in lines if w0 <= t < w1 and p is not None]
        events.append(
            {k: v for k, v in m.items() if k not in ("t", "wall", "live")}
            | {
                "assigned_by_others": sum(x[3] is not None for x in others),
                "rebalance_warnings": sum(bool(REBALANCE.search(x[2])) for x in others),
                "last_assigned_after_s": round(assigned[-1] - w0, 2) if assigned else None,
                "held_by_slot": {s: len(latest.get(log, ())) for s, log in nxt["live"]},
                # first rebalance warning of another worker → the last assignment after it
                "rebalance_s": next(
                    (
                        round(assigned[-1] - t, 2)
                        for t, _, text, _ in others
                        if REBALANCE.search(text) and assigned and assigned[-1] >= t
                    ),
                    None,
                ),  # fmt: skip
            }
            | window(ids, sent, answers, m["t"], t1, args.slo_ms)
        )
    before = window(ids, sent, answers, sent[0], marks[0]["t"], args.slo_ms)
    totals = {k: step[k] for k in ("requests", "ok", "expired", "error", "unanswered")}
    alive = {  # a crash shows here; Valkey may be several nodes
        role: all(map(pid_alive, pid if isinstance(pid, list) else [pid]))
        for role, pid in ctx["pids"].items()
    }
    return {"name": name, "before": before, "events": events, **totals, "alive_after": alive}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.serving import artifact_meta, data_label, default_now_ms, ensure_artifacts
    from state.store import RedisState
    from streamrec.stack.process import stop
    from streamrec.stack.servers import stop_service
    from streamrec.workers import Workers
    from streams.kafka import client_config

    label, machine, phases = args.label or data_label(args.data), machine_info(), Phases()
    train = argparse.Namespace(artifacts=args.artifacts, retrain=False, data=args.data)
    artifacts = ensure_artifacts(argparse.Namespace(**vars(train), train_config="auto"), phases)
    now_ms = default_now_ms(artifacts, artifact_meta(artifacts))[0]
    users, items = e2e.known_ids(artifacts)
    events, _ = e2e.burst_events(args.data, artifacts, args.events, args.seed, users, items)
    tmp = Path(tempfile.mkdtemp(prefix=f"streamrec-scale-{label}-"))
    ctx: dict[str, Any] = {"args": args, "artifacts": artifacts, "now_ms": now_ms}
    services, pids, out, workers, generator, ok = [], {}, {}, None, None, False
    ctx["pids"] = pids

    def discover() -> dict[str, list[int]]:
        running = [w.pid for w in workers.running()] if workers else []
        return stack_processes(pids, running, generator and generator.pid)

    def start_one() -> dict[str, Any]:
        w = e2e.start_workers(workers, 1, tmp)[-1]
        return {"slot": w.slot, "log": w.log}

    def restart(slot: int, kill: bool = False, leave_s: float = 0.0):
        def act() -> dict[str, Any]:
            w = next(w for w in workers.running() if w.slot == slot)
            t = time.perf_counter()
            workers.kill(w) if kill else stop(w.pid, grace=15)
            gone = {"exit_s": round(time.perf_counter() - t, 2)}
            time.sleep(leave_s)
            return gone | (start_one() if not leave_s else {})

        return act

    cpu = CpuAccount(discover)
    try:
        settings, _ = e2e.start_services(args, artifacts, tmp, phases, services, pids)
        bootstrap = settings.kafka_bootstrap
        workers = ctx["workers"] = Workers(settings)
        state = RedisState(settings.redis_url, prefix=settings.feast_project)
        t = time.perf_counter()
        e2e.start_workers(workers, args.counts[0], tmp)
        est = ctx["start_s"] = round((time.perf_counter() - t) / args.counts[0], 1)
        est = 2 * est + 5  # a start under load, estimated; raised by the joins measured
        with e2e.Arrivals(settings, bootstrap) as arrivals:
            generator = Generator(client_config(settings, bootstrap))
            load = ctx["load"] = e2e.RequestLoad(
                settings, bootstrap, arrivals, generator, cpu, [], args, phases, {}
            )
            joins, seed0 = [], args.seed
            for n in args.counts:
                if (have := len(workers.running())) < n:
                    acts = [(f"worker {i + 1} starts", start_one) for i in range(have, n)]
                    joins.append(under_load(ctx, f"join {have} → {n}", acts, est * (n - have)))
                    est = max(est, *(e["action_s"] + 5 for e in joins[-1]["events"]))
                load.ports = [w.metrics_port for w in workers.running()]
                args.seed = seed0 + 1000 * n  # request ids unique to this worker count
                e2e.warm_up(settings, bootstrap, state, arrivals, users, items, now_ms, args)
                burst = [{**e, "event_id": f"{e['event_id']}-w{n}"} for e in events]
                snap = cpu.snapshot()
                with phases.phase(f"burst, {n} worker(s)", f"({len(burst):,} events)"):
                    b = e2e.run_burst(burst, settings, bootstrap, state, load.ports, phases)
                spent = CpuAccount.spent(snap, cpu.snapshot())
                b["cpu_ms_per_event"] = {
                    k: round(v / args.events * 1e3, 3) for k, v in spent.items()
                }
                b.pop("processed_timeline_s")
                sweep = e2e.rate_sweep(load, artifacts, now_ms)
                keep = ("rate", "achieved_rps", "latency_ms", "steady", "sustainable")
                steps = [
                    {k: x[k] for k in keep} | {"cpu": x["cpu_per_request"]} for x in sweep["steps"]
                ]
                out[n] = {"burst": b, "highest_rps": sweep["highest_sustainable_rps"]} | {
                    "steps": steps
                }
            slots = sorted(w.slot for w in workers.running())
            acts = [(f"restart slot {s}", restart(s)) for s in slots]
            rolling = under_load(ctx, "rolling restart", acts, (est + 5) * len(slots))
            leaves = [
                under_load(ctx, f"leave by {sig}", [
                    (f"{sig} slot {slots[-1]}", restart(slots[-1], sig == "SIGKILL", args.leave_s)),
                    (f"replacement in slot {slots[-1]}", start_one),
                ], args.leave_s + est + 5)
                for sig in ("SIGTERM", "SIGKILL")
            ]  # fmt: skip
            generator.close()
        ok = True
    finally:
        if workers is not None:
            workers.stop_all()
        for service in reversed(services):
            stop_service(service)
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            phases.log(f"directory kept: {tmp}")
    return {
        "label": label, "machine": machine, "worker_start_s": ctx["start_s"],
        "config": {k: v for k, v in vars(args).items() if k != "artifacts"},
        "by_workers": out, "joins": joins, "rolling_restart": rolling, "leaves": leaves,
        "wall_s": round(phases.elapsed(), 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip


def markdown_report(r: dict[str, Any]) -> str:
    m, cfg, by = r["machine"], r["config"], r["by_workers"]
    one = by[min(by)]
    rows = []
    for n, x in by.items():
        b, best = x["burst"], max((s for s in x["steps"] if s["sustainable"]),
                                  key=lambda s: s["rate"], default={})  # fmt: skip
        cpu = best.get("cpu", {}).get("cpu_ms", {})
        per_event = [b["cpu_ms_per_event"].get(k) for k in ("stream worker", "broker", "valkey")]
        rows.append([
            n, b["events_per_s"], b["events_per_s_10_to_90pct"],
            fmt(b["events_per_s"] / one["burst"]["events_per_s"]), x["highest_rps"],
            fmt((x["highest_rps"] or 0) / one["highest_rps"]) if one["highest_rps"] else None,
            " / ".join(fmt(best.get("latency_ms", {}).get(q)) for q in ("p50", "p99")),
            *(cpu.get(k) for k in ("stream worker", "broker")),
            round(cpu.get("tritonserver", 0) + cpu.get("triton stubs", 0), 2) if cpu else None,
            cpu.get("valkey"), round(sum(cpu.get(k, 0) for k in SERVING), 2) if cpu else None,
            " / ".join(fmt(v, 3) for v in per_event),
            ", ".join(f"{s['rate']:g}: {fmt(s['latency_ms'].get('p99'), 0)}"
                      + ("" if s["steady"] else " (not steady)") for s in x["steps"]),
        ])  # fmt: skip
    ev = []
    for load in [*r["joins"], r["rolling_restart"], *r["leaves"]]:
        b = load["before"]
        lat = f"{fmt(b['p50_ms'])} / {fmt(b['p99_ms'])} / {fmt(b['max_ms'])}"
        ev.append([f"*{load['name']}: before*", b["seconds"], *[""] * 7, b["longest_gap_ms"],
                   lat, b["not_ok"], b["unanswered"], b["last_over_slo_after_s"]])  # fmt: skip
        for e in load["events"]:
            held = " ".join(f"{s}:{h}" for s, h in e["held_by_slot"].items())
            lat = f"{fmt(e['p50_ms'])} / {fmt(e['p99_ms'])} / {fmt(e['max_ms'])}"
            name = e["event"] + (f" (failed: {e['failed']})" if e.get("failed") else "")
            ev.append([name, e["seconds"], e.get("exit_s"), e["action_s"],
                       e["assigned_by_others"], e["rebalance_warnings"],
                       e["last_assigned_after_s"], e["rebalance_s"], held, e["longest_gap_ms"],
                       lat, e["not_ok"], e["unanswered"], e["last_over_slo_after_s"]])  # fmt: skip
    rr = r["rolling_restart"]
    return "\n".join([
        f"# Many workers: {r['label']}", "",
        f"{r['started']} · {m.get('cpu_model', m['machine'])} · {m['cpus_usable']} CPUs · "
        f"load average at start {m['load_average_at_start']}, at end "
        f"{r['load_average_at_end']} · commit {m.get('git_commit', '?')} · {r['wall_s']:,.0f} s. "
        f"One embedded stack (noida-db broker, Valkey, tritonserver), {cfg['partitions']} "
        "partitions per topic, workers added between measurements. **The machine has "
        f"{m['cpus_usable']} cores**, shared by the workers, broker, Triton, Valkey, the load "
        "generator and the response reader (and other work on the machine): 4 workers cannot "
        f"scale linearly here. Medians and p99 of one run; ratios within it. {cfg['note']}", "",
        "## Throughput by worker count", "",
        markdown_table(["workers", "events/s", "events/s 10→90 %", "× 1 worker",
                        f"req/s, p99 ≤ {cfg['slo_ms']:g} ms", "× 1 worker", "p50 / p99 ms there",
                        "CPU-ms/req worker", "broker", "Triton + stubs", "Valkey",
                        "serving total", "CPU-ms/event worker / broker / Valkey",
                        "sweep (req/s: p99 ms)"], rows), "",
        f"Events/s: a burst of {cfg['events']:,} interactions, from the first produce until the "
        "`acked` counter grew by all of them. Req/s: bench.e2e's open-loop sweep, "
        f"{cfg['warmup_s']:g} + {cfg['duration']:g} s a step; CPU-ms per answered request by "
        "process (psutil) at the highest rate that held the target.", "",
        "## Joins, rolling restart and leaves under a steady load", "",
        f"{cfg['steady_rate']:g} req/s open loop. A row covers its event until the next event "
        "(or the load's end); *before*: the load until the first event. *Assigned (others)*: "
        "`partitions assigned` lines from workers other than the one the event started, i.e. "
        "rebalances they went through; *rebalance warnings*: their log lines on rebalancing / "
        "rejoining / illegal generation; *rebalance s*: from the first of them to the last "
        "assignment. *Held*: slot:request partitions by each live worker's "
        "latest assignment at the row's end. *Gap*: the longest time without an answer. Latency "
        "of the ok answers to the requests sent in the row.", "",
        markdown_table(["event", "s", "exit s", "action s", "assigned (others)",
                        "rebalance warnings", "last assigned after s", "rebalance s", "held",
                        "gap ms",
                        "p50 / p99 / max ms", "not ok", "unanswered", "last over SLO after s"],
                       ev),  # fmt: skip
        "",
        f"Rolling restart in all: {rr['requests']:,} requests, {rr['ok']:,} ok, "
        f"{rr['expired']:,} expired, {rr['error']:,} errors, {rr['unanswered']:,} unanswered. "
        f"A worker starts in {r['worker_start_s']:g} s (unloaded, until ready). Servers "
        "still running after each load: " + "; ".join(
            f"{x['name']}: " + ", ".join(k for k, v in x["alive_after"].items() if v) or "none"
            for x in [*r["joins"], rr, *r["leaves"]]) + ".",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    result = public(run(args) | {"started": started})
    markdown = markdown_report(result)
    paths = write_results(f"scale-{result['label']}", result, markdown)
    console.print(markdown, markup=False)
    console.print("wrote " + " and ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
