"""What durability costs, interleaved in one run on an EmbeddedStack: an interaction batch's
Redis commit with and without WAITAOF (or `appendfsync always`), and a batch of responses
published plainly or in a Kafka transaction with its request offsets (results/durability.*)."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaProducer

from bench import common
from bench.common import summarize
from schemas.settings import Settings
from state.features import UserActivity
from state.store import RedisState
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


OPTIONS = [
    ("--rounds", 400, "batches per variant"),
    ("--batch", 50, "interactions per Redis batch"),
    ("--responses", 32, "responses per Kafka batch"),
]


def main(argv: list[str] | None = None) -> None:
    args = common.parser("python -m bench.durability", __doc__, OPTIONS).parse_args(argv)
    r = common.run_info("durability") | {"config": vars(args)}
    with (  # Valkey everysec with the broker; Valkey always
        common.embedded_stack("durability", False, partitions=4) as stack,
        common.embedded_stack("durability-always", False) as always,
    ):
        stack.up(("redis", "kafka"))
        always.up(("redis",))
        everysec, fsync = (RedisState(s.endpoint("redis")) for s in (stack, always))
        fsync.client.config_set("appendfsync", "always")
        variants = [
            ("everysec, no wait (not durable)", everysec, False),
            ("everysec + WAITAOF (streamrec)", everysec, True),
            ("appendfsync always", fsync, False),
        ]
        ms: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        for _ in range(args.rounds):  # round after round: the machine's noise hits all alike
            for name, state, wait in variants:
                ms[name].append(redis_commit(state, args.batch, wait))
        r["redis"] = {name: summarize(t) for name, t in ms.items()}
        create_topics(stack.settings, bootstrap := stack.endpoint("kafka"))
        kafka = kafka_publish(stack.settings, bootstrap, args.rounds, args.responses)
        r["kafka"] = asyncio.run(kafka)
    rows = [[f"Redis commit of {args.batch} interactions", k, s] for k, s in r["redis"].items()]
    rows += [[f"Kafka publish of {args.responses} responses", k, s] for k, s in r["kafka"].items()]
    rows = [[what, variant, s["p50"], s["p99"]] for what, variant, s in rows]
    r, table = common.finished(r), common.table("what|variant|p50 ms|p99 ms", rows)
    common.publish("durability", r, [common.header("What it costs", r), table])


if __name__ == "__main__":
    main()
