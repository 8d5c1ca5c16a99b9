"""`streamrec state rebuild`: the online state rebuilt from the training-time snapshot and the
Kafka log after Redis lost everything, compared with the state from before the loss.

Each test runs its own Valkey (the session's one is shared: FLUSHALL there would wipe the state
other tests rely on) and its own fresh topics on the session's embedded broker.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import uuid

import pandas as pd
import pytest
from records import T0, interaction, item_update, produce, stack_settings
from typer.testing import CliRunner

from schemas.settings import get_settings
from state.store import RedisState
from streams.kafka import client_config
from streams.processors import InteractionProcessor, ItemUpdateProcessor, RawEvent
from streams.rebuild import (
    Gap,
    PartitionRange,
    RetentionError,
    check_retention,
    load_snapshot,
    read_snapshot,
    record_offsets,
    watermarks,
    write_record,
)
from streams.topics import serde_for, topic_name

pytestmark = pytest.mark.integration

PROJECT = "streamrec"


@pytest.fixture()
def own_redis(tmp_path):
    from streamrec.stack.servers import start_redis, stop_service

    service = start_redis(tmp_path / "valkey", 15)
    yield service.endpoint
    stop_service(service)


@pytest.fixture()
def env(base_settings, kafka, own_redis, artifacts, tmp_path, monkeypatch):
    """Settings with fresh topics, this test's Valkey and run directory; the same settings as
    STREAMREC_* variables, for the CLI."""
    settings = stack_settings(
        base_settings,
        kafka,
        own_redis,
        None,
        artifacts,
        run_dir=tmp_path / "run",
        feast_project=PROJECT,
    )
    names = settings.topics.model_dump()
    variables = {
        "STREAMREC_KAFKA_BOOTSTRAP": kafka,
        "STREAMREC_REDIS_URL": own_redis,
        "STREAMREC_RUN_DIR": str(settings.run_dir),
        "STREAMREC_ARTIFACT_DIR": str(settings.artifact_dir),
        "STREAMREC_WORKER_GROUP": settings.worker_group,
        "STREAMREC_FEAST_PROJECT": PROJECT,
        "STREAMREC_PARTITIONS": str(settings.partitions),
    } | {f"STREAMREC_TOPICS__{role.upper()}": name for role, name in names.items()}
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def read_new(settings, role: str, position: dict[int, int]) -> list[RawEvent]:
    """The events of a topic past `position` (partition → next offset), which it advances: a
    plain reader of its own, not the rebuild's."""
    from confluent_kafka import Consumer, TopicPartition

    name = topic_name(settings, role)
    ends = {
        p: high
        for p, (_, high) in watermarks(settings, settings.kafka_bootstrap)[role][
            "partitions"
        ].items()
    }
    todo = {p: end for p, end in ends.items() if end > position.get(p, 0)}
    if not todo:
        return []
    consumer = Consumer(
        client_config(settings, settings.kafka_bootstrap)
        | {"group.id": f"reader-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(name, p, position.get(p, 0)) for p in todo])
    events: list[RawEvent] = []
    deadline = time.monotonic() + 30
    while any(position.get(p, 0) < end for p, end in todo.items()):
        assert time.monotonic() < deadline, "reading the topic timed out"
        for m in consumer.consume(500, 0.5):
            assert not m.error(), m.error()
            if m.offset() < todo[m.partition()]:
                events.append(
                    RawEvent(
                        m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1]
                    )
                )
                position[m.partition()] = m.offset() + 1
    consumer.close()
    return sorted(events, key=lambda e: e.timestamp_ms)  # like a worker keeping up


def dump(redis_url: str, artifacts, users: list[str], items: list[str]) -> dict:
    """Everything streamrec keeps in Redis, by key, and the Feast rows of every user and item."""
    import redis

    from state.feature_store import OnlineReader

    client = redis.Redis.from_url(redis_url)
    keys: dict[str, object] = {}
    feast_keys = log_keys = 0
    for key in client.scan_iter(count=1000):
        if not key.startswith(f"{PROJECT}:".encode()):
            feast_keys += 1
            continue
        if key.startswith(f"{PROJECT}:changes".encode()):
            log_keys += 1  # the serving stages' change logs: a history of writes, not state
            continue
        kind = client.type(key).decode()
        value = {
            "string": lambda k: client.get(k),
            "hash": lambda k: client.hgetall(k),
            "set": lambda k: client.smembers(k),
            "zset": lambda k: dict(client.zrange(k, 0, -1, withscores=True)),
        }[kind](key)
        keys[key.decode()] = value
    client.close()
    reader = OnlineReader(redis_url, PROJECT)
    feast = {
        "user_activity": reader.users(users, "user_activity"),
        "user_profile": reader.users(users, "user_profile"),
        "item_profile": reader.items(items, "item_profile"),
    }
    reader.close()
    return {"keys": keys, "feast_keys": feast_keys, "log_keys": log_keys, "feast": feast}


def merged(keys: dict, name: str, pop: bool = False):
    """The values of the item shards' keys `{PROJECT}:{name}:{...}` as one (sets and hashes
    joined); with `pop`, the keys are taken out of `keys`."""
    found = [k for k in keys if k.startswith(f"{PROJECT}:{name}:{{")]
    values = [keys.pop(k) if pop else keys[k] for k in found]
    if values and isinstance(values[0], set):
        return set().union(*values)
    return {k: v for value in values for k, v in value.items()}


def assert_close(a, b, where: str, rel: float) -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-300), f"{where}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a.keys() ^ b.keys())[:5]} differ"
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}", rel)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for n, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{n}]", rel)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_rebuild_after_a_flush_restores_the_state_from_before(env, artifacts):
    import redis
    from confluent_kafka import Consumer, TopicPartition

    from streamrec.cli import app

    settings = env
    rng = random.Random(7)

    # Events the workers consumed before the snapshot was loaded: their group committed them,
    # so they are not applied on top of the snapshot, and a rebuild must not replay them.
    before = [interaction(f"pre-{n}", str(1 + n), T0 - 10_000 + n) for n in range(8)]
    produce(settings, "interactions", before)
    marks = watermarks(settings, settings.kafka_bootstrap)
    name = topic_name(settings, "interactions")
    commits = [
        TopicPartition(name, p, high)
        for p, (_, high) in marks["interactions"]["partitions"].items()
        if high
    ]
    group = Consumer(
        client_config(settings, settings.kafka_bootstrap)
        | {"group.id": settings.worker_group, "enable.auto.commit": False}
    )
    group.commit(offsets=commits, asynchronous=False)
    group.close()

    record = load_snapshot(settings, artifacts, settings.redis_url, settings.kafka_bootstrap)
    assert record["error"] is None
    recorded = record["topics"]["interactions"]["partitions"]
    assert sum(p["start"] for p in recorded.values()) == len(before)
    assert all(p["start"] == p["end"] for p in recorded.values())
    assert read_snapshot(settings)["topics"] == record["topics"]

    # The stream after the snapshot, applied as live workers would: in small chunks, each
    # processed as it arrives, by the workers' own processors.
    new_item = f"new-item-{uuid.uuid4().hex[:6]}"
    updates = [
        item_update(
            new_item, T0, title="Brand New (2026)", year=1998, genres=["Comedy", "Romance"]
        ),
        item_update("50", T0 + 1, available=False),
        item_update("181", T0 + 2, available=False),
        item_update("181", T0 + 3, available=True),
        item_update("100", T0 + 4, available=False),
    ]
    users = [str(u) for u in range(1, 31)] + [f"new-{uuid.uuid4().hex[:4]}-{n}" for n in range(12)]
    popular = [str(i) for i in range(1, 60)] + [new_item] * 5
    stream = [
        interaction(rng.choice(users), rng.choice(popular), T0 + 10_000 + n * 1000)
        for n in range(600)
    ]
    stream[300:300] = [dict(stream[10])]  # the same event id again: a duplicate
    processors = {
        "interactions": InteractionProcessor(
            serde_for(settings, "interactions"),
            RedisState(settings.redis_url, PROJECT),
            settings.feature_repo(),
            artifacts,
        ),
        "item_updates": ItemUpdateProcessor(
            serde_for(settings, "item_updates"), RedisState(settings.redis_url, PROJECT)
        ),
    }
    positions = {
        role: {int(p): v["start"] for p, v in record["topics"][role]["partitions"].items()}
        for role in ("interactions", "item_updates")
    }
    applied = {"interactions": 0, "item_updates": 0}
    chunks = [("item_updates", updates, [])] + [
        ("interactions", stream[n : n + 25], [b"\x00broken"] if n == 100 else [])
        for n in range(0, len(stream), 25)
    ]
    for role, records, raw in chunks:
        produce(settings, role, records, raw)
        events = read_new(settings, role, positions[role])
        applied[role] += processors[role].process(events).applied
    assert applied == {"interactions": 600, "item_updates": 4}  # 181: only the newest applies

    ids = pd.read_parquet(artifacts / "state" / "user_profile.parquet")["user_id"].tolist()
    items = list(json.loads((artifacts / "items.json").read_text())) + [new_item]
    all_users = sorted(set(ids) | set(users) | {e["user_id"] for e in before})
    before_loss = dump(settings.redis_url, artifacts, all_users, items)
    assert merged(before_loss["keys"], "unavailable") == {b"50", b"100"}
    assert new_item.encode() in merged(before_loss["keys"], "catalog")
    assert before_loss["feast"]["user_activity"][all_users.index(users[-1])] is not None

    checked = CliRunner().invoke(app, ["state", "check"])
    assert checked.exit_code == 0, checked.output
    assert "all 607 events since the snapshot are retained" in checked.output, checked.output
    assert "retention.ms 604,800,000 (7.0 d)" in checked.output, checked.output

    redis.Redis.from_url(settings.redis_url).flushall()
    started = time.monotonic()
    result = CliRunner().invoke(app, ["state", "rebuild"])
    seconds = time.monotonic() - started
    assert result.exit_code == 0, result.output
    after = dump(settings.redis_url, artifacts, all_users, items)

    # Counts: every event since the snapshot replayed once; the duplicate and the broken bytes
    # are recognized as such again.
    out = result.output
    rows = {
        cells[0]: cells[1:]
        for line in out.splitlines()
        if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 3
    }
    assert rows["events replayed"] == ["602", "5"], out  # 600 + the duplicate + broken bytes
    assert rows["applied"] == ["600", "4"], out
    assert rows["duplicates (already applied)"] == ["1", "0"], out
    assert rows["undecodable or invalid (dead letters)"] == ["1", "0"], out
    # Every streamrec key: user states, seen sets, applied ids, availability, catalog, acks.
    popped = len(after["keys"])
    popular_before = merged(before_loss["keys"], "popular", pop=True)
    popular_after = merged(after["keys"], "popular", pop=True)
    # Events counted on the item side: the same ones, numbered in another order.
    assert set(merged(before_loss["keys"], "counted", pop=True)) == set(
        merged(after["keys"], "counted", pop=True)
    )
    popped -= len(after["keys"])
    assert before_loss["keys"].keys() == after["keys"].keys()
    for key, value in before_loss["keys"].items():
        assert after["keys"][key] == value, key
    # Popularity: the same events summed in another order.
    assert_close(popular_before, popular_after, "popular", rel=1e-9)
    # Feast: the same rows (event timestamps may differ, values do not).
    assert before_loss["feast_keys"] == after["feast_keys"]
    assert_close(before_loss["feast"], after["feast"], "feast", rel=1e-6)
    # The workers' group offsets are where they were.
    group = Consumer(
        client_config(settings, settings.kafka_bootstrap)
        | {"group.id": settings.worker_group, "enable.auto.commit": False}
    )
    still = group.committed([TopicPartition(name, tp.partition) for tp in commits], timeout=10)
    group.close()
    assert [tp.offset for tp in still] == [tp.offset for tp in commits]
    # Again on the rebuilt (not flushed) Redis: streamrec's and Feast's keys are cleared first,
    # so nothing is taken for a duplicate, and other keys are left alone.
    client = redis.Redis.from_url(settings.redis_url)
    client.set("someone-else:key", "kept")
    again = CliRunner().invoke(app, ["state", "rebuild"])
    assert again.exit_code == 0, again.output
    assert "│ applied" in again.output and "600" in again.output, again.output
    cleared = int(re.search(r"cleared ([\d,]+) keys", again.output)[1].replace(",", ""))
    # + popular and counted (popped above), the change logs and their counters (not dumped)
    assert cleared == len(after["keys"]) + popped + after["log_keys"] + after["feast_keys"]
    assert client.get("someone-else:key") == b"kept"
    client.delete("someone-else:key")
    client.close()
    twice = dump(settings.redis_url, artifacts, all_users, items)
    assert merged(twice["keys"], "popular", pop=True) == popular_after
    merged(twice["keys"], "counted", pop=True)
    assert twice["keys"] == after["keys"]
    assert_close(after["feast"], twice["feast"], "feast", rel=1e-6)
    print(checked.output)
    print(f"{len(after['keys'])} streamrec keys, {after['feast_keys']} Feast rows compared")
    print(f"rebuild: 607 events replayed onto the snapshot in {seconds:.1f} s\n{out}")


def test_rebuild_refuses_clearly_when_retention_deleted_events(env, artifacts):
    import redis
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    from streamrec.cli import app

    settings = env
    # The snapshot record as `load_snapshot` writes it (the load itself is not needed here).
    write_record(settings, artifacts, record_offsets(settings, settings.kafka_bootstrap))
    events = [interaction("u1", str(1 + n), T0 + n) for n in range(20)]
    produce(settings, "interactions", events)
    name = topic_name(settings, "interactions")
    partition = next(
        p
        for p, (_, high) in watermarks(settings, settings.kafka_bootstrap)["interactions"][
            "partitions"
        ].items()
        if high
    )
    admin = AdminClient(client_config(settings, settings.kafka_bootstrap))
    for future in admin.delete_records([TopicPartition(name, partition, 15)]).values():
        future.result(10)  # retention, as if: the first 15 events are gone
    client = redis.Redis.from_url(settings.redis_url)
    client.set(f"{PROJECT}:user:sentinel", "{}")

    runner = CliRunner()
    rebuilt = runner.invoke(app, ["state", "rebuild"])
    checked = runner.invoke(app, ["state", "check"])
    for result in (rebuilt, checked):
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        text = " ".join(result.output.split())
        assert f"{name}[{partition}]: 15 events missing" in text, text
        assert "Retrain" in text
    assert client.get(f"{PROJECT}:user:sentinel") == b"{}"  # refused before touching Redis
    client.close()


def test_the_retention_check_on_numbers():
    record = {"topics": {"interactions": {"name": "i", "partitions": {"0": {"start": 5}}}}}
    marks = {
        "interactions": {"name": "i", "partitions": {0: (7, 9), 1: (0, 4)}},
        "item_updates": {"name": "u", "partitions": {0: (0, 0)}},
    }
    ranges = [
        PartitionRange("interactions", "i", 0, 5, 7, 9),
        PartitionRange("interactions", "i", 1, 0, 0, 4),  # a partition added since: from 0
        PartitionRange("item_updates", "u", 0, 0, 0, 0),
    ]
    with pytest.raises(RetentionError) as e:
        check_retention(record, marks, ranges)
    assert e.value.gaps == [Gap("i", 0, 5, 7)]
    assert "i[0]: 2 events missing" in str(e.value)
    retained = {"interactions": {"name": "i", "partitions": {0: (5, 9)}}}
    check_retention(record, marks | retained, [PartitionRange("interactions", "i", 0, 5, 5, 9)])
    recreated = [PartitionRange("interactions", "i", 0, 5, 0, 2)]
    with pytest.raises(RetentionError, match="deleted and created again"):
        check_retention(record, marks, recreated)
