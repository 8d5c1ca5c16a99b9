"""The four stages as six operators: user features → retrieval → filtering → item features →
scoring → ordering. Each loads only the artifacts it needs and reads live state from Redis."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.features import decay
from models.inputs import ITEM_OUTPUTS, USER_OUTPUTS
from models.workflow import Workflow
from serving.graph import Graph, Operator, Tensor

STRING, INT64, INT32, FP32 = "TYPE_STRING", "TYPE_INT64", "TYPE_INT32", "TYPE_FP32"
ONE = (1,)
ANY = (-1,)

USER_TENSORS = {
    "user_age": Tensor(INT64, ONE),
    "user_gender": Tensor(INT64, ONE),
    "user_occupation": Tensor(INT64, ONE),
    "user_zip": Tensor(INT64, ONE),
    "hist_items": Tensor(INT64, (1, -1)),
}
ITEM_TENSORS = {
    "item_id": Tensor(INT64, ANY),
    "item_genres": Tensor(FP32, (-1, -1)),
    "item_year": Tensor(INT64, ANY),
}
REQUEST = {
    "user_id": Tensor(STRING, ONE),
    "k": Tensor(INT32, ONE),
    "exclude": Tensor(STRING, ANY),
    "temperature": Tensor(FP32, ONE),  # < 0: the server's default
    "seed": Tensor(INT64, ONE),  # < 0: unseeded
    "now_ms": Tensor(INT64, ONE),
}
PERSONALIZED, COLD_START = "personalized", "cold_start"
# The most items one response carries. Up to it a request gets exactly k items: the ranked ones,
# then popular items passing the same filters (backfill); only when the catalog minus the
# filters is smaller does the list come back short, and the response says so.
MAX_K = 1000

DEFAULTS: dict[str, Any] = {
    "redis_url": "redis://127.0.0.1:6379/0",
    "feast_project": "streamrec",
    "candidates": 300,
    "temperature": 0.0,
    "max_per_genre": 0,  # 0 = no limit
}


def strings(values) -> np.ndarray:
    return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=np.object_)


def decode(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]


def _redis_url(config) -> str:
    """The server's STREAMREC_REDIS_URL wins over the exported one: secrets stay out of the
    model repository."""
    return os.environ.get("STREAMREC_REDIS_URL") or config["redis_url"]


def _reader(config):
    from models.feature_repo import OnlineReader

    return OnlineReader(_redis_url(config), project=config["feast_project"])


def _state(config):
    from serving.state import RedisState

    return RedisState(_redis_url(config), prefix=config["feast_project"])


class UserFeatures(Operator):
    """The user's Feast features (profile + stream activity) through the fitted workflow."""

    name = "user_features"
    inputs = {"user_id": REQUEST["user_id"]}
    outputs = {
        **USER_TENSORS,
        "genre_affinity": Tensor(FP32, ANY),
        "user_events": Tensor(INT64, ONE),
        "path": Tensor(STRING, ONE),
    }
    files = ("workflow.json",)

    def __init__(self, artifacts: Path, config: dict[str, Any]):
        super().__init__(artifacts, config)
        self.workflow = Workflow.load(artifacts / "workflow.json")
        self.reader = _reader(config)
        self.n_genres = self.workflow.output_spec()["item_genres"][1]

    def compute(self, user_id):
        from models.recommender import user_inputs

        user = decode(user_id)[0]
        profile = self.reader.users([user], "user_profile")[0]
        activity = self.reader.users([user], "user_activity")[0] or {}
        recent = activity.get("recent_items") or []
        out = user_inputs(self.workflow, profile, recent)
        affinity = activity.get("genre_affinity") or [0.0] * self.n_genres
        out["genre_affinity"] = np.asarray(affinity, dtype=np.float32)
        out["user_events"] = np.array([activity.get("event_count") or 0], dtype=np.int64)
        path = PERSONALIZED if (profile or recent) else COLD_START
        out["path"] = strings([path])
        return out


class Retrieval(Operator):
    """User tower → ANN top-N; a cold-start user gets the live most-popular items instead."""

    name = "retrieval"
    inputs = {**USER_TENSORS, "path": UserFeatures.outputs["path"]}
    outputs = {"candidates": Tensor(STRING, ANY), "candidate_scores": Tensor(FP32, ANY)}
    files = (
        "user_tower.onnx",
        "item_tower.onnx",
        "items.faiss",
        "item_ids.json",
        "workflow.json",
        "items.json",
        "popular.json",
    )
    count_out = "candidates"

    def __init__(self, artifacts: Path, config: dict[str, Any]):
        super().__init__(artifacts, config)
        from models.index import ItemIndex
        from models.onnx_export import onnx_session

        self.user_tower = onnx_session(artifacts / "user_tower.onnx")
        self.item_tower = onnx_session(artifacts / "item_tower.onnx")
        self.workflow = Workflow.load(artifacts / "workflow.json")
        self.index = ItemIndex.load(artifacts)
        self.n = int(config["candidates"])
        self.popular_fallback = json.loads((artifacts / "popular.json").read_text())
        self.state = _state(config)
        self.catalog_version = 0

    def refresh(self) -> int:
        """Embed items added to the catalog since training and add them to the index."""
        from models.inputs import item_row
        from models.onnx_export import run_onnx

        version = self.state.catalog_version()
        if version == self.catalog_version:
            return 0
        self.catalog_version = version
        new = {i: p for i, p in self.state.catalog_additions().items() if i not in self.index.row}
        if new:
            rows = [
                self.workflow.transform_one(item_row(i, p), ITEM_OUTPUTS) for i, p in new.items()
            ]
            inputs = {name: np.stack([r[name] for r in rows]) for name in ITEM_OUTPUTS}
            self.index.add(run_onnx(self.item_tower, inputs), list(new))
        return len(new)

    def compute(self, path, **user):
        from models.onnx_export import run_onnx

        self.refresh()
        embedding = run_onnx(self.user_tower, user)
        if decode(path)[0] == COLD_START:
            ids = [
                i
                for i in (self.state.popular(self.n) or self.popular_fallback[: self.n])
                if i in self.index.row
            ]
            vectors = self.index.vectors(ids)
            scores = (vectors @ embedding[0]).astype(np.float32)
        else:
            score_rows, id_rows = self.index.search(embedding, self.n)
            ids, scores = id_rows[0], score_rows[0]
        return {"candidates": strings(ids), "candidate_scores": np.asarray(scores, np.float32)}


class Filtering(Operator):
    """Drop items the user already consumed, unavailable items and the request's exclusions.
    When fewer than k candidates are left, pick the backfill: the most popular other items that
    pass the same rules (the live ranking from Redis, then the artifacts' popular.json, then the
    rest of the trained catalog, items nobody interacted with)."""

    name = "filtering"
    inputs = {
        "user_id": REQUEST["user_id"],
        "exclude": REQUEST["exclude"],
        "k": REQUEST["k"],
        **Retrieval.outputs,
    }
    outputs = {
        "kept": Tensor(STRING, ANY),
        "kept_scores": Tensor(FP32, ANY),
        "removed": Tensor(INT32, (3,)),  # seen, unavailable, excluded
        "backfill": Tensor(STRING, ANY),  # most popular first; empty when k items were kept
    }
    files = ("popular.json", "item_ids.json")
    count_in, count_out = "candidates", "kept"

    def __init__(self, artifacts: Path, config: dict[str, Any]):
        super().__init__(artifacts, config)
        self.state = _state(config)
        self.popular_fallback = json.loads((artifacts / "popular.json").read_text())
        self.catalog_ids = json.loads((artifacts / "item_ids.json").read_text())

    def compute(self, user_id, exclude, k, candidates, candidate_scores):
        from models.recommender import filter_candidates

        ids = decode(candidates)
        user = decode(user_id)[0]
        excluded = set(decode(exclude)) - {""}
        seen = {i for i, s in zip(ids, self.state.seen_mask(user, ids), strict=True) if s}
        unavailable = {i for i, u in zip(ids, self.state.unavailable_mask(ids), strict=True) if u}
        kept, removed = filter_candidates(ids, seen, unavailable, excluded)
        score = dict(zip(ids, candidate_scores.tolist(), strict=True))
        need = int(k[0]) - len(kept)
        fill = self.backfill(user, need, set(ids), excluded) if need > 0 else []
        return {
            "kept": strings(kept),
            "kept_scores": np.array([score[i] for i in kept], dtype=np.float32),
            "removed": np.array(list(removed.values()), dtype=np.int32),
            "backfill": strings(fill),
        }

    def backfill(self, user: str, need: int, skip: set[str], excluded: set[str]) -> list[str]:
        """Up to `need` items, most popular first, that are not in `skip` (the candidates: kept
        ones are already listed, the others were filtered) and pass the filter rules. Reads the
        ranking in growing windows; each next source only after the one before runs out."""
        from models.recommender import filter_candidates

        out: list[str] = []
        taken = set(skip)
        sources = (
            self.state.popular,
            lambda n: self.popular_fallback[:n],
            lambda n: self.catalog_ids[:n],
        )
        for source in sources:
            start, n = 0, 2 * (need + len(skip))
            while len(out) < need:
                ranking = source(n)
                pool = [i for i in dict.fromkeys(ranking[start:]) if i not in taken]
                taken.update(pool)
                seen = self.state.seen_mask(user, pool)
                unavailable = self.state.unavailable_mask(pool)
                passed, _ = filter_candidates(
                    pool,
                    {i for i, s in zip(pool, seen, strict=True) if s},
                    {i for i, u in zip(pool, unavailable, strict=True) if u},
                    excluded,
                )
                out += passed[: need - len(out)]
                if len(ranking) < n:  # this source is exhausted
                    break
                start, n = len(ranking), 4 * n
        return out


class ItemFeatures(Operator):
    """Static item features from the catalog (cached), popularity fresh from Feast/Redis."""

    name = "item_features"
    inputs = {"kept": Filtering.outputs["kept"], "now_ms": REQUEST["now_ms"]}
    outputs = {**ITEM_TENSORS, "popularity": Tensor(FP32, ANY)}
    files = ("workflow.json", "items.json")
    count_in, count_out = "kept", "item_id"

    def __init__(self, artifacts: Path, config: dict[str, Any]):
        super().__init__(artifacts, config)
        from models.recommender import Catalog

        self.workflow = Workflow.load(artifacts / "workflow.json")
        self.catalog = Catalog.build(
            self.workflow, json.loads((artifacts / "items.json").read_text())
        )
        self.reader = _reader(config)
        self.state = _state(config)
        self.catalog_version = 0

    def refresh(self) -> None:
        """Take in catalog additions and attribute changes since the last request."""
        version = self.state.catalog_version()
        if version != self.catalog_version:
            self.catalog_version = version
            for item, profile in self.state.catalog_additions().items():
                self.catalog.add(self.workflow, item, profile)

    def compute(self, kept, now_ms):
        self.refresh()
        ids = [i for i in decode(kept) if i in self.catalog.row]
        out = self.catalog.take(ids)
        now = int(now_ms[0])
        stats = self.reader.items(ids, "item_stats", ["popularity", "popularity_ms"]) if ids else []
        out["popularity"] = np.array(
            [
                decay(s["popularity"] or 0.0, s["popularity_ms"] or now, now) if s else 0.0
                for s in stats
            ],
            dtype=np.float32,
        )
        return out


class Scoring(Operator):
    """The DLRM ranker over user × candidate features."""

    name = "scoring"
    inputs = {
        **USER_TENSORS,
        "genre_affinity": UserFeatures.outputs["genre_affinity"],
        "user_events": UserFeatures.outputs["user_events"],
        **ITEM_TENSORS,
        "popularity": ItemFeatures.outputs["popularity"],
        "kept_scores": Filtering.outputs["kept_scores"],
    }
    outputs = {"scores": Tensor(FP32, ANY)}
    files = ("ranker.onnx",)
    count_in, count_out = "item_id", "scores"

    def __init__(self, artifacts: Path, config: dict[str, Any]):
        super().__init__(artifacts, config)
        from models.onnx_export import onnx_session

        self.ranker = onnx_session(artifacts / "ranker.onnx")

    def compute(self, genre_affinity, user_events, popularity, kept_scores, **features):
        from models.onnx_export import run_onnx
        from models.recommender import ranker_feed

        if len(features["item_id"]) == 0:
            return {"scores": np.zeros(0, dtype=np.float32)}
        user = {name: features[name] for name in USER_OUTPUTS}
        items = {name: features[name] for name in ITEM_OUTPUTS}
        feed = ranker_feed(
            user, items, kept_scores, popularity, genre_affinity, int(user_events[0])
        )
        return {"scores": run_onnx(self.ranker, feed).reshape(-1).astype(np.float32)}


class Ordering(Operator):
    """Softmax sampling with a temperature (greedy at 0), at most N per genre, top-k; then the
    backfill (score 0, after every ranked item) up to k, and how many items it added."""

    name = "ordering"
    inputs = {
        "kept": Filtering.outputs["kept"],
        "backfill": Filtering.outputs["backfill"],
        "scores": Scoring.outputs["scores"],
        "item_genres": ITEM_TENSORS["item_genres"],
        "k": REQUEST["k"],
        "temperature": REQUEST["temperature"],
        "seed": REQUEST["seed"],
    }
    outputs = {
        "items": Tensor(STRING, ANY),
        "item_scores": Tensor(FP32, ANY),
        "backfilled": Tensor(INT32, ONE),
    }
    count_in, count_out = "scores", "items"

    def compute(self, kept, backfill, scores, item_genres, k, temperature, seed):
        from models.recommender import order

        t = float(temperature[0])
        t = float(self.config["temperature"]) if t < 0 else t
        s = int(seed[0])
        logits = np.log(np.clip(scores, 1e-7, 1.0)) - np.log(np.clip(1.0 - scores, 1e-7, 1.0))
        positions = order(logits, len(scores), t, None if s < 0 else s)
        positions = limit_per_genre(positions, item_genres, int(self.config["max_per_genre"]))
        top = positions[: int(k[0])]
        fill = backfill[: max(0, int(k[0]) - len(top))]
        return {
            "items": np.concatenate([kept[top] if len(top) else strings([]), fill]),
            "item_scores": np.concatenate([scores[top], np.zeros(len(fill))]).astype(np.float32),
            "backfilled": np.array([len(fill)], dtype=np.int32),
        }


def limit_per_genre(positions: np.ndarray, genres: np.ndarray, limit: int) -> np.ndarray:
    """Keep the order but skip items whose primary genre already has `limit` items."""
    if limit <= 0 or len(positions) == 0:
        return positions
    primary = np.where(genres.any(axis=1), genres.argmax(axis=1), -1)
    counts: dict[int, int] = {}
    kept = []
    for p in positions:
        g = int(primary[p])
        if counts.get(g, 0) < limit:
            counts[g] = counts.get(g, 0) + 1
            kept.append(p)
    return np.asarray(kept, dtype=np.int64)


OPERATORS: list[type[Operator]] = [
    UserFeatures,
    Retrieval,
    Filtering,
    ItemFeatures,
    Scoring,
    Ordering,
]
GRAPH = Graph(
    REQUEST, OPERATORS, response=("items", "item_scores", "backfilled", "path", "removed")
)


def request_tensors(request: dict, now_ms: int | None = None) -> dict[str, np.ndarray]:
    """A recommendation-request record as the graph's input tensors."""
    temperature = request.get("temperature")
    seed = request.get("seed")
    return {
        "user_id": strings([request["user_id"]]),
        "k": np.array([request.get("k", 10)], dtype=np.int32),
        "exclude": strings(request.get("exclude") or [""]),
        "temperature": np.array([-1.0 if temperature is None else temperature], np.float32),
        "seed": np.array([-1 if seed is None else seed], dtype=np.int64),
        "now_ms": np.array(
            [now_ms or request.get("timestamp_ms") or int(time.time() * 1000)], dtype=np.int64
        ),
    }


def response_record(
    request: dict, outputs: dict[str, np.ndarray], model_version: str, now_ms: int | None = None
) -> dict:
    """Graph outputs as a recommendation-response record (schemas/recommendation_response)."""
    items = decode(outputs["items"])
    scores = outputs["item_scores"].tolist()
    stages = []
    for op in OPERATORS:
        n_in, n_out, ms = outputs[op.stats_name()].tolist()
        stages.append(
            {
                "name": op.name,
                "candidates_in": int(n_in),
                "candidates_out": int(n_out),
                "duration_ms": float(ms),
            }
        )
    seen, unavailable, excluded = (int(x) for x in outputs["removed"].tolist())
    backfilled = int(outputs["backfilled"][0])
    return {
        "request_id": request["request_id"],
        "user_id": request["user_id"],
        "status": "ok",
        "error": None,
        "items": [{"item_id": i, "score": float(s)} for i, s in zip(items, scores, strict=True)],
        "removed": {"seen": seen, "unavailable": unavailable, "excluded": excluded},
        "path": decode(outputs["path"])[0],
        "model_version": model_version,
        "stages": stages,
        "backfilled": backfilled,
        "note": _note(len(items), request.get("k"), backfilled),
        "request_timestamp_ms": int(request.get("timestamp_ms") or 0),
        "timestamp_ms": now_ms or int(time.time() * 1000),
    }


def _note(n: int, k: int | None, backfilled: int) -> str | None:
    """Why the list is not k ranked items, or None."""
    if isinstance(k, int) and n < k:
        return (
            f"short list: {n} of {k} items ({backfilled} backfilled from popularity); "
            "no other item passes the filters (seen, unavailable, excluded, per-genre limit)"
        )
    if backfilled:
        return (
            f"{backfilled} of {n} items backfilled from popularity: "
            f"filtering left {n - backfilled} ranked candidates"
        )
    return None


def error_record(request: dict, error: str, model_version: str = "") -> dict:
    return {
        "request_id": str(request.get("request_id") or ""),
        "user_id": str(request.get("user_id") or ""),
        "status": "error",
        "error": error,
        "items": [],
        "removed": {},
        "path": "",
        "model_version": model_version,
        "stages": [],
        "backfilled": 0,
        "note": None,
        "request_timestamp_ms": int(request.get("timestamp_ms") or 0),
        "timestamp_ms": int(time.time() * 1000),
    }


def validate_request(request: dict, max_k: int = MAX_K) -> str | None:
    """Why a request cannot be served, or None."""
    if not request.get("request_id"):
        return "request_id is empty"
    if not request.get("user_id"):
        return "user_id is empty"
    k = request.get("k")
    if not isinstance(k, int) or not 1 <= k <= max_k:
        return f"k must be between 1 and {max_k} (the most items one response carries), got {k}"
    t = request.get("temperature")
    if t is not None and (not math.isfinite(t) or t < 0):
        return f"temperature must be a finite number >= 0, got {t}"
    return None
