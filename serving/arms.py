"""A/B arms: artifact versions served side by side, each user in one arm by a hash of their id.

The split is deterministic and sticky (a user's arm depends only on the user id and the test's
salt), so the same user sees the same model for the whole test, on every worker. The arms live
in `<artifact_dir>/ab.json`, written by `streamrec ab start` and read by the workers; `attribute`
counts what each arm's recommendations led to, from the responses and interactions topics.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

FILE = "ab.json"


@dataclass(frozen=True)
class Arm:
    name: str
    version: str  # the artifact version it serves
    share: float  # of the users, in (0, 1]
    triton_version: int = 0  # the model version number on Triton


@dataclass(frozen=True)
class Arms:
    arms: tuple[Arm, ...]
    salt: str  # a new test, a new split

    def __post_init__(self):
        names = [a.name for a in self.arms]
        if not self.arms or len(set(names)) != len(names):
            raise ValueError(f"arms need distinct names, at least one: {names}")
        if any(not 0 < a.share <= 1 for a in self.arms):
            raise ValueError("each arm's share must be in (0, 1]")
        if not math.isclose(sum(a.share for a in self.arms), 1.0, abs_tol=1e-9):
            raise ValueError(f"the shares must add up to 1, not {sum(a.share for a in self.arms)}")

    def assign(self, user_id: str) -> Arm:
        """The user's arm: the user's point in [0, 1) by hash, against the cumulative shares."""
        digest = hashlib.blake2b(f"{self.salt}\0{user_id}".encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") / 2**64
        edge = 0.0
        for arm in self.arms:
            edge += arm.share
            if point < edge:
                return arm
        return self.arms[-1]  # rounding of the last edge

    def save(self, root: Path) -> Path:
        path = root / FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"salt": self.salt, "arms": [asdict(a) for a in self.arms]}))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, root: Path) -> Arms | None:
        """The running test, or None."""
        try:
            data = json.loads((root / FILE).read_text())
        except FileNotFoundError:
            return None
        return cls(tuple(Arm(**a) for a in data["arms"]), data["salt"])


class ArmsFile:
    """The arms as the workers see them: `ab.json` read again when it changes (one stat per
    `current()` call at most every `every_s` seconds)."""

    def __init__(self, root: Path, every_s: float = 1.0):
        self.root = root
        self.every_s = every_s
        self._checked = -math.inf
        self._mtime: float | None = None
        self._arms: Arms | None = None

    def current(self, now: float) -> Arms | None:
        if now - self._checked < self.every_s:
            return self._arms
        self._checked = now
        try:
            mtime = (self.root / FILE).stat().st_mtime
        except FileNotFoundError:
            self._mtime, self._arms = None, None
            return None
        if mtime != self._mtime:
            self._mtime, self._arms = mtime, Arms.load(self.root)
        return self._arms


@dataclass
class ArmCounts:
    requests: int = 0
    impressions: int = 0  # items shown
    clicks: int = 0  # interactions attributed to a shown item (each request-item pair once)
    by_request_id: int = 0  # of the clicks: matched by the request id the client passed
    versions: set[str] = field(default_factory=set)  # the model versions that answered
    clicked_items: set[tuple[str, str]] = field(default_factory=set, repr=False)

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0


def attribute(
    responses: Iterable[dict], interactions: Iterable[dict], window_ms: int
) -> dict[str, ArmCounts]:
    """Per arm: requests, items shown, and the interactions they led to.

    An interaction counts for the response named by its `context["request_id"]` when that
    response showed the item; otherwise for the user's latest response at most `window_ms`
    before it that showed the item. Each (response, item) pair counts once.
    """
    counts: dict[str, ArmCounts] = {}
    shown: dict[str, tuple[str, int, set[str]]] = {}  # request id → (arm, time, items)
    by_user: dict[str, list[tuple[int, str]]] = {}  # user → [(time, request id)], in time order
    for r in responses:
        if r.get("status") != "ok" or not r.get("arm"):
            continue
        arm = counts.setdefault(r["arm"], ArmCounts())
        items = {i["item_id"] for i in r["items"]}
        arm.requests += 1
        arm.impressions += len(items)
        arm.versions.add(r.get("model_version") or "")
        at = int(r.get("request_timestamp_ms") or r["timestamp_ms"])
        shown[r["request_id"]] = (r["arm"], at, items)
        by_user.setdefault(r["user_id"], []).append((at, r["request_id"]))
    for history in by_user.values():
        history.sort()
    for event in interactions:
        request_id = (event.get("context") or {}).get("request_id")
        match = (
            request_id if request_id in shown and event["item_id"] in shown[request_id][2] else None
        )
        direct = match is not None
        if match is None:
            match = _within_window(by_user.get(event["user_id"], []), shown, event, window_ms)
        if match is None:
            continue
        arm = counts[shown[match][0]]
        if (match, event["item_id"]) in arm.clicked_items:
            continue
        arm.clicked_items.add((match, event["item_id"]))
        arm.clicks += 1
        arm.by_request_id += direct
    return counts


def _within_window(history, shown, event, window_ms: int) -> str | None:
    at = int(event["timestamp_ms"])
    for t, request_id in reversed(history):
        if t > at:
            continue
        if at - t > window_ms:
            return None
        if event["item_id"] in shown[request_id][2]:
            return request_id
    return None


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default)."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def difference(a: ArmCounts, b: ArmCounts, z: float = 1.96) -> tuple[float, float, float]:
    """CTR of b minus a, with a normal-approximation 95 % interval."""
    d = b.ctr - a.ctr
    var = sum(c.ctr * (1 - c.ctr) / c.impressions for c in (a, b) if c.impressions)
    return d, d - z * math.sqrt(var), d + z * math.sqrt(var)
