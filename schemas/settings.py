"""The one place for configuration: typed settings with `STREAMREC_` environment overrides.

Nested fields use a double underscore, e.g. `STREAMREC_TOPICS__REQUESTS=my-requests`.
An endpoint left unset (`kafka_bootstrap`, `redis_url`, `triton_url`) means "use the embedded
stack": `streamrec stack up` (or a test fixture) starts it and records its endpoints in the run
directory.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TopicNames(BaseModel):
    interactions: str = "interactions"
    item_updates: str = "item-updates"
    requests: str = "recommendation-requests"
    recommendations: str = "recommendations"
    dead_letter: str = "dead-letter"


# Items retrieval hands to ranking: served and offline results match only with the same number.
CANDIDATES = 300
ENDPOINTS = {"kafka": "kafka_bootstrap", "redis": "redis_url", "triton": "triton_url"}


class NotConfigured(RuntimeError):
    """A process that does not start servers needs an endpoint that is not set."""


class KafkaSecurity(BaseModel):
    """Passed through to every Kafka client (librdkafka and aiokafka names differ; see streams)."""

    protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_", env_nested_delimiter="__", extra="ignore"
    )

    # External services; None = the embedded stack of the run directory.
    kafka_bootstrap: str | None = Field(None, description="host:port[,host:port]")
    redis_url: str | None = Field(
        None, description="redis://[:password@]host:port/db; any node of a Redis Cluster"
    )
    redis_cluster_nodes: int = Field(
        0,
        ge=0,
        description="The embedded stack's Valkey: 0 = one server, N >= 3 = a local cluster of N "
        "primaries",
    )
    triton_url: str | None = Field(
        None, description="Triton gRPC endpoint(s), host:port[,host:port]: balanced by health"
    )
    schema_registry_url: str | None = Field(
        None, description="Confluent Schema Registry; unset = Avro single-object encoding"
    )
    kafka_security: KafkaSecurity = KafkaSecurity()

    topics: TopicNames = TopicNames()
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)

    candidates: int = Field(CANDIDATES, ge=1, description="Items retrieval hands to ranking")
    feast_project: str = Field("streamrec", description="Feast project; also the Redis key prefix")
    worker_group: str = Field("streamrec-workers", description="Consumer group of the workers")
    worker_instance_id: str | None = Field(
        None,
        description="Static group membership (KIP-345): unique per live worker and stable across "
        "its restarts (a StatefulSet pod name, say); a restarted worker takes its partitions "
        "back at once instead of waiting for a rebalance",
    )
    interaction_batch: int = Field(500, ge=1, description="Max events per micro-batch")
    request_concurrency: int = Field(32, ge=1, description="Requests in flight per worker")
    request_deadline_ms: int = Field(
        1000,
        ge=1,
        description="Deadline of a request without its own deadline_ms, counted from when it was "
        "produced (its Kafka timestamp); one taken or still unserved after its deadline is "
        "answered with status `expired`",
    )
    idle_fetch_backoff_ms: float = Field(
        8.0,
        ge=0,
        description="Most a worker waits before fetching again after an empty fetch that the "
        "broker answered at once instead of holding it (the embedded broker ignores fetch max "
        "wait, and an idle worker would spin); 0 = never wait",
    )
    kafka_transactions: bool = Field(
        False,
        description="Publish responses and commit their requests' offsets in one Kafka "
        "transaction: exactly one visible response per request. Turn on with Apache Kafka (the "
        "compose file does). Off (the embedded broker, whose transactions do not survive its "
        "restarts): at-least-once, and a duplicate has the first answer's bytes",
    )
    redis_wait_aof: bool = Field(
        True, description="Commit offsets only after Redis fsynced the effects (WAITAOF)"
    )
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        description="Also wait for this many replicas of each primary to have the effects (WAIT) "
        "before committing offsets: a failover to a replica then loses nothing acked",
    )
    redis_cluster_replicas: int = Field(
        0, ge=0, description="The embedded Valkey cluster: replicas per primary"
    )
    response_cache_ttl_s: int = Field(
        3600,
        ge=1,
        description="Without Kafka transactions: how long a response is kept to answer a "
        "redelivered request with the same bytes",
    )
    canary_interval_s: float = Field(
        2.0, gt=0, description="How often a worker checks the serving path with a real inference"
    )
    canary_timeout_s: float = Field(2.0, gt=0, description="Deadline of one canary inference")
    metrics_port: int | None = Field(None, description="Workers' Prometheus port (0 = any)")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoint binds")

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "warning",
        description="Log level of the workers' libraries (Faust, aiokafka) and of TensorFlow's "
        "start-up; streamrec's own lines (ready, recovery, trainer decisions) are always logged. "
        "`streamrec --verbose` sets info",
    )

    run_dir: Path = Path(".streamrec/run")
    artifact_dir: Path = Path(".streamrec/artifacts")
    data_dir: Path = Path(".streamrec/data")

    # Hard limits on start-up of embedded servers (seconds).
    kafka_start_timeout: float = 30.0
    redis_start_timeout: float = 15.0
    triton_start_timeout: float = 90.0

    def endpoint(self, name: str) -> str:
        """A service's configured URL (`streamrec serve workers` sets every one it resolved)."""
        if url := getattr(self, ENDPOINTS[name]):
            return url
        raise NotConfigured(
            f"STREAMREC_{ENDPOINTS[name].upper()} is not set: start workers with "
            "`streamrec serve workers`, which resolves the embedded stack, or set it"
        )

    def feature_repo(self) -> Path:
        """The Feast repository of this deployment (its Redis and project)."""
        return self.run_dir / "feature_repo" / self.feast_project


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
