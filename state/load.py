"""Load an artifact version's state: Feast features (offline parquet + Redis online store),
and the filter/popularity state of `state.store` (item popularity is not a Feast feature: the
artifacts' `state/item_stats.parquet` loads the `popular` sorted set and its epoch)."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd

from schemas.artifacts import Artifacts
from state.feature_store import TIMESTAMP, load_offline, write_repo
from state.store import RedisState


def load_features(
    artifact_dir: Path, redis_url: str, repo_dir: Path, project: str = "streamrec"
) -> Path:
    """Write the Feast repo (in `repo_dir`) for `redis_url`, its offline sources from the
    artifacts, and materialize them; load the Redis state (seen sets, popularity)."""
    artifacts = Artifacts(artifact_dir)
    repo = write_repo(repo_dir, redis_url, project)
    stats = pd.read_parquet(artifacts.state("item_stats"))
    _load_feast(repo, artifacts, first_ms=int(stats["popularity_ms"].min()), redis_url=redis_url)
    _load_redis(artifacts, stats, redis_url, project)
    return repo


def _load_feast(
    repo: Path, artifacts: Artifacts, first_ms: int, redis_url: str | None = None
) -> None:
    """The users' stream state after the training period is stamped with its own last-event
    time; static profiles with the start of the data (`first_ms` at the latest)."""
    users = pd.read_parquet(artifacts.state("user_profile"))
    items = pd.read_parquet(artifacts.state("item_profile"))
    activity = pd.read_parquet(artifacts.state("user_activity"))
    start = pd.Timestamp(min(activity["last_event_ms"].min(), first_ms), unit="ms", tz="UTC")
    users[TIMESTAMP] = start
    items[TIMESTAMP] = start
    activity[TIMESTAMP] = pd.to_datetime(activity["last_event_ms"], unit="ms", utc=True)
    users["age"] = users["age"].astype("Int64")
    items["year"] = items["year"].astype("Int64")
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # Feast's progress bars
        load_offline(repo, users, items, activity, redis_url=redis_url)


def _load_redis(artifacts: Artifacts, stats: pd.DataFrame, redis_url: str, project: str) -> None:
    """Seen sets and the `popular` sorted set, on a scale whose epoch is the last event."""
    seen = pd.read_parquet(artifacts.state("seen"))
    RedisState(redis_url, prefix=project).load(
        zip(seen["user_id"], seen["item_id"], seen["ts_ms"].astype(int), strict=True),
        dict(zip(stats["item_id"], stats["popularity"], strict=True)),
        dict(zip(stats["item_id"], stats["popularity_ms"].astype(int), strict=True)),
        epoch_ms=int(stats["popularity_ms"].max()),
    )
