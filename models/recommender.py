"""The four stages as plain functions over arrays, shared by offline evaluation and serving.

Retrieval (user tower + ANN index), filtering (seen / unavailable / excluded), scoring (DLRM
over user × candidate features) and ordering (softmax sampling with a temperature). The serving
graph wraps these in operators; `evaluate` calls them directly on replayed state.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.index import ItemIndex
from models.inputs import (
    USER_OUTPUTS,
    dense_features,
    item_table,
    item_tower_inputs,
    recent_vector,
    user_row,
)
from models.onnx_export import onnx_session, run_onnx
from models.workflow import Workflow
from schemas.artifacts import Artifacts


@dataclass
class Catalog:
    """Static item features, transformed once, in a fixed row order."""

    ids: list[str]
    row: dict[str, int]
    inputs: dict[str, np.ndarray]  # the item tower's inputs (`item_tower_inputs`), by row
    profiles: dict[str, dict[str, Any]]

    @classmethod
    def build(cls, workflow: Workflow, profiles: Mapping[str, Mapping[str, Any]]) -> Catalog:
        ids = list(profiles)
        inputs = item_table(workflow, ids, profiles, item_tower_inputs(workflow))
        return cls(
            ids, {i: n for n, i in enumerate(ids)}, inputs, {i: dict(profiles[i]) for i in ids}
        )

    def take(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        rows = np.fromiter((self.row[i] for i in item_ids), dtype=np.int64, count=len(item_ids))
        return {name: values[rows] for name, values in self.inputs.items()}


class Recommender:
    """Loaded artifacts and the stage functions over them."""

    def __init__(
        self,
        workflow: Workflow,
        user_tower,
        ranker,
        index: ItemIndex,
        catalog: Catalog,
    ):
        self.workflow = workflow
        self.user_tower = user_tower
        self.ranker = ranker
        self.index = index
        self.catalog = catalog

    @classmethod
    def load(cls, artifact_dir: Path) -> Recommender:

        workflow = Workflow.load(artifact_dir / Artifacts.WORKFLOW)
        profiles = Artifacts(artifact_dir).read(Artifacts.ITEMS)
        return cls(
            workflow,
            onnx_session(artifact_dir / Artifacts.USER_TOWER),
            onnx_session(artifact_dir / Artifacts.RANKER),
            ItemIndex.load(artifact_dir),
            Catalog.build(workflow, profiles),
        )

    # --- user features -----------------------------------------------------------------------
    def user_inputs(self, profile: Mapping | None, recent_items: Sequence[str]) -> dict:
        return user_inputs(self.workflow, profile, recent_items)

    # --- retrieval ---------------------------------------------------------------------------
    def embed_user(self, user_inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return run_onnx(self.user_tower, user_inputs)

    def retrieve(
        self, user_inputs: Mapping[str, np.ndarray], n: int
    ) -> tuple[list[str], np.ndarray]:
        scores, ids = self.index.search(self.embed_user(user_inputs), n)
        return ids[0], scores[0]

    # --- scoring -----------------------------------------------------------------------------
    def score(
        self,
        user_inputs: Mapping[str, np.ndarray],
        genre_affinity: Sequence[float],
        user_events: int,
        candidates: Sequence[str],
        retrieval_scores: np.ndarray,
        popularity: np.ndarray,
        idle_hours: float,
        recent_items: Sequence[str],
    ) -> np.ndarray:
        """Ranker probabilities of the candidates for one user."""
        if not candidates:
            return np.zeros(0, dtype=np.float32)
        items = self.catalog.take(candidates)
        recent = recent_vector(self.index.vectors([i for i in recent_items if i in self.index.row]))
        feed = ranker_feed(
            user_inputs,
            items,
            retrieval_scores,
            popularity,
            genre_affinity,
            user_events,
            idle_hours,
            self.index.vectors(list(candidates)) @ recent,
        )
        return run_onnx(self.ranker, feed).reshape(-1)


def user_inputs(workflow: Workflow, profile: Mapping | None, recent_items: Sequence[str]) -> dict:
    """Workflow outputs of one user, each with a leading batch dimension of 1."""
    out = workflow.transform_one(user_row(profile, recent_items), USER_OUTPUTS)
    return {name: np.asarray(out[name])[None] for name in USER_OUTPUTS}


def ranker_feed(
    user: Mapping[str, np.ndarray],
    items: Mapping[str, np.ndarray],
    retrieval_scores: np.ndarray,
    popularity: np.ndarray,
    genre_affinity: Sequence[float] | np.ndarray,
    user_events: int,
    idle_hours: float,
    recent_similarity: np.ndarray,
) -> dict[str, np.ndarray]:
    """The ranker's inputs for one user (batch 1) against n candidate items."""
    n = len(items["item_id"])
    feed = {name: np.repeat(v, n, axis=0) for name, v in user.items()}
    feed.update(items)
    feed["dense"] = dense_features(
        retrieval_scores,
        popularity,
        items["item_genres"],
        genre_affinity,
        user_events,
        idle_hours,
        recent_similarity,
    )
    return feed


def filter_candidates(
    candidates: Sequence[str],
    seen: Collection[str],
    unavailable: Collection[str],
    excluded: Collection[str],
) -> tuple[list[str], dict[str, int]]:
    """Drop seen, unavailable and excluded items; count what each rule removed (in that order)."""
    removed = {"seen": 0, "unavailable": 0, "excluded": 0}
    kept = []
    for item in candidates:
        if item in seen:
            removed["seen"] += 1
        elif item in unavailable:
            removed["unavailable"] += 1
        elif item in excluded:
            removed["excluded"] += 1
        else:
            kept.append(item)
    return kept, removed


def order(
    scores: np.ndarray, k: int, temperature: float = 0.0, seed: int | None = None
) -> np.ndarray:
    """Positions of k items: greedy top-k at temperature 0, otherwise softmax sampling without
    replacement (Gumbel top-k: argsort of logits/T + Gumbel noise), reproducible by seed."""
    scores = np.asarray(scores, dtype=np.float64)
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if temperature <= 0:
        return np.argsort(-scores, kind="stable")[:k]
    gumbel = np.random.default_rng(seed).gumbel(size=len(scores))
    with np.errstate(over="ignore"):  # shifted scores are <= 0: the worst case is -inf, harmless
        logits = (scores - scores.max()) / temperature
    return np.argsort(-(logits + gumbel), kind="stable")[:k]
