"""Offline evaluation on the temporal hold-out, the way the live system would serve it.

The hold-out interactions are replayed in time order through the stream feature updates. At a
few points per test user (seeded), each recommender ranks the catalog for the user as the state
stood then; the user's next interactions are the relevant items. Users with no interaction before
the cut ("cold at cut", most of ML-100K's later traffic) are reported apart from warm users.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.examples import Prepared
from models.inputs import idle_hours
from models.metrics import coverage, ndcg_at_k, recall_at_k
from models.recommender import Recommender, filter_candidates, order
from schemas.artifacts import Artifacts
from schemas.settings import CANDIDATES
from state.features import decay, update_user

METRICS = ("recall@10", "recall@50", "ndcg@10", "coverage@10")
# Averaged per user first, then over users (with standard errors): `summarize`.
PER_USER_METRICS = {"ndcg@10": ndcg_at_k, "recall@10": recall_at_k}


@dataclass
class EvalConfig:
    points_per_user: int = 3
    horizon: int = 10  # the user's next `horizon` interactions are the relevant items
    max_users: int = 2000  # test users sampled for evaluation (all of ML-100K's ~300)
    candidates: int = CANDIDATES
    seed: int = 0


@dataclass
class Point:
    user: str
    ts_ms: int
    state: object  # UserActivity
    seen: set[str]
    popularity: np.ndarray  # catalog-aligned decayed popularity at ts
    relevant: set[str]
    warm: bool
    position: int  # row of the hold-out frame this point comes just before
    history: list[str]  # the user's items so far, oldest first (train and hold-out)


def replay_points(
    rec: Recommender,
    prepared: Prepared,
    train: pd.DataFrame,
    test: pd.DataFrame,
    cfg: EvalConfig,
) -> list[Point]:
    """Walk the hold-out in time order and snapshot the state at the chosen points."""
    rng = np.random.default_rng(cfg.seed)
    users = dict(prepared.state.users)
    seen: dict[str, set[str]] = defaultdict(set)
    history: dict[str, list[str]] = defaultdict(list)
    ordered = train.sort_values("timestamp", kind="stable")
    for u, i in zip(ordered["user_id"], ordered["item_id"], strict=True):
        seen[u].add(i)
        history[u].append(i)
    warm = set(train["user_id"])

    catalog = rec.catalog
    pop = np.zeros(len(catalog.ids))
    pop_ms = np.zeros(len(catalog.ids), dtype=np.int64)
    for item, stats in prepared.state.items.items():
        if item in catalog.row:
            pop[catalog.row[item]], pop_ms[catalog.row[item]] = (
                stats.popularity,
                stats.popularity_ms,
            )

    chosen = _choose_points(test, cfg.points_per_user, cfg.max_users, rng)
    users_items = test.groupby("user_id", sort=False)["item_id"].apply(list).to_dict()
    position: dict[str, int] = defaultdict(int)
    points = []
    rows = zip(test["user_id"], test["item_id"], test["timestamp"], strict=True)
    for n, (u, i, ts) in enumerate(rows):
        t = int(ts) * 1000
        if (u, int(ts)) in chosen:
            chosen.discard((u, int(ts)))
            future = users_items[u][position[u] :]
            relevant = [x for x in dict.fromkeys(future) if x not in seen[u]][: cfg.horizon]
            if relevant:
                decayed = pop * decay(np.maximum(t - pop_ms, 0))
                state, past = users.get(u), list(history[u])
                points.append(
                    Point(u, t, state, set(seen[u]), decayed, set(relevant), u in warm, n, past)
                )
        position[u] += 1
        history[u].append(i)
        users[u] = update_user(users.get(u), i, prepared.vectors.get(i, _no(prepared)), t)
        seen[u].add(i)
        if i in catalog.row:
            r = catalog.row[i]
            pop[r] = pop[r] * float(decay(max(t - pop_ms[r], 0))) + 1.0
            pop_ms[r] = max(t, pop_ms[r])
    return points


def _no(prepared: Prepared) -> np.ndarray:
    return np.zeros(len(prepared.genres))


def _choose_points(test: pd.DataFrame, per_user: int, max_users: int, rng) -> set[tuple[str, int]]:
    chosen = set()
    users = np.unique(test["user_id"].to_numpy())
    if len(users) > max_users:
        users = set(rng.choice(users, size=max_users, replace=False))
        test = test[test["user_id"].isin(users)]
    for user, stamps in test.groupby("user_id", sort=True)["timestamp"]:
        distinct = np.unique(stamps.to_numpy())
        for ts in rng.choice(distinct, size=min(per_user, len(distinct)), replace=False):
            chosen.add((user, int(ts)))
    return chosen


Recommend = Callable[[Point, int], list[str]]


def most_popular(rec: Recommender) -> Recommend:
    def run(p: Point, k: int) -> list[str]:
        top = np.argsort(-p.popularity, kind="stable")[: k + len(p.seen)]
        return [rec.catalog.ids[r] for r in top if rec.catalog.ids[r] not in p.seen][:k]

    return run


def retrieval_only(rec: Recommender, prepared: Prepared) -> Recommend:
    def run(p: Point, k: int) -> list[str]:
        user = rec.user_inputs(prepared.user_profiles.get(p.user), _recent(p))
        ids, _ = rec.retrieve(user, k + len(p.seen))
        return filter_candidates(ids, p.seen, (), ())[0][:k]

    return run


def full_pipeline(rec: Recommender, prepared: Prepared, candidates: int) -> Recommend:
    def run(p: Point, k: int) -> list[str]:
        user = rec.user_inputs(prepared.user_profiles.get(p.user), _recent(p))
        ids, retrieval_scores = rec.retrieve(user, candidates)
        kept, _ = filter_candidates(ids, p.seen, (), ())
        by_id = dict(zip(ids, retrieval_scores, strict=True))
        popularity = p.popularity[[rec.catalog.row[i] for i in kept]]
        affinity = p.state.genre_affinity if p.state else []
        events = p.state.event_count if p.state else 0
        idle = idle_hours(p.state.last_event_ms if p.state else 0, p.ts_ms)
        retrieval_scores = np.array([by_id[i] for i in kept])
        scores = rec.score(
            user, affinity, events, kept, retrieval_scores, popularity, idle, _recent(p)
        )
        return [kept[j] for j in order(scores, k)]

    return run


def _recent(p: Point) -> list[str]:
    return p.state.recent_items if p.state else []


def evaluate(
    rec: Recommender,
    prepared: Prepared,
    train: pd.DataFrame,
    test: pd.DataFrame,
    cfg: EvalConfig,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """{recommender: {segment: {metric: value}}} plus the evaluation's own counts."""
    points = replay_points(rec, prepared, train, test, cfg)
    recommenders = {
        "most-popular": most_popular(rec),
        "retrieval": retrieval_only(rec, prepared),
        "four-stage": full_pipeline(rec, prepared, cfg.candidates),
    }
    lists: dict[str, list[list[str]]] = {name: [] for name in recommenders}
    for n, point in enumerate(points):
        for name, recommend in recommenders.items():
            lists[name].append(recommend(point, 50))
        if progress:
            progress(n + 1)
    segments = {
        "all": list(range(len(points))),
        "warm": [n for n, p in enumerate(points) if p.warm],
        "cold-at-cut": [n for n, p in enumerate(points) if not p.warm],
    }
    results = {
        name: {
            seg: _metrics(recs, points, idx, len(rec.catalog.ids)) for seg, idx in segments.items()
        }
        for name, recs in lists.items()
    }
    return {
        "results": results,
        "points": {seg: len(idx) for seg, idx in segments.items()},
        "config": vars(cfg),
    }


def _metrics(recs, points, idx, catalog_size) -> dict[str, float]:
    if not idx:
        return dict.fromkeys(METRICS, float("nan"))
    return {
        "recall@10": float(np.mean([recall_at_k(recs[n], points[n].relevant, 10) for n in idx])),
        "recall@50": float(np.mean([recall_at_k(recs[n], points[n].relevant, 50) for n in idx])),
        "ndcg@10": float(np.mean([ndcg_at_k(recs[n], points[n].relevant, 10) for n in idx])),
        "coverage@10": coverage([recs[n] for n in idx], catalog_size, 10),
    }


def evaluate_artifacts(artifact_dir, dataset, progress=None) -> dict:
    """Evaluate a trained artifact version on the split it was trained with."""

    from models.data import temporal_split
    from models.examples import prepare

    manifest = Artifacts(artifact_dir).manifest
    cfg = manifest["config"]
    split = temporal_split(dataset.interactions, cfg["split_quantile"])
    prepared = prepare(dataset, split.train)
    rec = Recommender.load(artifact_dir)
    eval_cfg = EvalConfig(
        cfg["eval_points_per_user"],
        max_users=cfg.get("eval_max_users", 2000),
        candidates=cfg["candidates"],
        seed=cfg["seed"],
    )
    return evaluate(rec, prepared, split.train, split.test, eval_cfg, progress)


def markdown_table(evaluation: dict) -> str:
    """The quality table: one row per recommender and segment."""
    lines = [
        "| recommender | users | points | " + " | ".join(METRICS) + " |",
        "|---|---|---:|" + "---:|" * len(METRICS),
    ]
    for name, segments in evaluation["results"].items():
        for seg, metrics in segments.items():
            values = " | ".join(f"{metrics[m]:.4f}" for m in METRICS)
            lines.append(f"| {name} | {seg} | {evaluation['points'][seg]} | {values} |")
    return "\n".join(lines)


def user_mean(points: Sequence[Point], lists: Sequence[list[str]], metric: str) -> float:
    return float(np.mean(list(_per_user(points, lists, metric).values())))


def _per_user(points: Sequence[Point], lists: Sequence[list[str]], metric: str) -> dict[str, float]:
    """Each user's mean of `metric` over their points."""
    values: dict[str, list[float]] = defaultdict(list)
    for p, recommended in zip(points, lists, strict=True):
        values[p.user].append(PER_USER_METRICS[metric](recommended, p.relevant, 10))
    return {u: float(np.mean(v)) for u, v in values.items()}


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    se = float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")
    return float(a.mean()), se


def summarize(points: Sequence[Point], lists: dict[str, list[list[str]]]) -> dict:
    """Per recommender and segment: users, points, each metric's mean ± SE over users, and the
    paired per-user difference in NDCG@10 against the first recommender (mean ± SE)."""
    reference = next(iter(lists))
    warm = {p.user for p in points if p.warm}
    segment_users = {
        "all": {p.user for p in points},
        "warm": warm,
        "cold-at-cut": {p.user for p in points} - warm,
    }
    per_user = {
        name: {m: _per_user(points, recs, m) for m in PER_USER_METRICS}
        for name, recs in lists.items()
    }
    results: dict[str, dict] = {}
    for name in lists:
        results[name] = {}
        for segment, users in segment_users.items():
            users = sorted(users)
            row: dict = {"users": len(users), "points": sum(p.user in users for p in points)}
            for metric in PER_USER_METRICS:
                row[metric], row[f"{metric} se"] = _mean_se(
                    [per_user[name][metric][u] for u in users]
                )
            ours, theirs = per_user[reference]["ndcg@10"], per_user[name]["ndcg@10"]
            row["ndcg@10 diff"], row["ndcg@10 diff se"] = _mean_se(
                [ours[u] - theirs[u] for u in users]
            )
            results[name][segment] = row
    return results
