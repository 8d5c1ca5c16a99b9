"""One valid example record per schema: used by the demo and the schema tests."""

from __future__ import annotations


def example_records(now_ms: int) -> dict[str, dict]:
    """{schema name: record}."""
    return {
        "interaction": _interaction(now_ms),
        "item_update": _item_update(now_ms),
        "recommendation_request": _recommendation_request(now_ms),
        "recommendation_response": _recommendation_response(now_ms),
        "dead_letter": _dead_letter(now_ms),
    }


def _interaction(now_ms: int) -> dict:
    return {
        "event_id": "ev-1",
        "user_id": "196",
        "item_id": "242",
        "event_type": "rating",
        "value": 3.0,
        "timestamp_ms": now_ms,
        "session_id": "s-1",
        "context": {"device": "mobile"},
    }


def _item_update(now_ms: int) -> dict:
    return {
        "item_id": "1683",
        "available": True,
        "title": "New Movie (2026)",
        "year": 2026,
        "genres": ["Comedy", "Drama"],
        "attributes": {"language": "en"},
        "timestamp_ms": now_ms,
    }


def _recommendation_request(now_ms: int) -> dict:
    return {
        "request_id": "req-1",
        "user_id": "196",
        "k": 5,
        "exclude": ["50"],
        "context": {"page": "home"},
        "temperature": 0.0,
        "seed": 7,
        "deadline_ms": now_ms + 500,
        "timestamp_ms": now_ms,
        "explain": True,
    }


def _recommendation_response(now_ms: int) -> dict:
    return {
        "request_id": "req-1",
        "user_id": "196",
        "status": "ok",
        "error": None,
        "items": [{"item_id": "100", "score": 0.91}, {"item_id": "181", "score": 0.87}],
        "removed": {"seen": 12, "unavailable": 1, "excluded": 0},
        "path": "personalized",
        "model_version": "example",
        "stages": [
            {
                "name": "retrieval",
                "candidates_in": 1682,
                "candidates_out": 300,
                "duration_ms": 0.8,
                "batch_size": 1,
            }
        ],
        "request_timestamp_ms": now_ms,
        "timestamp_ms": now_ms + 4,
        "backfilled": 0,
        "note": None,
        "arm": "treatment",
        "explanations": _explanations(),
    }


def _explanations() -> list[dict]:
    return [
        {
            "item_id": "100",
            "source": "retrieval",
            "retrieval_rank": 4,
            "retrieval_score": 0.52,
            "ranker_score": 0.91,
            "score_rank": 1,
            "features": {"log_popularity": 2.3, "recent_similarity": 0.61},
            "ordering": "score order",
        },
        {
            "item_id": "181",
            "source": "retrieval",
            "retrieval_rank": 1,
            "retrieval_score": 0.58,
            "ranker_score": 0.87,
            "score_rank": 2,
            "features": {"log_popularity": 3.1, "recent_similarity": 0.44},
            "ordering": "score order",
        },
    ]


def _dead_letter(now_ms: int) -> dict:
    return {
        "topic": "interactions",
        "partition": 0,
        "offset": 42,
        "key": b"196",
        "value": b"\x00garbage",
        "error": "not Avro single-object encoded",
        "processor": "example",
        "timestamp_ms": now_ms,
    }
