"""The four-stage ensemble on a real tritonserver against the in-process runtime.

The tests that write state (a seen item, an unavailable item) write it under a project of the
module's own, served by a tritonserver of its own (`own_server`): the session's state stays as
loaded for every other test.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from records import wait_until

from schemas.records import RecommendationRequest
from serving.client import AsyncTritonRecommender, LocalRecommender, TritonRecommender
from serving.operators import request_tensors
from state.store import RedisState

pytestmark = pytest.mark.integration

NOW_MS = 893_400_000_000  # just after the end of ML-100K


@pytest.fixture(scope="module")
def triton(triton_url):
    client = TritonRecommender(triton_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def local(artifacts, serving_config):
    return LocalRecommender(artifacts, serving_config)


@pytest.fixture(scope="module")
def state(serving_config):
    return RedisState(serving_config["redis_url"], prefix=serving_config["feast_project"])


@pytest.fixture(scope="module")
def writable(own_server):
    """The Triton client and the state of the module's own deployment, for tests that write."""
    client = TritonRecommender(own_server.triton_url)
    yield client, RedisState(own_server.redis_url, prefix=own_server.config["feast_project"])
    client.close()


def _request(user: str, k: int = 10, **fields) -> dict:
    fields = {"temperature": 0.0, "seed": 1, "timestamp_ms": NOW_MS} | fields
    return RecommendationRequest(user, k, request_id=f"r-{user}", **fields).to_record()


def _items(response: dict) -> list[str]:
    return [i["item_id"] for i in response["items"]]


@pytest.mark.parametrize("user", ["1", "196", "405", "655", "900", "unknown-user-x"])
def test_triton_answers_exactly_as_the_in_process_runtime(triton, local, user):
    served, reference = triton.recommend(_request(user)), local.recommend(_request(user))
    assert _items(served) == _items(reference)
    np.testing.assert_allclose(
        [i["score"] for i in served["items"]],
        [i["score"] for i in reference["items"]],
        rtol=1e-5,
        atol=1e-6,
    )
    assert served["path"] == reference["path"]
    assert served["removed"] == reference["removed"]
    assert served["model_version"] == reference["model_version"]
    assert len(served["items"]) == 10


def test_a_batch_on_triton_answers_exactly_as_the_in_process_runtime(triton, local):
    """Requests sent together are batched by Triton (stats say so) and each is answered as the
    in-process runtime answers it alone: items exact, scores to 1e-5."""
    users = [str(u) for u in range(100, 124)] + ["cold-a", "cold-b"]
    requests = [
        request_tensors(_request(u, k=5 + n % 7, exclude=["50"] if n % 3 else []))
        for n, u in enumerate(users)
    ]
    for _ in range(5):  # Triton may split a burst; keep the run where it batched
        served = triton.run_batch(requests)
        if max(int(s["stats_scoring"][3]) for s in served) > 1:
            break
    assert max(int(s["stats_scoring"][3]) for s in served) > 1, "Triton never batched"
    reference = [local.run(r) for r in requests]  # alone: a batch must not change an answer
    for got, want in zip(served, reference, strict=True):
        assert got["items"].tolist() == want["items"].tolist()
        np.testing.assert_allclose(got["item_scores"], want["item_scores"], rtol=1e-5, atol=1e-6)
        assert got["path"].tolist() == want["path"].tolist()
        assert got["removed"].tolist() == want["removed"].tolist()


def test_a_request_gets_the_same_answer_alone_or_in_any_batch(local):
    requests = [request_tensors(_request(str(u), k=20)) for u in range(200, 240)]
    alone = [local.run(r) for r in requests]
    for size in (2, 7, 40):
        batched = [
            out for n in range(0, 40, size) for out in local.run_batch(requests[n : n + size])
        ]
        for a, b in zip(alone, batched, strict=True):
            assert a["items"].tolist() == b["items"].tolist()
            assert a["item_scores"].tobytes() == b["item_scores"].tobytes()  # to the last bit


@pytest.mark.parametrize("user", ["1", "655", "900"])
def test_the_served_ranking_is_the_offline_pipeline_on_the_same_state(
    artifacts, local, serving_config, state, user
):
    """One feature code path: the graph serves what `models.evaluate` computes offline from
    the same user state, seen set and popularity (history, idle time, recent similarity...)."""
    from types import SimpleNamespace

    from models.evaluate import Point, full_pipeline
    from models.recommender import Recommender
    from serving.live import LiveItems
    from serving.operators import _reader
    from state.features import UserActivity

    rec = Recommender.load(artifacts)
    live = LiveItems(artifacts, state)
    popularity = live.popularity_at(live.rows(rec.catalog.ids), NOW_MS)
    reader = _reader(serving_config)
    (profile,) = reader.users([user], "user_profile")
    (features,) = reader.users([user], "user_activity")
    activity = UserActivity(**{k: features[k] for k in vars(UserActivity())})
    seen = {i.decode() for i in state.seen_sets([user])[0]}
    point = Point(user, NOW_MS, activity, seen, popularity, set(), True, 0, [])
    prepared = SimpleNamespace(user_profiles={user: profile})
    offline = full_pipeline(rec, prepared, serving_config["candidates"])(point, 10)
    assert activity.recent_items and _items(local.recommend(_request(user))) == offline


@pytest.mark.parametrize("user", ["196", "655", "unknown-user-y"])
def test_an_explained_answer_is_the_same_answer_with_its_reasons(triton, local, user):
    from models.inputs import DENSE_FEATURES

    plain = triton.recommend(_request(user, k=10))
    explained = triton.recommend(_request(user, k=10, explain=True))
    assert _items(explained) == _items(plain) and plain["explanations"] == []
    assert [i["score"] for i in explained["items"]] == [i["score"] for i in plain["items"]]
    reasons = explained["explanations"]
    assert [e["item_id"] for e in reasons] == _items(plain)
    for e, item in zip(reasons, explained["items"], strict=True):
        assert e["ranker_score"] == pytest.approx(item["score"], rel=1e-6)
        assert 1 <= e["retrieval_rank"] <= 300 and set(e["features"]) == set(DENSE_FEATURES)
        assert e["features"]["retrieval_score"] == pytest.approx(e["retrieval_score"], rel=1e-6)
        assert e["source"] == ("popular" if user.startswith("unknown") else "retrieval")
    assert [e["score_rank"] for e in reasons] == list(range(1, 11))  # greedy: the score order
    assert {e["ordering"] for e in reasons} == {"score order"}
    reference = local.recommend(_request(user, k=10, explain=True))["explanations"]
    assert [(e["item_id"], e["retrieval_rank"]) for e in reference] == [
        (e["item_id"], e["retrieval_rank"]) for e in reasons
    ]


def test_explanations_name_sampling_and_backfill(triton):
    sampled = triton.recommend(_request("196", k=10, temperature=2.0, seed=3, explain=True))
    moved = [e for e in sampled["explanations"] if e["ordering"] != "score order"]
    assert moved and all(e["ordering"].startswith("sampled: ") for e in moved)
    full = triton.recommend(_request("196", k=400, explain=True))  # more than the candidates
    reasons = full["explanations"]
    assert len(reasons) == 400 and full["backfilled"] > 0
    assert [e["source"] for e in reasons[-full["backfilled"] :]] == ["backfill"] * full[
        "backfilled"
    ]


def test_a_consumed_item_never_appears_again(writable):
    triton, state = writable
    before = triton.recommend(_request("42"))
    top = _items(before)[0]
    pipe = state.pipeline()
    state.add_seen(pipe, "42", top, NOW_MS)
    pipe.execute()
    after = triton.recommend(_request("42", k=50))
    assert top not in _items(after)
    assert after["removed"]["seen"] == before["removed"]["seen"] + 1


def test_an_unavailable_item_disappears_for_everyone(writable):
    triton, state = writable
    users = ["10", "20", "30"]
    top = _items(triton.recommend(_request(users[0])))[0]
    pipe = state.pipeline()
    state.update_item(pipe, top, NOW_MS, available=False)
    state.execute(pipe)
    try:
        for user in users:
            assert top not in _items(triton.recommend(_request(user, k=100)))
    finally:
        state.update_item(state.client, top, NOW_MS, available=True)
    assert top in _items(triton.recommend(_request(users[0])))


def test_request_exclusions_are_respected(triton):
    first = _items(triton.recommend(_request("7")))
    again = triton.recommend(_request("7", exclude=first[:3]))
    assert set(first[:3]).isdisjoint(_items(again))
    assert again["removed"]["excluded"] == 3
    assert _items(again)[:7] == first[3:]


def test_an_unknown_user_gets_a_popularity_fallback(triton):
    response = triton.recommend(_request("never-seen-before", k=5))
    assert response["path"] == "cold_start"
    assert len(response["items"]) == 5
    assert response["status"] == "ok"


def test_stage_counts_and_timings_are_reported(triton, serving_config):
    response = triton.recommend(_request("196", k=7))
    stages = {s["name"]: s for s in response["stages"]}
    assert list(stages) == [
        "user_features",
        "retrieval",
        "filtering",
        "item_features",
        "scoring",
        "ordering",
    ]
    retrieved = stages["retrieval"]["candidates_out"]
    assert retrieved == serving_config["candidates"]
    assert stages["filtering"]["candidates_in"] == retrieved
    assert stages["filtering"]["candidates_out"] == retrieved - sum(response["removed"].values())
    assert stages["scoring"]["candidates_out"] == stages["filtering"]["candidates_out"]
    assert stages["ordering"]["candidates_out"] == 7
    assert all(s["duration_ms"] > 0 for s in stages.values())


def test_sampling_is_reproducible_by_seed_on_triton(triton):
    a = triton.recommend(_request("300", temperature=1.0, seed=11))
    b = triton.recommend(_request("300", temperature=1.0, seed=11))
    c = triton.recommend(_request("300", temperature=1.0, seed=12))
    greedy = triton.recommend(_request("300"))
    assert _items(a) == _items(b)
    assert _items(a) != _items(c)
    assert _items(a) != _items(greedy)


@pytest.fixture()
def own_triton(artifacts, serving_config, tmp_path):
    """A tritonserver of this test's own: killing its stubs leaves the shared one alone."""
    from serving.triton_export import export_repository
    from streamrec.stack.servers import start_triton, stop_service

    repository = export_repository(artifacts, tmp_path / "models", serving_config)
    service = start_triton(tmp_path, timeout=120, repository=repository)
    yield service
    stop_service(service)


def _kill_stub(server_pid: int, stage: str) -> int:
    """SIGKILL the Python-backend stub process that runs `stage` (a child of tritonserver)."""
    import psutil

    script = f"/{stage}/1/model.py"
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:  # gone, or a zombie of an earlier kill
            continue
        if any(arg.endswith(script) for arg in cmdline):
            child.kill()
            wait_until(lambda c=child: _dead(c), 5, f"stub {child.pid} to die of SIGKILL")
            return child.pid
    raise AssertionError(f"no stub process for {stage}")


def _dead(process) -> bool:
    """Gone, or a zombie that Triton has not reaped."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _until_ok(canary, start: float, deadline_s: float = 30.0) -> float:
    """Run the canary until it passes; seconds since `start`."""
    while not (result := canary()).ok:
        assert time.monotonic() - start < deadline_s, result.reason
        time.sleep(0.2)
    return time.monotonic() - start


def test_a_killed_stage_stub_is_seen_by_the_canary_and_healed_within_30_s(own_triton):
    client = TritonRecommender(own_triton.endpoint)
    try:
        assert client.canary().ok
        _kill_stub(own_triton.pid, "executor")
        start = time.monotonic()
        assert client.client.is_server_ready()  # Triton's own flag does not notice
        failed = client.canary()
        assert not failed.ok
        assert "executor_0_0" in failed.reason
        assert failed.suspects == ("executor",)
        assert client.heal(failed.suspects) == ["executor"]
        seconds = _until_ok(client.canary, start)
        print(f"sync: executor back after {seconds:.1f} s")
        assert seconds <= 30
        assert client.recommend(_request("196"))["items"]
    finally:
        client.close()

    async def async_path() -> float:
        aclient = AsyncTritonRecommender(own_triton.endpoint)
        try:
            await aclient.connect()
            assert (await aclient.canary()).ok
            _kill_stub(own_triton.pid, "executor")
            start = time.monotonic()
            failed = await aclient.canary()
            assert not failed.ok and failed.suspects == ("executor",)
            await aclient.heal(failed.suspects)
            result = await aclient.canary()
            assert result.ok, result.reason
            return time.monotonic() - start
        finally:
            await aclient.close()

    seconds = asyncio.run(async_path())
    print(f"async: executor back after {seconds:.1f} s")
    assert seconds <= 30
