"""The catalog as the serving stages see it, in memory: one row per item (the retrieval index's
row order, then items added after training), with the item features, the live time-decayed
popularity and availability. Kept current from Redis's change stream (`state.store`): one
read per batch applies what the stream processors changed since the last one, so no request
decodes per-candidate state.

Popularity is the same float64 sum as the `{p}:popular:{shard}` sorted sets (each item's deltas
are added in the same order), so ranking and scores match the state exactly, replay after replay.
"""

from __future__ import annotations

import json
import logging
from functools import cached_property
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from models.inputs import item_row, item_table, item_tower_inputs
from models.workflow import Workflow
from schemas.artifacts import Artifacts
from state.features import decay

log = logging.getLogger(__name__)
# What the table loads from the artifacts (the index and item tower only when retrieval asks).
FILES = (
    Artifacts.MANIFEST,
    Artifacts.WORKFLOW,
    Artifacts.ITEM_IDS,
    Artifacts.ITEMS,
    Artifacts.POPULAR,
    Artifacts.INDEX,
    Artifacts.ITEM_TOWER,
)


class LiveItems:
    def __init__(self, artifacts: Path, state):
        from threadpoolctl import threadpool_limits

        # The stages compute on small batches: numpy's OpenBLAS threads would only spin in
        # sched_yield between calls (half of a Triton stub's CPU at 150 req/s went there).
        threadpool_limits(1)
        self.artifacts = artifacts
        self.version: str = Artifacts(artifacts).version
        self.state = state  # state.store.RedisState
        self.ids: list[str] = Artifacts(artifacts).read(Artifacts.ITEM_IDS)
        self.row: dict[str, int] = {i: n for n, i in enumerate(self.ids)}
        self.raw_ids: list[bytes] = [i.encode() for i in self.ids]  # as they go on the wire
        self.raw_row: dict[bytes, int] = {i: n for n, i in enumerate(self.raw_ids)}
        self._profiles: dict[str, dict] = {}  # items changed after training, until `features`
        # Backfill order after the live ranking: the artifacts' popular list, then row order.
        popular = Artifacts(artifacts).read(Artifacts.POPULAR)
        fallback = {i: n for n, i in enumerate(popular)}
        self.fallback_rank = np.array(
            [fallback.get(i, len(fallback) + n) for n, i in enumerate(self.ids)], dtype=np.float64
        )
        self.popularity = np.zeros(len(self.ids), dtype=np.float64)
        self.unavailable = np.zeros(len(self.ids), dtype=bool)
        self.epoch = 0
        self._unknown_unavailable: set[str] = set()
        self._last: dict[int, tuple[bytes, int]] = {}  # shard → (stream id, entry number) read
        self._top: np.ndarray | None = None  # rows in backfill order, cached until a change
        self.reload()

    # --- reading -------------------------------------------------------------------------------
    def rows(self, ids) -> np.ndarray:
        """Rows of these item ids (all str or all bytes); unknown ids are dropped."""
        ids = list(ids)
        if not ids:
            return np.zeros(0, dtype=np.int64)
        index = self.raw_row if isinstance(ids[0], bytes) else self.row
        rows = np.fromiter(map(index.get, ids, repeat(-1)), dtype=np.int64, count=len(ids))
        return rows[rows >= 0]

    def popularity_at(self, rows: np.ndarray, now_ms: int) -> np.ndarray:
        """Time-decayed interaction counts of these rows at `now_ms`."""
        return self.popularity[rows] * float(decay(now_ms - self.epoch))

    def top(self, n: int) -> np.ndarray:
        """The first `n` rows in backfill order: by live popularity, then the artifacts'
        popular list, then row order."""
        n = min(n, len(self.ids))
        if self._top is None or len(self._top) < n:
            key = np.where(self.popularity > 0, -self.popularity, self.fallback_rank)
            m = min(max(n, 2 * len(self._top) if self._top is not None else n), len(key))
            pick = np.argpartition(key, m - 1)[:m] if m < len(key) else np.arange(len(key))
            self._top = pick[np.lexsort((pick, key[pick]))]
        return self._top[:n]

    @cached_property
    def workflow(self) -> Workflow:
        return Workflow.load(self.artifacts / Artifacts.WORKFLOW)

    @cached_property
    def features(self) -> dict[str, np.ndarray]:
        """The item tower's inputs of every item (the stages' item tensors among them), loaded
        by the first stage that asks for them, in one batch transform of the workflow."""
        profiles = Artifacts(self.artifacts).read(Artifacts.ITEMS) | self._profiles
        return item_table(self.workflow, self.ids, profiles, self._inputs)

    @cached_property
    def _inputs(self) -> tuple[str, ...]:
        return item_tower_inputs(self.workflow)

    @cached_property
    def index(self):
        """The retrieval index (loaded by the first stage that asks for it)."""
        import faiss

        from models.index import ItemIndex

        # Batches are small and the stages share the cores: OpenMP's spinning threads only
        # contend with them (a batch of 32 searches ran 2.6x slower with two threads here).
        faiss.omp_set_num_threads(1)
        # Exact search of 20+ queries switches to a BLAS product that rounds differently: keep
        # every query on one code path, so a request's candidates never depend on its batch.
        faiss.cvar.distance_compute_blas_threshold = 2**30
        index = ItemIndex.load(self.artifacts)
        if index.ids != self.ids[: len(index.ids)]:
            raise ValueError("items.faiss / item_ids.json do not match")
        if len(self.ids) > len(index.ids):
            self._embed(self.ids[len(index.ids) :], index)
        return index

    @cached_property
    def vectors(self) -> np.ndarray:
        """Every row's item embedding, as in the index (a copy, for gathers by row)."""
        return self.index.index.reconstruct_n(0, len(self.ids))

    # --- keeping current -----------------------------------------------------------------------
    def sync(self) -> int:
        """Apply the change streams since the last call (one round trip when nothing is new);
        reload everything when entries were trimmed before this reader saw them."""
        applied = 0
        while True:
            found = self.state.changes({s: last for s, (last, _) in self._last.items()})
            for shard, entries in found.items():
                for entry_id, fields in entries:
                    n = int(fields[b"n"])
                    if n != self._last[shard][1] + 1:
                        log.info("change stream %d trimmed past entry %d: reloading", shard, n)
                        self.reload()
                        return applied
                    kind = fields[b"kind"].decode()
                    if kind == "reset":  # a new load: the snapshot covers every entry after it
                        self.reload()
                        return applied + 1
                    self._apply(kind, json.loads(fields[b"data"]))
                    self._last[shard] = (entry_id, n)
                    applied += 1
            if all(len(entries) < 1000 for entries in found.values()):
                return applied

    def reload(self) -> None:
        snap = self.state.snapshot()
        self.epoch = snap["epoch"]
        self.popularity[:] = 0.0
        self._apply("catalog", snap["catalog"])
        for item, score in snap["popularity"].items():
            if (r := self.row.get(item)) is not None:
                self.popularity[r] = score
        self.unavailable[:] = False
        self._unknown_unavailable = set()
        self._apply("available", [[i, False] for i in snap["unavailable"]])
        self._last = dict(snap["last"])
        self._top = None

    def _apply(self, kind: str, data: Any) -> None:
        if kind == "popularity":
            for item, weight in data:  # exact decimal strings
                if (r := self.row.get(item)) is not None:
                    self.popularity[r] += float(weight)
            self._top = None
        elif kind == "available":
            for item, available in data:
                r = self.row.get(item)
                if r is not None:
                    self.unavailable[r] = not available
                elif available:
                    self._unknown_unavailable.discard(item)
                else:
                    self._unknown_unavailable.add(item)
        elif kind == "catalog":
            self._add_items(data)

    def _add_items(self, profiles: dict[str, dict]) -> None:
        """New items get a row (and an embedding once the index is loaded); known ones get their
        features updated."""
        new = [i for i in profiles if i not in self.row]
        start = len(self.ids)
        for n, item in enumerate(new):
            self.row[item] = start + n
            self.raw_row[item.encode()] = start + n
        self.ids.extend(new)
        self.raw_ids.extend(i.encode() for i in new)
        if "features" not in self.__dict__:
            self._profiles |= profiles
        else:
            changed = [i for i in profiles if i not in new]
            for item in changed:
                out = self._features(item, profiles[item])
                for name in self._inputs:
                    self.features[name][self.row[item]] = out[name]
            if new:
                rows = [self._features(i, profiles[i]) for i in new]
                for name in self._inputs:
                    added = np.stack([r[name] for r in rows])
                    self.features[name] = np.concatenate([self.features[name], added])
        if not new:
            return
        self.fallback_rank = np.concatenate(
            [self.fallback_rank, len(self.fallback_rank) + np.arange(len(new), dtype=np.float64)]
        )
        self.popularity = np.concatenate([self.popularity, np.zeros(len(new))])
        flags = [i in self._unknown_unavailable for i in new]
        self.unavailable = np.concatenate([self.unavailable, np.array(flags, dtype=bool)])
        self._unknown_unavailable -= set(new)
        self._top = None
        if "index" in self.__dict__:
            self._embed(new, self.index)

    def _embed(self, items: list[str], index) -> None:
        from models.onnx_export import run_onnx

        rows = self.rows(items)
        inputs = {name: values[rows] for name, values in self.features.items()}
        embeddings = run_onnx(self._item_tower, inputs)
        index.add(embeddings, items)
        if "vectors" in self.__dict__:
            self.vectors = np.concatenate([self.vectors, embeddings.astype(np.float32)])

    @cached_property
    def _item_tower(self):
        from models.onnx_export import onnx_session

        return onnx_session(self.artifacts / Artifacts.ITEM_TOWER)

    def _features(self, item: str, profile: dict | None) -> dict[str, np.ndarray]:
        return self.workflow.transform_one(item_row(item, profile), self._inputs)
