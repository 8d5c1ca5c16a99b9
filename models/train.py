"""`streamrec train`: data → workflow → two-tower → index → DLRM → evaluation → artifacts.

Artifacts go to `<artifact_dir>/<version>/`, with `manifest.json` describing them; the
`current` link points at the newest complete version. `weights/` keeps the Keras weights that
continuous training (`models.continual`) starts from.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.data import Dataset, temporal_split
from models.evaluate import EvalConfig, evaluate
from models.examples import (
    PopularityClock,
    SeenBefore,
    build_examples,
    hard_negatives,
    prepare,
)
from models.index import ItemIndex
from models.inputs import (
    DENSE_FEATURES,
    USER_OUTPUTS,
    dense_features,
    item_tower_inputs,
    make_workflow,
    recent_vector,
)
from models.recommender import Catalog, Recommender
from schemas.artifacts import point_current

MANIFEST_VERSION = 1
WEIGHTS = {
    "user_tower": "user_tower.weights.h5",
    "item_tower": "item_tower.weights.h5",
    "ranker": "ranker.weights.h5",
}


@dataclass
class TrainConfig:
    split_quantile: float = 0.8
    dim: int = 64
    retrieval_epochs: int = 8
    retrieval_batch: int = 512
    # The user tower also reads the recent items in order (`models.retrieval.RecentSequence`).
    # On the validation slice it lifted retrieval alone (NDCG@10 0.133 -> 0.136, warm users
    # 0.052 -> 0.066) but the four-stage pipeline fell (0.158 -> 0.140): off until it does not.
    sequence: bool = False
    # Item-id dropout in the item tower (`models.retrieval.TwoTower.item_id_dropout`): items
    # unseen in training are embedded from title, genres and year.
    item_id_dropout: float = 0.2
    title_tokens: int = 8  # hashed title tokens the item tower reads (0: none)
    ranker_epochs: int = 3
    # The ranker: DLRM plus a wide (linear) path over the dense features, its deep part learning
    # at 0.1x the rate. On a validation slice cut from the end of the training period this was
    # as good as a frozen deep part and better than full rate, which fits the training period
    # (static item appeal, in-sample retrieval scores); the wide mix of retrieval score and
    # current popularity is what carries forward in time.
    ranker_wide: bool = True
    ranker_deep_lr_scale: float = 0.1
    negatives: int = 4
    candidates: int = 300
    eval_points_per_user: int = 3
    eval_max_users: int = 2000
    seed: int = 0


Step = Callable[[str], None]


def train(dataset: Dataset, artifact_root: Path, cfg: TrainConfig, step: Step = print) -> Path:
    import keras

    from models.onnx_export import export_onnx, onnx_session, parity
    from models.ranking import fit_ranker

    keras.utils.set_random_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.time()
    version = time.strftime("%Y%m%d-%H%M%S") + f"-{dataset.name}"
    out = artifact_root / version
    out.mkdir(parents=True)

    step(
        f"splitting {len(dataset.interactions):,} interactions at the {cfg.split_quantile:.0%} "
        "time quantile"
    )
    split = temporal_split(dataset.interactions, cfg.split_quantile)
    prepared = prepare(dataset, split.train)
    all_events = pd.concat([split.train, split.test])
    clock = PopularityClock(
        all_events["item_id"].to_numpy(), all_events["timestamp"].to_numpy().astype(np.int64) * 1000
    )
    seen = SeenBefore(all_events["user_id"].to_numpy(), all_events["item_id"].to_numpy())

    step("building training examples (features as of each interaction)")
    train_ex = build_examples(split.train, prepared.state.users_before, prepared, clock)
    workflow = make_workflow(cfg.title_tokens)
    workflow.fit(train_ex.frame)
    workflow.save(out / "workflow.json")
    x = workflow.transform(train_ex.frame)
    spec = workflow.output_spec()
    tower, ranker = build_models(spec, cfg)

    step(f"training the two-tower model on {len(train_ex.frame):,} pairs")
    counts = split.train["item_id"].value_counts()
    log_q = np.log(counts.reindex(train_ex.frame["item_id"]).to_numpy() / counts.sum())
    tower_loss = tower.fit(
        {k: x[k] for k in USER_OUTPUTS},
        {k: x[k] for k in item_tower_inputs(workflow)},
        log_q,
        epochs=cfg.retrieval_epochs,
        batch_size=cfg.retrieval_batch,
        progress=lambda e, loss: step(f"  retrieval epoch {e + 1}: loss {loss:.4f}"),
    )

    step("embedding the catalog and building the ANN index")
    catalog = Catalog.build(workflow, prepared.item_profiles)
    item_emb = tower.embed_items(catalog.inputs)
    built = time.perf_counter()
    index = ItemIndex.build(item_emb, catalog.ids)
    build_seconds = time.perf_counter() - built
    index.save(out)
    queries = tower.embed_users({k: x[k][: min(500, len(x[k]))] for k in USER_OUTPUTS})
    index_recall = index.recall_vs_exact(queries, 100)

    step(
        f"training the DLRM ranker ({cfg.negatives} negatives per positive from the unseen "
        "retrieval candidates)"
    )
    rx, ry, _ = ranker_set(
        split.train,
        prepared.state.users_before,
        prepared,
        clock,
        workflow,
        tower,
        index,
        cfg,
        rng,
        seen,
        offset=0,
        positives=(train_ex, x),
    )
    fit_ranker(
        ranker,
        rx,
        ry,
        epochs=cfg.ranker_epochs,
        seed=cfg.seed,
        deep_lr_scale=cfg.ranker_deep_lr_scale,
        progress=lambda e, loss: step(f"  ranker epoch {e + 1}: loss {loss:.4f}"),
    )
    from state.features import replay

    test_state = replay(split.test, prepared.vectors, prepared.state.users, prepared.state.items)
    tx, ty, in_candidates = ranker_set(
        split.test,
        test_state.users_before,
        prepared,
        clock,
        workflow,
        tower,
        index,
        cfg,
        rng,
        seen,
        offset=len(split.train),
    )
    ranker_metrics = _ranker_metrics(ranker, tx, ty, in_candidates)

    step("exporting ONNX models and checking parity with Keras")
    sample_user = {k: x[k][:64] for k in USER_OUTPUTS}
    sample_rank = {k: v[:64] for k, v in rx.items()}
    onnx_parity = {}
    for name, model, sample in (
        ("user_tower", tower.user_tower, sample_user),
        ("item_tower", tower.item_tower, {k: v[:64] for k, v in catalog.inputs.items()}),
        ("ranker", ranker, sample_rank),
    ):
        export_onnx(model, out / f"{name}.onnx")
        onnx_parity[name] = parity(model, out / f"{name}.onnx", sample)
    save_weights(out, tower, ranker)
    (out / "items.json").write_text(json.dumps(prepared.item_profiles))
    _write_state(out, dataset, split.train, prepared)

    step("evaluating on the temporal hold-out (most-popular vs retrieval vs four-stage)")
    rec = Recommender(
        workflow,
        onnx_session(out / "user_tower.onnx"),
        onnx_session(out / "ranker.onnx"),
        index,
        catalog,
    )
    evaluation = evaluate(
        rec,
        prepared,
        split.train,
        split.test,
        EvalConfig(
            cfg.eval_points_per_user,
            max_users=cfg.eval_max_users,
            candidates=cfg.candidates,
            seed=cfg.seed,
        ),
    )
    manifest = {
        "format_version": MANIFEST_VERSION,
        "version": version,
        "dataset": dataset.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds": round(time.time() - started, 1),
        "config": asdict(cfg),
        "data": {
            "interactions": len(dataset.interactions),
            "train": len(split.train),
            "test": len(split.test),
            "cut_timestamp": int(split.cut_timestamp),
            "train_range": [
                int(split.train["timestamp"].min()),
                int(split.train["timestamp"].max()),
            ],
            "users": int(dataset.interactions["user_id"].nunique()),
            "items": len(catalog.ids),
        },
        "inputs": {
            name: {"dtype": d, "width": w, "cardinality": c} for name, (d, w, c) in spec.items()
        },
        "dense_features": list(DENSE_FEATURES),
        "genres": prepared.genres,
        "models": {
            "user_tower": {
                "file": "user_tower.onnx",
                "inputs": list(USER_OUTPUTS),
                "output": "user_embedding",
                "dim": cfg.dim,
            },
            "item_tower": {
                "file": "item_tower.onnx",
                "inputs": list(tower.item_inputs),
                "output": "item_embedding",
                "dim": cfg.dim,
            },
            "ranker": {
                "file": "ranker.onnx",
                "inputs": [*USER_OUTPUTS, "item_id", "item_year", "dense"],
                "output": "score",
            },
        },
        "index": {
            "type": type(index.index).__name__,
            "items": len(index),
            "recall_vs_exact@100": index_recall,
            "build_seconds": round(build_seconds, 2),
            "duplicate_vectors": duplicate_share(item_emb),
        },
        "metrics": {
            "retrieval_loss": tower_loss,
            "ranker": ranker_metrics,
            "onnx_max_abs_diff": onnx_parity,
            "evaluation": evaluation,
        },
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=_json))
    point_current(artifact_root, out)
    return out


def duplicate_share(vectors: np.ndarray) -> float:
    """Share of rows that repeat an earlier row bit for bit (items the index cannot tell apart)."""
    v = np.ascontiguousarray(vectors)
    if len(v) == 0:
        return 0.0
    rows = v.view(np.dtype((np.void, v.dtype.itemsize * v.shape[1]))).ravel()
    return float(1.0 - len(np.unique(rows)) / len(rows))


def build_models(spec: dict, cfg: TrainConfig):
    """The untrained two-tower model and ranker for a fitted workflow's output spec."""
    from models.ranking import build_dlrm
    from models.retrieval import build_two_tower

    cards = {name: c for name, (_, _, c) in spec.items() if c}
    n_genres, hist_len = spec["item_genres"][1], spec["hist_items"][1]
    tower = build_two_tower(
        cards,
        n_genres,
        hist_len,
        dim=cfg.dim,
        seed=cfg.seed,
        sequence=cfg.sequence,
        title_len=spec["item_title"][1] if "item_title" in spec else None,
        item_id_dropout=cfg.item_id_dropout,
    )
    ranker = build_dlrm(cards, len(DENSE_FEATURES), hist_len, seed=cfg.seed, wide=cfg.ranker_wide)
    return tower, ranker


def save_weights(out: Path, tower, ranker) -> None:
    folder = out / "weights"
    folder.mkdir(exist_ok=True)
    models = {"user_tower": tower.user_tower, "item_tower": tower.item_tower, "ranker": ranker}
    for name, model in models.items():
        model.save_weights(folder / WEIGHTS[name])


def load_models(artifacts: Path, workflow):
    """A version's two-tower model and ranker with their trained weights."""
    manifest = json.loads((artifacts / "manifest.json").read_text())
    tower, ranker = build_models(workflow.output_spec(), TrainConfig(**manifest["config"]))
    models = {"user_tower": tower.user_tower, "item_tower": tower.item_tower, "ranker": ranker}
    for name, model in models.items():
        model.load_weights(artifacts / "weights" / WEIGHTS[name])
    return tower, ranker


def _ranker_metrics(ranker, x, y, in_candidates) -> dict[str, float]:
    """Hold-out AUC/logloss of the ranker, on all rows and on the rows whose positive retrieval
    put among the candidates (what the ranker actually orders), with the retrieval score's own
    AUC on the same rows for comparison."""
    from models.ranking import auc, evaluate_ranker

    out = evaluate_ranker(ranker, x, y)
    inside = {k: v[in_candidates] for k, v in x.items()}
    out["auc_in_candidates"] = evaluate_ranker(ranker, inside, y[in_candidates])["auc"]
    score = x["dense"][:, DENSE_FEATURES.index("retrieval_score")]
    out["retrieval_score_auc"] = auc(y, score)
    out["retrieval_score_auc_in_candidates"] = auc(y[in_candidates], score[in_candidates])
    return out


def ranker_set(
    interactions,
    before,
    prepared,
    clock,
    workflow,
    tower,
    index,
    cfg,
    rng,
    seen,
    offset,
    positives=None,
):
    """Positives (label 1) and hard negatives from retrieval (label 0) with their features.

    `interactions` sit at `offset` in the log `seen` was built from. Also returns, per row,
    whether its positive was among the retrieval candidates.
    """
    pos_ex, pos_x = positives or (None, None)
    if pos_ex is None:
        pos_ex = build_examples(interactions, before, prepared, clock)
        pos_x = workflow.transform(pos_ex.frame)
    user_emb = tower.embed_users({k: pos_x[k] for k in USER_OUTPUTS})
    item_emb = dict(zip(index.ids, index.index.reconstruct_n(0, len(index)), strict=True))
    neg_items, in_candidates = hard_negatives(
        user_emb,
        index,
        interactions["item_id"].to_numpy(),
        interactions["user_id"].to_numpy(),
        offset + np.arange(len(interactions)),
        seen,
        cfg.negatives,
        cfg.candidates,
        rng,
    )
    rep = np.repeat(np.arange(len(interactions)), cfg.negatives)
    neg_ex = build_examples(
        interactions.iloc[rep],
        [before[i] for i in rep],
        prepared,
        clock,
        item_ids=neg_items.reshape(-1),
    )
    neg_x = workflow.transform(neg_ex.frame)
    x = {k: np.concatenate([pos_x[k], neg_x[k]]) for k in pos_x}
    pos_items = interactions["item_id"].to_numpy()
    recent = np.stack([_recent_vector(s.recent_items, item_emb) for s in before])
    scores = [
        _similarity(user_emb, pos_items, item_emb),
        _similarity(user_emb[rep], neg_items.reshape(-1), item_emb),
    ]
    recent_scores = [
        _similarity(recent, pos_items, item_emb),
        _similarity(recent[rep], neg_items.reshape(-1), item_emb),
    ]
    x["dense"] = np.concatenate(
        [
            dense_features(
                s, e.popularity, xx["item_genres"], e.affinity, e.user_events, e.idle_hours, r
            )
            for s, r, e, xx in zip(
                scores, recent_scores, (pos_ex, neg_ex), (pos_x, neg_x), strict=True
            )
        ]
    )
    y = np.r_[np.ones(len(pos_ex.frame)), np.zeros(len(neg_ex.frame))].astype(np.float32)
    return x, y, np.r_[in_candidates, in_candidates[rep]]


def _similarity(user_emb: np.ndarray, items: np.ndarray, item_emb: dict) -> np.ndarray:
    zero = np.zeros(user_emb.shape[1], dtype=np.float32)
    return np.einsum("nd,nd->n", user_emb, np.stack([item_emb.get(i, zero) for i in items]))


def _recent_vector(recent_items: list[str], item_emb: dict) -> np.ndarray:
    known = [item_emb[i] for i in recent_items if i in item_emb]
    return recent_vector(np.array(known).reshape(len(known), len(next(iter(item_emb.values())))))


def _write_state(out: Path, dataset: Dataset, train: pd.DataFrame, prepared) -> None:
    """The stream state after the training period: the features Feast starts from."""
    state = out / "state"
    state.mkdir()
    users = pd.DataFrame([{"user_id": u, **vars(s)} for u, s in prepared.state.users.items()])
    items = pd.DataFrame([{"item_id": i, **vars(s)} for i, s in prepared.state.items.items()])
    users.to_parquet(state / "user_activity.parquet")
    items.to_parquet(state / "item_stats.parquet")
    dataset.users.to_parquet(state / "user_profile.parquet")
    seen = [
        {"user_id": u, "item_id": i, "ts_ms": int(t) * 1000}
        for u, i, t in zip(train["user_id"], train["item_id"], train["timestamp"], strict=True)
    ]
    pd.DataFrame(seen).to_parquet(state / "seen.parquet")
    end = max(s.popularity_ms for s in prepared.state.items.values())
    by_popularity = sorted(prepared.state.items.items(), key=lambda kv: -kv[1].at(end))
    (out / "popular.json").write_text(json.dumps([i for i, _ in by_popularity[:1000]]))
    pd.DataFrame([{"item_id": i, **p} for i, p in prepared.item_profiles.items()]).to_parquet(
        state / "item_profile.parquet"
    )


def _json(o):
    if isinstance(o, np.generic):
        return o.item()
    return str(o)
