"""The Faust app: agents over the topics of `streams.topics`, as plain async functions.

Run a worker with `streamrec serve workers` (or `faust -A streams.app worker --without-web`).
Processing is at-least-once: Faust commits offsets after the agents have handled the events,
and every effect is idempotent (event ids for interactions, newest-wins for item updates), so a
worker killed mid-batch resumes from the committed offsets without lost or doubled effects.
Requests are answered at least once: consumers de-duplicate responses by request id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import cached_property
from pathlib import Path

import faust

from schemas.serde import Serde
from streamrec.config import Settings, get_settings
from streamrec.stack import EmbeddedStack
from streams import metrics
from streams.processors import (
    InteractionProcessor,
    ItemUpdateProcessor,
    RawEvent,
    RequestProcessor,
)
from streams.topics import TOPICS, serde_for, topic_name

log = logging.getLogger("streamrec.workers")


class Runtime:
    """Endpoints, serdes and processors of one worker, built once on first use."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.stack = EmbeddedStack(settings)
        self.serdes: dict[str, Serde] = {role: serde_for(settings, role) for role in TOPICS}
        self._lock = threading.Lock()

    @cached_property
    def artifacts(self) -> Path:
        from models.train import current_artifacts

        return current_artifacts(self.settings.artifact_dir)

    @cached_property
    def interactions(self) -> InteractionProcessor:
        with self._lock:
            return InteractionProcessor(
                self.serdes["interactions"],
                self.stack.endpoint("redis"),
                self.settings.feature_repo(),
                self.artifacts,
                self.settings.feast_project,
            )

    @cached_property
    def item_updates(self) -> ItemUpdateProcessor:
        return ItemUpdateProcessor(
            self.serdes["item_updates"], self.stack.endpoint("redis"), self.settings.feast_project
        )

    async def requests(self) -> RequestProcessor:
        if "_requests" not in self.__dict__:
            from serving.client import AsyncTritonRecommender

            triton = AsyncTritonRecommender(self.stack.endpoint("triton"))
            await triton.connect()
            self.__dict__["_requests"] = RequestProcessor(
                self.serdes["requests"], triton, self.settings.request_concurrency
            )
        return self.__dict__["_requests"]


def _raw(event) -> RawEvent:
    m = event.message
    return RawEvent(m.topic, m.partition, m.offset, m.key, m.value, int(m.timestamp * 1000))


def create_app(settings: Settings) -> faust.App:
    from streams.kafka import faust_broker_settings

    bootstrap = EmbeddedStack(settings).endpoint("kafka")
    app = faust.App(
        settings.worker_group,
        broker=[f"kafka://{b}" for b in bootstrap.split(",")],
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        store="memory://",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_commit_every=100,
        broker_commit_interval=0.5,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        web_enabled=False,
        **faust_broker_settings(settings),
    )
    runtime = Runtime(settings)
    topics = {
        role: app.topic(
            topic_name(settings, role),
            value_type=bytes,
            key_type=bytes,
            value_serializer="raw",
            key_serializer="raw",
        )
        for role in TOPICS
    }
    serdes = runtime.serdes

    async def send_dead_letters(letters: list[dict], processor: str) -> None:
        for letter in letters:
            await topics["dead_letter"].send(
                key=letter["key"], value=serdes["dead_letter"].encode(letter)
            )
        if letters:
            metrics.DEAD_LETTERS.labels(processor).inc(len(letters))

    async def run_batch(processor, events) -> None:
        raw = [_raw(e) for e in events]
        result = await asyncio.to_thread(processor.process, raw)
        await send_dead_letters(result.dead_letters, processor.name)
        metrics.BATCH_SIZE.labels(processor.name).observe(len(raw))
        metrics.EVENTS.labels(processor.name, "applied").inc(result.applied)
        metrics.EVENTS.labels(processor.name, "duplicate").inc(result.duplicates)
        for seconds in result.freshness_s:
            metrics.FRESHNESS.observe(seconds)

    @app.agent(topics["interactions"])
    async def interactions(stream):
        async for events in stream.take_events(settings.interaction_batch, within=0.02):
            await run_batch(await asyncio.to_thread(getattr, runtime, "interactions"), events)

    @app.agent(topics["item_updates"])
    async def item_updates(stream):
        async for events in stream.take_events(settings.interaction_batch, within=0.02):
            await run_batch(runtime.item_updates, events)

    @app.agent(topics["requests"])
    async def requests(stream):
        async for events in stream.take_events(settings.request_concurrency, within=0.002):
            processor = await runtime.requests()
            answers = await asyncio.gather(*(processor.handle(_raw(e)) for e in events))
            for event, (response, letter) in zip(events, answers, strict=True):
                if letter is not None:
                    await send_dead_letters([letter], processor.name)
                    continue
                await topics["recommendations"].send(
                    key=response["user_id"].encode(),
                    value=serdes["recommendations"].encode(response),
                )
                _observe(response, event.message.timestamp)

    @app.timer(interval=5.0)
    async def consumer_lag():
        consumer = app.consumer
        metrics.CONSUMER_LAG.clear()  # partitions revoked since the last tick report nothing
        for tp in consumer.assignment():
            committed = consumer._committed_offset.get(tp)  # noqa: SLF001 - no public accessor
            lag = consumer.highwater(tp) - (committed or 0)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(lag, 0))

    @app.task
    async def warm_up():
        """Build the processors before traffic (Feast and ONNX imports take seconds)."""
        if settings.metrics_port is not None:
            port = metrics.serve(settings.metrics_port, settings.metrics_host)
            log.info("metrics on %s:%s", settings.metrics_host, port)
        try:
            await asyncio.to_thread(lambda: (runtime.interactions, runtime.item_updates))
            await runtime.requests()
        except Exception:  # the agents retry on their first batch; say why here
            log.exception("warm-up failed")
        else:
            log.info("streamrec worker ready")

    return app


def _observe(response: dict, produced_s: float) -> None:
    metrics.RESPONSES.labels(response["status"], response["path"] or "-").inc()
    metrics.REQUEST_LATENCY.labels("end_to_end").observe(time.time() - produced_s)
    for stage in response["stages"]:
        metrics.REQUEST_LATENCY.labels(stage["name"]).observe(stage["duration_ms"] / 1000)


app = create_app(get_settings())
