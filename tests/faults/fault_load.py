"""Load for the fault suite: a steady stream of interactions and requests, and what came of it.

Each scenario adds a row to `ROWS`; conftest prints the table at the end of the run.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import records
from records import T0, processed, wait_until

from schemas.settings import Settings
from streamrec.stack import EmbeddedStack
from streamrec.workers import Workers

ROWS: list[dict] = []
REAL_USERS = ["196", "186", "22", "244", "166", "298", "115", "253"]  # personalized path


@dataclass
class Live:
    settings: Settings
    stack: EmbeddedStack
    workers: Workers

    def state(self):
        from state.store import RedisState

        return RedisState(self.stack.endpoint("redis"), prefix=self.settings.feast_project)

    def service_pid(self, name: str) -> int:
        return self.stack.services()[name].pid


@dataclass
class Load:
    """Produces interactions and requests at steady rates and records what comes back."""

    live: Live
    scenario: str
    events_per_s: int = 100
    requests_per_s: int = 10
    users: int = 40
    items: int = 60
    sent: list[dict] = field(default_factory=list)  # interactions the broker acknowledged
    # Sends reported failed: the broker may hold them all the same (a fatal producer error
    # fails what was in flight), and then they must take effect like any other.
    unconfirmed: list[dict] = field(default_factory=list)
    unconfirmed_requests: dict[str, float] = field(default_factory=dict)
    failed_sends: int = 0
    probes: int = 0  # recovery probes sent (one a second after the fault cleared)
    requests: dict[str, float] = field(default_factory=dict)  # request id → sent at (monotonic)
    responses: dict[str, list[tuple[bytes, dict, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def __post_init__(self):
        from streams.kafka import EventProducer

        bootstrap = self.live.stack.endpoint("kafka")
        self._new_producer = lambda: EventProducer(self.live.settings, bootstrap)
        self._producer = self._new_producer()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._n = 0
        self._fatal = False
        self._threads = [
            threading.Thread(target=self._produce, daemon=True),
            threading.Thread(target=self._consume, args=(bootstrap,), daemon=True),
        ]

    def user(self, n: int) -> str:
        return f"{self.scenario}-u{n}"

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def interaction(self, user: str) -> None:
        self._n += 1
        event = records.interaction(user, f"{self.scenario}-i{self._n % self.items}", T0 + self._n)

        def delivered(err) -> None:
            with self._lock:
                if err is None:
                    self.sent.append(event)
                else:
                    self.unconfirmed.append(event)
                    self._failed(err)

        self._send("interactions", event, delivered)

    def request(self, user: str) -> None:
        request, sent_at = records.request(user, timestamp_ms=T0 + self._n), time.monotonic()

        def delivered(err) -> None:
            if err is None:
                self.requests[request["request_id"]] = sent_at
            else:
                self.unconfirmed_requests[request["request_id"]] = sent_at
                self._failed(err)

        self._send("requests", request, delivered)

    def _send(self, role: str, record: dict, on_delivery=None) -> None:
        self._with_producer(lambda p: p.send(role, record, on_delivery=on_delivery))

    def _failed(self, err) -> None:
        self.failed_sends += 1
        self._fatal = self._fatal or err.fatal()

    def _with_producer(self, action) -> None:
        """Produce as a user's service would: an idempotent producer that hits a fatal error
        (the embedded broker forgets producer sequence numbers when it restarts) is replaced,
        and what it had not delivered counts as not accepted."""
        from confluent_kafka import KafkaError, KafkaException

        if self._fatal:
            self._replace_producer()
        try:
            action(self._producer)
        except KafkaException as e:
            if not (e.args[0].fatal() or e.args[0].code() == KafkaError._FATAL):
                raise
            self._replace_producer()
            action(self._producer)

    def _replace_producer(self) -> None:
        from confluent_kafka import KafkaException

        old, self._producer, self._fatal = self._producer, self._new_producer(), False
        with contextlib.suppress(KafkaException):
            old.poll(1.0)  # its undelivered messages report their failure

    def _produce(self) -> None:
        tick, n = 0.05, 0
        per_tick_events = self.events_per_s * tick
        every_request = max(1, round(1 / (self.requests_per_s * tick)))
        next_at = time.monotonic()
        while not self._stop.is_set():
            for _ in range(round(per_tick_events)):
                self.interaction(self.user(self._n % self.users))
            if n % every_request == 0:
                pool = [self.user(n % self.users), REAL_USERS[n % len(REAL_USERS)]]
                self.request(pool[n // every_request % 2])
            self._with_producer(lambda p: p.poll(0))
            n += 1
            next_at += tick
            time.sleep(max(0.0, next_at - time.monotonic()))
        with contextlib.suppress(RuntimeError):  # failed deliveries are counted already
            self._producer.flush(120)

    def _consume(self, bootstrap: str) -> None:
        """Follow the response topic (assigned partitions, positions in memory: a group would
        re-read or skip around a broker restart), from its beginning: answers are matched by
        request id."""
        starts = self._everything("recommendations")
        for raw, response in self._read("recommendations", starts, follow=True):
            self.responses[response["request_id"]].append((raw, response, time.monotonic()))

    def _ends(self, role: str) -> dict[int, int]:
        from confluent_kafka import TopicPartition

        from streams.topics import topic_name

        consumer, topic = self._consumer(), topic_name(self.live.settings, role)
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p))[1] for p in partitions}
        consumer.close()
        return ends

    def _consumer(self):
        from confluent_kafka import Consumer

        from streams.kafka import client_config

        return Consumer(
            client_config(self.live.settings, self.live.stack.endpoint("kafka"))
            | {
                "group.id": "unused",
                "enable.auto.commit": False,
                "auto.offset.reset": "error",
                "enable.partition.eof": True,
            }
        )

    def _read(self, role: str, starts: dict[int, int], follow: bool):
        """(bytes, record) of each event of a topic from `starts`: until stopped (`follow`),
        or up to the topic's end now."""
        from confluent_kafka import KafkaError, TopicPartition

        from streams.topics import serde_for, topic_name

        serde, topic = serde_for(self.live.settings, role), topic_name(self.live.settings, role)
        consumer = self._consumer()
        consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
        ends = {} if follow else self._ends(role)
        position = dict(starts)
        deadline = time.monotonic() + 30
        while (
            (not self._stop.is_set() or self._draining)
            if follow
            else any(position[p] < end for p, end in ends.items()) and time.monotonic() < deadline
        ):
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF and msg.partition() in ends:
                    position[msg.partition()] = ends[msg.partition()]  # offsets may have gaps
                continue
            position[msg.partition()] = msg.offset() + 1
            yield msg.value(), serde.decode(msg.value())
        consumer.close()

    def in_log(self, role: str, key: str) -> set[str]:
        """The ids (`key` field) of this load's events that the topic holds now: the embedded
        broker can lose writes it acknowledged when it restarts."""
        return {r[key] for _, r in self._read(role, self._everything(role), follow=False)}

    def _everything(self, role: str) -> dict[int, int]:
        """Every partition from its beginning: after a lossy restart the broker may number new
        events below the offsets this load started at, so reads filter by id instead."""
        from confluent_kafka import OFFSET_BEGINNING

        return dict.fromkeys(self._ends(role), OFFSET_BEGINNING)

    _draining = False

    kept: set[str] = frozenset()  # ids of the interactions the topic holds once settled
    lost_requests: int = 0  # acknowledged requests the topic does not hold

    def settle(self, timeout: float = 90.0) -> None:
        """Stop producing and read what the topics hold: the events the system must apply
        and the requests it must answer. Wait until it has; then count the answers from the
        topic itself, read once more from the start."""
        self._stop.set()
        self._draining = True
        self._threads[0].join(timeout=130)
        self.kept = self.in_log("interactions", "event_id")
        kept_requests = self.in_log("requests", "request_id")
        self.lost_requests = sum(rid not in kept_requests for rid in self.requests)
        issued = self.requests | self.unconfirmed_requests
        self.requests = {rid: t for rid, t in issued.items() if rid in kept_requests}
        state = self.live.state()
        expected = self.accepted()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answered = set(self.responses) >= set(self.requests)
            counts = self.applied(state, list(expected))
            if answered and all(counts[u] >= n for u, n in expected.items()):
                break
            time.sleep(0.2)
        # Once the workers have committed every event, whatever comes of them is written: late
        # duplicates and doubled effects included.
        bootstrap = self.live.stack.endpoint("kafka")
        wait_until(
            lambda: processed(self.live.settings, bootstrap, ["interactions", "requests"]),
            60,
            "the workers to commit every event",
        )
        self._draining = False
        self._threads[1].join(timeout=10)
        seen_at = {rid: got[0][2] for rid, got in self.responses.items()}
        self.responses = defaultdict(list)
        for raw, response in self._read(
            "recommendations", self._everything("recommendations"), False
        ):
            rid = response["request_id"]
            if rid not in self.requests:
                continue
            self.responses[rid].append((raw, response, seen_at.get(rid, time.monotonic())))

    def accepted(self) -> Counter:
        """Per user, the events the topic holds, acknowledged or not: each applied once."""
        with self._lock:
            events = self.sent + self.unconfirmed
        return Counter(e["user_id"] for e in events if e["event_id"] in self.kept)

    @staticmethod
    def applied(state, users: list[str]) -> dict[str, int]:
        return {
            u: (s.event_count if s else 0) for u, s in zip(users, state.users(users), strict=True)
        }

    def first_ok_after(self, t: float) -> float | None:
        """When the first request sent after `t` got an `ok` answer."""
        times = [
            got[0][2]
            for rid, got in list(self.responses.items())
            if rid in self.requests and self.requests[rid] >= t and got[0][1]["status"] == "ok"
        ]
        return min(times, default=None)
