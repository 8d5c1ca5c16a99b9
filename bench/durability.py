"""What durability costs: the interaction batch's Redis commit with and without WAITAOF (and with
`appendfsync always` instead), and a batch of responses published plainly or in a Kafka
transaction with its request offsets. Real embedded servers, measured interleaved in one run.

    python -m bench.durability [--rounds 400] [--batch 50] [--responses 32]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import console, machine_info, markdown_table, summarize, write_results
from schemas.settings import Settings
from state.store import RedisState
from streamrec.stack.servers import STARTERS, stop_service
from streams.kafka import TransactionalPublisher
from streams.topics import create_topics, topic_name


def redis_commit(state: RedisState, batch: int, wait_aof: bool) -> float:
    """One batch of one user as the interactions processor commits it: the user's script, the
    item side's count, the pending ids cleared, then the fsync."""
    from state.features import UserActivity

    started = time.perf_counter()
    user = uuid.uuid4().hex[:8]
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
    from aiokafka import AIOKafkaProducer

    plain = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await plain.start()
    txn = TransactionalPublisher(settings, bootstrap, f"bench-{uuid.uuid4().hex[:6]}")
    topic = topic_name(settings, "recommendations")
    requests = topic_name(settings, "requests")
    value = b"x" * 600  # about one encoded response of k=10
    times: dict[str, list[float]] = {"plain (acks=all)": [], "transaction + offsets": []}
    try:
        for r in range(rounds):
            started = time.perf_counter()
            sent = [await plain.send(topic, value, key=str(i).encode()) for i in range(n)]
            await asyncio.gather(*sent)
            times["plain (acks=all)"].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            messages = {"recommendations": [(str(i).encode(), value) for i in range(n)]}
            await txn.publish(messages, {(requests, i % 4): r + 1 for i in range(4)})
            times["transaction + offsets"].append((time.perf_counter() - started) * 1000)
    finally:
        await plain.stop()
        await txn.close()
    return {name: summarize(t[len(t) // 10 :]) for name, t in times.items()}  # skip warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=400, help="batches per variant")
    parser.add_argument("--batch", type=int, default=50, help="interactions per Redis batch")
    parser.add_argument("--responses", type=int, default=32, help="responses per Kafka batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        services = []
        try:
            console.print("starting Valkey (everysec), Valkey (always) and the broker")
            everysec = STARTERS["redis"](root / "everysec", 15)
            services.append(everysec)
            always = STARTERS["redis"](root / "always", 15)
            services.append(always)
            kafka = STARTERS["kafka"](root / "kafka", 30)
            services.append(kafka)
            RedisState(always.endpoint).client.config_set("appendfsync", "always")
            variants = {
                "everysec, no wait (not durable)": (RedisState(everysec.endpoint), False),
                "everysec + WAITAOF (streamrec)": (RedisState(everysec.endpoint), True),
                "appendfsync always": (RedisState(always.endpoint), False),
            }
            redis_ms: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):  # interleaved: the machine's noise hits all alike
                for name, (state, wait) in variants.items():
                    redis_ms[name].append(redis_commit(state, args.batch, wait))
            settings = Settings(run_dir=root, partitions=4)
            create_topics(settings, kafka.endpoint)
            console.print("publishing response batches")
            kafka_ms = asyncio.run(
                kafka_publish(settings, kafka.endpoint, args.rounds, args.responses)
            )
        finally:
            for service in services:
                stop_service(service)
    redis_summary = {name: summarize(t) for name, t in redis_ms.items()}
    rows = [
        [f"Redis commit of {args.batch} interactions", name, s["p50"], s["p99"]]
        for name, s in redis_summary.items()
    ] + [
        [f"Kafka publish of {args.responses} responses", name, s["p50"], s["p99"]]
        for name, s in kafka_ms.items()
    ]
    table = markdown_table(["what", "variant", "p50 ms", "p99 ms"], rows)
    data = {
        "args": vars(args),
        "machine": machine_info(),
        "redis": redis_summary,
        "kafka": kafka_ms,
    }
    write_results("durability", data, f"# What durability costs\n\n{table}\n")
    console.print(table)


if __name__ == "__main__":
    main()
