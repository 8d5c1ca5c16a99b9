"""`make demo`: the whole system on the embedded stack, end to end, in a few minutes.

Stack up → ML-100K → train and evaluate → features into Feast/Redis → Triton ensemble → stream
worker → replay of a slice of the hold-out → for a few users, recommendations before and after a
new interaction → latency and freshness → everything shut down.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from schemas.artifacts import Artifacts
from schemas.settings import Settings
from streamrec.stack import EmbeddedStack

DEMO_USERS = ("405", "655", "13")


def run_demo(settings: Settings, console: Console, keep: bool = False, retrain: bool = False):
    from models.data import load_movielens_100k
    from models.evaluate import markdown_table
    from streamrec.deploy import deploy
    from streamrec.workers import Workers
    from streams.topics import create_topics

    stack = EmbeddedStack(settings)
    workers = Workers(settings)
    started = time.monotonic()

    def step(message: str) -> None:
        console.rule(f"[bold]{message}[/]  [dim]{time.monotonic() - started:.0f}s[/]")

    try:
        step("1. the embedded stack: Kafka-protocol broker and Valkey")
        stack.up(("kafka", "redis"))
        bootstrap, redis_url = stack.endpoint("kafka"), stack.endpoint("redis")
        create_topics(settings, bootstrap)
        console.print(f"broker {bootstrap}, Valkey {redis_url}")

        step("2. MovieLens-100K, temporal split, training and offline evaluation")
        with console.status("fetching ML-100K (once) from the recbole wheel"):
            dataset = load_movielens_100k(settings.data_dir)
        artifacts = _artifacts(settings, dataset, console, retrain)
        manifest = Artifacts(artifacts).manifest
        console.print(markdown_table(manifest["metrics"]["evaluation"]))

        step("3. features into Feast (Redis online store), the ensemble onto Triton, a worker")
        with console.status("loading features, starting tritonserver (executor model + ensemble)"):
            deploy(settings, stack, artifacts)
        with console.status("starting a stream worker"):
            workers.start(1)
        console.print(f"Triton {stack.endpoint('triton')}, worker pid {workers.running()[0].pid}")

        step("4. replay of the hold-out's first 4,000 interactions with requests at eval points")
        _replay(settings, dataset, artifacts, bootstrap, redis_url, console)

        step("5. the stream at work: recommendations before and after a new interaction")
        day_after = int(dataset.interactions["timestamp"].max()) * 1000 + 86_400_000
        _before_after(settings, artifacts, bootstrap, redis_url, console, day_after)
        console.print(f"[bold green]demo ok[/] in {time.monotonic() - started:.0f} s")
    finally:
        if not keep:
            workers.stop_all()
            stack.down()
            console.print("workers and stack stopped")


def _artifacts(settings: Settings, dataset, console: Console, retrain: bool) -> Path:
    from models.train import TrainConfig, train
    from schemas.artifacts import Artifacts, current_artifacts
    from streamrec.quiet import load_tensorflow

    if not retrain:
        try:
            found = current_artifacts(settings.artifact_dir)
            if Artifacts(found).manifest["dataset"] == dataset.name:
                console.print(f"reusing trained artifacts {found.name} (--retrain to train again)")
                return found
        except FileNotFoundError:
            pass
    t0 = time.monotonic()
    with console.status("training") as status:
        load_tensorflow()
        out = train(
            dataset,
            settings.artifact_dir,
            TrainConfig(),
            lambda m: (status.update(m.strip()), console.print(f"  {m}")),
        )
    console.print(f"trained in {time.monotonic() - t0:.0f} s → {out}")
    return out


def _replay(settings, dataset, artifacts, bootstrap, redis_url, console) -> None:
    from state.store import RedisState
    from streams.replay import Recorder, build_timeline, produce_timeline, served_quality

    timeline = build_timeline(
        dataset, artifacts, max_users=60, points_per_user=1, max_interactions=4000
    )
    state = RedisState(redis_url, prefix=settings.feast_project)
    ids = {s.record["request_id"] for s in timeline.requests}
    with Recorder(settings, bootstrap) as recorder:
        result = produce_timeline(timeline, settings, bootstrap, recorder, state.acked)
        recorder.wait(ids, timeout=60)
        got = {rid: r for rid, r in recorder.responses.items() if rid in ids}
    console.print(
        f"{result.produced['interactions']:,} interactions, "
        f"{result.produced['requests']} requests, {result.produced['raw']} undecodable "
        f"events (dead-lettered) in {result.seconds:.1f} s; "
        f"{len(got)}/{len(ids)} requests answered"
    )
    table = Table("on the replay's points", "recall@10", "ndcg@10")
    for name, m in served_quality(timeline, got, 10).items():
        table.add_row(name, f"{m['recall@10']:.4f}", f"{m['ndcg@10']:.4f}")
    console.print(table)


def _before_after(settings, artifacts, bootstrap, redis_url, console, now: int) -> None:
    from state.store import RedisState
    from streamrec.client import Client

    titles = Artifacts(artifacts).read(Artifacts.ITEMS)
    state = RedisState(redis_url, prefix=settings.feast_project)
    latencies, freshness = [], []
    with Client(bootstrap, settings, timeout=30.0) as client:

        def ask(user: str):
            sent = time.perf_counter()
            response = client.recommend(user, k=5, temperature=0.0, ts=now)
            latencies.append((time.perf_counter() - sent) * 1000)
            return response

        for user in DEMO_USERS:
            before = ask(user)
            if not before.items:
                console.print(f"user {user}: {before.status}: {before.error}")
                continue
            clicked = before.item_ids[0]
            acked = state.acked()
            sent = time.perf_counter()
            client.track(user, clicked, "click", ts=now, request_id=before.request_id)
            client.flush()
            while state.acked() <= acked:
                time.sleep(0.001)
            freshness.append((time.perf_counter() - sent) * 1000)
            after = ask(user)
            history = state.seen(user)[:4]
            _show(console, user, history, before.item_ids, after.item_ids, clicked, titles)
    console.print(
        f"request → response over Kafka: median {statistics.median(latencies):.1f} ms "
        f"(max {max(latencies):.1f}) over {len(latencies)} requests; interaction → features "
        f"and filters written: median {statistics.median(freshness):.1f} ms. "
        "Benchmarks with percentiles: bench/."
    )


def _show(console, user, history, before, after, clicked, titles) -> None:
    def title(i: str) -> str:
        return str(titles.get(i, {}).get("title") or i)

    table = Table(
        "#",
        "before",
        "after",
        title=f"user {user} — recent: " + "; ".join(title(i) for i in history),
        title_justify="left",
    )
    for n in range(max(len(before), len(after))):
        b = before[n] if n < len(before) else ""
        a = after[n] if n < len(after) else ""
        mark = " [yellow](clicked)[/]" if b == clicked else ""
        table.add_row(str(n + 1), f"{title(b)}{mark}" if b else "", title(a) if a else "")
    console.print(table)
