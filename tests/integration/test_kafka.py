"""Against the real embedded Kafka-protocol broker."""

from __future__ import annotations

import time
import uuid

import pytest

from schemas.examples import example_records
from streams.kafka import EventConsumer, EventProducer
from streams.topics import TOPICS, topic_name

pytestmark = pytest.mark.integration


def _interaction(i: int) -> dict:
    return example_records(0)["interaction"] | {
        "event_id": f"ev-{i}",
        "user_id": f"u{i}",
        "item_id": str(i),
        "timestamp_ms": i,
    }


def _drain(consumer: EventConsumer, want: int, timeout: float = 20.0) -> list:
    events, deadline = [], time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        event = consumer.poll(0.2)
        if event is not None:
            events.append(event)
    return events


def test_every_schema_round_trips_through_its_topic(settings, kafka):
    examples = example_records(int(time.time() * 1000))
    producer = EventProducer(settings, kafka)
    for role, topic in TOPICS.items():
        producer.send(role, examples[topic.schema])
    producer.close()

    consumer = EventConsumer(settings, kafka, list(TOPICS), f"g-{uuid.uuid4().hex}")
    events = _drain(consumer, len(TOPICS))
    consumer.close()

    by_topic = {e.topic: e for e in events}
    assert len(events) == len(TOPICS)
    for role, topic in TOPICS.items():
        event = by_topic[topic_name(settings, role)]
        assert event.error is None
        assert event.value == examples[topic.schema]
        if topic.key_field:
            assert event.key == str(examples[topic.schema][topic.key_field]).encode()


def test_a_group_of_two_consumers_splits_the_partitions(settings, kafka):
    producer = EventProducer(settings, kafka)
    for i in range(60):
        producer.send("interactions", _interaction(i))
    producer.close()

    group = f"g-{uuid.uuid4().hex}"
    a = EventConsumer(settings, kafka, ["interactions"], group)
    b = EventConsumer(settings, kafka, ["interactions"], group)
    got = {"a": [], "b": []}
    deadline = time.monotonic() + 40
    while len(got["a"]) + len(got["b"]) < 60 and time.monotonic() < deadline:
        for name, consumer in (("a", a), ("b", b)):
            event = consumer.poll(0.1)
            if event is not None:
                got[name].append(event)
    assign_a, assign_b = set(a.assignment()), set(b.assignment())
    a.close()
    b.close()

    topic = topic_name(settings, "interactions")
    assert assign_a and assign_b
    assert assign_a.isdisjoint(assign_b)
    assert assign_a | assign_b == {(topic, p) for p in range(settings.partitions)}
    ids = sorted(e.value["event_id"] for e in got["a"] + got["b"])
    assert ids == sorted(f"ev-{i}" for i in range(60))  # all of them, once
    assert {e.partition for e in got["a"]} <= {p for _, p in assign_a}


def test_committed_offsets_survive_a_consumer_restart(settings, kafka):
    producer = EventProducer(settings, kafka)
    for i in range(30):
        producer.send("interactions", _interaction(i))
    producer.close()

    group = f"g-{uuid.uuid4().hex}"
    first = EventConsumer(settings, kafka, ["interactions"], group)
    before = _drain(first, 12)
    first.commit()
    first.close()

    second = EventConsumer(settings, kafka, ["interactions"], group)
    after = _drain(second, 30 - len(before), timeout=20)
    extra = _drain(second, 1, timeout=2)  # nothing more may come
    second.close()

    ids_before = {e.value["event_id"] for e in before}
    ids_after = [e.value["event_id"] for e in after]
    assert len(before) == 12
    assert extra == []
    assert len(ids_after) == len(set(ids_after))
    assert ids_before.isdisjoint(ids_after)
    assert ids_before | set(ids_after) == {f"ev-{i}" for i in range(30)}


def test_malformed_bytes_are_rejected_with_the_reason(settings, kafka):
    producer = EventProducer(settings, kafka)
    producer.send_raw("interactions", b"\x00\x01 definitely not avro", key=b"k")
    producer.send("interactions", _interaction(1) | {"user_id": "k"})
    producer.close()

    consumer = EventConsumer(settings, kafka, ["interactions"], f"g-{uuid.uuid4().hex}")
    events = _drain(consumer, 2)
    consumer.close()

    bad, good = events  # same key, same partition: in order
    topic = topic_name(settings, "interactions")
    assert bad.value is None
    assert f"topic '{topic}'" in bad.error and "bad or missing header" in bad.error
    assert good.error is None and good.value["event_id"] == "ev-1"


def test_topic_creation_is_idempotent(settings, kafka):
    from streams.topics import create_topics

    again = create_topics(settings, kafka)
    assert set(again.values()) == {"exists"}
    assert len(again) == len(TOPICS)


def test_a_recorder_reading_with_spaced_out_fetches_keeps_every_response(settings, kafka):
    """`idle_backoff_s` (the benchmarks' reader: aiokafka, empty fetches spaced out): every
    response is kept with its arrival time; undecodable bytes are skipped."""
    from streams.replay import Recorder

    base = example_records(int(time.time() * 1000))["recommendation_response"]
    ids = {f"spaced-{uuid.uuid4().hex}-{i}" for i in range(3)}
    with Recorder(settings, kafka, idle_backoff_s=0.002) as recorder:
        producer, started = EventProducer(settings, kafka), time.perf_counter()
        producer.send_raw("recommendations", b"not a response")
        for rid in ids:
            producer.send("recommendations", base | {"request_id": rid})
        producer.close()
        assert recorder.wait(ids, 30)
    assert all(started < recorder.arrived[rid] < time.perf_counter() for rid in ids)
    assert all(recorder.responses[rid][0]["request_id"] == rid for rid in ids)
