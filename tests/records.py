"""Valid records of each topic for the tests (with defaults for what a test does not care
about), a way to put them on their topics and to read them back, and the tests' one way to wait
for a condition."""

from __future__ import annotations

import time
import uuid

from schemas.records import Interaction, ItemUpdate, RecommendationRequest

T0 = 893_300_000_000  # ML-100K's last weeks, in ms


def interaction(user: str, item: str, ts: int = T0, event_id: str | None = None) -> dict:
    event = Interaction(user, item, timestamp_ms=ts)
    return event.to_record() | ({"event_id": event_id} if event_id else {})


def item_update(
    item: str,
    ts: int = T0,
    available: bool = True,
    title: str | None = None,
    year: int | None = None,
    genres: list[str] = (),
) -> dict:
    return ItemUpdate(item, available, title, year, list(genres), timestamp_ms=ts).to_record()


def request(user: str, k: int = 10, request_id: str | None = None, **extra) -> dict:
    record = RecommendationRequest(user, k, temperature=0.0, timestamp_ms=T0).to_record()
    return record | ({"request_id": request_id} if request_id else {}) | extra


def stack_settings(base_settings, kafka, redis_url, triton_url, artifacts, **extra):
    """Settings for a worker on the test stack, with fresh topics (created) and group."""
    from schemas.settings import TopicNames
    from streams.topics import create_topics

    prefix = f"s{uuid.uuid4().hex[:6]}"
    names = {role: f"{prefix}-{name}" for role, name in TopicNames().model_dump().items()}
    settings = base_settings.model_copy(
        update={
            "kafka_bootstrap": kafka,
            "redis_url": redis_url,
            "triton_url": triton_url,
            "artifact_dir": artifacts.parent,
            "topics": TopicNames(**names),
            "worker_group": f"{prefix}-workers",
        }
        | extra
    )
    create_topics(settings, kafka)
    return settings


def produce(settings, role: str, records: list[dict], raw: list[bytes] = ()) -> None:
    """Produce `raw` bytes (malformed events) and then `records`; wait until all are delivered."""
    from streams.kafka import EventProducer

    producer = EventProducer(settings, settings.kafka_bootstrap)
    for value in raw:
        producer.send_raw(role, value, key=b"k")
    for r in records:
        producer.send(role, r)
    producer.close()


def wait_until(condition, timeout: float, what: str, every: float = 0.05):
    """Poll `condition` until it returns something true, and return that; after `timeout`
    seconds the test fails, saying what it waited for."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
    return value


def _ends(consumer, topic: str) -> dict[int, int]:
    """Each partition's end (high watermark) now."""
    from confluent_kafka import TopicPartition

    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    return {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
        for p in partitions
    }


def _consumer(settings, bootstrap: str, group: str, **extra):
    from confluent_kafka import Consumer

    from streams.kafka import client_config

    conf = {"group.id": group, "enable.auto.commit": False} | extra
    return Consumer(client_config(settings, bootstrap) | conf)


def processed(settings, bootstrap: str, roles: list[str]) -> bool:
    """Whether the workers' group has committed every event these topics hold now. A worker
    commits an event's offset only once its effects, answer or dead letter are written: then
    everything that will come of those events is there, late duplicates included."""
    from streams.rebuild import committed_offsets
    from streams.topics import topic_name

    consumer = _consumer(settings, bootstrap, f"ends-{uuid.uuid4().hex[:8]}")
    try:
        ends = {
            (topic, p): end
            for topic in (topic_name(settings, role) for role in roles)
            for p, end in _ends(consumer, topic).items()
        }
    finally:
        consumer.close()
    committed = committed_offsets(settings, bootstrap, list(ends))
    return all(committed.get(tp, 0) >= end for tp, end in ends.items())


def read_topic(settings, bootstrap: str, role: str, timeout: float = 30.0) -> list[dict]:
    """Every record of a topic, from its beginning up to its end as of this call (a consumer
    of its own, assigned: it joins no group)."""
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    from streams.topics import serde_for, topic_name

    topic, serde = topic_name(settings, role), serde_for(settings, role)
    consumer = _consumer(
        settings, bootstrap, f"read-{uuid.uuid4().hex[:8]}", **{"enable.partition.eof": True}
    )
    try:
        ends = _ends(consumer, topic)
        todo = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        records, deadline = [], time.monotonic() + timeout
        while todo:  # the last offsets may be transaction markers: the partition's EOF ends it
            assert time.monotonic() < deadline, f"reading {topic} to its end timed out"
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"reading {topic}: {msg.error()}")
                todo.discard(msg.partition())
                continue
            if msg.offset() < ends[msg.partition()]:
                records.append(serde.decode(msg.value()))
            if msg.offset() >= ends[msg.partition()] - 1:
                todo.discard(msg.partition())
        return records
    finally:
        consumer.close()
