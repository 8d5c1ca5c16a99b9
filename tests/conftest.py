"""Fixtures that start the real embedded servers on free 127.0.0.1 ports and stop them by PID.

A server that cannot start fails the tests that need it, loudly; nothing is skipped.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from streamrec.config import Settings, TopicNames
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
def serving_config(artifacts, redis_url, base_settings) -> dict:
    """Redis loaded with the trained model's feature and filter state."""
    from models.feature_load import load_features
    from serving.client import serving_config

    load_features(artifacts, redis_url, base_settings.feature_repo())
    return serving_config({"redis_url": redis_url})


@pytest.fixture(scope="session")
def triton_url(artifacts, serving_config, tmp_path_factory):
    """A real tritonserver serving the exported four-stage ensemble."""
    from serving.triton_export import export_repository
    from streamrec.stack.servers import start_triton, stop_service

    root = tmp_path_factory.mktemp("triton")
    repository = export_repository(artifacts, root / "models", serving_config)
    service = start_triton(root, timeout=120, repository=repository)
    yield service.endpoint
    stop_service(service)
