"""`streamrec evaluate --prequential`: the hold-out replayed in time order, recommend then learn.

At seeded points of each test user (`models.evaluate.replay_points`) every recommender ranks the
catalog as things stood just before the point, with the user's seen items removed; the user's
next interactions are the relevant items. Between points each recommender learns what it can
from the events replayed so far:

- the four-stage pipeline, frozen at the training cut: its stream features (recent items,
  activity, live popularity);
- the same pipeline trained continuously (`models.continual`): besides its features, every
  `cadence` events its models are fine-tuned on those events, warm-started; a point is served
  by the newest model trained on events before it;
- time-decayed popularity: every event;
- EASE: the user's history, folded in (the item-item weights stay those of the training period);
- SASRec, a standard sequential model trained on the same period: the user's item sequence.

Hyperparameters of the baselines (EASE's λ, SASRec's epochs) are chosen on a validation slice
cut from the end of the training period, never on the hold-out. Figures are means over users
(each user's points averaged first) with their standard errors; each recommender is compared
with the first one by the paired per-user difference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from models.continual import ContinualConfig, Learner
from models.data import Dataset, temporal_split
from models.ease import EASE
from models.evaluate import (
    EvalConfig,
    Point,
    full_pipeline,
    most_popular,
    replay_points,
    summarize,
    user_mean,
)
from models.examples import prepare
from models.recommender import Recommender
from models.sasrec import SASRec, SASRecConfig
from schemas.artifacts import Artifacts

TOP = 10
SEGMENTS = ("all", "warm", "cold-at-cut")
Step = Callable[[str], None]


@dataclass
class PrequentialConfig:
    points_per_user: int = 3
    horizon: int = 10  # the user's next `horizon` interactions are the relevant items
    max_users: int = 2000
    validation_quantile: float = 0.9  # validation = the last 10 % of the training period
    ease_lambdas: tuple[float, ...] = (10.0, 50.0, 100.0, 250.0, 500.0, 1000.0)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    cadence: int = 2000  # hold-out events per continuous-training cycle
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    seed: int = 0


def prequential(
    artifact_dir: Path, dataset: Dataset, cfg: PrequentialConfig, step: Step = print
) -> dict:
    """The table's figures: {"results": {recommender: {segment: {...}}}, "chosen": {...}}."""
    started = time.time()
    manifest = Artifacts(artifact_dir).manifest
    split = temporal_split(dataset.interactions, manifest["config"]["split_quantile"])
    rec = Recommender.load(artifact_dir)
    items = list(rec.catalog.ids)
    candidates = manifest["config"]["candidates"]

    step("choosing the baselines' settings on the end of the training period")
    inner = temporal_split(split.train, cfg.validation_quantile)
    validation = _points(rec, dataset, inner.train, inner.test, cfg, candidates)
    lam, by_lambda = _choose_ease(inner.train, items, validation, cfg.ease_lambdas)
    step(f"  EASE λ = {lam:g} (validation NDCG@10 by λ: {by_lambda})")
    epochs = SASRec.fit(
        _sequences(inner.train), items, cfg.sasrec, validation=_next_items(validation)
    ).best_epoch
    step(f"  SASRec: {epochs} epochs")

    step("fitting the baselines on the whole training period")
    ease = EASE.fit(split.train, items, lam)
    sasrec = SASRec.fit(_sequences(split.train), items, replace(cfg.sasrec, epochs=epochs))

    step("replaying the hold-out: recommend, then learn")
    prepared = prepare(dataset, split.train)
    points = _points(rec, dataset, split.train, split.test, cfg, candidates)
    learner = Learner(artifact_dir, dataset, cfg.continual)
    lists = {
        "four-stage (continuous)": _continuous(
            learner, points, split.test, cfg.cadence, prepared, candidates, step
        ),
        "four-stage (frozen)": [full_pipeline(rec, prepared, candidates)(p, TOP) for p in points],
        "most-popular (decayed)": [most_popular(rec)(p, TOP) for p in points],
        "EASE (fold-in)": _from_scores(ease.scores([p.history for p in points]), items, points),
        "SASRec": _from_scores(sasrec.scores([p.history for p in points]), items, points),
    }
    return {
        "results": summarize(points, lists),
        "chosen": {"ease_lambda": lam, "ease_validation": by_lambda, "sasrec_epochs": epochs},
        "continual_cycles": learner.cycles,
        "config": asdict(cfg),
        "artifacts": manifest["version"],
        "seconds": round(time.time() - started, 1),
    }


def _points(
    rec: Recommender,
    dataset: Dataset,
    train: pd.DataFrame,
    test: pd.DataFrame,
    cfg: PrequentialConfig,
    candidates: int,
) -> list[Point]:
    eval_cfg = EvalConfig(cfg.points_per_user, cfg.horizon, cfg.max_users, candidates, cfg.seed)
    return replay_points(rec, prepare(dataset, train), train, test, eval_cfg)


def _continuous(
    learner: Learner,
    points: Sequence[Point],
    test: pd.DataFrame,
    cadence: int,
    prepared,
    candidates: int,
    step: Step,
) -> list[list[str]]:
    """Each point served by the model trained on every whole `cadence` of events before it."""
    lists, learned = [], 0
    for p in points:  # in hold-out order
        while learned + cadence <= p.position:
            cycle = learner.learn(test.iloc[learned : learned + cadence])
            learned += cadence
            step(
                f"  continuous training: {learned:,} hold-out events learned ({cycle['seconds']} s)"
            )
        lists.append(full_pipeline(learner.recommender(), prepared, candidates)(p, TOP))
    return lists


def _sequences(interactions: pd.DataFrame) -> dict[str, list[str]]:
    ordered = interactions.sort_values("timestamp", kind="stable")
    return ordered.groupby("user_id", sort=False)["item_id"].apply(list).to_dict()


def _next_items(points: Sequence[Point]) -> dict[str, tuple[list[str], list[str]]]:
    """Each validation user's first point, as SASRec's early stopping takes it."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for p in points:
        out.setdefault(p.user, (p.history, sorted(p.relevant)))
    return out


def _choose_ease(
    train: pd.DataFrame, items: list[str], points: Sequence[Point], lambdas: Sequence[float]
) -> tuple[float, dict[str, float]]:
    by_lambda = {}
    for lam in lambdas:
        scores = EASE.fit(train, items, lam).scores([p.history for p in points])
        lists = _from_scores(scores, items, points)
        by_lambda[f"{lam:g}"] = round(user_mean(points, lists, "ndcg@10"), 4)
    best = max(by_lambda, key=lambda k: by_lambda[k])
    return float(best), by_lambda


def _from_scores(scores: np.ndarray, items: list[str], points: Sequence[Point]) -> list[list[str]]:
    """Top-`TOP` lists from a [points, items] score matrix, each point's seen items removed."""
    lists = []
    for row, p in zip(scores, points, strict=True):
        order = np.argsort(-row, kind="stable")[: TOP + len(p.seen)]
        lists.append([items[j] for j in order if items[j] not in p.seen][:TOP])
    return lists


def markdown_table(result: dict) -> str:
    """One row per recommender and segment; Δ = the first recommender minus this one."""
    names = list(result["results"])
    lines = [
        f"| recommender | users | n users | points | NDCG@10 ± SE | recall@10 ± SE "
        f"| Δ NDCG@10 ({names[0]} − this) ± SE |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for segment in SEGMENTS:
        for name in names:
            r = result["results"][name][segment]
            diff = (
                "–"
                if name == names[0]
                else f"{r['ndcg@10 diff']:+.4f} ± {r['ndcg@10 diff se']:.4f}"
            )
            lines.append(
                f"| {name} | {segment} | {r['users']} | {r['points']} "
                f"| {r['ndcg@10']:.4f} ± {r['ndcg@10 se']:.4f} "
                f"| {r['recall@10']:.4f} ± {r['recall@10 se']:.4f} | {diff} |"
            )
    return "\n".join(lines)
