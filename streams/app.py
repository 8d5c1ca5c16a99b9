"""The Faust app: agents over the topics of `streams.topics`, as plain async functions.

Run a worker with `streamrec serve workers`, or with `faust -A streams.app worker --without-web`
where STREAMREC_KAFKA_BOOTSTRAP, STREAMREC_REDIS_URL and STREAMREC_TRITON_URL are set (a worker
never looks for the embedded stack).
An event's offset is acked, and so committed, only after its effects are durable (written and
fsynced by Redis, its dead letter or response acknowledged by the broker); `streams.durable`
retries through dependency outages and dead-letters poison events. Every effect is idempotent
(event ids for interactions, newest-wins for item updates), so a worker killed mid-batch resumes
from the committed offsets without lost or doubled effects. A batch's responses are published in
one Kafka transaction with its requests' offsets when `kafka_transactions` is on (Apache Kafka):
exactly one visible response per request; otherwise at least one, and a duplicate has the first
answer's bytes. Without transactions each response is published as soon as it is ready, and a
request is acked once it and every earlier request of its partition are answered.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
import threading
import time
from collections import Counter
from functools import cached_property
from typing import NoReturn

import faust
from aiokafka.errors import ProducerFenced
from faust.types import EventT, StreamT, TopicT

from schemas.serde import Serde
from schemas.settings import NotConfigured, Settings, get_settings
from serving.arms import ArmsFile
from state.store import RedisState
from streams import FAILED, READY, metrics
from streams.durable import Guard, until_sent
from streams.kafka import (
    Batches,
    InOrderAcks,
    TransactionalPublisher,
    faust_broker_settings,
    space_out_empty_fetches,
)
from streams.processors import (
    Answer,
    BatchResult,
    InteractionProcessor,
    ItemUpdateProcessor,
    RawEvent,
    RequestProcessor,
    ResponseCache,
)
from streams.topics import TOPICS, serde_for, topic_name

log = logging.getLogger("streamrec.workers")
# Merged into Faust's logging set-up: streamrec's own lines (ready, stalls, recoveries) at info
# through a handler of their own, whatever level the libraries log at (`Settings.log_level`).
LOGGING = {
    "merge": True,
    "handlers": {
        "streamrec": {
            "class": "logging.StreamHandler",
            "formatter": "default",
            "level": "INFO",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {"streamrec": {"level": "INFO", "handlers": ["streamrec"], "propagate": False}},
}
SEND_TIMEOUT_S = 15.0  # for the broker to acknowledge a batch before it is sent again
REQUEST_BATCH_WAIT_S = 0.001  # the most a request waits for others to share its batch


class Runtime:
    """Endpoints, serdes and processors of one worker, built once on first use."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.serdes: dict[str, Serde] = {role: serde_for(settings, role) for role in TOPICS}
        self._lock = threading.Lock()
        self._processors: dict[str, InteractionProcessor | ItemUpdateProcessor] = {}
        self._requests: RequestProcessor | None = None
        self._building = asyncio.Lock()  # the first batches of requests arrive together

    @cached_property
    def redis_url(self) -> str:
        return self.settings.endpoint("redis")

    def check(self) -> None:
        """Fail with a readable reason when something the worker needs is missing (cheap: runs
        before the worker joins its consumer group)."""
        from schemas.artifacts import current_artifacts

        current_artifacts(self.settings.artifact_dir)  # FileNotFoundError says what to run
        repo = self.settings.feature_repo()
        if not (repo / "feature_store.yaml").exists():
            raise FileNotFoundError(
                f"no Feast repository at {repo}: run `streamrec train` (it loads the features)"
            )
        state = self._state()
        try:
            state.client.ping()
            state.wait_durable()
        except Exception as e:
            hint = " (needs appendonly yes, or STREAMREC_REDIS_WAIT_AOF=false)" * (
                "appendonly" in str(e)
            )
            raise ConnectionError(f"Redis at {self.redis_url}: {e}{hint}") from e

    def build(self) -> None:
        """Build the processors (Feast and ONNX imports take seconds)."""
        self.processor("interactions")
        self.processor("item_updates")

    def _state(self) -> RedisState:
        s = self.settings
        return RedisState(self.redis_url, s.feast_project, s.redis_wait_aof, s.redis_wait_replicas)

    def processor(self, name: str) -> InteractionProcessor | ItemUpdateProcessor:
        with self._lock:
            if name not in self._processors:
                self._processors[name] = self._build(name)
            return self._processors[name]

    def _build(self, name: str) -> InteractionProcessor | ItemUpdateProcessor:
        from schemas.artifacts import current_artifacts

        s = self.settings
        if name == "item_updates":
            return ItemUpdateProcessor(self.serdes["item_updates"], self._state())
        return InteractionProcessor(
            self.serdes["interactions"],
            self._state(),
            s.feature_repo(),
            current_artifacts(s.artifact_dir),
        )

    @cached_property
    def transactions(self) -> TransactionalPublisher | None:
        """Where responses are published with their requests' offsets (None: no transactions)."""
        if not self.settings.kafka_transactions:
            return None
        # Without a static membership id, one unique to this process: nothing to fence, and a
        # dead worker's open transaction is aborted by its timeout (10 s).
        unique = f"{self.settings.worker_group}-{socket.gethostname()}-{os.getpid()}"
        name = self.settings.worker_instance_id or unique
        return TransactionalPublisher(self.settings, self.settings.endpoint("kafka"), name)

    @property
    def requests_ready(self) -> RequestProcessor | None:
        return self._requests

    async def requests(self) -> RequestProcessor:
        async with self._building:
            if self._requests is None:
                from serving.pool import TritonPool

                # One server or several (comma-separated), balanced by health.
                url, timeout = self.settings.endpoint("triton"), self.settings.canary_timeout_s
                triton = TritonPool(url, probe_timeout_s=timeout)
                try:
                    await triton.connect()
                except Exception as e:
                    raise ConnectionError(f"Triton at {url}: {e}") from e
                metrics.watch_triton(triton)
                # Within transactions a redelivered request's first answer was never visible:
                # serving it again is right, and nothing needs caching.
                cache = None
                if not self.settings.kafka_transactions:
                    cache = ResponseCache(self._state(), self.settings.response_cache_ttl_s)
                self._requests = RequestProcessor(
                    self.serdes["requests"],
                    self.serdes["recommendations"],
                    triton,
                    cache,
                    self.settings.request_concurrency,
                    default_deadline_ms=self.settings.request_deadline_ms,
                    arms=ArmsFile(self.settings.artifact_dir),
                )
        return self._requests


def _raw(event) -> RawEvent:
    m = event.message
    return RawEvent(m.topic, m.partition, m.offset, m.key, m.value, int(m.timestamp * 1000))


def create_app(settings: Settings) -> faust.App:
    """The worker: an agent per input topic, the serving canary, lag metrics and the warm-up."""
    bootstrap = settings.endpoint("kafka")
    runtime = Runtime(settings)
    runtime.check()
    space_out_empty_fetches(settings.idle_fetch_backoff_ms / 1000)
    app = _faust_app(settings, bootstrap)
    topics = {role: _topic(app, settings, role) for role in TOPICS}
    out = _Publisher(topics, runtime)
    for role in ("interactions", "item_updates"):
        _batch_agent(app, topics[role], role, settings, runtime, out)
    _requests_agent(app, topics["requests"], settings, runtime, out)
    _serving_canary(app, settings, runtime)
    _log_assignments(app)
    _consumer_lag(app)
    _warm_up(app, settings, runtime)
    return app


def _faust_app(settings: Settings, bootstrap: str) -> faust.App:
    return faust.App(
        settings.worker_group,
        broker=[f"kafka://{b}" for b in bootstrap.split(",")],
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        store="memory://",
        # Group membership (docs/PRODUCTION.md, "Failures"): static membership lets a
        # restarted worker take its partitions back at once; the embedded broker never evicts a
        # dead dynamic member. On Apache Kafka a worker that is not replaced loses its partitions
        # after the session timeout; a rebalance is bounded by the rebalance timeout.
        consumer_group_instance_id=settings.worker_instance_id,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=20.0,
        broker_max_poll_interval=60.0,
        broker_commit_every=100,
        broker_commit_interval=0.5,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger=0.0,  # each response goes out as soon as it is ready
        web_enabled=False,
        logging_config=LOGGING,
        **faust_broker_settings(settings),
    )


def _topic(app: faust.App, settings: Settings, role: str) -> TopicT:
    return app.topic(
        topic_name(settings, role),
        value_type=bytes,
        key_type=bytes,
        value_serializer="raw",
        key_serializer="raw",
    )


class _Publisher:
    """What the agents produce (responses, dead letters), sent until the broker has it."""

    def __init__(self, topics: dict[str, TopicT], runtime: Runtime):
        self.topics = topics
        self.runtime = runtime

    async def publish(self, role: str, messages: list[tuple[bytes | None, bytes]]) -> None:
        """Produce and wait until the broker has every message (retried while it is away)."""

        async def send_all() -> None:
            sent = [await self.topics[role].send(key=k, value=v) for k, v in messages]
            await asyncio.gather(*sent)

        # Bounded as a whole: around a broker restart a send may wait for the topic's metadata
        # or for room in the producer's buffer (up to Faust's producer request timeout, 20 min)
        # and its acknowledgement may never come; a stuck agent holds its request slots and
        # stalls Faust's fetcher. On time-out the batch is sent again.
        if messages:
            await until_sent(lambda: asyncio.wait_for(send_all(), SEND_TIMEOUT_S), role)

    async def dead_letters(self, letters: list[dict], processor: str) -> None:
        await self.publish("dead_letter", self._encoded(letters))
        if letters:
            metrics.DEAD_LETTERS.labels(processor).inc(len(letters))

    async def atomically(self, answers, letters: list[dict], events: list[EventT]) -> None:
        """Responses, dead letters and the requests' offsets in one transaction."""
        offsets: dict[tuple[str, int], int] = {}
        for e in events:
            tp = (e.message.topic, e.message.partition)
            offsets[tp] = max(offsets.get(tp, 0), e.message.offset + 1)
        messages = {"recommendations": answers, "dead_letter": self._encoded(letters)}
        try:
            await until_sent(
                lambda: self.runtime.transactions.publish(messages, offsets), "requests"
            )
        except ProducerFenced:
            log.error("another worker took over this worker's transactional id; exiting")
            os._exit(3)
        metrics.DEAD_LETTERS.labels("requests").inc(len(letters))

    def _encoded(self, letters: list[dict]) -> list[tuple[bytes | None, bytes]]:
        serde = self.runtime.serdes["dead_letter"]
        return [(d["key"], serde.encode(d)) for d in letters]


def _batch_agent(
    app: faust.App,
    topic: TopicT,
    role: str,
    settings: Settings,
    runtime: Runtime,
    out: _Publisher,
) -> None:
    """The agent of interactions or of item updates, named by its role."""
    guard = Guard(role)  # requests are guarded one by one, in RequestProcessor

    # noack_take: an event is acked by `_run_batch`, after its effects are durable, never by
    # Faust when the agent stops or fails (take_events acks the batch in a finally block).
    @app.agent(topic, name=f"{__name__}.{role}")
    async def agent(stream: StreamT) -> None:
        async for events in stream.noack_take(settings.interaction_batch, within=0.02):
            processor = await asyncio.to_thread(runtime.processor, role)
            await _run_batch(stream, processor, events, guard, out)


async def _run_batch(
    stream: StreamT,
    processor: InteractionProcessor | ItemUpdateProcessor,
    events: list[EventT],
    guard: Guard,
    out: _Publisher,
) -> None:
    """Apply a batch until durable, publish its dead letters, then ack its offsets."""
    results = await guard.run(
        lambda batch: asyncio.to_thread(processor.process, batch),
        [_raw(e) for e in events],
        lambda letter: BatchResult(dead_letters=[letter]),
    )
    await out.dead_letters([d for r in results for d in r.dead_letters], processor.name)
    for event in events:
        await stream.ack(event)
    metrics.BATCH_SIZE.labels(processor.name).observe(len(events))
    for r in results:
        metrics.EVENTS.labels(processor.name, "applied").inc(r.applied)
        metrics.EVENTS.labels(processor.name, "duplicate").inc(r.duplicates)
        for seconds in r.freshness_s:
            metrics.FRESHNESS.observe(seconds)


def _requests_agent(
    app: faust.App, topic: TopicT, settings: Settings, runtime: Runtime, out: _Publisher
) -> None:
    @app.agent(topic)
    async def requests(stream: StreamT) -> None:
        """Takes requests while earlier ones are in flight (at most `request_concurrency`).

        Without transactions each answer is published as soon as it is ready. With them, one
        transaction per batch (its answers and its offsets), so a batch waits for its slowest
        request, and transactions commit in the order the batches were taken.
        """
        slots = asyncio.Semaphore(settings.request_concurrency)
        acks = InOrderAcks(stream)
        in_flight: set[asyncio.Task] = set()
        last: asyncio.Task | None = None

        async def serve(events: list[EventT], previous: asyncio.Task | None) -> None:
            processor = await runtime.requests()
            if runtime.transactions is None:
                await _answer(processor, events, acks, out)
            else:
                await _answer_atomically(processor, events, acks, previous, out)

        def launch(events: list[EventT]) -> None:
            nonlocal last
            acks.taken(events)
            last = asyncio.create_task(_releasing(serve(events, last), slots, len(events)))
            in_flight.add(last)
            last.add_done_callback(in_flight.discard)

        batches = Batches(settings.request_concurrency, REQUEST_BATCH_WAIT_S, launch)
        try:
            async for event in stream.noack().events():
                await slots.acquire()  # at most `request_concurrency` taken and unanswered
                batches.add(event)
        finally:  # stopping: what is in flight is unacked, so redelivered
            batches.cancel()
            for task in in_flight:
                task.cancel()


async def _answer(
    processor: RequestProcessor, events: list[EventT], acks: InOrderAcks, out: _Publisher
) -> None:
    """Publish each answer as soon as it is ready, then ack its request (in offset order)."""
    async for ready in processor.answers([_raw(e) for e in events]):
        outcomes = [o for _, o in ready]
        await out.publish("recommendations", [(o.key, o.value) for o in outcomes if _is_answer(o)])
        await out.dead_letters([o for o in outcomes if not _is_answer(o)], processor.name)
        await acks.done([events[n] for n, _ in ready])
        _observe([(o, events[n]) for n, o in ready])


async def _answer_atomically(
    processor: RequestProcessor,
    events: list[EventT],
    acks: InOrderAcks,
    previous: asyncio.Task | None,
    out: _Publisher,
) -> None:
    """The batch's answers, dead letters and offsets in one transaction, committed after the
    previous batch's: offsets only move forward."""
    outcomes = await processor.handle_batch([_raw(e) for e in events])
    if previous is not None and not await previous:
        raise RuntimeError("an earlier batch of requests failed; not committing past it")
    answers = [(o.key, o.value) for o in outcomes if _is_answer(o)]
    await out.atomically(answers, [o for o in outcomes if not _is_answer(o)], events)
    await acks.done(events)
    _observe(list(zip(outcomes, events, strict=True)))


def _serving_canary(app: faust.App, settings: Settings, runtime: Runtime) -> None:
    failures: Counter[str] = Counter()  # in a row, per Triton server

    @app.timer(interval=settings.canary_interval_s)
    async def serving_canary() -> None:
        """Judge each Triton server by a real inference; reload stages that look dead.

        Triton's ready flag stays up when a stage's stub process dies, so only an inference
        tells. A server that fails its canary takes no requests until one passes (the pool's
        probe readmits it); two failures in a row that name suspect stages trigger a reload of
        those stages on that server (the old instances serve until the new ones are up).
        """
        if runtime.requests_ready is None:
            return
        triton = runtime.requests_ready.triton
        results = await triton.canaries(timeout=settings.canary_timeout_s)
        metrics.SERVING_READY.set(1 if any(r.ok for r in results.values()) else 0)
        for server, result in results.items():
            await _judge(triton, server, result, len(results) > 1, failures)


async def _judge(triton, server: str, result, named: bool, failures: Counter[str]) -> None:
    where = f" on {server}" if named else ""
    if result.ok:
        if failures[server]:
            log.warning(
                "serving path healthy again%s (canary %.0f ms)", where, result.seconds * 1000
            )
        failures[server] = 0
        return
    failures[server] += 1
    log.warning(
        "serving path failed its canary%s (%d in a row): %s",
        where,
        failures[server],
        result.reason.splitlines()[0][:300],
    )
    # A stage that answers with its own error (Redis down, say) is alive: reloading it
    # would not help. A dead stub is named by Triton, or only times out.
    dead = "not healthy" in result.reason or "DEADLINE_EXCEEDED" in result.reason
    if failures[server] >= 2 and result.suspects and dead:
        log.warning("reloading stage(s) %s%s", ", ".join(result.suspects), where)
        try:
            await triton.heal(result.suspects, server=server)
        except Exception as e:  # noqa: BLE001 - Triton itself may be down; try again later
            log.warning("reload failed: %s", e)


def _log_assignments(app: faust.App) -> None:
    @app.on_partitions_assigned.connect
    async def assigned(sender, assigned, **kwargs):  # noqa: ARG001 - Faust's signal signature
        by_topic: dict[str, list[int]] = {}
        for tp in sorted(assigned):
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        log.info("partitions assigned: %s", by_topic or "none")


def _consumer_lag(app: faust.App) -> None:
    @app.timer(interval=5.0)
    async def consumer_lag() -> None:
        consumer = app.consumer
        metrics.CONSUMER_LAG.clear()  # partitions revoked since the last tick report nothing
        for tp in consumer.assignment():
            committed = consumer._committed_offset.get(tp)  # noqa: SLF001 - no public accessor
            lag = consumer.highwater(tp) - (committed or 0)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(lag, 0))


def _warm_up(app: faust.App, settings: Settings, runtime: Runtime) -> None:
    @app.task
    async def warm_up() -> None:
        """Build the processors before traffic (Feast and ONNX imports take seconds); a worker
        that cannot do so exits at once with the reason (the CLI prints it)."""
        if settings.metrics_port is not None:
            port = metrics.serve(settings.metrics_port, settings.metrics_host)
            log.info("metrics on %s:%s", settings.metrics_host, port)
        try:
            await asyncio.to_thread(runtime.build)
            await runtime.requests()
        except Exception as e:  # noqa: BLE001
            log.exception("warm-up failed")
            _exit_failed(f"{type(e).__name__}: {e}")
        # The models, Feast and imports live as long as the worker: keep them out of every
        # later collection, so none scans them on the request path.
        gc.collect()
        gc.freeze()
        log.info(READY)


async def _releasing(work, slots: asyncio.Semaphore, n: int) -> bool:
    """Run `work`, then free its `n` request slots; whether it succeeded. A failed batch stays
    unacked, and so holds its partitions' commits (its requests are redelivered on a restart)."""
    try:
        await work
        return True
    except Exception:  # noqa: BLE001 - nothing may escape an agent's work unseen
        log.exception("requests: answering a batch failed; its offsets stay uncommitted")
        metrics.STALLED.labels("requests").set(1)
        return False
    finally:
        for _ in range(n):
            slots.release()


def _is_answer(outcome) -> bool:
    return isinstance(outcome, Answer)


def _observe(outcomes: list) -> None:
    """Metrics of a list of (outcome, event) just published: one counter update per kind."""
    now = time.time()
    kinds: Counter[tuple[str, str, str]] = Counter()
    end_to_end = _latency("end_to_end")
    for outcome, event in outcomes:
        response = outcome.response if _is_answer(outcome) else None
        if response is None:
            continue
        kinds[response["status"], response["path"] or "-", response.get("arm") or "-"] += 1
        end_to_end.observe(now - event.message.timestamp)
        for stage in response["stages"]:
            _latency(stage["name"]).observe(stage["duration_ms"] / 1000)
    for labels, n in kinds.items():
        metrics.RESPONSES.labels(*labels).inc(n)


_latencies: dict[str, object] = {}


def _latency(stage: str):
    """The stage's latency histogram (a labelled child is a locked lookup: kept)."""
    if stage not in _latencies:
        _latencies[stage] = metrics.REQUEST_LATENCY.labels(stage)
    return _latencies[stage]


def _exit_failed(reason: str) -> NoReturn:
    """Say why on one line that `streamrec.workers` finds in the log, and exit at once."""
    print(f"{FAILED}{reason}", file=sys.stderr, flush=True)
    os._exit(2)  # from any thread or task, without waiting for Faust's shutdown


try:
    app = create_app(get_settings())
except (NotConfigured, FileNotFoundError, ConnectionError) as e:  # expected: say why
    _exit_failed(str(e))
except Exception as e:  # noqa: BLE001 - unexpected: the traceback goes to the log too
    import traceback

    traceback.print_exc()
    _exit_failed(f"{type(e).__name__}: {e}")
