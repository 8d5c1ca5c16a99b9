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
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from models.data import Dataset, Split, temporal_split
from models.evaluate import EvalConfig, evaluate
from models.examples import (
    Examples,
    PopularityClock,
    Prepared,
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
from models.workflow import Workflow
from schemas.artifacts import Artifacts, point_current
from schemas.settings import CANDIDATES
from state.features import UserActivity, replay

if TYPE_CHECKING:
    import keras

    from models.retrieval import TwoTower

MANIFEST_VERSION = 1


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
    candidates: int = CANDIDATES
    eval_points_per_user: int = 3
    eval_max_users: int = 2000
    seed: int = 0


Step = Callable[[str], None]


def train(dataset: Dataset, artifact_root: Path, cfg: TrainConfig, step: Step = print) -> Path:
    import keras

    keras.utils.set_random_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.time()
    out = artifact_root / (time.strftime("%Y%m%d-%H%M%S") + f"-{dataset.name}")
    out.mkdir(parents=True)
    run = _Run(dataset, cfg, out, step, started)

    data = _split(run)
    pairs = _fit_workflow(run, data)
    tower, ranker = build_models(pairs.workflow.output_spec(), cfg)
    tower_loss = _train_two_tower(run, data, pairs, tower)
    catalog, index, index_summary = _build_index(run, data, pairs, tower)
    rows = RankerRows(data.prepared, data.clock, data.seen, pairs.workflow, tower, index, cfg, rng)
    rx, ranker_metrics = _train_ranker(run, data, pairs, rows, ranker)
    onnx_parity = _export_onnx(
        run,
        {
            "user_tower": (tower.user_tower, {k: pairs.x[k] for k in USER_OUTPUTS}),
            "item_tower": (tower.item_tower, catalog.inputs),
            "ranker": (ranker, rx),
        },
    )
    save_weights(out, tower, ranker)
    (out / Artifacts.ITEMS).write_text(json.dumps(data.prepared.item_profiles))
    _write_state(out, dataset, data.split.train, data.prepared)
    evaluation = _evaluate(run, data, pairs.workflow, index, catalog)

    manifest = {
        **_describe(run, data, pairs.workflow, tower, len(catalog.ids)),
        "index": index_summary,
        "metrics": {
            "retrieval_loss": tower_loss,
            "ranker": ranker_metrics,
            "onnx_max_abs_diff": onnx_parity,
            "evaluation": evaluation,
        },
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
    }
    (out / Artifacts.MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json))
    point_current(artifact_root, out)
    return out


@dataclass(frozen=True)
class _Run:
    """One training run: its data set, settings, output folder, progress callback and start
    time."""

    dataset: Dataset
    cfg: TrainConfig
    out: Path
    step: Step
    started: float


@dataclass(frozen=True)
class _Data:
    """The temporal split, the state after its training period, and the popularity clock and
    seen pairs of the whole log (features and negatives as of each interaction)."""

    split: Split
    prepared: Prepared
    clock: PopularityClock
    seen: SeenBefore


@dataclass(frozen=True)
class _Pairs:
    """The training interactions as examples, the workflow fitted on them and its outputs."""

    examples: Examples
    workflow: Workflow
    x: dict[str, np.ndarray]


def _split(run: _Run) -> _Data:
    interactions = run.dataset.interactions
    run.step(
        f"splitting {len(interactions):,} interactions at the {run.cfg.split_quantile:.0%} "
        "time quantile"
    )
    split = temporal_split(interactions, run.cfg.split_quantile)
    prepared = prepare(run.dataset, split.train)
    events = pd.concat([split.train, split.test])
    clock = PopularityClock(
        events["item_id"].to_numpy(), events["timestamp"].to_numpy().astype(np.int64) * 1000
    )
    seen = SeenBefore(events["user_id"].to_numpy(), events["item_id"].to_numpy())
    return _Data(split, prepared, clock, seen)


def _fit_workflow(run: _Run, data: _Data) -> _Pairs:
    run.step("building training examples (features as of each interaction)")
    examples = build_examples(
        data.split.train, data.prepared.state.users_before, data.prepared, data.clock
    )
    workflow = make_workflow(run.cfg.title_tokens)
    workflow.fit(examples.frame)
    workflow.save(run.out / Artifacts.WORKFLOW)
    return _Pairs(examples, workflow, workflow.transform(examples.frame))


def _train_two_tower(run: _Run, data: _Data, pairs: _Pairs, tower: TwoTower) -> list[float]:
    """Trains `tower`; returns the loss per epoch."""
    run.step(f"training the two-tower model on {len(pairs.examples.frame):,} pairs")
    counts = data.split.train["item_id"].value_counts()
    log_q = np.log(counts.reindex(pairs.examples.frame["item_id"]).to_numpy() / counts.sum())
    return tower.fit(
        {k: pairs.x[k] for k in USER_OUTPUTS},
        {k: pairs.x[k] for k in item_tower_inputs(pairs.workflow)},
        log_q,
        epochs=run.cfg.retrieval_epochs,
        batch_size=run.cfg.retrieval_batch,
        progress=lambda e, loss: run.step(f"  retrieval epoch {e + 1}: loss {loss:.4f}"),
    )


def _build_index(
    run: _Run, data: _Data, pairs: _Pairs, tower: TwoTower
) -> tuple[Catalog, ItemIndex, dict]:
    """The catalog, its ANN index (saved) and the index's manifest section."""
    run.step("embedding the catalog and building the ANN index")
    catalog = Catalog.build(pairs.workflow, data.prepared.item_profiles)
    item_emb = tower.embed_items(catalog.inputs)
    built = time.perf_counter()
    index = ItemIndex.build(item_emb, catalog.ids)
    build_seconds = time.perf_counter() - built
    index.save(run.out)
    queries = tower.embed_users({k: pairs.x[k][:500] for k in USER_OUTPUTS})
    summary = {
        "type": type(index.index).__name__,
        "items": len(index),
        "recall_vs_exact@100": index.recall_vs_exact(queries, 100),
        "build_seconds": round(build_seconds, 2),
        "duplicate_vectors": duplicate_share(item_emb),
    }
    return catalog, index, summary


def _train_ranker(
    run: _Run, data: _Data, pairs: _Pairs, rows: RankerRows, ranker: keras.Model
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Trains `ranker` on the training period; returns its training rows and its hold-out
    metrics."""
    from models.ranking import fit_ranker

    run.step(
        f"training the DLRM ranker ({run.cfg.negatives} negatives per positive from the unseen "
        "retrieval candidates)"
    )
    train = data.split.train
    before = data.prepared.state.users_before
    rx, ry, _ = rows.build(train, before, offset=0, positives=(pairs.examples, pairs.x))
    fit_ranker(
        ranker,
        rx,
        ry,
        epochs=run.cfg.ranker_epochs,
        seed=run.cfg.seed,
        deep_lr_scale=run.cfg.ranker_deep_lr_scale,
        progress=lambda e, loss: run.step(f"  ranker epoch {e + 1}: loss {loss:.4f}"),
    )
    state = data.prepared.state
    test_state = replay(data.split.test, data.prepared.vectors, state.users, state.items)
    tx, ty, in_candidates = rows.build(data.split.test, test_state.users_before, offset=len(train))
    return rx, _ranker_metrics(ranker, tx, ty, in_candidates)


def _export_onnx(
    run: _Run, models: dict[str, tuple[keras.Model, dict[str, np.ndarray]]]
) -> dict[str, float]:
    """`{name: (Keras model, inputs)}` written as `<name>.onnx`; returns each export's largest
    difference from Keras on the first 64 rows of its inputs."""
    from models.onnx_export import export_onnx, parity

    run.step("exporting ONNX models and checking parity with Keras")
    onnx_parity = {}
    for name, (model, inputs) in models.items():
        export_onnx(model, run.out / f"{name}.onnx")
        sample = {k: v[:64] for k, v in inputs.items()}
        onnx_parity[name] = parity(model, run.out / f"{name}.onnx", sample)
    return onnx_parity


def _evaluate(
    run: _Run, data: _Data, workflow: Workflow, index: ItemIndex, catalog: Catalog
) -> dict:
    """The exported pipeline on the temporal hold-out."""
    from models.onnx_export import onnx_session

    run.step("evaluating on the temporal hold-out (most-popular vs retrieval vs four-stage)")
    rec = Recommender(
        workflow,
        onnx_session(run.out / Artifacts.USER_TOWER),
        onnx_session(run.out / Artifacts.RANKER),
        index,
        catalog,
    )
    cfg = run.cfg
    return evaluate(
        rec,
        data.prepared,
        data.split.train,
        data.split.test,
        EvalConfig(
            cfg.eval_points_per_user,
            max_users=cfg.eval_max_users,
            candidates=cfg.candidates,
            seed=cfg.seed,
        ),
    )


def _describe(run: _Run, data: _Data, workflow: Workflow, tower: TwoTower, items: int) -> dict:
    """The manifest's description of the version: its data, inputs and model files."""
    split, interactions = data.split, run.dataset.interactions
    spec = workflow.output_spec()
    return {
        "format_version": MANIFEST_VERSION,
        "version": run.out.name,
        "dataset": run.dataset.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds": round(time.time() - run.started, 1),
        "config": asdict(run.cfg),
        "data": {
            "interactions": len(interactions),
            "train": len(split.train),
            "test": len(split.test),
            "cut_timestamp": int(split.cut_timestamp),
            "train_range": [
                int(split.train["timestamp"].min()),
                int(split.train["timestamp"].max()),
            ],
            "users": int(interactions["user_id"].nunique()),
            "items": items,
        },
        "inputs": {
            name: {"dtype": d, "width": w, "cardinality": c} for name, (d, w, c) in spec.items()
        },
        "dense_features": list(DENSE_FEATURES),
        "genres": data.prepared.genres,
        "models": {
            "user_tower": {
                "file": Artifacts.USER_TOWER,
                "inputs": list(USER_OUTPUTS),
                "output": "user_embedding",
                "dim": run.cfg.dim,
            },
            "item_tower": {
                "file": Artifacts.ITEM_TOWER,
                "inputs": list(tower.item_inputs),
                "output": "item_embedding",
                "dim": run.cfg.dim,
            },
            "ranker": {
                "file": Artifacts.RANKER,
                "inputs": [*USER_OUTPUTS, "item_id", "item_year", "dense"],
                "output": "score",
            },
        },
    }


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
    (out / Artifacts.WEIGHTS).mkdir(exist_ok=True)
    models = {"user_tower": tower.user_tower, "item_tower": tower.item_tower, "ranker": ranker}
    for name, model in models.items():
        model.save_weights(Artifacts(out).weights(name))


def load_models(artifacts: Path, workflow):
    """A version's two-tower model and ranker with their trained weights."""
    version = Artifacts(artifacts)
    tower, ranker = build_models(workflow.output_spec(), TrainConfig(**version.manifest["config"]))
    models = {"user_tower": tower.user_tower, "item_tower": tower.item_tower, "ranker": ranker}
    for name, model in models.items():
        model.load_weights(version.weights(name))
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


@dataclass(frozen=True)
class RankerRows:
    """Builds the ranker's labelled rows: positives (label 1) and hard negatives from retrieval
    (label 0) with their features.

    Holds what the training and the hold-out rows are built from alike: the prepared data, the
    whole log's popularity clock and seen pairs, the fitted workflow, the two-tower model and its
    index, the config (negatives, candidates) and the generator that draws the negatives.
    """

    prepared: Prepared
    clock: PopularityClock
    seen: SeenBefore
    workflow: Workflow
    tower: TwoTower
    index: ItemIndex
    cfg: TrainConfig
    rng: np.random.Generator

    def build(
        self,
        interactions: pd.DataFrame,
        before: list[UserActivity],
        offset: int,
        positives: tuple[Examples, dict[str, np.ndarray]] | None = None,
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Rows for `interactions` (at `offset` in the log `seen` was built from), the user
        states `before` each; `positives`: their examples and workflow outputs, if already
        built. Returns inputs, labels and, per row, whether its positive was among the retrieval
        candidates."""
        pos_ex, pos_x = positives or self._examples(interactions, before)
        user_emb = self.tower.embed_users({k: pos_x[k] for k in USER_OUTPUTS})
        neg_items, in_candidates = hard_negatives(
            user_emb,
            self.index,
            interactions["item_id"].to_numpy(),
            interactions["user_id"].to_numpy(),
            offset + np.arange(len(interactions)),
            self.seen,
            self.cfg.negatives,
            self.cfg.candidates,
            self.rng,
        )
        neg_items = neg_items.reshape(-1)
        rep = np.repeat(np.arange(len(interactions)), self.cfg.negatives)
        neg_ex, neg_x = self._examples(interactions.iloc[rep], [before[i] for i in rep], neg_items)
        x = {k: np.concatenate([pos_x[k], neg_x[k]]) for k in pos_x}

        index = self.index
        item_emb = dict(zip(index.ids, index.index.reconstruct_n(0, len(index)), strict=True))
        recent = np.stack([_recent_vector(s.recent_items, item_emb) for s in before])
        pos_items = interactions["item_id"].to_numpy()
        x["dense"] = np.concatenate(
            [
                _dense(pos_ex, pos_x, pos_items, user_emb, recent, item_emb),
                _dense(neg_ex, neg_x, neg_items, user_emb[rep], recent[rep], item_emb),
            ]
        )
        y = np.r_[np.ones(len(pos_ex.frame)), np.zeros(len(neg_ex.frame))].astype(np.float32)
        return x, y, np.r_[in_candidates, in_candidates[rep]]

    def _examples(
        self, interactions: pd.DataFrame, before: list[UserActivity], item_ids=None
    ) -> tuple[Examples, dict[str, np.ndarray]]:
        examples = build_examples(interactions, before, self.prepared, self.clock, item_ids)
        return examples, self.workflow.transform(examples.frame)


def _dense(
    examples: Examples,
    x: dict[str, np.ndarray],
    items: np.ndarray,
    user_emb: np.ndarray,
    recent: np.ndarray,
    item_emb: dict,
) -> np.ndarray:
    """The ranker's dense features of rows with these items, users and recent-item vectors."""
    return dense_features(
        _similarity(user_emb, items, item_emb),
        examples.popularity,
        x["item_genres"],
        examples.affinity,
        examples.user_events,
        examples.idle_hours,
        _similarity(recent, items, item_emb),
    )


def _similarity(user_emb: np.ndarray, items: np.ndarray, item_emb: dict) -> np.ndarray:
    zero = np.zeros(user_emb.shape[1], dtype=np.float32)
    return np.einsum("nd,nd->n", user_emb, np.stack([item_emb.get(i, zero) for i in items]))


def _recent_vector(recent_items: list[str], item_emb: dict) -> np.ndarray:
    known = [item_emb[i] for i in recent_items if i in item_emb]
    return recent_vector(np.array(known).reshape(len(known), len(next(iter(item_emb.values())))))


def _write_state(out: Path, dataset: Dataset, train: pd.DataFrame, prepared) -> None:
    """The stream state after the training period: the features Feast starts from."""
    state = Artifacts(out).state
    (out / Artifacts.STATE).mkdir()
    users = pd.DataFrame([{"user_id": u, **vars(s)} for u, s in prepared.state.users.items()])
    items = pd.DataFrame([{"item_id": i, **vars(s)} for i, s in prepared.state.items.items()])
    users.to_parquet(state("user_activity"))
    items.to_parquet(state("item_stats"))
    dataset.users.to_parquet(state("user_profile"))
    seen = [
        {"user_id": u, "item_id": i, "ts_ms": int(t) * 1000}
        for u, i, t in zip(train["user_id"], train["item_id"], train["timestamp"], strict=True)
    ]
    pd.DataFrame(seen).to_parquet(state("seen"))
    end = max(s.popularity_ms for s in prepared.state.items.values())
    by_popularity = sorted(prepared.state.items.items(), key=lambda kv: -kv[1].at(end))
    (out / Artifacts.POPULAR).write_text(json.dumps([i for i, _ in by_popularity[:1000]]))
    pd.DataFrame([{"item_id": i, **p} for i, p in prepared.item_profiles.items()]).to_parquet(
        state("item_profile")
    )


def _json(o):
    if isinstance(o, np.generic):
        return o.item()
    return str(o)
