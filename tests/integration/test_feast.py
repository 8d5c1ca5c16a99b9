"""The Feast repository on a real Valkey: offline load + materialize, stream writes, and the direct
reader (`OnlineReader`) checked against `get_online_features` so that a Feast upgrade that changes
the Redis layout fails here instead of silently in serving.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from state.feature_store import (
    ENTITIES,
    TIMESTAMP,
    VIEWS,
    OnlineReader,
    apply_definitions,
    feature_store,
    load_offline,
    redis_connection_string,
    write_online,
    write_repo,
)

pytestmark = pytest.mark.integration

T0 = datetime(2024, 1, 1, tzinfo=UTC)
N_ITEMS = 250
UNKNOWN = "no-such-id"


def ts(seconds: float) -> pd.Timestamp:
    return pd.Timestamp(T0 + timedelta(seconds=seconds))


def _stamps(seconds: list[float]) -> pd.Series:
    return pd.Series([ts(s) for s in seconds], dtype="datetime64[ns, UTC]")


def offline_frames() -> dict[str, pd.DataFrame]:
    """Small offline data: repeated entities (older + newer row), nulls, empty arrays, a user
    with activity but no profile (u4), and enough items for the 200-item reads."""
    users = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u3"],
            "age": pd.array([30, 31, None, 45], dtype="Int64"),
            "gender": ["F", "F", None, "M"],
            "occupation": ["writer", "editor", "student", "other"],
            "zip_code": ["11111", "22222", "33333", None],
            TIMESTAMP: _stamps([0, 50, 10, 20]),
        }
    )
    user_activity = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u3", "u4"],
            "recent_items": [["i1"], ["i3", "i2", "i1"], ["i7"], []],
            "event_count": [1, 3, 1, 0],
            "genre_affinity": [[1.0, 0.0], [0.1, 0.9], [0.3, 0.7], [0.5, 0.5]],
            "last_event_ms": [1_000, 3_000, 2_000, 0],
            TIMESTAMP: _stamps([1, 3, 2, 4]),
        }
    )
    ids = [f"i{k}" for k in range(N_ITEMS)]
    items = pd.DataFrame(
        {
            "item_id": ["i0", *ids],
            "title": ["Old title", *[f"Movie {k}" for k in range(N_ITEMS)]],
            "year": pd.array([1900, None, *[1950 + k % 50 for k in range(1, N_ITEMS)]], "Int64"),
            "genres": [
                ["Drama"],
                [],
                *[["Comedy", "Drama"][: 1 + k % 2] for k in range(1, N_ITEMS)],
            ],
            TIMESTAMP: _stamps([0] + [5] * N_ITEMS),
        }
    )
    return {"user_profile": users, "user_activity": user_activity, "item_profile": items}


def _plain(value: Any, feast_type: str) -> Any:
    """An offline cell as Feast serves it: None for nulls, lists, float32-rounded floats."""
    if isinstance(value, list | np.ndarray):
        value = list(value)
        return [float(np.float32(v)) for v in value] if "Float32" in feast_type else value
    if pd.isna(value):
        return None
    if feast_type == "Float32":
        return float(np.float32(value))
    return value.item() if isinstance(value, np.generic) else value


def expected_rows(frames: dict[str, pd.DataFrame], view: str, ids: list[str]) -> list[dict | None]:
    """The latest offline row per entity (None where the entity has no row)."""
    spec = VIEWS[view]
    key = ENTITIES[spec.entity]
    latest = frames[view].sort_values(TIMESTAMP, kind="stable").drop_duplicates(key, keep="last")
    latest = latest.set_index(key)
    return [
        {f: _plain(latest.at[i, f], t) for f, t in spec.features.items()}
        if i in latest.index
        else None
        for i in ids
    ]


def feast_rows(store, view: str, ids: list[str]) -> list[dict | None]:
    """`get_online_features` as one dict per entity; None where every feature is missing."""
    spec = VIEWS[view]
    key = ENTITIES[spec.entity]
    result = store.get_online_features(
        features=[f"{view}:{f}" for f in spec.features],
        entity_rows=[{key: i} for i in ids],
    ).to_dict()
    rows = [{f: result[f][n] for f in spec.features} for n in range(len(ids))]
    return [None if all(v is None for v in row.values()) else row for row in rows]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, redis_url):
    """A repo with the offline frames loaded and materialized, under its own project."""
    repo = write_repo(
        tmp_path_factory.mktemp("feast_repo"), redis_url, f"load_{uuid.uuid4().hex[:8]}"
    )
    frames = offline_frames()
    load_offline(
        repo,
        users=frames["user_profile"],
        items=frames["item_profile"],
        user_activity=frames["user_activity"],
        redis_url=redis_url,  # the bulk write of Feast's layout, as state.load loads
    )
    store = feature_store(repo)
    return repo, store, frames


def _hashes(client, project: str) -> dict[bytes, dict]:
    suffix = project.encode()
    return {
        k[: -len(suffix)]: client.hgetall(k)
        for k in client.scan_iter(match=b"*" + suffix, count=10_000)
        if k.endswith(suffix)
    }


def test_the_bulk_write_is_byte_for_byte_what_materialize_writes(loaded, tmp_path, redis_url):
    """`load_offline(redis_url=...)` writes Feast's layout itself (minutes → seconds at 1M
    items): the same keys, fields and bytes as Feast's own materialize."""
    from state.store import redis_client

    repo, store, frames = loaded
    project = f"mat_{uuid.uuid4().hex[:8]}"
    other = write_repo(tmp_path / "mat", redis_url, project)
    load_offline(
        other,
        users=frames["user_profile"],
        items=frames["item_profile"],
        user_activity=frames["user_activity"],
    )
    client = redis_client(redis_url)
    bulk, materialized = _hashes(client, store.project), _hashes(client, project)
    assert len(bulk) == frames["item_profile"]["item_id"].nunique() + 4  # items, users u1-u4
    assert bulk == materialized


@pytest.fixture()
def fresh_store(tmp_path, redis_url):
    """An applied repo with nothing in the online store, under a project of its own."""
    repo = write_repo(tmp_path / "repo", redis_url, f"fresh_{uuid.uuid4().hex[:8]}")
    store = feature_store(repo)
    apply_definitions(store)
    return store


USER_IDS = ["u1", "u2", "u3", "u4", UNKNOWN]
ITEM_IDS = ["i0", "i1", "i2", "i3", f"i{N_ITEMS - 1}", UNKNOWN]


def test_redis_connection_string():
    timeouts = ",socket_timeout=2.0,socket_connect_timeout=2.0"
    assert redis_connection_string("redis://127.0.0.1:6390/0") == "127.0.0.1:6390,db=0" + timeouts
    assert redis_connection_string("redis://h:1") == "h:1" + timeouts
    assert (
        redis_connection_string("rediss://me:p%40ss@h:1/2")
        == "h:1,db=2,username=me,password=p@ss,ssl=true" + timeouts
    )
    assert redis_connection_string("h:1,db=3") == "h:1,db=3"
    with pytest.raises(ValueError, match="redis://"):
        redis_connection_string("http://h:1")


def test_repo_layout(loaded):
    repo, store, _ = loaded
    yaml = (repo / "feature_store.yaml").read_text()
    assert "type: redis" in yaml and "entity_key_serialization_version: 3" in yaml
    assert sorted(fv.name for fv in store.list_feature_views()) == sorted(VIEWS)
    assert "user_activity_push" in {s.name for s in store.list_data_sources()}
    assert all((repo / "data" / f"{view}.parquet").exists() for view in VIEWS)


def test_a_view_dropped_from_the_definitions_leaves_the_registry(fresh_store, monkeypatch):
    """An existing repo's registry loses what VIEWS no longer defines (as `item_stats` went)."""
    from state import feature_store as feature_repo

    dropped = feature_repo.ViewSpec("item", {"score": "Float32"}, push_source="dropped_push")
    monkeypatch.setitem(feature_repo.VIEWS, "dropped", dropped)
    apply_definitions(fresh_store)
    assert "dropped" in {fv.name for fv in fresh_store.list_feature_views()}
    monkeypatch.delitem(feature_repo.VIEWS, "dropped")
    apply_definitions(fresh_store)
    assert sorted(fv.name for fv in fresh_store.list_feature_views()) == sorted(VIEWS)
    sources = {s.name for s in fresh_store.list_data_sources()}
    assert "user_activity_push" in sources and not {"dropped_push", "dropped_source"} & sources


@pytest.mark.parametrize("view", list(VIEWS))
def test_materialized_features_are_the_latest_offline_rows(loaded, view):
    _, store, frames = loaded
    ids = USER_IDS if VIEWS[view].entity == "user" else ITEM_IDS
    assert feast_rows(store, view, ids) == expected_rows(frames, view, ids)


def test_materialized_edge_cases(loaded):
    _, store, _ = loaded
    profile = dict(zip(USER_IDS, feast_rows(store, "user_profile", USER_IDS), strict=True))
    activity = dict(zip(USER_IDS, feast_rows(store, "user_activity", USER_IDS), strict=True))
    assert profile["u1"]["occupation"] == "editor"  # the newer of two rows
    assert profile["u2"]["age"] is None and profile["u2"]["gender"] is None  # nulls stay null
    assert profile["u4"] is None and activity["u4"]["recent_items"] == []  # no profile, empty array
    assert activity["u1"]["recent_items"] == ["i3", "i2", "i1"]
    assert profile[UNKNOWN] is None and activity[UNKNOWN] is None


def activity_rows(user_ids: list[str], seconds: float, count: int) -> pd.DataFrame:
    n = len(user_ids)
    return pd.DataFrame(
        {
            "user_id": user_ids,
            "recent_items": [[f"i{count}", "i1"]] * n,
            "event_count": [count] * n,
            "genre_affinity": [[0.1, 0.2, 0.7]] * n,
            "last_event_ms": [int(ts(seconds).timestamp() * 1000)] * n,
            TIMESTAMP: _stamps([seconds] * n),
        }
    )


def test_write_online_keeps_the_newest_row(fresh_store, redis_url):
    store, reader = fresh_store, OnlineReader(redis_url, fresh_store.project)

    def count() -> int | None:
        row = reader.users(["s1"], "user_activity")[0]
        return row and row["event_count"]

    write_online(store, "user_activity", activity_rows(["s1"], 100, count=1))
    assert count() == 1
    write_online(store, "user_activity", activity_rows(["s1"], 200, count=2))
    assert count() == 2
    # An older event written later is dropped: Feast's Redis store compares event times.
    write_online(store, "user_activity", activity_rows(["s1"], 150, count=99))
    assert count() == 2
    # Observed quirk: the comparison is in whole seconds and keeps the stored row on a tie, so a
    # newer event within the same second as the stored one is dropped too.
    write_online(store, "user_activity", activity_rows(["s1"], 200.9, count=3))
    assert count() == 2
    write_online(store, "user_activity", activity_rows(["s1"], 201, count=4))
    assert count() == 4

    # Two rows for one entity in one batch: the later event wins, whatever the row order.
    batch = pd.concat([activity_rows(["s1"], 300, count=6), activity_rows(["s1"], 250, count=5)])
    write_online(store, "user_activity", batch)
    assert count() == 6

    # A batch of 500 rows lands in full, and items work the same way.
    users = [f"b{k}" for k in range(500)]
    write_online(store, "user_activity", activity_rows(users, 400, count=7))
    assert all(r and r["event_count"] == 7 for r in reader.users(users, "user_activity"))
    profiles = pd.DataFrame(
        {
            "item_id": ["x1", "x2"],
            "title": ["One", None],
            "year": pd.array([1999, None], dtype="Int64"),
            "genres": [["Drama"], []],
            TIMESTAMP: _stamps([10, 10]),
        }
    )
    write_online(store, "item_profile", profiles)
    got = reader.items(["x1", "x2"], "item_profile")
    assert got == feast_rows(store, "item_profile", ["x1", "x2"])
    assert got[0]["title"] == "One" and got[1]["title"] is None
    reader.close()


def test_write_online_rejects_bad_frames(fresh_store):
    rows = activity_rows(["s1"], 100, count=1)
    with pytest.raises(ValueError, match="missing columns"):
        write_online(fresh_store, "user_activity", rows.drop(columns=["event_count"]))
    naive = rows.assign(**{TIMESTAMP: rows[TIMESTAMP].dt.tz_localize(None)})
    with pytest.raises(ValueError, match="tz-aware"):
        write_online(fresh_store, "user_activity", naive)


@pytest.mark.parametrize("view", list(VIEWS))
def test_online_reader_conforms_to_get_online_features(loaded, redis_url, view):
    """Guards the direct reader against a change of Feast's Redis layout or encoding."""
    _, store, _ = loaded
    reader = OnlineReader(redis_url, store.project)
    entity = VIEWS[view].entity
    ids = USER_IDS if entity == "user" else [*ITEM_IDS, *(f"i{k}" for k in range(N_ITEMS))]
    read = reader.users if entity == "user" else reader.items
    assert read(ids, view) == feast_rows(store, view, ids)
    some = list(VIEWS[view].features)[1:3]
    assert read(ids, view, some) == [r and {f: r[f] for f in some} for r in read(ids, view)]
    with pytest.raises(ValueError):
        read(ids, "item_profile" if entity == "user" else "user_profile")
    reader.close()
