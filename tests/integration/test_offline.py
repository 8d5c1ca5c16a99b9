"""Training on the real ML-100K timeline, its artifacts, evaluation and the Feast load."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from models.evaluate import evaluate_artifacts
from state.feature_store import OnlineReader, feature_store
from state.load import load_features

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def manifest(artifacts) -> dict:
    return json.loads((artifacts / "manifest.json").read_text())


def test_the_artifact_version_is_complete(artifacts, manifest):
    for name in (
        "workflow.json",
        "user_tower.onnx",
        "item_tower.onnx",
        "ranker.onnx",
        "items.faiss",
        "item_ids.json",
        "items.json",
        "manifest.json",
    ):
        assert (artifacts / name).exists(), name
    assert (artifacts.parent / "current").resolve() == artifacts
    assert manifest["data"]["train"] + manifest["data"]["test"] == 100_000
    assert manifest["data"]["train_range"][1] < manifest["data"]["cut_timestamp"]
    assert manifest["index"]["recall_vs_exact@100"] == 1.0  # exact search for 1,682 items


def test_onnx_models_match_keras(manifest):
    for name, diff in manifest["metrics"]["onnx_max_abs_diff"].items():
        assert diff <= 1e-4, name


def test_the_ranker_separates_held_out_positives_from_retrieval_negatives(manifest):
    assert manifest["metrics"]["ranker"]["auc"] > 0.6


def test_four_stage_pipeline_beats_most_popular_on_the_temporal_hold_out(manifest):
    results = manifest["metrics"]["evaluation"]["results"]
    full, popular = results["four-stage"]["all"], results["most-popular"]["all"]
    assert full["ndcg@10"] > popular["ndcg@10"]
    assert full["recall@10"] > popular["recall@10"]
    assert results["retrieval"]["all"]["recall@50"] > popular["recall@50"]


def test_evaluation_is_reproducible_from_the_artifacts(artifacts, manifest, movielens):
    again = evaluate_artifacts(artifacts, movielens)
    assert again["results"] == manifest["metrics"]["evaluation"]["results"]
    assert again["points"]["cold-at-cut"] > again["points"]["warm"]  # ML-100K's time shape


def test_feature_state_is_materialized_into_redis(artifacts, redis_url, tmp_path):
    load_features(artifacts, redis_url, tmp_path / "repo", project="offline_test")
    activity = pd.read_parquet(artifacts / "state" / "user_activity.parquet").set_index("user_id")
    users = list(activity.index[:5])
    store = feature_store(tmp_path / "repo")
    online = store.get_online_features(
        ["user_activity:recent_items", "user_activity:event_count"],
        [{"user_id": u} for u in users],
    ).to_dict()
    for n, user in enumerate(users):
        assert online["recent_items"][n] == list(activity.loc[user, "recent_items"])
        assert online["event_count"][n] == activity.loc[user, "event_count"]
    reader = OnlineReader(redis_url, project="offline_test")
    got = reader.users(users, "user_activity", ["genre_affinity"])
    for n, user in enumerate(users):
        np.testing.assert_allclose(
            got[n]["genre_affinity"], activity.loc[user, "genre_affinity"], rtol=1e-6
        )
