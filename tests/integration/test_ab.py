"""An A/B test on a real tritonserver and a stream worker: two artifact versions served side by
side, each user sticky to the arm of their hash, every response naming arm and version."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request

import pytest
from records import stack_settings

from schemas.artifacts import point_current
from serving.arms import Arms
from serving.client import TritonRecommender
from serving.rollout import ExperimentRunning, promote, start_test, stop_test
from streamrec.client import Client
from streamrec.workers import Workers

pytestmark = pytest.mark.integration

USERS = [str(u) for u in range(1, 41)]


def _version(source, root, name):
    """A copy of the trained artifacts under another version name."""
    shutil.copytree(source, root / name)
    manifest = json.loads((root / name / "manifest.json").read_text())
    (root / name / "manifest.json").write_text(json.dumps(manifest | {"version": name}))
    return root / name


@pytest.fixture()
def ab_stack(base_settings, kafka, redis_url, artifacts, serving_config, tmp_path):
    from serving.triton_export import export_repository
    from streamrec.stack.servers import start_triton, stop_service

    root = tmp_path / "artifacts"
    control = _version(artifacts, root, "ab-a")
    _version(artifacts, root, "ab-b")
    point_current(root, control)
    repository = export_repository(control, tmp_path / "models", serving_config)
    triton = start_triton(tmp_path, timeout=120, repository=repository)
    settings = stack_settings(
        base_settings, kafka, redis_url, triton.endpoint, control, request_deadline_ms=60_000
    )
    workers = Workers(settings)
    try:
        running = workers.start(1)
        yield settings, root, repository, TritonRecommender(triton.endpoint), running[0]
    finally:
        workers.stop_all()
        stop_service(triton)


def test_two_versions_side_by_side_split_by_user(ab_stack):
    settings, root, repository, triton, worker = ab_stack
    test = start_test(
        [("control", root / "ab-a", 0.5), ("treatment", root / "ab-b", 0.5)],
        root,
        repository,
        triton,
        salt="it",
    )
    versions = {a.name: a.version for a in test.arms}
    with Client(settings=settings, timeout=60.0) as client:
        deadline = time.monotonic() + 30
        while not client.recommend(USERS[0], k=3).arm:  # the worker reads ab.json each second
            assert time.monotonic() < deadline, "the worker never routed a request to an arm"
        first = {u: client.recommend(u, k=3) for u in USERS}
        again = {u: client.recommend(u, k=3) for u in USERS}
        for user, response in first.items():
            assert response.ok and response.arm == test.assign(user).name
            assert response.model_version == versions[response.arm]
            assert again[user].arm == response.arm  # sticky
        assert {r.arm for r in first.values()} == {"control", "treatment"}
        assert _responses_by_arm(worker.metrics_port).keys() >= {"control", "treatment"}
        with pytest.raises(ExperimentRunning):  # the test decides; no switch meanwhile
            promote(root / "ab-b", root, repository, triton, {"reason": "by hand"})

        stop_test("treatment", root, repository, triton, drain_s=1.5)
        after = [client.recommend(u, k=3) for u in USERS[:10]]
    assert Arms.load(root) is None
    assert all(r.ok and r.arm == "" and r.model_version == "ab-b" for r in after)


def _responses_by_arm(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "streamrec_responses_total":
                arm = sample.labels["arm"]
                out[arm] = out.get(arm, 0.0) + sample.value
    return out
