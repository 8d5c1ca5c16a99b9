"""`make demo`: the embedded stack end to end."""

from __future__ import annotations

import time
import uuid

from rich.console import Console
from rich.table import Table

from schemas.examples import example_records
from streamrec.config import Settings
from streamrec.stack import EmbeddedStack


def run_demo(settings: Settings, console: Console, keep: bool = False) -> None:
    from streams.kafka import EventConsumer, EventProducer
    from streams.topics import TOPICS, create_topics

    stack = EmbeddedStack(settings)
    started = time.monotonic()
    with console.status("starting the embedded stack") as status:
        stack.up(on_start=lambda n: status.update(f"starting {n}"))
    console.print(
        f"[green]stack up[/] in {time.monotonic() - started:.1f} s: "
        + ", ".join(f"{r['service']}={r['endpoint']}" for r in stack.status())
    )
    try:
        bootstrap = stack.endpoint("kafka")
        created = create_topics(settings, bootstrap)
        console.print(f"topics: {', '.join(f'{n} ({s})' for n, s in created.items())}")

        producer = EventProducer(settings, bootstrap)
        examples = example_records(int(time.time() * 1000))
        for role, topic in TOPICS.items():
            producer.send(role, examples[topic.schema])
        producer.send_raw("interactions", b"\x00not avro at all", key=b"196")
        producer.close()

        consumer = EventConsumer(settings, bootstrap, list(TOPICS), f"demo-{uuid.uuid4().hex[:6]}")
        table = Table("topic", "partition@offset", "event", title="events round-tripped")
        n = 0
        for event in consumer.events(idle_timeout=3.0):
            shown = f"[red]rejected: {event.error}[/]" if event.error else _brief(event.value)
            table.add_row(event.topic, f"{event.partition}@{event.offset}", shown)
            n += 1
        consumer.close()
        console.print(table)
        expected = len(TOPICS) + 1
        if n != expected:
            raise RuntimeError(f"expected {expected} events back, got {n}")

        console.print(f"triton ping: {_ping_triton(stack.endpoint('triton'))}")
        console.print(
            f"[bold green]demo ok[/]: {n} events round-tripped through {len(TOPICS)} topics"
        )
    finally:
        if not keep:
            stack.down()
            console.print("stack down")


def _brief(value: dict) -> str:
    keys = [
        k
        for k in (
            "event_id",
            "request_id",
            "item_id",
            "user_id",
            "event_type",
            "status",
            "available",
            "error",
        )
        if k in value
    ]
    return ", ".join(f"{k}={value[k]}" for k in keys)


def _ping_triton(endpoint: str) -> str:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(endpoint)
    x = grpcclient.InferInput("INPUT", [3], "FP32")
    x.set_data_from_numpy(np.array([1, 2, 3], dtype=np.float32))
    out = client.infer("ping", [x]).as_numpy("OUTPUT")
    return f"ping([1, 2, 3]) = {out.tolist()}"
