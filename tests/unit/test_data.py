from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models import data
from models.data import (
    DataUnavailable,
    load_directory,
    load_movielens_100k,
    split_users,
    synthetic,
    temporal_split,
)

ROOT = Path(__file__).resolve().parents[2]

INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "1\t10\t4\t300\n"
    "2\t10\t5\t100\n"
    "1\t20\t3\t200\n"
    "3\t30\t2.5\t200\n"
)
USER = (
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "1\t24\tM\ttechnician\t85711\n"
    "2\t\tF\tother\tT8H1N\n"
)
ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "10\tToy Story\t1995\tAnimation Children's Comedy\n"
    "20\tunkonwn\tunkonwn\tunknown\n"
    "30\tLand Before Time III: The Time of the Great Giving (1995)\tV\tAnimation\n"
    "40\t\t\t\n"
)


def write_dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text, encoding="utf-8")
    return path


def test_load_directory_parses_atomic_files(tmp_path):
    ds = load_directory(write_dir(tmp_path / "tiny", {
        "tiny.inter": INTER, "tiny.user": USER, "tiny.item": ITEM,
    }))  # fmt: skip
    assert ds.name == "tiny"

    inter = ds.interactions
    assert list(inter.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert inter["rating"].dtype == np.float32 and inter["timestamp"].dtype == np.int64
    assert inter["timestamp"].tolist() == [100, 200, 200, 300]
    assert inter["user_id"].tolist() == ["2", "1", "3", "1"]  # stable among equal timestamps
    assert inter["rating"].tolist() == [5.0, 3.0, 2.5, 4.0]
    assert all(isinstance(v, str) for v in inter["item_id"])

    users = ds.users.set_index("user_id")
    assert str(users["age"].dtype) == "Int64"
    assert users.loc["1", "age"] == 24 and users["age"].isna().loc["2"]
    assert users.loc["2", "zip_code"] == "T8H1N" and users.loc["1", "gender"] == "M"

    items = ds.items.set_index("item_id")
    assert str(items["year"].dtype) == "Int64"
    assert items.loc["10", "year"] == 1995
    assert items["year"].isna().loc[["20", "30", "40"]].all()  # 'unkonwn', 'V', empty
    assert items.loc["10", "genres"] == ["Animation", "Children's", "Comedy"]
    assert items.loc["20", "genres"] == ["unknown"]
    assert items.loc["40", "genres"] == [] and items.loc["40", "title"] is None
    assert items.loc["30", "title"].startswith("Land Before Time III")


def test_load_directory_optional_files_and_missing_inter(tmp_path):
    ds = load_directory(write_dir(tmp_path / "only", {"x.inter": INTER}))
    assert len(ds.interactions) == 4
    assert list(ds.users.columns) == ["user_id", "age", "gender", "occupation", "zip_code"]
    assert list(ds.items.columns) == ["item_id", "title", "year", "genres"]
    assert ds.users.empty and ds.items.empty
    assert str(ds.users["age"].dtype) == "Int64" and str(ds.items["year"].dtype) == "Int64"

    with pytest.raises(DataUnavailable, match=r"No \*\.inter file"):
        load_directory(write_dir(tmp_path / "empty", {"x.user": USER}))


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no network")

    monkeypatch.setattr(data.subprocess, "run", failing_run)
    with pytest.raises(DataUnavailable) as info:
        load_movielens_100k(tmp_path / "cache")
    message = str(info.value)
    assert "recbole==1.2.1" in message and "no network" in message
    assert "load_directory" in message and str(tmp_path / "cache" / "ml-100k") in message


def make_interactions(n: int = 1000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": rng.integers(0, 50, n).astype(str).astype(object),
        "item_id": rng.integers(0, 80, n).astype(str).astype(object),
        "rating": np.ones(n, dtype=np.float32),
        "timestamp": rng.integers(0, 200, n).astype(np.int64),  # many ties
    })  # fmt: skip


@pytest.mark.parametrize("quantile", [0.5, 0.8, 0.9])
def test_temporal_split_has_no_leakage(quantile):
    frame = make_interactions()
    split = temporal_split(frame, quantile)
    assert split.train["timestamp"].max() < split.cut_timestamp <= split.test["timestamp"].min()
    assert len(split.train) + len(split.test) == len(frame)
    assert abs(len(split.train) / len(frame) - quantile) < 0.02
    assert split.train["timestamp"].is_monotonic_increasing
    with pytest.raises(ValueError):
        temporal_split(frame, 1.0)


def test_split_users():
    frame = pd.DataFrame({
        "user_id": ["a", "b", "a", "c", "b", "d"],
        "item_id": ["1", "2", "3", "4", "5", "6"],
        "rating": np.ones(6, dtype=np.float32),
        "timestamp": np.array([1, 2, 3, 4, 5, 6], dtype=np.int64),
    })  # fmt: skip
    split = temporal_split(frame, 0.5)
    assert split.cut_timestamp == 4
    warm, cold = split_users(split)
    assert warm == {"b"} and cold == {"c", "d"}


def test_synthetic_shapes_dtypes_and_power_law():
    ds = synthetic(n_users=500, n_items=20_000, n_events=100_000, seed=1)
    inter = ds.interactions
    assert len(inter) == 100_000 and len(ds.users) == 500 and len(ds.items) == 20_000
    assert inter["rating"].dtype == np.float32 and inter["timestamp"].dtype == np.int64
    assert inter["timestamp"].is_monotonic_increasing
    assert inter["timestamp"].max() - inter["timestamp"].min() <= 30 * 86_400
    assert set(inter["user_id"]) <= set(ds.users["user_id"])
    assert set(inter["item_id"]) <= set(ds.items["item_id"])
    assert str(ds.users["age"].dtype) == "Int64" and str(ds.items["year"].dtype) == "Int64"
    assert ds.items["genres"].map(lambda g: isinstance(g, list) and 1 <= len(g) <= 3).all()

    counts = inter["item_id"].value_counts()
    top = counts.iloc[: len(ds.items) // 100].sum() / len(inter)
    assert top > 0.4, f"top 1% of items get only {top:.0%} of events"


def test_synthetic_has_genre_preference():
    ds = synthetic(n_users=300, n_items=3000, n_events=60_000, seed=2)
    primary = ds.items.set_index("item_id")["genres"].str[0]
    genres = ds.interactions["item_id"].map(primary)
    top2 = genres.groupby(ds.interactions["user_id"]).agg(
        lambda g: g.value_counts(normalize=True).iloc[:2].sum()
    )
    assert top2.mean() > 0.5  # 2 of 18 genres would be ~0.11 without preferences


def test_synthetic_is_deterministic_by_seed():
    a = synthetic(100, 1000, 5000, seed=7)
    b = synthetic(100, 1000, 5000, seed=7)
    c = synthetic(100, 1000, 5000, seed=8)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.users, b.users)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not a.interactions.equals(c.interactions)


def test_synthetic_scales_to_a_million():
    ds = synthetic(n_users=10_000, n_items=1_000_000, n_events=1_000_000, seed=0)
    assert len(ds.items) == 1_000_000 and len(ds.interactions) == 1_000_000


def test_movielens_100k_real():
    cache = Path(os.environ.get("STREAMREC_DATA_DIR", ROOT / ".streamrec" / "data"))
    ds = load_movielens_100k(cache)
    assert ds.name == "ml-100k"
    assert len(ds.interactions) == 100_000
    assert ds.interactions["user_id"].nunique() == 943 and len(ds.users) == 943
    assert ds.interactions["item_id"].nunique() == 1682 and len(ds.items) == 1682
    assert ds.interactions["timestamp"].is_monotonic_increasing
    assert set(ds.interactions["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    toy_story = ds.items.set_index("item_id").loc["1"]
    assert toy_story["title"] == "Toy Story" and toy_story["year"] == 1995
    assert toy_story["genres"] == ["Animation", "Children's", "Comedy"]

    split = temporal_split(ds.interactions, 0.8)
    warm, cold = split_users(split)
    cold_share = split.test["user_id"].isin(cold).mean()
    assert 0.75 < cold_share < 0.95, cold_share
