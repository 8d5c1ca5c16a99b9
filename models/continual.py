"""Continuous training: an artifact version's models, trained further on new events.

`Learner` starts from a version's Keras weights and the stream state after its training period,
and `learn(events)` fine-tunes the two towers and the ranker on the new events, warm-started
(a few passes at a small learning rate, the same losses and example builders as `models.train`):
the features of each event are those it had when it happened, and the ranker's negatives come
from the re-embedded catalog's own retrieval. `recommender()` is the updated four-stage model
in memory; `save()` writes it as a complete artifact version.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.data import Dataset, temporal_split
from models.examples import PopularityClock, SeenBefore, build_examples, prepare
from models.features import replay
from models.index import ItemIndex
from models.inputs import ITEM_OUTPUTS, USER_OUTPUTS
from models.recommender import Catalog, Recommender
from models.workflow import Workflow

ONNX_MODELS = ("user_tower", "item_tower", "ranker")


@dataclass
class ContinualConfig:
    retrieval_epochs: int = 2
    retrieval_learning_rate: float = 1e-3
    ranker_epochs: int = 1
    ranker_learning_rate: float = 1e-3
    seed: int = 0


class Learner:
    def __init__(self, artifacts: Path, dataset: Dataset, cfg: ContinualConfig | None = None):
        import keras

        from models.train import TrainConfig, load_models

        cfg = cfg or ContinualConfig()
        keras.utils.set_random_seed(cfg.seed)
        self.base = artifacts
        self.cfg = cfg
        self.manifest = json.loads((artifacts / "manifest.json").read_text())
        self.train_cfg = TrainConfig(**self.manifest["config"])
        split = temporal_split(dataset.interactions, self.train_cfg.split_quantile)
        self.prepared = prepare(dataset, split.train)
        self.users, self.items = dict(self.prepared.state.users), dict(self.prepared.state.items)
        self.log = split.train[["user_id", "item_id", "timestamp"]].reset_index(drop=True)
        self.workflow = Workflow.load(artifacts / "workflow.json")
        self.catalog = Catalog.build(self.workflow, self.prepared.item_profiles)
        self.tower, self.ranker = load_models(artifacts, self.workflow)
        self.index = ItemIndex.load(artifacts)
        self.rng = np.random.default_rng(cfg.seed)
        self.cycles: list[dict] = []
        self._recommender: Recommender | None = None

    def learn(self, events: pd.DataFrame) -> dict:
        """Fine-tune on `events` (time order, after everything learned so far)."""
        from models.ranking import fit_ranker
        from models.train import ranker_set

        started = time.time()
        events = events[["user_id", "item_id", "timestamp"]].reset_index(drop=True)
        offset = len(self.log)
        self.log = pd.concat([self.log, events], ignore_index=True)
        ts_ms = self.log["timestamp"].to_numpy().astype(np.int64) * 1000
        clock = PopularityClock(self.log["item_id"].to_numpy(), ts_ms)
        seen = SeenBefore(self.log["user_id"].to_numpy(), self.log["item_id"].to_numpy())
        state = replay(events, self.prepared.vectors, self.users, self.items)
        examples = build_examples(events, state.users_before, self.prepared, clock)
        x = self.workflow.transform(examples.frame)

        counts = self.log["item_id"].value_counts()
        log_q = np.log(counts.reindex(events["item_id"]).to_numpy() / counts.sum())
        tower_loss = self.tower.fit(
            {k: x[k] for k in USER_OUTPUTS},
            {k: x[k] for k in ITEM_OUTPUTS},
            log_q,
            epochs=self.cfg.retrieval_epochs,
            batch_size=self.train_cfg.retrieval_batch,
            learning_rate=self.cfg.retrieval_learning_rate,
        )
        self.index = ItemIndex.build(self.tower.embed_items(self.catalog.inputs), self.catalog.ids)
        rx, ry, _ = ranker_set(
            events,
            state.users_before,
            self.prepared,
            clock,
            self.workflow,
            self.tower,
            self.index,
            self.train_cfg,
            self.rng,
            seen,
            offset=offset,
            positives=(examples, x),
        )
        ranker_loss = fit_ranker(
            self.ranker,
            rx,
            ry,
            epochs=self.cfg.ranker_epochs,
            learning_rate=self.cfg.ranker_learning_rate,
            seed=self.cfg.seed + len(self.cycles),
            deep_lr_scale=self.train_cfg.ranker_deep_lr_scale,
        )
        self.users, self.items = state.users, state.items
        self._recommender = None
        cycle = {
            "events": len(events),
            "until_ts": int(events["timestamp"].max()),
            "retrieval_loss": tower_loss,
            "ranker_loss": ranker_loss,
            "seconds": round(time.time() - started, 2),
        }
        self.cycles.append(cycle)
        return cycle

    def recommender(self) -> Recommender:
        """The current models as the stage functions use them (ONNX, as served)."""
        if self._recommender is None:
            from models.onnx_export import onnx_session

            with tempfile.TemporaryDirectory() as tmp:
                paths = self._export(Path(tmp), ("user_tower", "ranker"))
                self._recommender = Recommender(
                    self.workflow,
                    onnx_session(paths["user_tower"]),
                    onnx_session(paths["ranker"]),
                    self.index,
                    self.catalog,
                )
        return self._recommender

    def save(self, root: Path, version: str | None = None) -> Path:
        """The current models as a complete artifact version under `root`: the base version's
        files, with the models, weights and index replaced and the lineage in the manifest."""
        from models.train import save_weights

        version = version or time.strftime("%Y%m%d-%H%M%S") + f"-{self.manifest['dataset']}-ct"
        out = root / version
        shutil.copytree(self.base, out, symlinks=True)
        self._export(out, ONNX_MODELS)
        save_weights(out, self.tower, self.ranker)
        self.index.save(out)
        manifest = self.manifest | {
            "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "parent": self.manifest["version"],
            "continual": {"config": asdict(self.cfg), "cycles": self.cycles},
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return out

    def _export(self, folder: Path, names) -> dict[str, Path]:
        from models.onnx_export import export_onnx

        models = {
            "user_tower": self.tower.user_tower,
            "item_tower": self.tower.item_tower,
            "ranker": self.ranker,
        }
        return {n: export_onnx(models[n], folder / f"{n}.onnx") for n in names}
