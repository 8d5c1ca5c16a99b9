"""The four stages as six operators: user features → retrieval → filtering → item features →
scoring → ordering. Each computes on a batch of requests, loads only the artifacts it needs and
shares the process's in-memory item table (`serving.live`); per request, users' features and
seen sets are read from Redis once."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.inputs import ITEM_OUTPUTS, USER_OUTPUTS
from models.workflow import Workflow
from schemas.artifacts import Artifacts
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
    "explain": Tensor(INT32, ONE),  # 1: the stages also output what explains their answer
}
PERSONALIZED, COLD_START = "personalized", "cold_start"
# The most items one response carries. Up to it a request gets exactly k items: the ranked ones,
# then popular items passing the same filters (backfill); only when the catalog minus the
# filters is smaller does the list come back short, and the response says so.
MAX_K = 1000


def strings(values) -> np.ndarray:
    return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=np.object_)


def decode(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]


def _redis_url(config) -> str:
    """The server's STREAMREC_REDIS_URL wins over the exported one: secrets stay out of the
    model repository."""
    return os.environ.get("STREAMREC_REDIS_URL") or config["redis_url"]


def _reader(config):
    from state.feature_store import OnlineReader

    return OnlineReader(_redis_url(config), project=config["feast_project"])


def _state(config):
    from state.store import RedisState

    return RedisState(_redis_url(config), prefix=config["feast_project"])


def _live_items(artifacts: Path, config: dict[str, Any]):
    from serving.live import LiveItems

    return LiveItems(artifacts, _state(config))


class UserFeatures(Operator):
    """The users' Feast features (profile + stream activity) through the fitted workflow."""

    name = "user_features"
    inputs = {"user_id": REQUEST["user_id"], "now_ms": REQUEST["now_ms"]}
    outputs = {
        **USER_TENSORS,
        "genre_affinity": Tensor(FP32, ANY),
        "user_events": Tensor(INT64, ONE),
        "idle_hours": Tensor(FP32, ONE),
        "recent": Tensor(INT64, ANY, items=True),  # the last RECENT_ITEMS known items
        "path": Tensor(STRING, ONE),
    }
    files = (Artifacts.WORKFLOW,)

    def __init__(self, artifacts: Path, config: dict[str, Any], items):
        super().__init__(artifacts, config, items)
        self.workflow = Workflow.load(artifacts / Artifacts.WORKFLOW)
        self.reader = _reader(config)
        self.n_genres = self.workflow.output_spec()["item_genres"][1]

    def compute(self, batch):
        users = [decode(t["user_id"])[0] for t in batch]
        profiles = self.reader.users(users, "user_profile")
        activities = self.reader.users(users, "user_activity")
        return [
            self._one(p, a or {}, int(t["now_ms"][0]))
            for p, a, t in zip(profiles, activities, batch, strict=True)
        ]

    def _one(self, profile: dict | None, activity: dict, now_ms: int) -> dict[str, np.ndarray]:
        from models.inputs import RECENT_ITEMS, idle_hours
        from models.recommender import user_inputs

        recent = activity.get("recent_items") or []
        out = user_inputs(self.workflow, profile, recent)
        affinity = activity.get("genre_affinity") or [0.0] * self.n_genres
        out["genre_affinity"] = np.asarray(affinity, dtype=np.float32)
        out["user_events"] = np.array([activity.get("event_count") or 0], dtype=np.int64)
        idle = idle_hours(int(activity.get("last_event_ms") or 0), now_ms)
        out["idle_hours"] = np.array([idle], dtype=np.float32)
        out["recent"] = self.items.rows(recent)[:RECENT_ITEMS]
        out["path"] = strings([PERSONALIZED if (profile or recent) else COLD_START])
        return out


class Retrieval(Operator):
    """User tower → ANN top-N (one index search per batch); a cold-start user gets the live
    most-popular items instead, scored by the same tower."""

    name = "retrieval"
    inputs = {**USER_TENSORS, "path": UserFeatures.outputs["path"]}
    outputs = {"candidates": Tensor(INT64, ANY, items=True), "candidate_scores": Tensor(FP32, ANY)}
    files = (Artifacts.USER_TOWER,)
    count_out = "candidates"

    def __init__(self, artifacts: Path, config: dict[str, Any], items):
        super().__init__(artifacts, config, items)
        from models.onnx_export import onnx_session

        self.user_tower = onnx_session(artifacts / Artifacts.USER_TOWER)
        self.n = int(config["candidates"])
        self.items.index  # noqa: B018 - load it now, not on the first request

    def compute(self, batch):
        from models.onnx_export import run_onnx

        # One tower call per request: a batched GEMM rounds differently with the batch's size
        # (up to 9e-8 here), and a request's answer must not depend on its neighbours.
        embeddings = np.concatenate(
            [run_onnx(self.user_tower, {name: t[name] for name in USER_TENSORS}) for t in batch]
        )
        cold = [decode(t["path"])[0] == COLD_START for t in batch]
        warm = [n for n, c in enumerate(cold) if not c]
        scores, rows = self.items.index.search_rows(embeddings[warm], self.n)
        found = dict(zip(warm, zip(scores, rows, strict=True), strict=True))
        if any(cold):
            popular = self.items.top(self.n)
            vectors = self.items.vectors[popular]
        out = []
        for n, is_cold in enumerate(cold):
            if is_cold:
                rows, scores = popular, vectors @ embeddings[n]
            else:
                scores, rows = found[n]
            out.append({"candidates": rows, "candidate_scores": scores.astype(np.float32)})
        return out


class Filtering(Operator):
    """Drop items the user already consumed, unavailable items and the request's exclusions.
    When fewer than k candidates are left, pick the backfill: the most popular other items that
    pass the same rules (the live ranking, then the artifacts' popular.json, then the rest of
    the trained catalog). Reads the users' seen sets in one round trip per batch."""

    name = "filtering"
    inputs = {
        "user_id": REQUEST["user_id"],
        "exclude": REQUEST["exclude"],
        "k": REQUEST["k"],
        "explain": REQUEST["explain"],
        **Retrieval.outputs,
    }
    outputs = {
        "kept": Tensor(INT64, ANY, items=True),
        "kept_scores": Tensor(FP32, ANY),
        "removed": Tensor(INT32, (3,)),  # seen, unavailable, excluded
        "backfill": Tensor(INT64, ANY, items=True),  # most popular first; empty when k kept
        "kept_rank": Tensor(INT32, ANY),  # explain: each kept item's place among the candidates
    }
    count_in, count_out = "candidates", "kept"

    def __init__(self, artifacts: Path, config: dict[str, Any], items):
        super().__init__(artifacts, config, items)
        self.state = _state(config)

    def compute(self, batch):
        seen = self.state.seen_sets([decode(t["user_id"])[0] for t in batch])
        return [self._one(t, self.items.rows(s)) for t, s in zip(batch, seen, strict=True)]

    def _one(self, t, seen: np.ndarray) -> dict[str, np.ndarray]:
        candidates = t["candidates"]
        excluded = self.items.rows(set(decode(t["exclude"])) - {""})
        is_seen = np.isin(candidates, seen)
        is_unavailable = self.items.unavailable[candidates] & ~is_seen
        is_excluded = np.isin(candidates, excluded) & ~is_seen & ~is_unavailable
        keep = ~(is_seen | is_unavailable | is_excluded)
        need = int(t["k"][0]) - int(keep.sum())
        fill = self.backfill(need, candidates, seen, excluded) if need > 0 else candidates[:0]
        return {
            "kept": candidates[keep],
            "kept_scores": t["candidate_scores"][keep],
            "removed": np.array(
                [is_seen.sum(), is_unavailable.sum(), is_excluded.sum()], dtype=np.int32
            ),
            "backfill": fill,
            "kept_rank": np.flatnonzero(keep).astype(np.int32) if _explain(t) else _NO_RANKS,
        }

    def backfill(
        self, need: int, skip: np.ndarray, seen: np.ndarray, excluded: np.ndarray
    ) -> np.ndarray:
        """Up to `need` rows in backfill order that are not in `skip` (the candidates: kept ones
        are already listed, the others were filtered) and pass the filter rules; read in
        growing windows of the ranking."""
        out: list[np.ndarray] = []
        got, start, n = 0, 0, 2 * (need + len(skip))
        while got < need:
            ranking = self.items.top(n)
            pool = ranking[start:]
            pool = pool[~np.isin(pool, skip) & ~np.isin(pool, seen) & ~np.isin(pool, excluded)]
            pool = pool[~self.items.unavailable[pool]][: need - got]
            out.append(pool)
            got += len(pool)
            if len(ranking) < n:  # the whole catalog was read
                break
            start, n = len(ranking), 4 * n
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class ItemFeatures(Operator):
    """The candidates' item features, live time-decayed popularity and similarity to the user's
    last items, from memory."""

    name = "item_features"
    inputs = {
        "kept": Filtering.outputs["kept"],
        "recent": UserFeatures.outputs["recent"],
        "now_ms": REQUEST["now_ms"],
    }
    outputs = {
        **ITEM_TENSORS,
        "popularity": Tensor(FP32, ANY),
        "recent_similarity": Tensor(FP32, ANY),
    }
    count_in, count_out = "kept", "item_id"

    def __init__(self, artifacts: Path, config: dict[str, Any], items):
        super().__init__(artifacts, config, items)
        self.items.vectors  # noqa: B018 - load them now, not on the first request

    def compute(self, batch):
        from models.inputs import recent_vector

        out = []
        for t in batch:
            rows = t["kept"]
            features = {name: self.items.features[name][rows] for name in ITEM_OUTPUTS}
            popularity = self.items.popularity_at(rows, int(t["now_ms"][0]))
            recent = recent_vector(self.items.vectors[t["recent"]])
            similarity = self.items.vectors[rows] @ recent
            out.append(
                features
                | {
                    "popularity": popularity.astype(np.float32),
                    "recent_similarity": similarity.astype(np.float32),
                }
            )
        return out


class Scoring(Operator):
    """The DLRM ranker over user × candidate features."""

    name = "scoring"
    inputs = {
        **USER_TENSORS,
        "genre_affinity": UserFeatures.outputs["genre_affinity"],
        "user_events": UserFeatures.outputs["user_events"],
        "idle_hours": UserFeatures.outputs["idle_hours"],
        **ITEM_TENSORS,
        "popularity": ItemFeatures.outputs["popularity"],
        "recent_similarity": ItemFeatures.outputs["recent_similarity"],
        "kept_scores": Filtering.outputs["kept_scores"],
        "explain": REQUEST["explain"],
    }
    outputs = {
        "scores": Tensor(FP32, ANY),
        "features": Tensor(FP32, (-1, -1)),  # explain: the ranker's dense inputs, per candidate
    }
    files = (Artifacts.RANKER,)
    count_in, count_out = "item_id", "scores"

    def __init__(self, artifacts: Path, config: dict[str, Any], items):
        super().__init__(artifacts, config, items)
        from models.onnx_export import onnx_session, per_user

        # The user's history is pooled once per user, not once per candidate (40% of the work).
        self.ranker = onnx_session(per_user(artifacts / Artifacts.RANKER, {"hist_items"}))

    def compute(self, batch):
        return [self._score(t) for t in batch]

    def _score(self, t) -> dict[str, np.ndarray]:
        """One ONNX call per request, for the same reason as in `Retrieval`."""
        from models.inputs import DENSE_FEATURES
        from models.onnx_export import USER_INDEX, run_onnx
        from models.recommender import ranker_feed

        n = len(t["item_id"])
        if n == 0:
            empty = np.zeros((0, len(DENSE_FEATURES)), dtype=np.float32)
            return {"scores": np.zeros(0, dtype=np.float32), "features": empty}
        feed = ranker_feed(
            {name: t[name] for name in USER_OUTPUTS},
            {name: t[name] for name in ITEM_OUTPUTS},
            t["kept_scores"],
            t["popularity"],
            t["genre_affinity"],
            int(t["user_events"][0]),
            float(t["idle_hours"][0]),
            t["recent_similarity"],
        )
        feed["hist_items"] = t["hist_items"]  # one row: the rewritten model pools it once
        feed[USER_INDEX] = np.zeros(n, dtype=np.int64)
        scores = run_onnx(self.ranker, feed).reshape(-1).astype(np.float32)
        return {"scores": scores, "features": feed["dense"][: n * _explain(t)]}


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
        "explain": REQUEST["explain"],
        "kept_rank": Filtering.outputs["kept_rank"],
        "kept_scores": Filtering.outputs["kept_scores"],
        "features": Scoring.outputs["features"],
    }
    outputs = {
        "items": Tensor(STRING, ANY),
        "item_scores": Tensor(FP32, ANY),
        "backfilled": Tensor(INT32, ONE),
        "model_version": Tensor(STRING, ONE),  # the artifact version that served the request
        # explain: a row per ranked item (EXPLAIN_COLUMNS, then the ranker's dense features)
        "explanation": Tensor(FP32, (-1, -1)),
    }
    count_in, count_out = "scores", "items"

    def compute(self, batch):
        version = np.array([self.items.version], dtype=np.object_)
        return [self._one(**t) | {"model_version": version} for t in batch]

    def _one(self, kept, backfill, scores, item_genres, k, temperature, seed, **explain):
        from models.recommender import order

        t = float(temperature[0])
        t = float(self.config["temperature"]) if t < 0 else t
        s = int(seed[0])
        logits = np.log(np.clip(scores, 1e-7, 1.0)) - np.log(np.clip(1.0 - scores, 1e-7, 1.0))
        positions = order(logits, len(scores), t, None if s < 0 else s)
        positions = limit_per_genre(positions, item_genres, int(self.config["max_per_genre"]))
        top = positions[: int(k[0])]
        fill = backfill[: max(0, int(k[0]) - len(top))]
        ids = self.items.raw_ids
        return {
            "items": np.array([ids[r] for r in kept[top]] + [ids[r] for r in fill], np.object_),
            "item_scores": np.concatenate([scores[top], np.zeros(len(fill))]).astype(np.float32),
            "backfilled": np.array([len(fill)], dtype=np.int32),
            "explanation": _explanation(top, scores, t, **explain),
        }


EXPLAIN_COLUMNS = ("retrieval_rank", "retrieval_score", "ranker_score", "score_rank", "sampled")


def _explanation(top, scores, temperature, explain, kept_rank, kept_scores, features):
    """Rows of EXPLAIN_COLUMNS + the dense features for the ranked items (none unless asked)."""
    if not explain[0]:
        return np.zeros((0, len(EXPLAIN_COLUMNS) + features.shape[1]), dtype=np.float32)
    score_rank = np.empty(len(scores), dtype=np.int64)
    score_rank[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    columns = [
        kept_rank[top] + 1,
        kept_scores[top],
        scores[top],
        score_rank[top],
        np.full(len(top), float(temperature > 0)),
    ]
    return np.column_stack([*columns, features[top]]).astype(np.float32)


_NO_RANKS = np.zeros(0, dtype=np.int32)


def _explain(t) -> int:
    return int(t["explain"][0])


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
    REQUEST,
    OPERATORS,
    response=(
        "items",
        "item_scores",
        "backfilled",
        "path",
        "removed",
        "model_version",
        "explanation",
    ),
    items=_live_items,
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
        "explain": np.array([1 if request.get("explain") else 0], dtype=np.int32),
    }


def response_record(
    request: dict, outputs: dict[str, np.ndarray], now_ms: int | None = None
) -> dict:
    """Graph outputs as a recommendation-response record (schemas/recommendation_response)."""
    items = decode(outputs["items"])
    scores = outputs["item_scores"].tolist()
    stages = []
    for op in OPERATORS:
        n_in, n_out, ms, batch = outputs[op.stats_name()].tolist()
        stages.append(
            {
                "name": op.name,
                "candidates_in": int(n_in),
                "candidates_out": int(n_out),
                "duration_ms": float(ms),
                "batch_size": int(batch),
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
        "model_version": decode(outputs["model_version"])[0],
        "stages": stages,
        "backfilled": backfilled,
        "note": _note(len(items), request.get("k"), backfilled),
        "request_timestamp_ms": int(request.get("timestamp_ms") or 0),
        "timestamp_ms": now_ms or int(time.time() * 1000),
        "explanations": _explanations(items, outputs) if request.get("explain") else [],
    }


def _explanations(items: list[str], outputs: dict[str, np.ndarray]) -> list[dict]:
    from models.inputs import DENSE_FEATURES

    rows = outputs["explanation"]
    source = "popular" if decode(outputs["path"])[0] == COLD_START else "retrieval"
    out = []
    for position, item in enumerate(items, 1):
        if position > len(rows):
            out.append(_backfill_explanation(item))
            continue
        row = dict(zip(EXPLAIN_COLUMNS, rows[position - 1].tolist(), strict=False))
        score_rank = int(row["score_rank"])
        if score_rank == position:
            ordering = "score order"
        else:
            by = "sampled" if row["sampled"] else "genre limit"
            ordering = f"{by}: {score_rank} → {position}"
        features = rows[position - 1][len(EXPLAIN_COLUMNS) :].tolist()
        out.append(
            {
                "item_id": item,
                "source": source,
                "retrieval_rank": int(row["retrieval_rank"]),
                "retrieval_score": row["retrieval_score"],
                "ranker_score": row["ranker_score"],
                "score_rank": score_rank,
                "features": dict(zip(DENSE_FEATURES, features, strict=True)),
                "ordering": ordering,
            }
        )
    return out


def _backfill_explanation(item: str) -> dict:
    return {
        "item_id": item,
        "source": "backfill",
        "retrieval_rank": 0,
        "retrieval_score": 0.0,
        "ranker_score": 0.0,
        "score_rank": 0,
        "features": {},
        "ordering": "backfill (popular)",
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
