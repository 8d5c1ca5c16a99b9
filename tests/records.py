"""Valid records of each topic for the tests (with defaults for what a test does not care
about), and a way to put them on their topics."""

from __future__ import annotations

import uuid

T0 = 893_300_000_000  # ML-100K's last weeks, in ms


def interaction(user: str, item: str, ts: int = T0, event_id: str | None = None) -> dict:
    return {
        "event_id": event_id or uuid.uuid4().hex,
        "user_id": user,
        "item_id": item,
        "event_type": "view",
        "value": None,
        "timestamp_ms": ts,
        "session_id": None,
        "context": {},
    }


def item_update(
    item: str,
    ts: int = T0,
    available: bool = True,
    title: str | None = None,
    year: int | None = None,
    genres: list[str] = (),
) -> dict:
    return {
        "item_id": item,
        "available": available,
        "title": title,
        "year": year,
        "genres": list(genres),
        "attributes": {},
        "timestamp_ms": ts,
    }


def request(user: str, k: int = 10, request_id: str | None = None, **extra) -> dict:
    return {
        "request_id": request_id or uuid.uuid4().hex,
        "user_id": user,
        "k": k,
        "exclude": [],
        "context": {},
        "temperature": 0.0,
        "seed": None,
        "deadline_ms": None,
        "timestamp_ms": T0,
    } | extra


def produce(settings, role: str, records: list[dict], raw: list[bytes] = ()) -> None:
    """Produce `raw` bytes (malformed events) and then `records`; wait until all are delivered."""
    from streams.kafka import EventProducer

    producer = EventProducer(settings, settings.kafka_bootstrap)
    for value in raw:
        producer.send_raw(role, value, key=b"k")
    for r in records:
        producer.send(role, r)
    producer.close()
