"""Kafka client configuration and the small typed producer/consumer the CLI and tests use."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from schemas.settings import Settings
from streams.topics import TOPICS, record_key, serde_for, topic_name


def client_config(settings: Settings, bootstrap: str) -> dict[str, Any]:
    """librdkafka settings shared by producers, consumers and admin clients, security included."""
    sec = settings.kafka_security
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "security.protocol": sec.protocol}
    if sec.sasl_mechanism:
        conf["sasl.mechanism"] = sec.sasl_mechanism
    if sec.sasl_username is not None:
        conf["sasl.username"] = sec.sasl_username
    if sec.sasl_password is not None:
        conf["sasl.password"] = sec.sasl_password
    for key, path in (
        ("ssl.ca.location", sec.ssl_cafile),
        ("ssl.certificate.location", sec.ssl_certfile),
        ("ssl.key.location", sec.ssl_keyfile),
    ):
        if path is not None:
            conf[key] = str(path)
    return conf


def _ssl_context(settings: Settings):
    sec = settings.kafka_security
    if not sec.protocol.endswith("SSL"):
        return None
    import ssl

    context = ssl.create_default_context(cafile=str(sec.ssl_cafile) if sec.ssl_cafile else None)
    if sec.ssl_certfile:
        context.load_cert_chain(
            str(sec.ssl_certfile), str(sec.ssl_keyfile) if sec.ssl_keyfile else None
        )
    return context


def faust_broker_settings(settings: Settings) -> dict[str, Any]:
    """The same security settings in Faust's terms."""
    import faust

    sec = settings.kafka_security
    if sec.protocol == "PLAINTEXT":
        return {}
    if sec.protocol.startswith("SASL"):
        credentials = faust.SASLCredentials(
            username=sec.sasl_username,
            password=sec.sasl_password,
            mechanism=sec.sasl_mechanism or "PLAIN",
            ssl_context=_ssl_context(settings),
        )
    else:
        credentials = faust.SSLCredentials(_ssl_context(settings))
    return {"broker_credentials": credentials}


def aiokafka_settings(settings: Settings) -> dict[str, Any]:
    """The same security settings in aiokafka's terms."""
    sec = settings.kafka_security
    conf: dict[str, Any] = {
        "security_protocol": sec.protocol,
        "ssl_context": _ssl_context(settings),
    }
    if sec.protocol.startswith("SASL"):
        conf |= {
            "sasl_mechanism": sec.sasl_mechanism or "PLAIN",
            "sasl_plain_username": sec.sasl_username,
            "sasl_plain_password": sec.sasl_password,
        }
    return conf


class TransactionalPublisher:
    """Publishes a batch's output and commits its input offsets in one Kafka transaction:
    a consumer reading committed data (librdkafka's default) sees each output once, whatever
    crashes. `transactional_id` should be stable per worker (its static membership id): a
    restarted worker then fences its dead predecessor and aborts its open transaction at once.
    """

    def __init__(
        self, settings: Settings, bootstrap: str, transactional_id: str, timeout_s: float = 15.0
    ):
        from aiokafka import AIOKafkaProducer

        self.timeout_s = timeout_s
        self.settings = settings
        self.group = settings.worker_group
        self._new = lambda: AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            transactional_id=transactional_id,
            transaction_timeout_ms=10_000,  # bounds how long a dead worker's open one blocks
            linger_ms=0,
            **aiokafka_settings(settings),
        )
        self._producer = self._new()
        self._started = False

    async def publish(
        self,
        messages: dict[str, list[tuple[bytes | None, bytes]]],
        offsets: dict[tuple[str, int], int],
    ) -> None:
        """{role: [(key, value)]} and {(topic, partition): next offset to read}, atomically."""
        from aiokafka import TopicPartition

        async def transaction() -> None:
            if not self._started:
                await self._producer.start()
                self._started = True
            async with self._producer.transaction():
                sent = [
                    await self._producer.send(topic_name(self.settings, role), value, key=key)
                    for role, batch in messages.items()
                    for key, value in batch
                ]
                # Every message acknowledged before the commit: a failed one aborts the lot.
                await asyncio.gather(*sent)
                commits = {TopicPartition(t, p): o for (t, p), o in offsets.items()}
                await self._producer.send_offsets_to_transaction(commits, self.group)

        try:
            # Bounded: a request caught in a broker restart may never be answered.
            await asyncio.wait_for(transaction(), self.timeout_s)
        except Exception:
            # The next try starts a new producer: its InitProducerId aborts what this one left.
            await self.close()
            self._producer, self._started = self._new(), False
            raise

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._producer.stop(), self.timeout_s)


class EventProducer:
    """Encodes records with their topic's schema and keys them by the topic's key field."""

    def __init__(self, settings: Settings, bootstrap: str, **extra: Any):
        from confluent_kafka import Producer

        self.settings = settings
        conf = client_config(settings, bootstrap) | {
            "enable.idempotence": True,
            "linger.ms": 0,  # a request waits for nothing: sent as soon as it is produced
        }
        self._producer = Producer(conf | extra)
        self._serdes = {role: serde_for(settings, role) for role in TOPICS}
        self._errors: list[str] = []

    def send(self, role: str, record: dict, key: bytes | None = None, on_delivery=None) -> None:
        """Produce a record; `on_delivery(error or None)` is called once the broker answers."""
        value = self._serdes[role].encode(record)
        key = key if key is not None else record_key(role, record)
        self.send_raw(role, value, key, on_delivery)

    def send_raw(self, role: str, value: bytes, key: bytes | None = None, on_delivery=None) -> None:
        """Produce bytes as they are (used to inject malformed events in tests and replays)."""

        def delivered(err, msg) -> None:
            self._on_delivery(err, msg)
            if on_delivery is not None:
                on_delivery(err)

        self._producer.produce(
            topic_name(self.settings, role), value=value, key=key, on_delivery=delivered
        )
        self._producer.poll(0)

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery callbacks."""
        self._producer.poll(timeout)

    def close(self) -> None:
        """Deliver what is pending, then release the client (before the broker goes away)."""
        self.flush()
        self._producer = None

    def _on_delivery(self, err, _msg) -> None:
        if err is not None:
            self._errors.append(str(err))

    def flush(self, timeout: float = 30.0) -> None:
        left = self._producer.flush(timeout)
        if left or self._errors:
            raise RuntimeError(
                f"{left} events not delivered; errors: {'; '.join(self._errors[:5]) or 'none'}"
            )


@dataclass
class Event:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: dict | None  # None when the bytes could not be decoded
    error: str | None = None


class EventConsumer:
    """Decodes each topic's events; undecodable ones come back with `error` set, never raised."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        roles: list[str],
        group: str,
        from_beginning: bool = True,
        from_now: bool = False,
        **extra: Any,
    ):
        """`from_now`: read every partition from its end as of this call, without joining the
        group (no rebalance wait; nothing produced after this call returns is missed)."""
        from confluent_kafka import Consumer

        self.settings = settings
        conf = client_config(settings, bootstrap) | {
            "group.id": group,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "enable.auto.commit": False,
        }
        self._consumer = Consumer(conf | extra)
        self._serdes = {topic_name(settings, r): serde_for(settings, r) for r in roles}
        if from_now:
            self._consumer.assign(self._ends(list(self._serdes)))
        else:
            self._consumer.subscribe(list(self._serdes))

    def _ends(self, topics: list[str], timeout: float = 10.0) -> list:
        from confluent_kafka import TopicPartition

        metadata = self._consumer.list_topics(timeout=timeout)
        out = []
        for topic in topics:
            if topic not in metadata.topics or metadata.topics[topic].error is not None:
                raise RuntimeError(f"topic '{topic}' does not exist (streamrec topics create)")
            for partition in metadata.topics[topic].partitions:
                tp = TopicPartition(topic, partition)
                _, high = self._consumer.get_watermark_offsets(tp, timeout=timeout)
                out.append(TopicPartition(topic, partition, high))
        return out

    def poll(self, timeout: float = 1.0) -> Event | None:
        from confluent_kafka import KafkaError

        msg = self._consumer.poll(timeout)
        if msg is None:
            return None
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                return None
            raise RuntimeError(f"consumer error: {msg.error()}")
        event = Event(msg.topic(), msg.partition(), msg.offset(), msg.key(), None)
        try:
            event.value = self._serdes[msg.topic()].decode(msg.value())
        except ValueError as e:
            event.error = str(e)
        return event

    def events(self, idle_timeout: float | None = None) -> Iterator[Event]:
        """Yield events; stop after `idle_timeout` seconds without one (None = never stop)."""
        last = time.monotonic()
        while True:
            event = self.poll(0.2)
            if event is not None:
                last = time.monotonic()
                yield event
            elif idle_timeout is not None and time.monotonic() - last > idle_timeout:
                return

    def commit(self) -> None:
        self._consumer.commit(asynchronous=False)

    def assignment(self) -> list[tuple[str, int]]:
        return [(tp.topic, tp.partition) for tp in self._consumer.assignment()]

    def close(self) -> None:
        self._consumer.close()


class ResponseStream:
    """The recommendations topic read in a thread of its own, each decoded response handed to
    `on_response` (undecodable ones skipped), until `close()`. `from_now`: as `EventConsumer`'s
    (no group to join; nothing produced after this returns is missed). `idle_backoff_s` > 0 (in
    a group, not `from_now`): read with aiokafka, spacing out empty fetches up to that long
    (`space_out_empty_fetches`): librdkafka asks a broker that answers empty fetches at once
    (the embedded one) again and again, about half a core of this process and of the broker."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        on_response: Callable[[dict], None],
        group: str,
        from_now: bool = False,
        idle_backoff_s: float = 0.0,
    ):
        self._consumer = None
        if idle_backoff_s > 0 and not from_now:
            run, args = self._run_aiokafka, (settings, bootstrap, group, idle_backoff_s)
        else:
            self._consumer = EventConsumer(
                settings, bootstrap, ["recommendations"], group, from_now=from_now
            )
            run, args = self._run, ()
        self._on_response = on_response
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=run, args=args, name="streamrec-responses", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._consumer is not None:
            self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            event = self._consumer.poll(0.1)
            if event is not None and event.value:
                self._on_response(event.value)

    def _run_aiokafka(self, *args: Any) -> None:
        asyncio.run(self._read_aiokafka(*args))

    async def _read_aiokafka(
        self, settings: Settings, bootstrap: str, group: str, backoff_s: float
    ) -> None:
        from aiokafka import AIOKafkaConsumer

        space_out_empty_fetches(backoff_s)
        serde = serde_for(settings, "recommendations")
        consumer = AIOKafkaConsumer(
            topic_name(settings, "recommendations"),
            bootstrap_servers=bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **aiokafka_settings(settings),
        )
        await consumer.start()
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=100)
                for message in (m for batch in batches.values() for m in batch):
                    with contextlib.suppress(ValueError):  # undecodable: skipped
                        self._on_response(serde.decode(message.value))
        finally:
            await consumer.stop()


class EmptyFetchBackoff:
    """Waits a little before the next fetch from a broker whose last answer was empty and came
    back at once: a broker that ignores fetch max wait (the embedded one) would otherwise be
    asked again and again by an idle consumer, a core's worth of round trips. The wait grows
    with the time the node has had nothing (an eighth of it, from `first_s` up to `max_s`), so
    a consumer between two requests of a steady stream waits little and an idle one waits
    `max_s`. Data resets it; an empty answer that the broker held (Apache Kafka) costs no wait."""

    def __init__(self, max_s: float, first_s: float = 0.0005):
        self.max_s, self.first_s = max_s, first_s
        self._idle_since: dict[int, float] = {}  # by broker node

    def after(
        self, node_id: int, has_data: bool, held_s: float, max_wait_s: float, now: float
    ) -> float:
        """How long to wait before the next fetch from this node."""
        if has_data or held_s >= max_wait_s / 2:
            self._idle_since.pop(node_id, None)
            return 0.0
        idle_s = now - self._idle_since.setdefault(node_id, now)
        return min(max(idle_s / 8, self.first_s), self.max_s)


def space_out_empty_fetches(max_s: float) -> None:
    """Make every aiokafka consumer of this process (Faust's included) wait as `EmptyFetchBackoff`
    says. aiokafka has no setting for it: it relies on the broker to hold empty fetches."""
    from aiokafka.consumer.fetcher import Fetcher

    if max_s <= 0 or getattr(Fetcher._proc_fetch_request, "backoff", None):
        return
    original = Fetcher._proc_fetch_request
    backoff = EmptyFetchBackoff(max_s)

    async def fetch(self, assignment, node_id, request) -> bool:
        started = time.monotonic()
        has_data = await original(self, assignment, node_id, request)
        held_s = time.monotonic() - started
        delay = backoff.after(
            node_id, has_data, held_s, self._fetch_max_wait_ms / 1000, time.monotonic()
        )
        if delay and assignment.active:
            # The node counts as in flight until this returns: no fetch to it meanwhile.
            # Cancelled (a rebalance, a close): return as aiokafka's own fetch does.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(delay)
        return has_data

    fetch.backoff = backoff
    Fetcher._proc_fetch_request = fetch


class InOrderAcks:
    """Acks each partition's requests in offset order, a request once it and every earlier one
    of its partition is answered. Faust commits past a gap at the head of a partition's acked
    offsets (`Consumer._new_offset` checks `min(acked) - committed > 1`, and nothing before the
    first commit), so acking out of order could commit a request still in flight."""

    def __init__(self, stream):
        self.stream = stream
        self._pending: dict[tuple[str, int], dict[int, list]] = {}  # [event, answered]

    def taken(self, events) -> None:
        for e in events:
            tp = (e.message.topic, e.message.partition)
            self._pending.setdefault(tp, {})[e.message.offset] = [e, False]

    async def done(self, events) -> None:
        for e in events:
            entry = self._pending.get((e.message.topic, e.message.partition), {})
            if e.message.offset in entry:
                entry[e.message.offset][1] = True
        for tp in {(e.message.topic, e.message.partition) for e in events}:
            await self._ack_head(tp)

    async def _ack_head(self, tp: tuple[str, int]) -> None:
        pending = self._pending.get(tp, {})
        while pending:
            offset, (event, answered) = next(iter(pending.items()))  # dicts keep insertion order
            if not answered:
                return
            del pending[offset]
            await self.stream.ack(event)


class Batches:
    """Groups events taken one by one into batches of up to `max_`, the first event waiting at
    most `wait_s` for company. Unlike Faust's `take`, which wakes every `within` seconds even
    when there is nothing to take, an idle stream costs nothing."""

    def __init__(self, max_: int, wait_s: float, launch: Callable[[list], None]):
        self.max_, self.wait_s, self.launch = max_, wait_s, launch
        self._batch: list = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, event) -> None:
        self._batch.append(event)
        if len(self._batch) >= self.max_:
            self.flush()
        elif len(self._batch) == 1:
            self._timer = asyncio.get_running_loop().call_later(self.wait_s, self.flush)

    def flush(self) -> None:
        self.cancel()
        events, self._batch = self._batch, []
        if events:
            self.launch(events)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
