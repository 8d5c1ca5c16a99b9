"""Trained artifacts: the files of one version (`Artifacts`, every file name in one place), the
versions under an artifact root, which is `current` (the version to serve), and the log of
promotion decisions (`decisions.jsonl`, one JSON object a line)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

DECISIONS = "decisions.jsonl"


@dataclass(frozen=True)
class Artifacts:
    """One version's folder, as `models.train` writes it and everything else reads it."""

    path: Path

    MANIFEST: ClassVar[str] = "manifest.json"  # version, data, config, metrics, files
    WORKFLOW: ClassVar[str] = "workflow.json"  # the fitted preprocessing workflow
    ITEMS: ClassVar[str] = "items.json"  # item id → profile (title, year, genres)
    ITEM_IDS: ClassVar[str] = "item_ids.json"  # the index's row order
    POPULAR: ClassVar[str] = "popular.json"  # the most popular items at the cut, best first
    INDEX: ClassVar[str] = "items.faiss"
    USER_TOWER: ClassVar[str] = "user_tower.onnx"
    ITEM_TOWER: ClassVar[str] = "item_tower.onnx"
    RANKER: ClassVar[str] = "ranker.onnx"
    WEIGHTS: ClassVar[str] = "weights"  # Keras weights, for continued training
    STATE: ClassVar[str] = "state"  # the state snapshot at the cut, one parquet file a table
    EVALUATION: ClassVar[str] = "evaluation.json"  # `streamrec evaluate`'s default output
    PREQUENTIAL: ClassVar[str] = "prequential.json"

    def state(self, table: str) -> Path:
        """A table of the state snapshot: user_activity, item_stats, user_profile, ..."""
        return self.path / self.STATE / f"{table}.parquet"

    def weights(self, model: str) -> Path:
        return self.path / self.WEIGHTS / f"{model}.weights.h5"

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / self.MANIFEST).read_text())

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def read(self, name: str) -> Any:
        """One of the JSON files."""
        return json.loads((self.path / name).read_text())


def current_artifacts(root: Path) -> Path:
    link = root / "current"
    if not (link / Artifacts.MANIFEST).exists():
        raise FileNotFoundError(f"no trained artifacts under {root}: run `streamrec train` first")
    return link.resolve()


def point_current(root: Path, version_dir: Path) -> None:
    """Point `current` at a version, atomically."""
    link = root / "current"
    tmp = root / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version_dir.name)
    tmp.replace(link)


def list_versions(root: Path) -> list[dict]:
    """Every complete version, oldest first: its manifest's summary and its folder."""
    out = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        manifest = folder / Artifacts.MANIFEST
        if folder.is_symlink() or not manifest.exists():
            continue
        m = json.loads(manifest.read_text())
        out.append(
            {
                "version": m["version"],
                "created": m.get("created", ""),
                "parent": m.get("parent"),
                "path": folder,
            }
        )
    return sorted(out, key=lambda v: v["created"])


def log_decision(root: Path, decision: dict) -> dict:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | decision
    with (root / DECISIONS).open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def decisions(root: Path) -> list[dict]:
    path = root / DECISIONS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
