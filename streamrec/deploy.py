"""Put an artifact version into service on a stack: its state into Feast and Redis (with the
topics' offsets, so that `streamrec state rebuild` can restore it), its operator graph exported
as a Triton model repository, and tritonserver (re)started on that repository.

The one way artifacts reach a stack: the CLI, the demo, the tests and the benchmarks call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.settings import Settings
from serving.client import serving_config
from serving.triton_export import export_repository
from streamrec.stack import EmbeddedStack, StackNotRunning
from streams.rebuild import load_snapshot


@dataclass(frozen=True)
class Deployment:
    repository: Path  # the exported Triton model repository
    config: dict[str, Any]  # the serving config the models were exported with
    snapshot: dict[str, Any] | None  # load_snapshot's record (None: the state was not loaded)
    triton: str | None  # the restarted Triton's endpoint (None: not started, or external)


def deploy(
    settings: Settings,
    stack: EmbeddedStack,
    artifacts: Path,
    *,
    load: bool = True,
    start: bool = True,
    serving: dict[str, Any] | None = None,
    **export: Any,
) -> Deployment:
    """Deploy `artifacts` onto `stack` (Valkey is started if it is embedded and down).

    load: replace the project's state in Redis/Feast with the artifacts' snapshot.
    start: (re)start the embedded tritonserver on the exported repository (an external Triton
    is left alone: load the repository there).
    serving: serving settings over the defaults (temperature, max_per_genre, ...).
    export: `export_repository`'s options (layout, instances, max_batch, queue_delay_us).
    """
    stack.up(("redis",))
    redis_url = stack.endpoint("redis")
    snapshot = None
    if load:
        try:
            bootstrap = stack.endpoint("kafka")
        except StackNotRunning:
            bootstrap = None
        snapshot = load_snapshot(settings, artifacts, redis_url, bootstrap)
    base = {"redis_url": redis_url, "feast_project": settings.feast_project}
    config = serving_config(base | {"candidates": settings.candidates} | (serving or {}))
    repository = export_repository(artifacts, stack.root / "triton" / "models", config, **export)
    triton = None
    if start and not stack.external("triton"):
        stack.restart(("triton",))
        triton = stack.endpoint("triton")
    return Deployment(repository, config, snapshot, triton)
