"""Faults injected into the live system while interactions and requests flow.

Each scenario injects one real fault (SIGKILL, SIGSTOP, a restart on the same data) and then
checks, from the state and the response topic: no accepted event lost or applied twice (user
state, its Feast rows, item popularity in the `popular` sorted set), every request answered
(error answers are fine during the outage; a duplicate answer must be byte-identical), and the
system back within 30 s of the fault clearing. "Recovery" is the later of: an interaction sent
when the fault cleared is applied, and a request sent after it is answered `ok`.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest
import redis
from fault_load import ROWS, Live, Load
from records import wait_until

from streamrec.stack.process import pid_alive
from streamrec.workers import Workers

pytestmark = pytest.mark.faults

RECOVERY_S = 30.0


def _kill(pid: int, sig: int = signal.SIGKILL, group: bool = False) -> None:
    if group:
        os.killpg(pid, sig)
    else:
        os.kill(pid, sig)
    wait_until(lambda: not pid_alive(pid), 30, f"pid {pid} to exit")


def run(live: Live, name: str, inject, broker_restarts: bool = False, **rates) -> dict:
    """Flow load, inject the fault (which returns when it cleared), measure and check."""
    with Load(live, name, **rates) as load:
        state = live.state()
        wait_until(lambda: len(load.sent) >= 100 and load.responses, 60, "the load to flow")
        cleared = inject(live)
        probe = f"{name}-probe"

        def probe_applied() -> bool:  # sent now, and again each second until one is applied
            if Load.applied(state, [probe])[probe] > 0:
                return True
            if time.monotonic() - cleared > load.probes:
                load.probes += 1
                load.interaction(probe)
            return False

        wait_until(probe_applied, 120, "an interaction after the fault")
        applied = time.monotonic()
        try:
            wait_until(
                lambda: load.first_ok_after(cleared) is not None, 120, "a request after the fault"
            )
            answered = time.monotonic()
        except AssertionError as e:  # worker stuck, or this test's reader? Say which.
            health = live.workers.health()
            raise AssertionError(f"{e}; {len(load.responses)} answers read; {health}") from e
        load.settle()
    row = measure(live, load)
    row["recovery_s"] = round(max(applied, answered) - cleared, 1)
    ROWS.append({"scenario": name, **row})
    assert row["lost"] == 0 and row["doubled"] == 0, row
    assert broker_restarts or row["broker_lost"] == 0, row
    assert row["answered"] == row["requests"], row
    assert row["recovery_s"] <= RECOVERY_S, row
    return row


def measure(live: Live, load: Load) -> dict:
    """The row: counts from Valkey and the topics. An event the broker acknowledged but lost
    in its own restart (`broker_lost`) may have been applied before it was lost, or not: it
    counts neither as lost nor as doubled; every other event must be applied exactly once."""
    from state.feature_store import OnlineReader

    state = live.state()
    accepted = [e for e in load.sent + load.unconfirmed if e["event_id"] in load.kept]
    broker_lost = [e for e in load.sent if e["event_id"] not in load.kept]
    # Not in the log after the restart: acknowledged and then lost by the broker, or never
    # acknowledged (a delivery error) yet written and lost; either may have been applied.
    gone = broker_lost + [e for e in load.unconfirmed if e["event_id"] not in load.kept]
    at_least = load.accepted()
    at_most = at_least + Counter(e["user_id"] for e in gone)
    users = sorted(at_most)
    actual = Load.applied(state, users)
    reader = OnlineReader(live.stack.endpoint("redis"), project=live.settings.feast_project)
    feast = [row["event_count"] if row else 0 for row in reader.users(users, "user_activity")]
    assert feast == [actual[u] for u in users], "Feast rows differ from the users' state"
    _check_popularity(state, accepted, gone)
    answers = {rid: load.responses.get(rid, []) for rid in load.requests}
    for rid, got in answers.items():
        assert len({raw for raw, _, _ in got}) <= 1, f"duplicate answers to {rid} differ"
    reasons = Counter(
        got[0][1]["error"][:80] for got in answers.values() if got and got[0][1]["status"] != "ok"
    )
    print(f"error answers: {dict(reasons.most_common(5))}")  # shown when a scenario fails
    unconfirmed_kept = sum(e["event_id"] in load.kept for e in load.unconfirmed) + sum(
        rid in load.requests for rid in load.unconfirmed_requests
    )
    return {
        "events": sum(at_most.values()),
        "applied": sum(min(actual[u], n) for u, n in at_most.items()),
        "lost": sum(max(0, n - actual[u]) for u, n in at_least.items()),
        "doubled": sum(max(0, actual[u] - n) for u, n in at_most.items()),
        "not_accepted": load.failed_sends - unconfirmed_kept,
        "unconfirmed_kept": unconfirmed_kept,
        "broker_lost": len(broker_lost) + load.lost_requests,
        "requests": len(answers),
        "answered": sum(1 for got in answers.values() if got),
        "duplicated": sum(max(0, len(got) - 1) for got in answers.values()),
        "errors": sum(1 for got in answers.values() if got and got[0][1]["status"] != "ok"),
    }


def _check_popularity(state, accepted: list[dict], gone: list[dict]) -> None:
    """Each item's popularity is the sum of its accepted events' weights, each counted once
    (events the broker lost may or may not be in it)."""

    def weights(events) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in events:
            out[e["item_id"]] = out.get(e["item_id"], 0.0) + state.popularity_weight(
                e["timestamp_ms"]
            )
        return out

    least, maybe = weights(accepted), weights(gone)
    items = sorted(least.keys() | maybe.keys())
    for item, got in zip(items, state.popularity_scores(items), strict=True):
        low, high = least.get(item, 0.0), least.get(item, 0.0) + maybe.get(item, 0.0)
        assert low * (1 - 1e-9) <= got <= high * (1 + 1e-9), f"popularity of {item}"


def test_valkey_sigkill_and_restart_on_its_data(live):
    def inject(live: Live) -> float:
        _kill(live.service_pid("redis"))
        time.sleep(3.0)  # the outage
        live.stack.up(("redis",))  # heals in place: same port, same AOF
        return time.monotonic()

    run(live, "valkey-kill", inject)


def test_valkey_stopped_longer_than_every_client_timeout(live):
    def inject(live: Live) -> float:
        pid = live.service_pid("redis")
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_until(  # the worker says so: it holds its batches and waits
            lambda: "interactions" in live.workers.health()[0]["stalled"], 10, "a stall report"
        )
        time.sleep(max(0.0, stopped + 6.0 - time.monotonic()))  # > every client timeout
        os.kill(pid, signal.SIGCONT)
        return time.monotonic()

    run(live, "valkey-stop", inject)


def test_cluster_primary_sigkill_and_restart_on_its_data(cluster_live):
    """A Valkey cluster without replicas cannot fail over: the dead primary's slots are down
    until it restarts on its AOF and rejoins; the workers hold their batches meanwhile."""

    def inject(live: Live) -> float:
        _kill(live.stack.services()["redis"].pids[1])
        time.sleep(3.0)  # the outage
        live.stack.up(("redis",))  # restarts the dead node: same ports, AOF and nodes.conf
        return time.monotonic()

    run(cluster_live, "cluster-node-kill", inject)


def test_cluster_primary_stopped_longer_than_every_client_timeout(cluster_live):
    def inject(live: Live) -> float:
        pid = live.stack.services()["redis"].pids[2]
        os.kill(pid, signal.SIGSTOP)
        time.sleep(6.0)  # > every client timeout, > the cluster's node timeout
        os.kill(pid, signal.SIGCONT)
        return time.monotonic()

    run(cluster_live, "cluster-node-stop", inject)


def test_cluster_failover_to_a_replica(replicated_live):
    """A primary SIGKILLed: its replica takes over its slots after the node timeout (2 s), and
    the dead node comes back as the new primary's replica. Offsets are committed only once a
    replica has the effects, so the failover loses nothing acked; until a replica is back the
    workers hold their batches."""

    def inject(live: Live) -> float:
        service = live.stack.services()["redis"]
        _kill(service.pids[1])
        replica = redis.Redis(port=int(service.extra["ports"].split(",")[4]))  # node 1's
        wait_until(lambda: replica.info("replication")["role"] == "master", 30, "the failover")
        live.stack.up(("redis",))  # the dead node rejoins, as a replica
        return time.monotonic()

    row = run(replicated_live, "cluster-failover", inject)
    assert row["applied"] == row["events"]


def test_tritonserver_sigkill_and_restart(live):
    def inject(live: Live) -> float:
        _kill(live.service_pid("triton"), group=True)  # the server and its stage stubs
        live.stack.up(("triton",))  # same ports, same model repository
        return time.monotonic()

    run(live, "triton-kill", inject)


def test_a_stage_stub_sigkill_is_healed(live):
    import psutil

    def inject(live: Live) -> float:
        triton = psutil.Process(live.service_pid("triton"))
        stub = next(p for p in triton.children() if "/executor/" in " ".join(p.cmdline()))
        stub.kill()
        killed = time.monotonic()  # nobody restarts anything: the worker must notice and heal
        wait_until(  # the worker reports the degraded serving path until it healed it
            lambda: live.workers.health()[0]["serving_ready"] == 0, 15, "a degraded canary"
        )
        return killed

    run(live, "stage-kill", inject)


def replace_worker(workers: Workers):
    """The fault: SIGKILL the worker and start a replacement at once (its slot, so its id)."""

    def inject(live: Live) -> float:
        workers.kill(workers.running()[0])
        cleared = time.monotonic()
        workers.start(1)
        return cleared

    return inject


def test_worker_sigkill_during_interactions(live):
    inject = replace_worker(live.workers)
    run(live, "worker-kill-events", inject, events_per_s=200, requests_per_s=2)


def test_worker_sigkill_during_requests(live):
    inject = replace_worker(live.workers)
    run(live, "worker-kill-requests", inject, events_per_s=20, requests_per_s=20)


def test_broker_stop_and_start_with_its_data(live):
    def inject(live: Live) -> float:
        _kill(live.service_pid("kafka"), signal.SIGTERM)  # saves its data and exits
        live.stack.up(("kafka",))  # same port, same data directory
        return time.monotonic()

    run(live, "broker-restart", inject, broker_restarts=True)
