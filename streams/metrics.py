"""Prometheus metrics of the stream workers (served on 127.0.0.1:<metrics port>)."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

EVENTS = Counter("streamrec_events_total", "Events handled", ["processor", "outcome"])
BATCH_SIZE = Histogram(
    "streamrec_batch_size",
    "Events per micro-batch",
    ["processor"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)
DEAD_LETTERS = Counter(
    "streamrec_dead_letters_total", "Events sent to the dead-letter topic", ["processor"]
)
FRESHNESS = Histogram(
    "streamrec_feature_freshness_seconds",
    "From an interaction's produce time to its online feature write",
    buckets=LATENCY_BUCKETS,
)
REQUEST_LATENCY = Histogram(
    "streamrec_request_latency_seconds",
    "Request latency per stage and end to end (request produce → response sent)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
RESPONSES = Counter("streamrec_responses_total", "Responses published", ["status", "path", "arm"])
EXPIRED = Counter(
    "streamrec_requests_expired_total",
    "Requests answered `expired`: their deadline passed before or while they were served",
)
STALLED = Gauge(
    "streamrec_stalled",
    "1 while a processor holds a batch because a dependency is unavailable",
    ["processor"],
)
STALL_SECONDS = Counter(
    "streamrec_stall_seconds_total", "Time processors spent waiting for dependencies", ["processor"]
)
RETRIES = Counter(
    "streamrec_retries_total",
    "Retried batches: transient (a dependency) or failed (the batch itself)",
    ["processor", "kind"],
)
SERVING_READY = Gauge(
    "streamrec_serving_ready", "1 when the last canary inference through Triton succeeded"
)
CONSUMER_LAG = Gauge(
    "streamrec_consumer_lag", "Highwater minus committed offset", ["topic", "partition"]
)


class _TritonServers(Collector):
    """Each Triton server of the worker's pool (`serving.pool.TritonPool`), read when scraped."""

    pool = None

    def collect(self):
        up = GaugeMetricFamily(
            "streamrec_triton_server_up",
            "1 while the Triton server takes requests (0: ejected until a canary passes)",
            labels=["server"],
        )
        answered = CounterMetricFamily(
            "streamrec_triton_requests",
            "Inferences the Triton server answered (canaries not counted)",
            labels=["server"],
        )
        for server in self.pool.servers if self.pool else []:
            up.add_metric([server.url], float(server.healthy))
            answered.add_metric([server.url], server.answered)
        yield up
        yield answered


_TRITON = _TritonServers()
REGISTRY.register(_TRITON)


def watch_triton(pool) -> None:
    """Export the servers of the worker's pool with its metrics."""
    _TRITON.pool = pool


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Start the metrics endpoint; port 0 picks a free one. Returns the port."""
    server, _ = start_http_server(port, addr=host)
    return server.server_port
