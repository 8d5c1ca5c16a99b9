"""Continuous training on the live system: the trainer reads real interactions from the topic,
gates its candidates and switches Triton to the better one while requests flow; a worse one is
rejected; a rollback switches back. Every request must be answered, none with an error.
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import records
from fault_load import Live, Load
from records import wait_until
from test_faults import measure

from models.continual import ContinualConfig
from models.data import temporal_split
from schemas.artifacts import decisions
from serving.client import TritonRecommender
from serving.rollout import rollback
from serving.triton_export import read_config
from streams.kafka import EventConsumer, EventProducer
from streams.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.faults

CYCLE = 1800  # hold-out events per cycle; the newest half is the gate's window


def _produce_holdout(live: Live, events) -> None:
    producer = EventProducer(live.settings, live.stack.endpoint("kafka"))
    for u, i, t in zip(events["user_id"], events["item_id"], events["timestamp"], strict=True):
        producer.send("interactions", records.interaction(u, i, int(t) * 1000))
    producer.close()


def _versions_answered(load: Load) -> list[str]:
    """The versions that answered, in the order the answers arrived, repeats collapsed."""
    answers = sorted((got[0][2], got[0][1]) for got in list(load.responses.values()))
    ok = [r["model_version"] for _, r in answers if r["status"] == "ok"]
    return [version for version, _ in itertools.groupby(ok)]


def _shuffled(learn, rng):
    """Learning from the events with their items shuffled: a worse candidate on purpose."""

    def run(events):
        return learn(events.assign(item_id=rng.permutation(events["item_id"].to_numpy())))

    return run


def test_the_trainer_promotes_a_better_candidate_and_rejects_a_worse_one(live, movielens):
    root = live.settings.artifact_dir
    repository = live.stack.root / "triton" / "models"
    triton = TritonRecommender(live.stack.endpoint("triton"))
    base = triton.served_version()
    # The switch is under test here, not the size of the gain (within noise on this data, see
    # models.continual): a candidate is promoted unless it is clearly worse. Measured offline
    # on such windows: a warm-started candidate -0.007 ± 0.004, the shuffled one -0.06 to -0.14.
    cfg = TrainerConfig(every_events=CYCLE, gate_share=1 / 2, margin=-0.02)
    trainer = Trainer(movielens, root, repository, triton, cfg)
    quantile = json.loads((root / base / "manifest.json").read_text())["config"]["split_quantile"]
    holdout = temporal_split(movielens.interactions, quantile).test
    consumer = EventConsumer(
        live.settings,
        live.stack.endpoint("kafka"),
        ["interactions"],
        group=f"{live.settings.worker_group}-trainer",
    )
    with Load(live, "promotion", events_per_s=0, requests_per_s=20) as load:
        wait_until(lambda: len(load.responses) >= 20, 60, "requests to be answered")

        _produce_holdout(live, holdout.iloc[:CYCLE])
        trainer.run(consumer, stop=lambda: False, max_cycles=1)
        promoted = decisions(root)[-1]
        assert promoted["action"] == "promoted", promoted
        assert promoted["gate_events"] == CYCLE // 2 and promoted["points"] >= 20
        candidate = promoted["version"]
        assert triton.served_version() == candidate != base
        wait_until(lambda: candidate in _versions_answered(load), 30, "answers by the candidate")

        trainer.learner.learn = _shuffled(trainer.learner.learn, np.random.default_rng(0))
        trainer.learner.cfg = ContinualConfig(
            retrieval_epochs=3,
            retrieval_learning_rate=3e-2,
            ranker_epochs=3,
            ranker_learning_rate=3e-2,
            replay=0,  # older events would keep it sane
        )
        trainer.cfg.every_events = 2 * CYCLE  # a larger gate window: a clearer verdict
        _produce_holdout(live, holdout.iloc[CYCLE : 3 * CYCLE])
        trainer.run(consumer, stop=lambda: False, max_cycles=1)
        rejected = decisions(root)[-1]
        assert rejected["action"] == "rejected", rejected
        assert rejected["diff"] < cfg.margin
        assert triton.served_version() == candidate  # nothing switched
        lineage = json.loads((root / rejected["candidate"] / "manifest.json").read_text())
        assert lineage["parent"] == candidate  # kept for inspection, trained from the promoted one

        switching = time.monotonic()
        undone = rollback(root, repository, triton)
        switch = (switching, time.monotonic())
        assert (undone["action"], undone["version"]) == ("rolled back", base)
        assert triton.served_version() == base
        switched_back = time.monotonic()
        wait_until(
            lambda: load.first_ok_after(switched_back) is not None, 30, "answers after rollback"
        )
        load.settle()
    consumer.close()
    row = measure(live, load)
    assert row["answered"] == row["requests"] > 0, row
    # No request failed. On these two busy cores a request in flight in the ensemble when
    # Triton swaps it can miss its 1 s deadline on retry (1-2 of ~700 in two runs of six): it is
    # answered `expired`, never lost.
    errors = [got[0][1] for got in load.responses.values() if got[0][1]["status"] == "error"]
    assert not errors, errors[:3]
    assert row["errors"] <= 0.01 * row["requests"], row
    during = [
        got[0][2] - load.requests[rid]
        for rid, got in load.responses.items()
        if rid in load.requests and switch[0] <= load.requests[rid] <= switch[1]
    ]
    assert during, "no request was sent while Triton switched versions"
    p50, p99 = np.percentile(during, [50, 99]) * 1000
    print(
        f"{len(during)} requests sent during a {switch[1] - switch[0]:.1f} s switch: "
        f"latency p50 {p50:.0f} ms, p99 {p99:.0f} ms"
    )
    answered_by = _versions_answered(load)  # versions may interleave while one switches
    assert answered_by[0] == base and candidate in answered_by and answered_by[-1] == base
    pinned = read_config(repository / "executor" / "config.pbtxt").version_policy.specific.versions
    assert pinned == [1]
