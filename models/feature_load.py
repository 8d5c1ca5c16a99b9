"""Load an artifact version's state: Feast features (offline parquet + Redis online store),
and the filter/popularity state of `serving.state`."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd

from models.feature_repo import TIMESTAMP, load_offline, write_repo
from serving.state import RedisState


def load_features(
    artifact_dir: Path, redis_url: str, repo_dir: Path, project: str = "streamrec"
) -> Path:
    """Write the Feast repo (in `repo_dir`) for `redis_url`, its offline sources from the
    artifacts, and materialize them.

    The stream state after the training period (user activity, item popularity) is stamped
    with its own last-event time; static profiles with the start of the data.
    """
    state = artifact_dir / "state"
    repo = write_repo(repo_dir, redis_url, project)
    users = pd.read_parquet(state / "user_profile.parquet")
    items = pd.read_parquet(state / "item_profile.parquet")
    activity = pd.read_parquet(state / "user_activity.parquet")
    stats = pd.read_parquet(state / "item_stats.parquet")
    start = pd.Timestamp(
        min(activity["last_event_ms"].min(), stats["popularity_ms"].min()), unit="ms", tz="UTC"
    )
    users[TIMESTAMP] = start
    items[TIMESTAMP] = start
    activity[TIMESTAMP] = pd.to_datetime(activity["last_event_ms"], unit="ms", utc=True)
    stats[TIMESTAMP] = pd.to_datetime(stats["popularity_ms"], unit="ms", utc=True)
    users["age"] = users["age"].astype("Int64")
    items["year"] = items["year"].astype("Int64")
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # Feast's progress bars
        load_offline(repo, users, items, activity, stats)
    seen = pd.read_parquet(state / "seen.parquet")
    RedisState(redis_url, prefix=project).load(
        zip(seen["user_id"], seen["item_id"], seen["ts_ms"].astype(int), strict=True),
        dict(zip(stats["item_id"], stats["popularity"], strict=True)),
        dict(zip(stats["item_id"], stats["popularity_ms"].astype(int), strict=True)),
        epoch_ms=int(stats["popularity_ms"].max()),
    )
    return repo
