"""Fixtures that start the real embedded servers on free 127.0.0.1 ports and stop them by PID.

A server that cannot start fails the tests that need it, loudly; nothing is skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
    triton_url: str | None = None  # a tritonserver of its own whose stages read this state

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


# --- state of a module's own, for tests that write state ------------------------------------
# The session's state (the `streamrec` project on each Valkey) is shared by every module: a test
# that applies interactions, marks items unavailable or adds seen items there would change what
# later tests see. Such tests get the trained state under a Feast project of their own.


@contextmanager
def _own_state(backend: Backend, artifacts: Path, root: Path, triton: bool) -> Iterator[Backend]:
    """`backend`'s Valkey with the trained state loaded under a Feast project of its own (and,
    with `triton`, a tritonserver of its own whose stages read that project); the project's keys
    are deleted afterwards."""
    from serving.triton_export import export_repository
    from streamrec.stack.servers import start_triton, stop_service
    from streams.rebuild import clear_state, load_snapshot

    project = f"own_{uuid.uuid4().hex[:8]}"
    settings = backend.settings.model_copy(update={"feast_project": project})
    config = backend.config | {"feast_project": project}
    service = None
    try:
        load_snapshot(settings, artifacts, backend.redis_url, None)
        if triton:
            repository = export_repository(artifacts, root / "models", config)
            timeout = settings.triton_start_timeout
            service = start_triton(root, timeout=timeout, repository=repository)
        yield Backend(backend.kind, settings, config, service.endpoint if service else None)
    finally:
        if service is not None:
            stop_service(service)
        clear_state(backend.redis_url, project)


@pytest.fixture(scope="module")
def own_state(backend, artifacts, tmp_path_factory) -> Iterator[Backend]:
    """`backend` (server, then cluster) with the trained state under a project of this
    module's own."""
    root = tmp_path_factory.mktemp(f"own-{backend.kind}")
    with _own_state(backend, artifacts, root, triton=False) as own:
        yield own


@pytest.fixture(scope="module")
def own_backend(backend, artifacts, tmp_path_factory) -> Iterator[Backend]:
    """`own_state` with a tritonserver of its own (`own_backend.triton_url`) reading it."""
    root = tmp_path_factory.mktemp(f"own-{backend.kind}")
    with _own_state(backend, artifacts, root, triton=True) as own:
        yield own


@pytest.fixture(scope="module")
def own_server(server_backend, artifacts, tmp_path_factory) -> Iterator[Backend]:
    """The Valkey server with the trained state under a project of this module's own, and a
    tritonserver of its own (`own_server.triton_url`) reading it."""
    root = tmp_path_factory.mktemp("own-server")
    with _own_state(server_backend, artifacts, root, triton=True) as own:
        yield own
