"""Artifact versions and their Triton model versions, on disk (no servers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.artifacts import (
    current_artifacts,
    decisions,
    list_versions,
    log_decision,
    point_current,
)
from serving.live import FILES
from serving.operators import GRAPH
from serving.triton_export import (
    ENSEMBLE,
    LAYOUTS,
    add_version,
    exported_layout,
    pin_version,
    read_config,
    versions,
)


def _version(root: Path, name: str, created: str, parent: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for file in {*FILES, *(f for op in GRAPH.operators for f in op.files)}:
        (folder / file).write_text("{}")
    manifest = {"version": name, "created": created, "parent": parent}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture()
def repository(tmp_path) -> Path:
    """An exported executor-layout repository holding version 1 (config only: no Triton)."""
    repo = tmp_path / "models"
    for name in LAYOUTS["executor"]:
        (repo / name).mkdir(parents=True)
        policy = "version_policy { specific { versions: 1 } }"
        (repo / name / "config.pbtxt").write_text(f'name: "{name}"\n{policy}\n')
    (repo / ENSEMBLE).mkdir()
    return repo


def test_new_versions_are_numbered_after_the_last_and_reused_when_exported(tmp_path, repository):
    a = _version(tmp_path / "artifacts", "a", "1")
    b = _version(tmp_path / "artifacts", "b", "2")
    assert exported_layout(repository) == LAYOUTS["executor"]
    assert (add_version(a, repository), add_version(b, repository)) == (1, 2)
    assert add_version(a, repository) == 1  # already there: nothing written
    assert versions(repository) == {1: "a", 2: "b"}
    assert (repository / "executor" / "2" / "artifacts" / "manifest.json").exists()
    assert (repository / "executor" / "2" / "model.py").exists()


def test_pinning_rewrites_only_the_version_policy(repository):
    pin_version(repository, 7)
    config = read_config(repository / "executor" / "config.pbtxt")
    assert [field.name for field, _ in config.ListFields()] == ["name", "version_policy"]
    assert config.name == "executor" and config.version_policy.specific.versions == [7]


def test_current_and_the_decision_log(tmp_path):
    root = tmp_path / "artifacts"
    old, new = _version(root, "old", "2026-01-01"), _version(root, "new", "2026-02-01", "old")
    point_current(root, old)
    assert current_artifacts(root) == old.resolve()
    point_current(root, new)
    assert current_artifacts(root) == new.resolve()
    assert [(v["version"], v["parent"]) for v in list_versions(root)] == [
        ("old", None),
        ("new", "old"),
    ]
    log_decision(root, {"action": "promoted", "version": "new", "previous": "old"})
    log_decision(root, {"action": "rejected", "candidate": "x"})
    assert [d["action"] for d in decisions(root)] == ["promoted", "rejected"]
    assert all("time" in d for d in decisions(root))


def test_no_artifacts_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="streamrec train"):
        current_artifacts(tmp_path)
