"""Replay a data set's hold-out period through the live system.

The timeline is the hold-out interactions in time order, with a recommendation request inserted
just before chosen interactions of a user (the points of the offline evaluation, so the served
quality can be compared with the offline figure on exactly the same points), plus optional
bad events. In barrier mode (the default) every request is produced only once all interactions
before it are fully processed, so the live state at each request is the state the offline
evaluation computes, and two replays from the same start give the same responses.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fastavro

from models.data import Dataset, temporal_split
from models.evaluate import EvalConfig, Point, full_pipeline, most_popular, replay_points
from models.examples import prepare
from models.metrics import ndcg_at_k, recall_at_k
from models.recommender import Recommender
from schemas.artifacts import Artifacts
from schemas.records import Interaction, RecommendationRequest
from schemas.serde import SingleObjectSerde, schema_text
from schemas.settings import Settings
from streams.kafka import EventProducer, ResponseStream


@dataclass
class Step:
    role: str  # interactions | requests | raw:<role> (bytes sent as they are)
    record: dict | bytes
    point: Point | None = None


@dataclass
class Timeline:
    steps: list[Step]
    points: list[Point]
    offline: dict[str, dict[str, float]]  # recommender → metrics on the same points
    bad: dict[str, int] = field(default_factory=dict)  # injected bad events by kind

    @property
    def requests(self) -> list[Step]:
        return [s for s in self.steps if s.role == "requests"]


def build_timeline(
    dataset: Dataset,
    artifacts: Path,
    max_users: int = 100,
    points_per_user: int = 2,
    k: int = 10,
    seed: int = 0,
    inject_bad: bool = True,
    max_interactions: int | None = None,
) -> Timeline:
    """The hold-out as events, requests at evaluation points, the offline figures for them."""
    manifest = Artifacts(artifacts).manifest
    cfg = manifest["config"]
    split = temporal_split(dataset.interactions, cfg["split_quantile"])
    test = split.test if max_interactions is None else split.test.iloc[:max_interactions]
    prepared = prepare(dataset, split.train)
    rec = Recommender.load(artifacts)
    eval_cfg = EvalConfig(
        points_per_user, max_users=max_users, candidates=cfg["candidates"], seed=seed
    )
    points = replay_points(rec, prepared, split.train, test, eval_cfg)
    offline = {
        "most-popular": _score(most_popular(rec), points, k),
        "four-stage": _score(full_pipeline(rec, prepared, cfg["candidates"]), points, k),
    }
    at = {p.position: p for p in points}
    steps = []
    for n, r in enumerate(test.itertuples(index=False)):
        if n in at:
            steps.append(Step("requests", _request(at[n], k, seed), at[n]))
        steps.append(
            Step("interactions", _interaction(r.user_id, r.item_id, int(r.timestamp), n, seed))
        )
    bad = _inject_bad(steps, seed) if inject_bad else {}
    return Timeline(steps, points, offline, bad)


def _request(p: Point, k: int, seed: int) -> dict:
    return RecommendationRequest(
        p.user,
        k,
        context={"source": "replay"},
        temperature=0.0,
        seed=seed,
        timestamp_ms=p.ts_ms,
        request_id=f"replay-{seed}-{p.user}-{p.ts_ms}",
    ).to_record()


def _interaction(user: str, item: str, ts: int, n: int, seed: int) -> dict:
    return Interaction(
        user, item, "rating", timestamp_ms=ts * 1000, event_id=f"replay-{seed}-{n}"
    ).to_record()


def _inject_bad(steps: list[Step], seed: int) -> dict[str, int]:
    """Bad events spread through the timeline: each must be answered or dead-lettered."""
    extended = json.loads(schema_text("interaction"))
    extended["fields"].append({"name": "unexpected", "type": "string"})
    unknown_fields = SingleObjectSerde("x", fastavro.parse_schema(extended))
    t = steps[len(steps) // 2].record["timestamp_ms"]
    sample = _interaction("1", "1", t // 1000, 0, seed)
    bad = [
        Step("raw:interactions", b"\x00\x01 not an event"),
        Step("raw:interactions", unknown_fields.encode(sample | {"unexpected": "field"})),
        Step("raw:requests", b"garbage request"),
        Step(
            "requests",
            {**_request(_cold_point(t), 10, seed), "k": 0, "request_id": f"replay-{seed}-bad-k"},
        ),
        Step(
            "requests",
            {**_request(_cold_point(t), 10, seed), "request_id": f"replay-{seed}-unknown-user"},
        ),
        Step("interactions", _interaction("replay-new-user", "no-such-item", t // 1000, -1, seed)),
    ]
    for n, step in enumerate(bad):
        steps.insert((n + 1) * len(steps) // (len(bad) + 1), step)
    return {
        "undecodable": 2,
        "garbage_request": 1,
        "invalid_k": 1,
        "unknown_user": 1,
        "unknown_item": 1,
    }


def _cold_point(ts_ms: int) -> Point:
    return Point("replay-unknown-user", ts_ms, None, set(), None, set(), False, -1, [])


def _score(recommend, points: list[Point], k: int) -> dict[str, float]:
    lists = [recommend(p, k) for p in points]
    return metrics_of(lists, [p.relevant for p in points], k)


def metrics_of(lists: list[list[str]], relevant: list[set[str]], k: int) -> dict[str, float]:
    n = max(len(lists), 1)
    return {
        f"recall@{k}": sum(recall_at_k(r, rel, k) for r, rel in zip(lists, relevant, strict=True))
        / n,
        f"ndcg@{k}": sum(ndcg_at_k(r, rel, k) for r, rel in zip(lists, relevant, strict=True)) / n,
    }


@dataclass
class ReplayResult:
    produced: dict[str, int]
    seconds: float
    acked_before: dict[str, set[str]]  # request id → the user's items processed before it


class Recorder:
    """Consumes the recommendations topic in a background thread, keeping every response and
    when the first one to each request arrived (`time.perf_counter()`). `idle_backoff_s`: as
    `ResponseStream`'s (a reader that costs little between answers: the benchmarks)."""

    def __init__(self, settings: Settings, bootstrap: str, idle_backoff_s: float = 0.0):
        self._settings, self._bootstrap = settings, bootstrap
        self._idle_backoff_s = idle_backoff_s
        self.responses: dict[str, list[dict]] = {}
        self.arrived: dict[str, float] = {}
        self._changed = threading.Condition()
        self._stream: ResponseStream | None = None

    def __enter__(self) -> Recorder:
        group = f"replay-recorder-{uuid.uuid4().hex[:8]}"
        self._stream = ResponseStream(
            self._settings, self._bootstrap, self._keep, group, idle_backoff_s=self._idle_backoff_s
        )
        return self

    def __exit__(self, *exc) -> None:
        self._stream.close()

    def _keep(self, response: dict) -> None:
        arrived = time.perf_counter()
        with self._changed:
            self.arrived.setdefault(response["request_id"], arrived)
            self.responses.setdefault(response["request_id"], []).append(response)
            self._changed.notify_all()

    def wait(self, request_ids: set[str], timeout: float) -> bool:
        """Until every id has a response (or `timeout` seconds); True if all arrived."""
        with self._changed:
            done = self._changed.wait_for(lambda: request_ids <= self.responses.keys(), timeout)
        return done

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for rid in sorted(self.responses):
                for response in self.responses[rid]:
                    f.write(json.dumps(response) + "\n")


def produce_timeline(
    timeline: Timeline,
    settings: Settings,
    bootstrap: str,
    recorder: Recorder,
    acked: Callable[[], int] | None,
    speed: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    timeout: float = 120.0,
) -> ReplayResult:
    """Produce the steps in order.

    With `acked` (the processed-interaction counter) the replay is a strict sequence: each
    request waits until every interaction before it is processed, and the interactions after
    it wait for its response, so the state each request sees is exactly the timeline's state
    at that point. Without it, events flow freely (`speed`: N× event time; None: at once).
    """
    producer = EventProducer(settings, bootstrap)
    start_acked = acked() if acked else 0
    produced = {"interactions": 0, "requests": 0, "raw": 0}
    seen: dict[str, set[str]] = {}
    acked_before: dict[str, set[str]] = {}
    started = time.monotonic()
    first_ts = None
    for n, step in enumerate(timeline.steps):
        if speed and isinstance(step.record, dict):
            ts = step.record["timestamp_ms"]
            first_ts = ts if first_ts is None else first_ts
            lag = (ts - first_ts) / 1000 / speed - (time.monotonic() - started)
            if lag > 0:
                time.sleep(lag)
        if step.role.startswith("raw:"):
            producer.send_raw(step.role[4:], step.record, key=b"replay")
            produced["raw"] += 1
        elif step.role == "requests":
            rid = step.record["request_id"]
            if acked:
                producer.flush()
                _wait(acked, start_acked + produced["interactions"], timeout)
                acked_before[rid] = set(seen.get(step.record["user_id"], ()))
            producer.send("requests", step.record)
            produced["requests"] += 1
            if acked:
                producer.flush()
                if not recorder.wait({rid}, timeout):
                    raise TimeoutError(f"no response to {rid} within {timeout:.0f} s")
        else:
            producer.send("interactions", step.record)
            seen.setdefault(step.record["user_id"], set()).add(step.record["item_id"])
            produced["interactions"] += 1
        if progress and n % 500 == 0:
            progress(n, len(timeline.steps))
    producer.close()
    if progress:
        progress(len(timeline.steps), len(timeline.steps))
    return ReplayResult(produced, time.monotonic() - started, acked_before)


def _wait(acked: Callable[[], int], target: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while acked() < target:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"interactions not processed within {timeout:.0f} s: are the "
                "stream workers running?"
            )
        time.sleep(0.002)


def served_quality(timeline: Timeline, responses: dict[str, list[dict]], k: int) -> dict:
    """Served metrics on the timeline's evaluation points, beside the offline ones."""
    lists, relevant = [], []
    for step in timeline.requests:
        if step.point is None or not step.point.relevant:
            continue
        answers = responses.get(step.record["request_id"])
        lists.append([i["item_id"] for i in answers[0]["items"]] if answers else [])
        relevant.append(step.point.relevant)
    return {"served": metrics_of(lists, relevant, k), **timeline.offline}
