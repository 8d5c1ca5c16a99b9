"""Stream workers (real Faust processes) on the embedded broker, Valkey and tritonserver.

The workers write state (interactions, item updates): the tests that run them on it use state
and a tritonserver of the module's own (`own_backend`), never the session's.
"""

from __future__ import annotations

import time
import uuid

import pytest
from records import (
    T0,
    interaction,
    processed,
    produce,
    read_topic,
    request,
    stack_settings,
    wait_until,
)

from state.feature_store import feature_store
from state.store import RedisState
from streamrec.workers import Workers, log_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(own_backend, kafka, artifacts):
    """Fresh topics and one worker for the module, publishing in Kafka transactions."""
    # A generous default deadline: these tests assert answers, and a loaded machine must not
    # turn them into `expired` ones. Deadlines are tested with explicit ones.
    settings = stack_settings(
        own_backend.settings,
        kafka,
        own_backend.redis_url,
        own_backend.triton_url,
        artifacts,
        kafka_transactions=True,
        request_deadline_ms=60_000,
    )
    workers = Workers(settings)
    workers.start(1)
    yield settings
    workers.stop_all()


@pytest.fixture(scope="module")
def state(own_backend):
    return RedisState(own_backend.redis_url, prefix=own_backend.config["feast_project"])


def settled(settings, roles: list[str], timeout: float = 60.0) -> None:
    """Until the workers have committed every event of these topics: whatever comes of them
    (effects, answers, dead letters, duplicates) is written by then."""
    wait_until(
        lambda: processed(settings, settings.kafka_bootstrap, roles),
        timeout,
        f"the workers to commit every event of {', '.join(roles)}",
    )


def responses(settings, request_ids: set[str], timeout: float = 60.0) -> dict[str, list[dict]]:
    """All responses to these requests (a list each, to see duplicates) once the workers have
    committed every request."""
    settled(settings, ["requests"], timeout)
    got: dict[str, list[dict]] = {}
    for response in read_topic(settings, settings.kafka_bootstrap, "recommendations"):
        if response["request_id"] in request_ids:
            got.setdefault(response["request_id"], []).append(response)
    return got


def ask(settings, user: str, k: int = 10) -> dict:
    r = request(user, k)
    produce(settings, "requests", [r])
    return responses(settings, {r["request_id"]})[r["request_id"]][0]


def items_of(response: dict) -> list[str]:
    return [i["item_id"] for i in response["items"]]


def test_each_request_gets_exactly_one_response_with_its_id(live):
    batch = [request(str(u), k=5) for u in range(100, 130)]
    batch.append(request("17", k=0))  # invalid: answered with an error
    produce(live, "requests", batch)
    got = responses(live, {r["request_id"] for r in batch})
    assert set(got) == {r["request_id"] for r in batch}
    assert all(len(v) == 1 for v in got.values())
    assert sum(v[0]["status"] == "ok" for v in got.values()) == 30
    bad = got[batch[-1]["request_id"]][0]
    assert bad["status"] == "error" and "k must be" in bad["error"]


def test_an_expired_request_is_answered_expired_at_once_and_its_batch_served(live):
    now_ms = int(time.time() * 1000)
    fresh = [request("196", k=5), request("196", k=5, deadline_ms=now_ms + 30_000)]
    late = request("196", k=5, deadline_ms=now_ms - 2_000)  # one user: one partition, one batch
    produce(live, "requests", [fresh[0], late, fresh[1]])
    got = responses(live, {r["request_id"] for r in [*fresh, late]})
    assert all(len(got[r["request_id"]]) == 1 for r in [*fresh, late])
    assert [got[r["request_id"]][0]["status"] for r in fresh] == ["ok", "ok"]
    expired = got[late["request_id"]][0]
    assert expired["status"] == "expired" and "before serving" in expired["error"]
    missed_ms = int(expired["error"].split("missed by ")[1].split(" ms")[0])
    assert missed_ms >= 2_000
    assert expired["items"] == [] and expired["stages"] == []  # Triton never ran it


def test_an_interaction_removes_the_item_from_the_users_next_recommendation(live, state):
    user = "59"
    top = items_of(ask(live, user))[0]
    produce(live, "interactions", [interaction(user, top, T0 + 1000)])
    wait_until(lambda: top in state.seen(user), 30, "the interaction to be applied")
    assert top not in items_of(ask(live, user, k=50))


def test_features_read_back_from_feast_reflect_the_events(live, artifacts):
    user = f"new-{uuid.uuid4().hex[:6]}"
    items = ["50", "181", "100", "258"]
    produce(
        live, "interactions", [interaction(user, i, T0 + n * 1000) for n, i in enumerate(items)]
    )
    store = feature_store(live.feature_repo())

    def features():
        return store.get_online_features(
            ["user_activity:recent_items", "user_activity:event_count"], [{"user_id": user}]
        ).to_dict()

    wait_until(lambda: features()["event_count"][0] == len(items), 30, "Feast to show 4 events")
    assert features()["recent_items"][0] == list(reversed(items))
    response = ask(live, user)
    assert response["path"] == "personalized"
    assert set(items).isdisjoint(items_of(response))


def test_an_item_marked_unavailable_disappears_from_all_responses(live, state):
    users = ["201", "202", "203"]
    target = items_of(ask(live, users[0]))[0]
    update = {
        "item_id": target,
        "available": False,
        "title": None,
        "year": None,
        "genres": [],
        "attributes": {},
        "timestamp_ms": T0,
    }
    produce(live, "item_updates", [update])
    wait_until(lambda: state.unavailable_mask([target]) == [True], 30, "the item update")
    try:
        for user in users:
            assert target not in items_of(ask(live, user, k=100))
    finally:  # the module's other tests see the item again
        produce(live, "item_updates", [update | {"available": True, "timestamp_ms": T0 + 1}])
        wait_until(lambda: state.unavailable_mask([target]) == [False], 30, "re-enabling")


def test_malformed_bytes_are_dead_lettered_and_later_events_still_processed(live, state):
    user = f"dlq-{uuid.uuid4().hex[:6]}"
    produce(live, "interactions", [interaction(user, "1", T0)], raw=[b"\x00broken bytes"])
    wait_until(lambda: state.seen(user) == ["1"], 30, "the valid event after the bad one")
    settled(live, ["interactions"])
    letters = read_topic(live, live.kafka_bootstrap, "dead_letter")
    broken = [d for d in letters if d["value"] == b"\x00broken bytes"]
    assert len(broken) == 1
    assert broken[0]["topic"] == live.topics.interactions
    assert "bad or missing header" in broken[0]["error"]
    assert broken[0]["processor"] == "interactions"


def test_a_new_catalog_item_is_embedded_and_retrievable_without_retraining(
    live, state, artifacts, own_backend
):
    from serving.operators import GRAPH, Retrieval

    item = f"new-item-{uuid.uuid4().hex[:6]}"
    update = {
        "item_id": item,
        "available": True,
        "title": "Brand New (2026)",
        "year": 1998,
        "genres": ["Comedy", "Romance"],
        "attributes": {},
        "timestamp_ms": T0,
    }
    produce(live, "item_updates", [update])
    wait_until(lambda: item in state.catalog_additions([item]), 30, "the catalog addition")
    # The stage's own code and item table, in this process, taking in the change stream
    (retrieval,) = GRAPH.instantiate([Retrieval], artifacts, own_backend.config)
    index = retrieval.items.index
    assert item in index.row
    own = index.vectors([item])
    scores, found = index.search(own, 100)
    # Its nearest neighbour is itself, up to ties with other unseen items of the same genres/year.
    best = [i for i, s in zip(found[0], scores[0], strict=True) if s >= scores[0][0] - 1e-6]
    assert item in best


def test_a_worker_killed_mid_stream_loses_and_doubles_nothing(own_backend, kafka, artifacts, state):
    own = own_backend
    settings = stack_settings(own.settings, kafka, own.redis_url, own.triton_url, artifacts)
    users = [f"kill-{uuid.uuid4().hex[:6]}-{n}" for n in range(20)]
    events = [interaction(users[n % 20], str(1 + n % 300), T0 + n * 1000) for n in range(600)]
    requests = [request(users[n % 20], k=5) for n in range(150)]
    workers = Workers(settings)
    try:
        workers.start(1)
        produce(settings, "interactions", events)
        produce(settings, "requests", requests)
        wait_until(lambda: sum(len(state.seen(u)) for u in users) > 50, 30, "some progress")
        workers.kill(workers.running()[0])
        workers.start(1)
        got = responses(settings, {r["request_id"] for r in requests}, timeout=120)
        settled(settings, ["interactions"])  # every event applied, any replay of them too
    finally:
        workers.stop_all()
    assert set(got) == {r["request_id"] for r in requests}  # none lost (duplicates allowed)
    expected: dict[str, int] = {}
    for e in events:
        expected[e["user_id"]] = expected.get(e["user_id"], 0) + 1
    for user, s in zip(users, state.users(users), strict=True):
        assert s.event_count == expected[user]  # not doubled by the replay after the kill
        assert set(state.seen(user)) == {e["item_id"] for e in events if e["user_id"] == user}
    store = feature_store(settings.feature_repo())
    online = store.get_online_features(
        ["user_activity:event_count"], [{"user_id": u} for u in users]
    ).to_dict()
    assert online["event_count"] == [expected[u] for u in users]


def test_two_workers_split_the_partitions_and_answer_everything(
    base_settings,
    kafka,
    redis_url,
    triton_url,
    artifacts,
    serving_config,
):
    settings = stack_settings(base_settings, kafka, redis_url, triton_url, artifacts)
    workers = Workers(settings)
    try:
        running = workers.start(2)
        batch = [request(str(u), k=3) for u in range(300, 380)]
        produce(settings, "requests", batch)
        got = responses(settings, {r["request_id"] for r in batch}, timeout=90)
        logs = [log_of(w) for w in running]
        metrics = [_responses_metric(w.metrics_port) for w in running]
    finally:
        workers.stop_all()
    assert set(got) == {r["request_id"] for r in batch}
    assert all(len(v) == 1 for v in got.values())
    assert all(m > 0 for m in metrics), metrics  # both workers answered some
    assert sum(metrics) == len(batch)
    assert all("partitions assigned: {" in log for log in logs)  # streamrec's own line


def _responses_metric(port: int) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("streamrec_responses_total{")
    )


def test_a_worker_that_cannot_start_says_why_at_once(
    base_settings, kafka, redis_url, triton_url, artifacts, serving_config, tmp_path
):
    from streamrec.stack.process import StartupError

    settings = stack_settings(base_settings, kafka, redis_url, triton_url, artifacts)
    cases = {
        "no Feast repository at": {"run_dir": tmp_path / "empty-run"},
        "Redis at redis://127.0.0.1:1/0": {"redis_url": "redis://127.0.0.1:1/0"},
        "no trained artifacts under": {"artifact_dir": tmp_path / "no-artifacts"},
    }
    for reason, update in cases.items():
        started = time.monotonic()
        with pytest.raises(StartupError, match="stream worker failed to start: ") as failed:
            Workers(settings.model_copy(update=update)).start(1, timeout=120)
        assert reason in str(failed.value)
        assert "Traceback" not in str(failed.value)
        assert time.monotonic() - started < 30  # not the 120 s start-up timeout
