"""Valid records of each topic for the tests (with defaults for what a test does not care
about), and a way to put them on their topics."""

from __future__ import annotations

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
