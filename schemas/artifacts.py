"""The artifact versions under an artifact root: what exists, which is `current` (the version
to serve), and the log of promotion decisions (`decisions.jsonl`, one JSON object a line)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

DECISIONS = "decisions.jsonl"


def current_artifacts(root: Path) -> Path:
    link = root / "current"
    if not (link / "manifest.json").exists():
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
        manifest = folder / "manifest.json"
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
