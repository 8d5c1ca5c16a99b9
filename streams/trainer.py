"""`streamrec serve trainer`: keep training on the interactions topic; promote only what is better.

The trainer reads the interactions topic in its own consumer group and keeps every event in a
`models.continual.Learner` (which starts from the version Triton serves). Every `every_events`
events, or `every_s` seconds with at least `min_events` new ones, it runs a cycle, test then
train:

1. the newest `gate_share` of the new events is the gate's window: nothing has trained on it;
2. the older ones fine-tune the serving version's models, warm-started (`ContinualConfig`:
   the ranker; the towers and a re-embedded catalog when asked): the candidate, saved as a new
   artifact version;
3. candidate and serving version recommend at points of the gate window (features as of each
   point) and are compared by NDCG@10 of the users' next items. The candidate is promoted, and
   Triton switches to it with no failed request, only if it is better by more than `margin`;
   otherwise the learner goes back to the serving version's models;
4. the gate window's events are trained on in the next cycle.

Every decision is logged with its figures in the artifact root's `decisions.jsonl`.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from models.continual import ContinualConfig, Learner
from models.data import Dataset
from models.evaluate import EvalConfig
from models.recommender import Recommender
from schemas.artifacts import log_decision
from serving.arms import Arms
from serving.rollout import Triton, promote

log = logging.getLogger("streamrec.trainer")
COLUMNS = ["user_id", "item_id", "timestamp"]


@dataclass
class TrainerConfig:
    every_events: int = 5000
    every_s: float = 3600.0
    min_events: int = 200  # a timed cycle needs at least this many new events
    gate_share: float = 0.25
    margin: float = 0.0  # NDCG@10 the candidate must gain over the serving version
    min_gate_points: int = 20
    continual: ContinualConfig = field(default_factory=ContinualConfig)


class Trainer:
    def __init__(
        self,
        dataset: Dataset,
        root: Path,
        repository: Path,
        triton: Triton,
        cfg: TrainerConfig,
    ):
        self.root, self.repository, self.triton, self.cfg = root, repository, triton, cfg
        self.serving = root / triton.served_version()
        self.learner = Learner(self.serving, dataset, cfg.continual)
        self.pending: list[dict] = []  # events not trained on yet, oldest first
        self.last_cycle = time.monotonic()

    def add(self, user_id: str, item_id: str, timestamp_ms: int) -> None:
        self.pending.append(
            {"user_id": user_id, "item_id": item_id, "timestamp": timestamp_ms // 1000}
        )

    def due(self) -> bool:
        if len(self.pending) >= self.cfg.every_events:
            return True
        waited = time.monotonic() - self.last_cycle >= self.cfg.every_s
        return waited and len(self.pending) >= self.cfg.min_events

    def cycle(self) -> dict:
        """Train, gate and maybe promote; the logged decision."""
        started, cpu = time.monotonic(), time.process_time()
        self.last_cycle = time.monotonic()
        # Partitions interleave: in time order, the gate's window is the newest events.
        events = pd.DataFrame(self.pending, columns=COLUMNS).sort_values("timestamp", kind="stable")
        cut = len(events) - max(1, int(len(events) * self.cfg.gate_share))
        train, gate = events.iloc[:cut], events.iloc[cut:]
        self.learner.learn(train)
        self.pending = gate.to_dict("records")
        points = self.learner.points(gate, EvalConfig(points_per_user=3, horizon=10))
        figures = {"train_events": len(train), "gate_events": len(gate)}
        if len(points) < self.cfg.min_gate_points:
            self.learner.restore(self.serving)
            return self._log("skipped", figures | {"points": len(points)}, started, cpu)
        candidate = self.learner.save(self.root)
        figures |= self.learner.compare(points, Recommender.load(self.serving))
        figures |= {"candidate": candidate.name, "serving": self.serving.name}
        if figures["diff"] > self.cfg.margin and Arms.load(self.root) is None:
            reason = f"NDCG@10 {figures['diff']:+.4f} > margin {self.cfg.margin}"
            figures |= {"reason": reason} | self._costs(started, cpu)
            decision = promote(candidate, self.root, self.repository, self.triton, figures)
            self.serving = candidate
            return decision
        if figures["diff"] > self.cfg.margin:
            figures["reason"] = "better, but an A/B test runs: not promoted"
        self.learner.restore(self.serving)
        return self._log("rejected", figures, started, cpu)

    def run(self, consumer, stop, max_cycles: int | None = None) -> None:
        """Feed the interactions `consumer` (streams.kafka.EventConsumer) reads and run the
        cycles that fall due, until `stop()` or `max_cycles`; offsets are committed after each
        cycle."""
        cycles = 0
        while not stop() and (max_cycles is None or cycles < max_cycles):
            event = consumer.poll(0.5)
            if event is not None and event.error is None:
                r = event.value
                self.add(r["user_id"], r["item_id"], int(r["timestamp_ms"]))
            if self.due():
                decision = self.cycle()
                consumer.commit()
                cycles += 1
                log.info("trainer cycle %d: %s", cycles, decision)

    def _log(self, action: str, figures: dict, started: float, cpu: float) -> dict:
        return log_decision(self.root, {"action": action} | figures | self._costs(started, cpu))

    @staticmethod
    def _costs(started: float, cpu: float) -> dict:
        return {
            "cycle_s": round(time.monotonic() - started, 2),
            "cpu_s": round(time.process_time() - cpu, 2),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
