"""What durability costs, interleaved in one run on an EmbeddedStack: an interaction batch's
Redis commit with and without WAITAOF (or `appendfsync always`), and a batch of responses
published plainly or in a Kafka transaction with its request offsets (results/durability.*)."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaProducer

from bench.common import console, machine_info, markdown_table, summarize, write_results
from schemas.settings import Settings
from state.features import UserActivity
from state.store import RedisState
from streamrec.stack import EmbeddedStack
from streams.kafka import TransactionalPublisher
from streams.topics import create_topics, topic_name


def redis_commit(state: RedisState, batch: int, wait_aof: bool) -> float:
    """ms of one batch of one user as the interactions processor commits it: the user's
    script, the item side's counts, the pending ids cleared, then (or not) the fsync."""
    started, user = time.perf_counter(), uuid.uuid4().hex[:8]
    events = [(uuid.uuid4().hex, str(n), n) for n in range(batch)]
    pipe = state.pipeline()
    state.apply_user(pipe, user, None, UserActivity(event_count=batch, last_event_ms=batch), events)
    state.execute(pipe)
    state.count([(f"{user}:{e}", item, ts) for e, item, ts in events])
    state.clear_pending({user: [e for e, _, _ in events]})
    if wait_aof:
        state.wait_durable()
    return (time.perf_counter() - started) * 1000


async def kafka_publish(settings: Settings, bootstrap: str, rounds: int, n: int) -> dict:
    """ms of `n` responses with acks=all, then in a transaction with 4 offsets (10 % warm-up)."""
    plain = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await plain.start()
    txn = TransactionalPublisher(settings, bootstrap, f"bench-{uuid.uuid4().hex[:6]}")
    topic, requests = topic_name(settings, "recommendations"), topic_name(settings, "requests")
    value, ms = b"x" * 600, {"plain (acks=all)": [], "transaction + offsets": []}  # ~ k=10
    try:
        for r in range(rounds):
            t0 = time.perf_counter()
            await asyncio.gather(*[await plain.send(topic, value, b"%d" % i) for i in range(n)])
            t1 = time.perf_counter()
            messages = {"recommendations": [(b"%d" % i, value) for i in range(n)]}
            await txn.publish(messages, {(requests, p): r + 1 for p in range(4)})
            ms["plain (acks=all)"].append((t1 - t0) * 1000)
            ms["transaction + offsets"].append((time.perf_counter() - t1) * 1000)
    finally:
        await plain.stop()
        await txn.close()
    return {name: summarize(t[len(t) // 10 :]) for name, t in ms.items()}


def redis_variants(stacks: list[EmbeddedStack], rounds: int, batch: int) -> dict[str, dict]:
    """The three commit variants, round after round: the machine's noise hits all alike."""
    everysec, always = (RedisState(s.endpoint("redis")) for s in stacks)
    always.client.config_set("appendfsync", "always")
    variants = [("everysec, no wait (not durable)", everysec, False),
                ("everysec + WAITAOF (streamrec)", everysec, True),
                ("appendfsync always", always, False)]  # fmt: skip
    ms: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _ in range(rounds):
        for name, state, wait in variants:
            ms[name].append(redis_commit(state, batch, wait))
    return {name: summarize(t) for name, t in ms.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("python -m bench.durability", description=__doc__)
    parser.add_argument("--rounds", type=int, default=400, help="batches per variant (400)")
    parser.add_argument("--batch", type=int, default=50, help="interactions per Redis batch (50)")
    parser.add_argument("--responses", type=int, default=32, help="responses per Kafka batch (32)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:  # Valkey everysec with the broker, Valkey always
        settings = dict(partitions=4, kafka_bootstrap=None, redis_url=None)
        stacks = [EmbeddedStack(Settings(run_dir=Path(tmp) / n, **settings)) for n in "ab"]
        try:
            stacks[0].up(("redis", "kafka"))
            stacks[1].up(("redis",))
            redis = redis_variants(stacks, args.rounds, args.batch)
            create_topics(stacks[0].settings, bootstrap := stacks[0].endpoint("kafka"))
            kafka = kafka_publish(stacks[0].settings, bootstrap, args.rounds, args.responses)
            kafka = asyncio.run(kafka)
        finally:
            for stack in stacks:
                stack.down()
    rows = [[f"Redis commit of {args.batch} interactions", k, s] for k, s in redis.items()]
    rows += [[f"Kafka publish of {args.responses} responses", k, s] for k, s in kafka.items()]
    rows = [[what, variant, s["p50"], s["p99"]] for what, variant, s in rows]
    table = markdown_table(["what", "variant", "p50 ms", "p99 ms"], rows)
    data = {"args": vars(args), "machine": machine_info(), "redis": redis, "kafka": kafka}
    write_results("durability", data, f"# What durability costs\n\n{table}\n")
    console.print(table)


if __name__ == "__main__":
    main()
