"""The client library against the real embedded broker, a worker, Valkey and tritonserver.

The worker applies the interactions the client tracks: it runs on state and a tritonserver of
the module's own (`own_server`), never on the session's.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from records import T0, stack_settings

from schemas.records import Interaction
from streamrec.client import AsyncClient, Client, RecommendationTimeout
from streamrec.workers import Workers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(own_server, kafka, artifacts):
    own = own_server
    settings = stack_settings(own.settings, kafka, own.redis_url, own.triton_url, artifacts)
    workers = Workers(settings)
    workers.start(1)
    yield settings
    workers.stop_all()


@pytest.fixture()
def client(live):
    # The first requests wait for the worker to join its group and Triton's first batch.
    with Client(settings=live, timeout=60.0) as client:
        yield client


def test_recommend_round_trip(client):
    response = client.recommend("196", k=7)
    assert response.ok and response.user_id == "196"
    assert len(response.items) == 7 and len(set(response.item_ids)) == 7
    assert response.model_version and response.stages


def test_an_explained_answer_over_kafka_is_the_same_answer(client):
    plain = client.recommend("405", k=5, temperature=0.0)
    explained = client.recommend("405", k=5, temperature=0.0, explain=True)
    assert explained.item_ids == plain.item_ids and not plain.explanations
    assert [e.item_id for e in explained.explanations] == plain.item_ids
    assert all(e.source == "retrieval" and e.retrieval_rank >= 1 for e in explained.explanations)


def test_an_invalid_request_is_answered_with_an_error(client):
    response = client.recommend("196", k=0)
    assert response.status == "error" and "k must be" in response.error


def test_track_changes_the_next_recommendation(client):
    user = f"client-{uuid.uuid4().hex[:6]}"  # a new user: no history, and none of its own
    top = client.recommend(user, k=10).item_ids[0]
    event = client.track(user, top, "click", ts=T0)  # the data set's time, as the state's
    client.flush()
    assert isinstance(event, Interaction) and len(event.event_id) == 32
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if top not in client.recommend(user, k=10).item_ids:
            return
    pytest.fail(f"item {top} was still recommended to user {user} 30 s after the click")


def test_a_request_nobody_answers_times_out_with_a_clear_error(base_settings, kafka):
    from schemas.settings import TopicNames
    from streams.topics import create_topics

    prefix = f"nobody-{uuid.uuid4().hex[:6]}"
    names = {role: f"{prefix}-{name}" for role, name in TopicNames().model_dump().items()}
    settings = base_settings.model_copy(update={"topics": TopicNames(**names)})
    create_topics(settings, kafka)
    with Client(kafka, settings) as client:
        started = time.monotonic()
        with pytest.raises(RecommendationTimeout, match="no recommendation for user '1' within"):
            client.recommend("1", timeout=1.0)
        assert time.monotonic() - started < 5.0


def test_the_async_client_answers_concurrent_requests(live):
    async def run():
        async with AsyncClient(settings=live, timeout=60.0) as client:
            await client.track(f"client-{uuid.uuid4().hex[:6]}", "50", ts=T0)
            return await asyncio.gather(*(client.recommend(str(u), k=3) for u in range(300, 310)))

    responses = asyncio.run(run())
    assert [r.user_id for r in responses] == [str(u) for u in range(300, 310)]
    assert all(r.ok and len(r.items) == 3 for r in responses)


def test_the_registry_wire_format(base_settings, kafka):
    """With a Schema Registry URL the client writes the registry wire format: on the broker, a
    zero magic byte and a schema id before the body, which the registry's deserializer reads
    back as the records sent. (The registry is confluent-kafka's in-process mock: no Schema
    Registry runs here, and a mock's schemas live in its own client.)"""
    from confluent_kafka import Consumer

    from schemas.settings import TopicNames
    from streams.topics import create_topics, topic_name

    prefix = f"registry-{uuid.uuid4().hex[:6]}"
    names = {role: f"{prefix}-{name}" for role, name in TopicNames().model_dump().items()}
    settings = base_settings.model_copy(
        update={"topics": TopicNames(**names), "schema_registry_url": f"mock://{prefix}"}
    )
    create_topics(settings, kafka)
    roles = ("interactions", "item_updates")
    consumer = Consumer(
        {"bootstrap.servers": kafka, "group.id": prefix, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic_name(settings, r) for r in roles])
    with Client(kafka, settings) as client:
        sent = {
            "interactions": client.track("7", "50", "rating", 4.0),
            "item_updates": client.update_item("new-7", title="New", genres=["Drama"]),
        }
        client.flush()
        got = {}
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                got[next(r for r in roles if msg.topic() == topic_name(settings, r))] = msg.value()
        consumer.close()
        serdes = client._producer._serdes  # noqa: SLF001 - the client's registry (see above)
        assert set(got) == set(roles)
        for role, data in got.items():
            assert data[0] == 0 and len(data) > 5  # magic byte, 4-byte schema id, body
            assert type(sent[role]).from_record(serdes[role].decode(data)) == sent[role]
