"""The online state rebuilt from the log: the training-time snapshot plus the topics' events.

Kafka is the source of truth for everything that happened after a snapshot was loaded. When the
snapshot is loaded (`load_snapshot`: `streamrec train`, the demo), the offsets from which the
stream workers will apply events on top of it are recorded on disk, next to the Feast repo
(`<feature repo>/stream_offsets.json`), where a Redis loss cannot take them. Per partition of the
interactions and item-updates topics that is the workers' committed offset, or, where their group
has none yet, the earliest retained offset (the workers read from the earliest); a topic that does
not exist yet records nothing (= from offset 0). The high watermarks at that moment are recorded
too, for information.

`rebuild` clears streamrec's and the Feast project's keys in Redis, loads the same snapshot again
and replays both topics from the recorded offsets up to their current end through the workers'
own processors, so the result is the state from before the loss. Before anything is touched the
retention check compares each recorded offset with the partition's earliest retained offset (its
low watermark): above it, events were deleted and cannot be replayed, and the rebuild refuses.

Order: the two topics are merged by event time (the Kafka message timestamp) while each
partition stays in offset order, i.e. in the order the workers applied them: per user
(interactions are keyed by user) and per item (item updates are keyed by item) the order is
exactly the original one, and an interaction sees the catalog additions that were there when it
was produced (its item's genre vector comes from them).
"""

from __future__ import annotations

import heapq
import json
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.settings import Settings
from streams.kafka import client_config
from streams.processors import RawEvent
from streams.topics import topic_name

SNAPSHOT_FILE = "stream_offsets.json"
ROLES = ("interactions", "item_updates")  # the topics whose events make the state


class SnapshotError(RuntimeError):
    """No usable record of the snapshot's offsets."""


@dataclass(frozen=True)
class Gap:
    topic: str
    partition: int
    recorded: int  # where the replay would have to start
    earliest: int  # the partition's earliest retained offset

    @property
    def missing(self) -> int:
        return self.earliest - self.recorded


class RetentionError(RuntimeError):
    """Events after the snapshot were deleted (retention): the log cannot rebuild the state."""

    def __init__(self, gaps: list[Gap], problems: list[str] | None = None):
        self.gaps = gaps
        self.problems = problems or []
        lines = [
            f"{g.topic}[{g.partition}]: {g.missing:,} events missing (the snapshot needs offset "
            f"{g.recorded:,}, the earliest retained is {g.earliest:,})"
            for g in gaps
        ] + self.problems
        missing = sum(g.missing for g in gaps)
        head = (
            f"{missing:,} events since the snapshot are no longer in Kafka"
            if gaps
            else "the topics no longer match the snapshot's offsets"
        )
        super().__init__(
            f"{head}; the state cannot be rebuilt from the log:\n  "
            + "\n  ".join(lines)
            + "\nRetrain (`streamrec train`) to get back to a consistent state, and keep the "
            "topics' retention longer than the time between snapshots."
        )


# --- offsets and the snapshot record ---------------------------------------------------------


def snapshot_file(settings: Settings, repo_dir: Path | None = None) -> Path:
    return Path(repo_dir or settings.feature_repo()) / SNAPSHOT_FILE


def watermarks(settings: Settings, bootstrap: str, timeout: float = 10.0) -> dict[str, Any]:
    """{role: {"name": topic, "partitions": {p: (low, high)}}}; no partitions if no topic."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        client_config(settings, bootstrap)
        | {"group.id": f"streamrec-offsets-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
    )
    try:
        topics = consumer.list_topics(timeout=timeout).topics
        out: dict[str, Any] = {}
        for role in ROLES:
            name = topic_name(settings, role)
            meta = topics.get(name)
            parts: dict[int, tuple[int, int]] = {}
            if meta is not None and meta.error is None:
                for p in sorted(meta.partitions):
                    low, high = consumer.get_watermark_offsets(
                        TopicPartition(name, p), timeout=timeout, cached=False
                    )
                    parts[p] = (low, high)
            out[role] = {"name": name, "partitions": parts}
        return out
    finally:
        consumer.close()


def committed_offsets(
    settings: Settings, bootstrap: str, tps: list[tuple[str, int]], timeout: float = 10.0
) -> dict[tuple[str, int], int]:
    """The workers' group's committed offsets (an offset fetch: it joins no group)."""
    from confluent_kafka import Consumer, TopicPartition

    if not tps:
        return {}
    consumer = Consumer(
        client_config(settings, bootstrap)
        | {"group.id": settings.worker_group, "enable.auto.commit": False}
    )
    try:
        got = consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=timeout)
        return {(tp.topic, tp.partition): tp.offset for tp in got if tp.offset >= 0}
    finally:
        consumer.close()


def record_offsets(settings: Settings, bootstrap: str, timeout: float = 10.0) -> dict[str, Any]:
    """Where the workers will start applying events onto a snapshot loaded now, per partition."""
    marks = watermarks(settings, bootstrap, timeout)
    tps = [(t["name"], p) for t in marks.values() for p in t["partitions"]]
    committed = committed_offsets(settings, bootstrap, tps, timeout)
    topics = {}
    for role, t in marks.items():
        parts = {}
        for p, (low, high) in t["partitions"].items():
            start = committed.get((t["name"], p), low)
            parts[str(p)] = {"start": min(start, high), "end": high}
        topics[role] = {"name": t["name"], "partitions": parts}
    return topics


def load_snapshot(
    settings: Settings,
    artifact_dir: Path,
    redis_url: str,
    bootstrap: str | None,
    repo_dir: Path | None = None,
) -> dict[str, Any]:
    """Load the artifacts' snapshot into Feast + Redis, replacing the project's state there, and
    record the topics' offsets with it.

    The offsets are read before the load: an event produced during the load is applied by the
    workers too, so it must be replayed by a rebuild. Without a reachable broker (`bootstrap`
    None or an error) the record says why, and a rebuild of this snapshot will refuse.
    Returns the record (also written to `snapshot_file`).
    """
    from state.load import load_features

    offsets, error = None, None
    if bootstrap is None:
        error = "no Kafka broker was running when the snapshot was loaded"
    else:
        try:
            offsets = record_offsets(settings, bootstrap)
        except Exception as e:  # librdkafka: broker unreachable, timeouts
            error = f"the offsets could not be read from Kafka ({bootstrap}): {e}"
    # The state becomes the snapshot's: what an earlier load or its stream left (applied event
    # ids, user states, seen sets) would make the same events count as duplicates.
    clear_state(redis_url, settings.feast_project)
    repo = load_features(
        artifact_dir, redis_url, repo_dir or settings.feature_repo(), settings.feast_project
    )
    return write_record(settings, artifact_dir, offsets, error, repo)


def write_record(
    settings: Settings,
    artifact_dir: Path,
    offsets: dict[str, Any] | None,
    error: str | None = None,
    repo_dir: Path | None = None,
) -> dict[str, Any]:
    """Write the snapshot record (atomically) next to the Feast repo; returns it."""
    record = {
        "artifacts": str(Path(artifact_dir).resolve()),
        "project": settings.feast_project,
        "worker_group": settings.worker_group,
        "loaded_at_ms": int(time.time() * 1000),
        "topics": offsets,
        "error": error,
    }
    path = snapshot_file(settings, repo_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return record


def read_snapshot(settings: Settings, repo_dir: Path | None = None) -> dict[str, Any]:
    path = snapshot_file(settings, repo_dir)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise SnapshotError(
            f"no snapshot record at {path}: no snapshot was loaded here with its Kafka "
            "offsets. Run `streamrec train` to load one (and record its offsets)."
        ) from None
    except (OSError, ValueError) as e:
        raise SnapshotError(f"unreadable snapshot record {path}: {e}") from None
    if record.get("topics") is None:
        raise SnapshotError(
            f"the snapshot of {record.get('artifacts')} was loaded without its Kafka offsets "
            f"({record.get('error')}); it cannot be rebuilt from the log. Retrain, with the "
            "broker running."
        )
    if not Path(record["artifacts"]).is_dir():
        raise SnapshotError(f"the snapshot's artifacts {record['artifacts']} are gone")
    return record


# --- the replay plan and the retention check -------------------------------------------------


@dataclass(frozen=True)
class PartitionRange:
    role: str
    topic: str
    partition: int
    start: int  # recorded: the first offset to replay
    earliest: int  # low watermark now
    end: int  # high watermark now: replay up to here (exclusive)

    @property
    def events(self) -> int:
        return max(self.end - self.start, 0)


def plan(record: dict[str, Any], marks: dict[str, Any]) -> list[PartitionRange]:
    """Partitions to replay: recorded start (0 for partitions added since) → current end."""
    ranges = []
    for role in ROLES:
        recorded = record["topics"].get(role) or {"name": marks[role]["name"], "partitions": {}}
        parts = recorded["partitions"]
        for p, (low, high) in marks[role]["partitions"].items():
            start = parts.get(str(p), {}).get("start", 0)
            ranges.append(PartitionRange(role, marks[role]["name"], p, start, low, high))
    return ranges


def check_retention(
    record: dict[str, Any], marks: dict[str, Any], ranges: list[PartitionRange]
) -> None:
    """Raise RetentionError unless every event since the snapshot is still in the topics."""
    problems = []
    for role in ROLES:
        recorded = record["topics"].get(role)
        if recorded is None:
            continue
        now = marks[role]
        if recorded["name"] != now["name"]:
            problems.append(
                f"the snapshot recorded topic '{recorded['name']}' for {role}, the settings "
                f"name '{now['name']}'"
            )
        gone = sorted(set(map(int, recorded["partitions"])) - set(now["partitions"]))
        if gone:
            problems.append(f"{now['name']}: partitions {gone} of the snapshot no longer exist")
    for r in ranges:
        if r.end < r.start:
            problems.append(
                f"{r.topic}[{r.partition}]: ends at offset {r.end:,}, before the snapshot's "
                f"{r.start:,} (was the topic deleted and created again?)"
            )
    gaps = [Gap(r.topic, r.partition, r.start, r.earliest) for r in ranges if r.earliest > r.start]
    if gaps or problems:
        raise RetentionError(gaps, problems)


def retention_ms(settings: Settings, bootstrap: str, timeout: float = 10.0) -> dict[str, int]:
    """The topics' `retention.ms` (-1 = forever), for information; {} if not available."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient(client_config(settings, bootstrap))
    names = [topic_name(settings, r) for r in ROLES]
    out = {}
    try:
        futures = admin.describe_configs([ConfigResource("topic", n) for n in names])
        for resource, future in futures.items():
            entry = future.result(timeout).get("retention.ms")
            if entry is not None and entry.value is not None:
                out[resource.name] = int(entry.value)
    except Exception:  # older brokers / ACLs: the watermark check is what counts
        return out
    return out


# --- clearing and replaying ------------------------------------------------------------------


def _glob_escape(raw: bytes) -> bytes:
    return b"".join(b"\\" + bytes([c]) if c in b"*?[]\\" else bytes([c]) for c in raw)


def _feast_prefix(join_key: str, project: str) -> bytes:
    """The start of Feast's Redis key of every entity of `join_key` (string ids): the serialized
    key up to the value's length. (Feast's own `_redis_key_prefix` does not match the keys of
    entity key serialization v3.)"""
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from state.feature_store import ENTITY_KEY_SERIALIZATION_VERSION

    a, b = (
        _redis_key(
            project,
            EntityKey(join_keys=[join_key], entity_values=[Value(string_val=v)]),
            ENTITY_KEY_SERIALIZATION_VERSION,
        )
        for v in ("a", "bb")
    )
    n = 0
    while a[n] == b[n]:
        n += 1
    return a[:n]


def clear_state(redis_url: str, project: str) -> int:
    """Delete streamrec's keys (`{project}:*`) and the Feast project's online rows; leave any
    other key alone. Returns the number of keys deleted."""
    from state.feature_store import ENTITIES
    from state.store import redis_client

    name = project.encode()
    prefixes = [_feast_prefix(key, project) for key in ENTITIES.values()]

    def feast_row(key: bytes, prefix: bytes) -> bool:  # prefix + length + id + project
        size = int.from_bytes(key[len(prefix) : len(prefix) + 4], "little")
        return key.endswith(name) and len(key) == len(prefix) + 4 + size + len(name)

    scans = [(_glob_escape(name) + b":*", lambda _: True)] + [
        (_glob_escape(p) + b"*" + _glob_escape(name), lambda k, p=p: feast_row(k, p))
        for p in prefixes
    ]
    client = redis_client(redis_url)  # on a cluster, scans every primary
    deleted = 0
    try:
        for pattern, wanted in scans:
            batch = []
            for key in client.scan_iter(match=pattern, count=1000):
                if wanted(key):
                    batch.append(key)
                if len(batch) >= 1000:
                    deleted += client.delete(*batch)
                    batch = []
            if batch:
                deleted += client.delete(*batch)
    finally:
        client.close()
    return deleted


def read_merged(
    settings: Settings, bootstrap: str, ranges: list[PartitionRange], buffer: int = 5000
) -> Iterator[RawEvent]:
    """The events of `ranges`, partitions merged by message time, each in offset order.

    A plain consumer with assign(): no group is joined and no offset is committed, so the
    workers' group is not disturbed. Memory stays bounded: a partition holding `buffer` events
    that cannot be emitted yet (another partition is behind) is paused until it drains.
    """
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    todo = [r for r in ranges if r.events > 0]
    if not todo:
        return
    consumer = Consumer(
        client_config(settings, bootstrap)
        | {
            "group.id": f"streamrec-rebuild-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "error",  # deleted while reading: fail, never skip
        }
    )
    ends = {(r.topic, r.partition): r.end for r in todo}
    rank = {r.topic: ROLES.index(r.role) for r in todo}  # same time: item updates first
    buffers: dict[tuple[str, int], deque[RawEvent]] = {tp: deque() for tp in ends}
    open_: set[tuple[str, int]] = set(ends)  # still reading
    paused: set[tuple[str, int]] = set()

    def key(tp: tuple[str, int]) -> tuple[int, int, tuple[str, int]]:
        return buffers[tp][0].timestamp_ms, -rank[tp[0]], tp

    def close(tp: tuple[str, int]) -> None:
        open_.discard(tp)
        paused.discard(tp)
        consumer.pause([TopicPartition(*tp)])  # nothing past the end is fetched

    consumer.assign([TopicPartition(r.topic, r.partition, r.start) for r in todo])
    try:
        while open_ or any(buffers.values()):
            # Emit while every partition still being read has a head: its next event cannot
            # be earlier than what it already holds.
            heads = [(key(tp), tp) for tp, b in buffers.items() if b]
            heapq.heapify(heads)
            while heads and all(buffers[tp] for tp in open_):
                _, tp = heapq.heappop(heads)
                yield buffers[tp].popleft()
                if buffers[tp]:
                    heapq.heappush(heads, (key(tp), tp))
            resume = [tp for tp in paused if len(buffers[tp]) < buffer // 2]
            if resume:
                consumer.resume([TopicPartition(*tp) for tp in resume])
                paused.difference_update(resume)
            if not open_:
                continue
            for msg in consumer.consume(1000, 1.0):
                tp = (msg.topic(), msg.partition())
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        if tp in open_:
                            close(tp)
                        continue
                    raise RuntimeError(f"reading {tp[0]}[{tp[1]}] failed: {msg.error()}")
                if tp not in open_:
                    continue
                if msg.offset() >= ends[tp]:
                    close(tp)
                    continue
                _, ts = msg.timestamp()
                buffers[tp].append(
                    RawEvent(tp[0], tp[1], msg.offset(), msg.key(), msg.value(), max(ts, 0))
                )
                if msg.offset() >= ends[tp] - 1:
                    close(tp)
            full = [tp for tp in open_ - paused if len(buffers[tp]) >= buffer]
            if full:
                consumer.pause([TopicPartition(*tp) for tp in full])
                paused.update(full)
    finally:
        consumer.close()


@dataclass
class RebuildResult:
    artifacts: str
    cleared_keys: int = 0
    to_replay: int = 0
    replayed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    applied: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    duplicates: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    dead_letters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    load_seconds: float = 0.0
    replay_seconds: float = 0.0
    ranges: list[PartitionRange] = field(default_factory=list)


def prepare(settings: Settings, bootstrap: str) -> tuple[dict, list[PartitionRange]]:
    """The snapshot record and the replay plan, retention-checked (raises if not replayable)."""
    record = read_snapshot(settings)
    marks = watermarks(settings, bootstrap)
    ranges = plan(record, marks)
    check_retention(record, marks, ranges)
    return record, ranges


def rebuild(
    settings: Settings,
    bootstrap: str,
    redis_url: str,
    batch: int | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> RebuildResult:
    """Clear the project's Redis state, reload the recorded snapshot, replay the topics.

    `on_progress(phase, done, total)` reports the phases "load" and "replay". Raises
    SnapshotError or RetentionError before touching Redis if the log cannot rebuild the state.
    """
    from state.load import load_features
    from state.store import RedisState
    from streams.processors import InteractionProcessor, ItemUpdateProcessor
    from streams.topics import serde_for

    progress = on_progress or (lambda *_: None)
    record, ranges = prepare(settings, bootstrap)
    artifacts = Path(record["artifacts"])
    project = settings.feast_project
    result = RebuildResult(str(artifacts), ranges=ranges)
    result.to_replay = sum(r.events for r in ranges)

    started = time.monotonic()
    progress("load", 0, 1)
    result.cleared_keys = clear_state(redis_url, project)
    repo = load_features(artifacts, redis_url, settings.feature_repo(), project)

    def state() -> RedisState:
        return RedisState(redis_url, project, settings.redis_wait_aof, settings.redis_wait_replicas)

    processors = {
        "interactions": InteractionProcessor(
            serde_for(settings, "interactions"), state(), repo, artifacts
        ),
        "item_updates": ItemUpdateProcessor(serde_for(settings, "item_updates"), state()),
    }
    result.load_seconds = time.monotonic() - started
    progress("load", 1, 1)

    started = time.monotonic()
    role_of = {r.topic: r.role for r in ranges}
    size = batch or settings.interaction_batch
    pending: list[RawEvent] = []
    done = 0

    def flush() -> None:
        nonlocal done
        if not pending:
            return
        role = role_of[pending[0].topic]
        out = processors[role].process(pending)
        result.replayed[role] += len(pending)
        result.applied[role] += out.applied
        result.duplicates[role] += out.duplicates
        result.dead_letters[role] += len(out.dead_letters)
        done += len(pending)
        pending.clear()
        progress("replay", done, result.to_replay)

    progress("replay", 0, result.to_replay)
    for event in read_merged(settings, bootstrap, ranges):
        if pending and (pending[0].topic != event.topic or len(pending) >= size):
            flush()
        pending.append(event)
    flush()
    result.replay_seconds = time.monotonic() - started
    return result
