"""Typed records of every topic: what producers build and consumers read.

Each class mirrors its `.avsc` file field for field (names and defaults;
`tests/unit/test_records.py` checks it), so a record built here always encodes. Required fields
that a caller rarely has at hand get generated values: ids are fresh UUIDs, times are now.
`to_record()` gives the dict the serde writes; `from_record()` reads a decoded dict back.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeVar

EventType = Literal["view", "click", "add_to_cart", "purchase", "rating"]
Status = Literal["ok", "error", "expired"]
EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase", "rating")


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


R = TypeVar("R", bound="_Record")


class _Record:
    SCHEMA: ClassVar[str]  # the .avsc file's stem

    def to_record(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_record(cls: type[R], record: dict[str, Any]) -> R:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in record.items() if k in names})


@dataclass(frozen=True)
class Interaction(_Record):
    """A user interacted with an item (keyed by user). `event_id` makes it idempotent: the
    same id applied twice takes effect once."""

    SCHEMA: ClassVar[str] = "interaction"
    user_id: str
    item_id: str
    event_type: EventType = "view"
    value: float | None = None
    timestamp_ms: int = field(default_factory=now_ms)
    event_id: str = field(default_factory=new_id)
    session_id: str | None = None
    context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemUpdate(_Record):
    """A catalog change for one item (keyed by item); the newest timestamp wins."""

    SCHEMA: ClassVar[str] = "item_update"
    item_id: str
    available: bool = True
    title: str | None = None
    year: int | None = None
    genres: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    timestamp_ms: int = field(default_factory=now_ms)


@dataclass(frozen=True)
class RecommendationRequest(_Record):
    """Ask for k items for one user; answered once, with the same `request_id`."""

    SCHEMA: ClassVar[str] = "recommendation_request"
    user_id: str
    k: int = 10
    exclude: list[str] = field(default_factory=list)
    context: dict[str, str] = field(default_factory=dict)
    temperature: float | None = None  # None: the server's default; 0: greedy
    seed: int | None = None
    deadline_ms: int | None = None  # answer before this time or not at all (`expired`)
    timestamp_ms: int = field(default_factory=now_ms)
    request_id: str = field(default_factory=new_id)
    explain: bool = False


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float


@dataclass(frozen=True)
class StageStats:
    name: str
    candidates_in: int
    candidates_out: int
    duration_ms: float
    batch_size: int = 1


@dataclass(frozen=True)
class Explanation:
    """Why an item is where it is: see `schemas/recommendation_response.avsc`."""

    item_id: str
    source: str  # retrieval, popular (a cold-start user's candidates) or backfill
    retrieval_rank: int  # 1-based; 0 for backfill
    retrieval_score: float
    ranker_score: float
    score_rank: int  # 1-based among the filtered candidates; 0 for backfill
    ordering: str
    features: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RecommendationResponse(_Record):
    """The answer to one request: `status` ok (with items), error (with the reason) or expired
    (the deadline passed first)."""

    SCHEMA: ClassVar[str] = "recommendation_response"
    request_id: str
    user_id: str
    status: Status = "error"
    error: str | None = None
    items: list[ScoredItem] = field(default_factory=list)
    removed: dict[str, int] = field(default_factory=dict)
    path: str = ""
    model_version: str = ""
    stages: list[StageStats] = field(default_factory=list)
    request_timestamp_ms: int = 0
    timestamp_ms: int = field(default_factory=now_ms)
    backfilled: int = 0
    note: str | None = None
    arm: str = ""  # the A/B arm that served it, if a test runs
    explanations: list[Explanation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def item_ids(self) -> list[str]:
        return [i.item_id for i in self.items]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RecommendationResponse:
        record = dict(record)
        record["items"] = [ScoredItem(**i) for i in record.get("items", [])]
        record["stages"] = [StageStats(**s) for s in record.get("stages", [])]
        record["explanations"] = [Explanation(**e) for e in record.get("explanations", [])]
        return super().from_record(record)


@dataclass(frozen=True)
class DeadLetter(_Record):
    """An event a processor could not handle, verbatim, with where it came from and why."""

    SCHEMA: ClassVar[str] = "dead_letter"
    topic: str
    partition: int
    offset: int
    value: bytes
    error: str
    key: bytes | None = None
    processor: str = ""
    timestamp_ms: int = field(default_factory=now_ms)


RECORDS: tuple[type[_Record], ...] = (
    Interaction,
    ItemUpdate,
    RecommendationRequest,
    RecommendationResponse,
    DeadLetter,
)
