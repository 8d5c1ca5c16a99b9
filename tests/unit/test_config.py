from pathlib import Path

from schemas.settings import Settings
from streams.kafka import client_config
from streams.topics import TOPICS, role_of, topic_name


def test_env_overrides_with_prefix_and_nesting(monkeypatch):
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", "broker:9092")
    monkeypatch.setenv("STREAMREC_PARTITIONS", "12")
    monkeypatch.setenv("STREAMREC_TOPICS__REQUESTS", "prod-requests")
    monkeypatch.setenv("STREAMREC_RUN_DIR", "/tmp/x")
    s = Settings()
    assert s.kafka_bootstrap == "broker:9092"
    assert s.partitions == 12
    assert s.topics.requests == "prod-requests"
    assert s.topics.interactions == "interactions"
    assert s.run_dir == Path("/tmp/x")


def test_every_topic_role_is_named_in_settings():
    s = Settings()
    for role in TOPICS:
        assert role_of(s, topic_name(s, role)) == role


def test_security_settings_reach_the_kafka_client_config(monkeypatch):
    monkeypatch.setenv("STREAMREC_KAFKA_SECURITY__PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMREC_KAFKA_SECURITY__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STREAMREC_KAFKA_SECURITY__SASL_USERNAME", "svc")
    monkeypatch.setenv("STREAMREC_KAFKA_SECURITY__SASL_PASSWORD", "secret")
    monkeypatch.setenv("STREAMREC_KAFKA_SECURITY__SSL_CAFILE", "/etc/ca.pem")
    conf = client_config(Settings(), "b:9093")
    assert conf == {
        "bootstrap.servers": "b:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": "secret",
        "ssl.ca.location": "/etc/ca.pem",
    }
