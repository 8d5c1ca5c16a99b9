"""Putting an artifact version into service on a running Triton, and taking it back.

A version is exported into the model repository as the next numbered version of each model
(`serving.triton_export.add_version`), loaded beside the one serving (Triton switches once it
is ready: no request fails), and pinned in the models' configuration so that a restarted Triton
serves it too. The artifact root's `current` link follows, and every change is logged with its
reasons in `decisions.jsonl` (`schemas.artifacts`).
"""

from __future__ import annotations

import time
from pathlib import Path

from schemas.artifacts import decisions, log_decision, point_current
from serving.arms import FILE, Arm, Arms
from serving.client import EXECUTOR, TritonRecommender
from serving.pool import TritonServers
from serving.triton_export import add_version, exported_layout, pin_version

SWITCHES = ("promoted", "rolled back")
Triton = TritonRecommender | TritonServers  # a change of versions goes to every server


def promote(artifacts: Path, root: Path, repository: Path, triton: Triton, why: dict) -> dict:
    """Serve `artifacts` (a version under `root`); the logged decision."""
    return _switch(artifacts, root, repository, triton, {"action": "promoted"} | why)


def rollback(root: Path, repository: Path, triton: Triton) -> dict:
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


def start_test(
    arms: list[tuple[str, Path, float]],
    root: Path,
    repository: Path,
    triton: Triton,
    salt: str,
) -> Arms:
    """Serve (name, artifact version, share) arms side by side: every version loaded on
    Triton, `ab.json` written for the workers (they route each user by hash within a second)."""
    if list(exported_layout(repository)) != [EXECUTOR]:
        raise ValueError("an A/B test needs the executor layout (`streamrec serve triton`)")
    numbers = [add_version(path, repository) for _, path, _ in arms]
    triton.serve_version(*numbers)
    pin_version(repository, *numbers)
    test = Arms(
        tuple(
            Arm(name, path.name, share, n)
            for (name, path, share), n in zip(arms, numbers, strict=True)
        ),
        salt,
    )
    test.save(root)
    log_decision(
        root, {"action": "A/B started", "version": "", "arms": [vars(a) for a in test.arms]}
    )
    return test


def stop_test(
    keep: str, root: Path, repository: Path, triton: Triton, drain_s: float = 2.0
) -> dict:
    """End the test: every user back on arm `keep`'s version, the others unloaded once the
    workers stopped routing to them (they re-read `ab.json` every second)."""
    test = Arms.load(root)
    if test is None:
        raise LookupError(f"no A/B test runs ({root / FILE} does not exist)")
    arm = next((a for a in test.arms if a.name == keep), None)
    if arm is None:
        raise LookupError(f"no arm {keep!r} (arms: {', '.join(a.name for a in test.arms)})")
    (root / FILE).unlink()
    time.sleep(drain_s)
    triton.serve_version(arm.triton_version)
    pin_version(repository, arm.triton_version)
    point_current(root, root / arm.version)
    return log_decision(root, {"action": "A/B stopped", "version": arm.version, "kept": keep})


class ExperimentRunning(RuntimeError):
    """Versions are not switched while an A/B test runs: it decides which version wins."""


def _switch(artifacts: Path, root: Path, repository: Path, triton: Triton, why: dict) -> dict:
    if Arms.load(root) is not None:
        raise ExperimentRunning(f"an A/B test runs ({root / FILE}): `streamrec ab stop` first")
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
