"""Putting an artifact version into service on a running Triton, and taking it back.

A version is exported into the model repository as the next numbered version of each model
(`serving.triton_export.add_version`), loaded beside the one serving (Triton switches once it
is ready: no request fails), and pinned in the models' configuration so that a restarted Triton
serves it too. The artifact root's `current` link follows, and every change is logged with its
reasons in `decisions.jsonl` (`models.versions`).
"""

from __future__ import annotations

import time
from pathlib import Path

from models.versions import decisions, log_decision, point_current
from serving.client import TritonRecommender
from serving.triton_export import add_version, pin_version

SWITCHES = ("promoted", "rolled back")


def promote(
    artifacts: Path, root: Path, repository: Path, triton: TritonRecommender, why: dict
) -> dict:
    """Serve `artifacts` (a version under `root`); the logged decision."""
    return _switch(artifacts, root, repository, triton, {"action": "promoted"} | why)


def rollback(root: Path, repository: Path, triton: TritonRecommender) -> dict:
    """Serve again the version the last switch replaced; the logged decision."""
    switches = [d for d in decisions(root) if d["action"] in SWITCHES]
    if not switches:
        raise LookupError(f"nothing to roll back: {root / 'decisions.jsonl'} records no switch")
    return _switch(
        root / switches[-1]["previous"],
        root,
        repository,
        triton,
        {"action": "rolled back", "reason": f"undo {switches[-1]['version']}"},
    )


def _switch(
    artifacts: Path, root: Path, repository: Path, triton: TritonRecommender, why: dict
) -> dict:
    started = time.monotonic()
    previous = triton.served_version()
    number = add_version(artifacts, repository)
    triton.serve_version(number)
    pin_version(repository, number)
    point_current(root, artifacts)
    return log_decision(
        root,
        why
        | {
            "version": artifacts.name,
            "previous": previous,
            "triton_version": number,
            "switch_s": round(time.monotonic() - started, 2),
        },
    )
