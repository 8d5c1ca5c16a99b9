"""The fault suite's live system: a whole embedded stack of its own (broker, Valkey,
tritonserver on the exported ensemble) with a stream worker in the deployment's consumer group
and topic names. The table of the scenarios' figures is printed at the end of the run.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from fault_load import ROWS, Live

from schemas.settings import Settings
from streamrec.stack import EmbeddedStack
from streamrec.workers import Workers


@contextmanager
def _live(tmp_path_factory, base_settings, artifacts, **settings):
    """A fresh stack, the trained model's state and ensemble, and one worker."""
    from streamrec.deploy import deploy
    from streams.topics import create_topics

    run = tmp_path_factory.mktemp("faults")
    settings = Settings(
        run_dir=run, artifact_dir=artifacts.parent, data_dir=base_settings.data_dir, **settings
    )
    stack = EmbeddedStack(settings)
    try:
        stack.up(("kafka", "redis"))
        create_topics(settings, stack.endpoint("kafka"))
        deploy(settings, stack, artifacts)
        workers = Workers(settings)
        workers.start(1)
        yield Live(settings, stack, workers)
    finally:
        Workers(settings).stop_all()
        stack.down()


@pytest.fixture(scope="module")
def live(tmp_path_factory, base_settings, artifacts):
    with _live(tmp_path_factory, base_settings, artifacts) as live:
        yield live


@pytest.fixture(scope="module")
def cluster_live(tmp_path_factory, base_settings, artifacts):
    """The same on a Valkey cluster of three primaries."""
    with _live(tmp_path_factory, base_settings, artifacts, redis_cluster_nodes=3) as live:
        yield live


@pytest.fixture(scope="module")
def replicated_live(tmp_path_factory, base_settings, artifacts):
    """The same on a Valkey cluster of three primaries with a replica each; the workers wait
    for the replica (WAIT) before they commit offsets."""
    cluster = {"redis_cluster_nodes": 3, "redis_cluster_replicas": 1, "redis_wait_replicas": 1}
    with _live(tmp_path_factory, base_settings, artifacts, **cluster) as live:
        yield live


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    columns = list(ROWS[0])
    terminalreporter.write_sep("=", "fault suite")
    widths = {c: max(len(c), *(len(str(r[c])) for r in ROWS)) for c in columns}
    terminalreporter.write_line(" | ".join(c.ljust(widths[c]) for c in columns))
    for row in ROWS:
        terminalreporter.write_line(" | ".join(str(row[c]).ljust(widths[c]) for c in columns))
