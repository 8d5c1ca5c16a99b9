"""Continuous training on the real ML-100K hold-out: warm start, a saved candidate version."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.continual import ContinualConfig, Learner
from models.data import temporal_split
from models.recommender import Recommender

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def learned(artifacts, movielens):
    """A learner after one cycle on the hold-out's first 1,000 events."""
    learner = Learner(artifacts, movielens, ContinualConfig(retrieval_epochs=1))
    before = learner.recommender()
    split = temporal_split(movielens.interactions, learner.train_cfg.split_quantile)
    learner.learn(split.test.iloc[:1000])
    return learner, before, split


def _user(rec: Recommender, learner: Learner, user: str) -> dict:
    state = learner.users[user]
    return rec.user_inputs(learner.prepared.user_profiles.get(user), state.recent_items)


def test_the_loaded_weights_are_the_served_models(artifacts, learned):
    learner, before, split = learned
    served = Recommender.load(artifacts)
    user = _user(served, learner, split.train["user_id"].iloc[-1])
    assert np.allclose(before.embed_user(user), served.embed_user(user), atol=1e-5)
    assert before.retrieve(user, 20)[0] == served.retrieve(user, 20)[0]


def test_a_cycle_moves_the_models_and_keeps_them_sound(learned):
    learner, before, split = learned
    after = learner.recommender()
    [cycle] = learner.cycles
    assert cycle["events"] == 1000 and np.isfinite(cycle["ranker_loss"]).all()
    users = split.test["user_id"].iloc[:1000].unique()[:20]
    moved = [
        np.abs(
            after.embed_user(_user(after, learner, u))
            - before.embed_user(_user(before, learner, u))
        ).max()
        for u in users
    ]
    assert min(moved) > 0.0
    # warm-started: small steps, not a model trained afresh
    assert float(np.median(moved)) < 0.5
    ids, scores = after.retrieve(_user(after, learner, users[0]), 300)
    assert len(set(ids)) == 300 and np.all(np.diff(scores) <= 1e-6)


def test_a_saved_candidate_is_a_complete_version(learned, tmp_path):
    learner, _, split = learned
    out = learner.save(tmp_path, "candidate-1")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == "candidate-1"
    assert manifest["parent"] == learner.manifest["version"]
    assert manifest["continual"]["cycles"][0]["until_ts"] == int(split.test["timestamp"].iloc[999])
    loaded = Recommender.load(out)
    user = _user(loaded, learner, split.test["user_id"].iloc[0])
    current = learner.recommender()
    assert loaded.retrieve(user, 50)[0] == current.retrieve(user, 50)[0]
    assert np.allclose(loaded.embed_user(user), current.embed_user(user), atol=1e-6)
