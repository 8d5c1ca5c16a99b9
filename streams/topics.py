"""Every topic in one place: its setting name, its Avro schema, its key, and how to create it."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.serde import Serde, make_serde
from schemas.settings import Settings


@dataclass(frozen=True)
class Topic:
    role: str  # field of `TopicNames` holding the topic's name
    schema: str  # schemas/<schema>.avsc
    key_field: str | None  # record field used as the Kafka key (partitioning, ordering)
    doc: str
    config: tuple[tuple[str, str], ...] = ()  # topic configs set when it is created


TOPICS: dict[str, Topic] = {
    t.role: t
    for t in (
        Topic("interactions", "interaction", "user_id", "user-item events"),
        Topic("item_updates", "item_update", "item_id", "catalog availability and attributes"),
        Topic(
            "requests",
            "recommendation_request",
            "user_id",
            "recommendation requests",
            # A request's default deadline counts from its Kafka timestamp. The broker's clock,
            # not the producer's: a fresh idempotent producer holds its first record 0.5-1 s
            # while it gets its producer id (librdkafka), time the request never spent waiting
            # for an answer.
            config=(("message.timestamp.type", "LogAppendTime"),),
        ),
        Topic("recommendations", "recommendation_response", "user_id", "responses to requests"),
        Topic("dead_letter", "dead_letter", None, "events a processor rejected, with the reason"),
    )
}


def topic_name(settings: Settings, role: str) -> str:
    return getattr(settings.topics, role)


def role_of(settings: Settings, name: str) -> str:
    """The role of a topic given by name (or by role, `dead-letter` as well as `dead_letter`)."""
    if name.replace("-", "_") in TOPICS:
        return name.replace("-", "_")
    for role in TOPICS:
        if topic_name(settings, role) == name:
            return role
    known = ", ".join(topic_name(settings, r) for r in TOPICS)
    raise KeyError(f"unknown topic '{name}' (known: {known})")


def role_for(schema: str) -> str:
    """The topic role whose events have this schema."""
    return next(role for role, topic in TOPICS.items() if topic.schema == schema)


def serde_for(settings: Settings, role: str) -> Serde:
    return make_serde(topic_name(settings, role), TOPICS[role].schema, settings.schema_registry_url)


def record_key(role: str, record: dict) -> bytes | None:
    field = TOPICS[role].key_field
    return None if field is None else str(record[field]).encode()


def create_topics(settings: Settings, bootstrap: str, timeout: float = 30.0) -> dict[str, str]:
    """Create every topic with the configured partition count; existing topics are left alone.

    Returns {topic name: "created" | "exists"}.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    from streams.kafka import client_config

    admin = AdminClient(client_config(settings, bootstrap))
    names = [topic_name(settings, role) for role in TOPICS]
    existing = set(admin.list_topics(timeout=timeout).topics)
    result = {n: "exists" for n in names if n in existing}
    new = [
        NewTopic(
            topic_name(settings, role),
            settings.partitions,
            settings.replication_factor,
            config=dict(TOPICS[role].config),
        )
        for role in TOPICS
        if topic_name(settings, role) not in existing
    ]
    if new:
        for name, fut in admin.create_topics(new, operation_timeout=timeout).items():
            try:
                fut.result(timeout)
                result[name] = "created"
            except KafkaException as e:
                if e.args[0].code() != e.args[0].TOPIC_ALREADY_EXISTS:
                    raise
                result[name] = "exists"
    return result
