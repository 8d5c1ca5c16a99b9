"""Fixtures that start the real embedded servers on free 127.0.0.1 ports and stop them by PID.

A server that cannot start fails the tests that need it, loudly; nothing is skipped.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from schemas.settings import Settings, TopicNames
from streamrec.stack import EmbeddedStack

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def base_settings(tmp_path_factory) -> Settings:
    run = tmp_path_factory.mktemp("run")
    data = Path(os.environ.get("STREAMREC_DATA_DIR", ROOT / ".streamrec" / "data"))
    return Settings(
        kafka_bootstrap=None,
        redis_url=None,
        triton_url=None,
        run_dir=run,
        artifact_dir=run / "artifacts",
        data_dir=data,
        partitions=4,
        triton_start_timeout=120,
    )


@pytest.fixture(scope="session")
def stack(base_settings):
    stack = EmbeddedStack(base_settings)
    yield stack
    stack.down()


@pytest.fixture(scope="session")
def kafka(stack) -> str:
    stack.up(("kafka",))
    return stack.endpoint("kafka")


@pytest.fixture(scope="session")
def redis_url(stack) -> str:
    stack.up(("redis",))
    return stack.endpoint("redis")


@pytest.fixture()
def settings(base_settings, kafka) -> Settings:
    """Settings whose topics are fresh (unique names) and already created."""
    from streams.topics import create_topics

    prefix = f"t{uuid.uuid4().hex[:8]}"
    names = {role: f"{prefix}-{name}" for role, name in TopicNames().model_dump().items()}
    settings = base_settings.model_copy(update={"topics": TopicNames(**names)})
    create_topics(settings, kafka)
    return settings


@pytest.fixture(scope="session")
def movielens(base_settings):
    from models.data import load_movielens_100k

    return load_movielens_100k(base_settings.data_dir)


@pytest.fixture(scope="session")
def artifacts(base_settings, movielens) -> Path:
    """A model trained on ML-100K once per session, as `streamrec train` does it.

    STREAMREC_TEST_ARTIFACTS names an already trained version to reuse instead (local
    development only: CI trains afresh)."""
    from models.train import TrainConfig, train

    if reuse := os.environ.get("STREAMREC_TEST_ARTIFACTS"):
        return Path(reuse).resolve()
    return train(movielens, base_settings.artifact_dir, TrainConfig(), step=lambda _: None)


@pytest.fixture(scope="session")
def serving_config(artifacts, redis_url, base_settings, stack) -> dict:
    """Redis loaded with the trained model's feature and filter state."""
    from streamrec.deploy import deploy

    return deploy(base_settings, stack, artifacts, start=False).config


@pytest.fixture(scope="session")
def triton_url(artifacts, serving_config, base_settings, stack):
    """A real tritonserver serving the exported four-stage ensemble."""
    from streamrec.deploy import deploy

    yield deploy(base_settings, stack, artifacts, load=False).triton
    stack.down(("triton",))


# --- the state on one Valkey server and on a local Valkey cluster ----------------------------


@dataclass(frozen=True)
class Backend:
    """The Redis that holds the state: one Valkey server, or a local Valkey cluster."""

    kind: str  # "server" | "cluster"
    settings: Settings  # its feature_repo() is the Feast repository on this Redis
    config: dict  # the serving config (redis_url, feast_project, ...)

    @property
    def redis_url(self) -> str:
        return self.config["redis_url"]


@pytest.fixture(scope="session")
def cluster_stack(base_settings, tmp_path_factory):
    """An embedded stack whose Valkey is a Redis Cluster of three primaries."""
    run = tmp_path_factory.mktemp("cluster-run")
    stack = EmbeddedStack(
        base_settings.model_copy(update={"run_dir": run, "redis_cluster_nodes": 3})
    )
    yield stack
    stack.down()


@pytest.fixture(scope="session")
def server_backend(base_settings, serving_config) -> Backend:
    return Backend("server", base_settings, serving_config)


@pytest.fixture(scope="session")
def cluster_backend(cluster_stack, artifacts) -> Backend:
    from streamrec.deploy import deploy

    config = deploy(cluster_stack.settings, cluster_stack, artifacts, start=False).config
    return Backend("cluster", cluster_stack.settings, config)


@pytest.fixture(scope="module", params=["server", "cluster"])
def backend(request) -> Backend:
    """Each test that asks for it runs on one Valkey server, then on a Valkey cluster."""
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(scope="session")
def cluster_triton_url(artifacts, cluster_backend, cluster_stack):
    """A real tritonserver whose stages read the cluster."""
    from streamrec.deploy import deploy

    yield deploy(cluster_stack.settings, cluster_stack, artifacts, load=False).triton
    cluster_stack.down(("triton",))


@pytest.fixture(scope="module")
def backend_triton_url(backend, request) -> str:
    """The tritonserver whose stages read `backend`."""
    return request.getfixturevalue(
        "triton_url" if backend.kind == "server" else "cluster_triton_url"
    )
