"""ML-100K's hold-out period replayed through the live system: broker, Valkey, tritonserver and
Faust workers, all real. The CI-sized replay uses every hold-out interaction and requests for a
sample of users; `STREAMREC_REPLAY_USERS=1000 STREAMREC_REPLAY_POINTS=3` runs a larger one."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
from records import processed, read_topic, wait_until

from schemas.settings import TopicNames
from serving.client import serving_config
from serving.triton_export import export_repository
from state.load import load_features
from state.store import RedisState
from streamrec.stack.servers import start_redis, start_triton, stop_service
from streamrec.workers import Workers
from streams.replay import Recorder, build_timeline, produce_timeline, served_quality
from streams.topics import create_topics

pytestmark = pytest.mark.replay

USERS = int(os.environ.get("STREAMREC_REPLAY_USERS", "120"))
POINTS = int(os.environ.get("STREAMREC_REPLAY_POINTS", "2"))
K = 10


@pytest.fixture(scope="module")
def replay_stack(tmp_path_factory, artifacts, kafka, base_settings):
    """A Valkey and a tritonserver of their own, so each replay can start from a clean state."""
    root = tmp_path_factory.mktemp("replay")
    redis = start_redis(root / "valkey", timeout=15)
    triton = None
    try:
        config = serving_config({"redis_url": redis.endpoint, "feast_project": "replay"})
        repository = export_repository(artifacts, root / "triton" / "models", config)
        triton = start_triton(root / "triton", timeout=120, repository=repository)
        yield {"redis": redis.endpoint, "triton": triton.endpoint, "root": root}
    finally:
        if triton is not None:
            stop_service(triton)
        stop_service(redis)


@pytest.fixture(scope="module")
def timeline(movielens, artifacts):
    return build_timeline(movielens, artifacts, max_users=USERS, points_per_user=POINTS, k=K)


def run_replay(base_settings, kafka, artifacts, replay_stack, timeline) -> dict:
    """One replay from the state right after training: fresh state, topics and workers."""
    RedisState(replay_stack["redis"]).client.flushall()
    prefix = f"r{uuid.uuid4().hex[:6]}"
    settings = base_settings.model_copy(
        update={
            "kafka_bootstrap": kafka,
            "redis_url": replay_stack["redis"],
            "triton_url": replay_stack["triton"],
            "artifact_dir": artifacts.parent,
            "run_dir": replay_stack["root"] / prefix,
            "feast_project": "replay",
            "worker_group": f"{prefix}-workers",
            "topics": TopicNames(
                **{r: f"{prefix}-{n}" for r, n in TopicNames().model_dump().items()}
            ),
        }
    )
    load_features(artifacts, replay_stack["redis"], settings.feature_repo(), "replay")
    create_topics(settings, kafka)
    state = RedisState(replay_stack["redis"], prefix="replay")
    workers = Workers(settings)
    try:
        workers.start(1)
        ids = {s.record["request_id"] for s in timeline.requests}
        with Recorder(settings, kafka) as recorder:
            result = produce_timeline(timeline, settings, kafka, recorder, state.acked)
            assert recorder.wait(ids, timeout=60)
        # Once the workers have committed every event, all that comes of them is on the topics,
        # anything doubled included: read them to their ends.
        wait_until(
            lambda: processed(settings, kafka, ["interactions", "requests"]),
            60,
            "the workers to commit every event",
        )
        responses: dict[str, list[dict]] = {}
        for response in read_topic(settings, kafka, "recommendations"):
            responses.setdefault(response["request_id"], []).append(response)
        dead = read_topic(settings, kafka, "dead_letter")
    finally:
        workers.stop_all()
    return {"responses": responses, "result": result, "dead": dead, "settings": settings}


@pytest.fixture(scope="module")
def replays(base_settings, kafka, artifacts, replay_stack, timeline):
    return [run_replay(base_settings, kafka, artifacts, replay_stack, timeline) for _ in range(2)]


def test_every_request_gets_exactly_one_response(replays, timeline):
    ids = {s.record["request_id"] for s in timeline.requests}
    for replay in replays:
        assert set(replay["responses"]) == ids
        assert all(len(v) == 1 for v in replay["responses"].values())


def test_no_response_recommends_an_item_the_user_already_consumed(replays):
    for replay in replays:
        for request_id, consumed in replay["result"].acked_before.items():
            items = {i["item_id"] for i in replay["responses"][request_id][0]["items"]}
            assert not items & consumed, request_id


def test_two_replays_with_temperature_zero_give_identical_responses(replays):
    first, second = (r["responses"] for r in replays)
    for request_id, (a,) in first.items():
        (b,) = second[request_id]
        assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
        # Popularity is one sum kept in the same order everywhere: scores repeat to 1e-6.
        np.testing.assert_allclose(
            [i["score"] for i in a["items"]], [i["score"] for i in b["items"]], rtol=0, atol=1e-6
        )
        assert (a["status"], a["path"], a["removed"]) == (b["status"], b["path"], b["removed"])


def test_served_quality_matches_the_offline_evaluation_and_beats_most_popular(replays, timeline):
    quality = served_quality(timeline, replays[0]["responses"], K)
    served, offline, popular = quality["served"], quality["four-stage"], quality["most-popular"]
    for metric in (f"recall@{K}", f"ndcg@{K}"):
        assert abs(served[metric] - offline[metric]) <= 0.01, (metric, quality)
        assert served[metric] > popular[metric], (metric, quality)


def test_bad_events_are_answered_or_dead_lettered_and_the_replay_completes(replays, timeline):
    seed = 0
    for replay in replays:
        responses = replay["responses"]
        bad_k = responses[f"replay-{seed}-bad-k"][0]
        assert bad_k["status"] == "error" and "k must be" in bad_k["error"]
        unknown = responses[f"replay-{seed}-unknown-user"][0]
        assert unknown["status"] == "ok" and unknown["path"] == "cold_start"
        assert len(unknown["items"]) == K
        reasons = sorted(d["error"] for d in replay["dead"])
        assert len(reasons) == 3  # two undecodable interactions, one undecodable request
        assert sum("bad or missing header" in r for r in reasons) == 2
        assert sum("unknown writer schema" in r for r in reasons) == 1
        assert replay["result"].produced["interactions"] == sum(
            1 for s in timeline.steps if s.role == "interactions"
        )
