"""`streamrec ui`: a live web console on 127.0.0.1 (Starlette + Plotly).

- Live figures, from the running workers' Prometheus endpoints: responses and interactions per
  second, latency percentiles per stage and end to end, feature freshness, consumer lag, dead
  letters and error answers. Rates and percentiles cover the time since the page last asked
  (histogram bucket deltas), so they are live, not since the workers started.
- A user view: the user's recent items and stream features (the Feast online store), and their
  recommendations with explanations, asked over Kafka as any service would (`streamrec.client`).
  A click on an item produces an interaction, and the list is asked again.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from functools import cached_property
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from schemas.settings import Settings

PAGE = Path(__file__).with_name("console.html")


class Console:
    """What the routes read: the workers' metrics, the feature store, the client."""

    def __init__(self, settings: Settings, bootstrap: str, as_of_ms: int | None = None):
        self.settings = settings
        self.bootstrap = bootstrap
        self.as_of_ms = as_of_ms  # a fixed time for requests and clicks (historical data)
        self._last: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    @cached_property
    def client(self):
        from streamrec.client import Client

        return Client(self.bootstrap, self.settings, timeout=5.0)

    @cached_property
    def reader(self):
        from state.feature_store import OnlineReader
        from streamrec.stack import EmbeddedStack

        redis = EmbeddedStack(self.settings).endpoint("redis")
        return OnlineReader(redis, project=self.settings.feast_project)

    @cached_property
    def titles(self) -> dict[str, dict]:
        import json

        from schemas.artifacts import Artifacts, current_artifacts

        try:
            return json.loads(
                (current_artifacts(self.settings.artifact_dir) / Artifacts.ITEMS).read_text()
            )
        except FileNotFoundError:
            return {}

    # --- metrics -------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """Totals now, and rates and percentiles since the previous call."""
        now, totals = time.monotonic(), self._scrape()
        with self._lock:
            last, self._last = self._last, (now, totals)
        if last is None:
            return {"workers": totals["workers"], "window_s": 0.0, "totals": _public(totals)}
        seconds = max(now - last[0], 1e-6)
        delta = {k: totals[k] - last[1].get(k, 0.0) for k in totals if isinstance(totals[k], float)}
        stages = sorted({s for s, _ in totals["latency"]})
        return {
            "workers": totals["workers"],
            "window_s": round(seconds, 2),
            "totals": _public(totals),
            "responses_per_s": round(delta.get("responses", 0.0) / seconds, 2),
            "interactions_per_s": round(delta.get("interactions", 0.0) / seconds, 2),
            "latency_ms": {
                stage: {
                    q: _quantile(_delta(totals["latency"], last[1]["latency"], stage), q)
                    for q in ("p50", "p99")
                }
                for stage in stages
            },
            "freshness_ms_p50": _quantile(
                _delta(totals["freshness"], last[1]["freshness"], ""), "p50"
            ),
        }

    def _scrape(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        from streamrec.workers import Workers

        out: dict = {
            "workers": 0,
            "responses": 0.0,
            "errors": 0.0,
            "expired": 0.0,
            "interactions": 0.0,
            "dead_letters": 0.0,
            "lag": 0.0,
            "latency": {},
            "freshness": {},
        }
        for worker in Workers(self.settings).running():
            url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
            try:
                text = urllib.request.urlopen(url, timeout=2).read().decode()
            except OSError:
                continue
            out["workers"] += 1
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    _add(out, s.name, s.labels, s.value)
        return out

    # --- the user view -------------------------------------------------------------------------
    def user(self, user_id: str) -> dict:
        (activity,) = self.reader.users([user_id], "user_activity")
        response = self.client.recommend(user_id, k=10, explain=True, ts=self.as_of_ms)
        return {
            "user": user_id,
            "recent": [self._item(i) for i in (activity or {}).get("recent_items") or []][:10],
            "features": {
                k: v for k, v in (activity or {}).items() if k in ("event_count", "last_event_ms")
            },
            "status": response.status,
            "error": response.error,
            "request_id": response.request_id,
            "model_version": response.model_version,
            "arm": response.arm,
            "removed": response.removed,
            "items": [
                self._item(e.item_id)
                | {
                    "score": e.ranker_score,
                    "source": e.source,
                    "retrieval_rank": e.retrieval_rank,
                    "ordering": e.ordering,
                    "features": {k: round(v, 3) for k, v in e.features.items()},
                }
                for e in response.explanations
            ],
        }

    def click(self, user_id: str, item_id: str, request_id: str | None) -> dict:
        event = self.client.track(
            user_id, item_id, "click", ts=self.as_of_ms, request_id=request_id
        )
        self.client.flush()
        return {"event_id": event.event_id}

    def _item(self, item_id: str) -> dict:
        info = self.titles.get(item_id, {})
        return {
            "item_id": item_id,
            "title": info.get("title") or item_id,
            "genres": info.get("genres") or [],
        }


_COUNTERS = {
    "streamrec_dead_letters_total": "dead_letters",
    "streamrec_consumer_lag": "lag",
}


def _add(out: dict, name: str, labels: dict, value: float) -> None:
    if name == "streamrec_responses_total":
        out["responses"] += value
        if labels.get("status") == "error":
            out["errors"] += value
        elif labels.get("status") == "expired":
            out["expired"] += value
    elif name == "streamrec_events_total" and labels.get("processor") == "interactions":
        out["interactions"] += value if labels.get("outcome") == "applied" else 0.0
    elif name in _COUNTERS:
        out[_COUNTERS[name]] += value
    elif name == "streamrec_request_latency_seconds_bucket":
        key = (labels["stage"], float(labels["le"]))
        out["latency"][key] = out["latency"].get(key, 0.0) + value
    elif name == "streamrec_feature_freshness_seconds_bucket":
        key = ("", float(labels["le"]))
        out["freshness"][key] = out["freshness"].get(key, 0.0) + value


def _delta(now: dict, before: dict, stage: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of one stage's histogram since the previous scrape."""
    return sorted((le, now[(s, le)] - before.get((s, le), 0.0)) for s, le in now if s == stage)


def _quantile(buckets: list[tuple[float, float]], q: str) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket, in milliseconds."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = {"p50": 0.5, "p99": 0.99}[q] * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return round(lower * 1000, 2)
            share = (rank - below) / (count - below) if count > below else 1.0
            return round((lower + (le - lower) * share) * 1000, 2)
        lower, below = le, count
    return None


def _public(totals: dict) -> dict:
    return {k: v for k, v in totals.items() if isinstance(v, float)}


def app(settings: Settings, bootstrap: str, as_of_ms: int | None = None) -> Starlette:
    console = Console(settings, bootstrap, as_of_ms)

    async def page(_: Request) -> Response:
        return HTMLResponse(PAGE.read_text())

    async def plotly(_: Request) -> Response:
        from plotly.offline import get_plotlyjs

        return Response(get_plotlyjs(), media_type="application/javascript")

    async def metrics(_: Request) -> Response:
        import asyncio

        return JSONResponse(await asyncio.to_thread(console.metrics))

    async def user(request: Request) -> Response:
        import asyncio

        from streamrec.client import RecommendationTimeout

        try:
            return JSONResponse(await asyncio.to_thread(console.user, request.path_params["user"]))
        except RecommendationTimeout as e:
            return JSONResponse({"error": str(e)}, status_code=504)

    async def click(request: Request) -> Response:
        import asyncio

        body = await request.json()
        done = await asyncio.to_thread(
            console.click, str(body["user"]), str(body["item"]), body.get("request_id")
        )
        return JSONResponse(done)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/plotly.js", plotly),
            Route("/api/metrics", metrics),
            Route("/api/user/{user}", user),
            Route("/api/click", click, methods=["POST"]),
        ]
    )
