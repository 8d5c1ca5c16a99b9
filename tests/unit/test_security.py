"""Security settings, from STREAMREC_* environment variables to the clients that use them:
librdkafka (`client_config`), Faust/aiokafka (`faust_broker_settings`) and Redis (URL parsing of
redis-py and of Feast's connection string). No servers: the configs are built, not connected."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import faust
import pytest
import redis
import yaml
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from schemas.settings import Settings
from state.feature_store import redis_connection_string
from state.store import RedisState
from streams.kafka import client_config, faust_broker_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def clean_env(monkeypatch):
    import os

    for var in [v for v in os.environ if v.upper().startswith("STREAMREC_")]:
        monkeypatch.delenv(var)
    return monkeypatch


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    """A self-signed CA certificate and a client certificate + key signed by it (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256())
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    files = {"ca": out / "ca.pem", "cert": out / "client.pem", "key": out / "client.key"}
    pem = serialization.Encoding.PEM
    files["ca"].write_bytes(cert("test-ca", ca_key, "test-ca", ca_key, True).public_bytes(pem))
    files["cert"].write_bytes(
        cert("streamrec", client_key, "test-ca", ca_key, False).public_bytes(pem)
    )
    files["key"].write_bytes(
        client_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


def sasl_ssl_env(env, tls_files, with_client_cert: bool = False) -> Settings:
    env.setenv("STREAMREC_KAFKA_SECURITY__PROTOCOL", "SASL_SSL")
    env.setenv("STREAMREC_KAFKA_SECURITY__SASL_MECHANISM", "SCRAM-SHA-512")
    env.setenv("STREAMREC_KAFKA_SECURITY__SASL_USERNAME", "streamrec-svc")
    env.setenv("STREAMREC_KAFKA_SECURITY__SASL_PASSWORD", "s3cr3t")
    env.setenv("STREAMREC_KAFKA_SECURITY__SSL_CAFILE", str(tls_files["ca"]))
    if with_client_cert:
        env.setenv("STREAMREC_KAFKA_SECURITY__SSL_CERTFILE", str(tls_files["cert"]))
        env.setenv("STREAMREC_KAFKA_SECURITY__SSL_KEYFILE", str(tls_files["key"]))
    return Settings()


# --- Kafka: librdkafka ----------------------------------------------------------------------------


def test_sasl_ssl_from_env_reaches_librdkafka_config(clean_env, tls_files):
    settings = sasl_ssl_env(clean_env, tls_files, with_client_cert=True)
    conf = client_config(settings, "broker-1:9094,broker-2:9094")
    assert conf == {
        "bootstrap.servers": "broker-1:9094,broker-2:9094",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "streamrec-svc",
        "sasl.password": "s3cr3t",
        "ssl.ca.location": str(tls_files["ca"]),
        "ssl.certificate.location": str(tls_files["cert"]),
        "ssl.key.location": str(tls_files["key"]),
    }


def test_librdkafka_accepts_the_config(clean_env, tls_files):
    """confluent-kafka validates property names and values when a client is created (no
    connection is made before the first request)."""
    from confluent_kafka import Producer

    settings = sasl_ssl_env(clean_env, tls_files)
    producer = Producer(client_config(settings, "127.0.0.1:1") | {"socket.timeout.ms": 100})
    assert producer.flush(0) == 0


def test_plaintext_default_adds_nothing(clean_env):
    settings = Settings()
    assert client_config(settings, "b:9092") == {
        "bootstrap.servers": "b:9092",
        "security.protocol": "PLAINTEXT",
    }
    assert faust_broker_settings(settings) == {}


# --- Kafka: Faust / aiokafka --------------------------------------------------------------------


def test_sasl_ssl_from_env_reaches_faust_credentials(clean_env, tls_files):
    settings = sasl_ssl_env(clean_env, tls_files, with_client_cert=True)
    credentials = faust_broker_settings(settings)["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert (credentials.username, credentials.password) == ("streamrec-svc", "s3cr3t")
    assert isinstance(credentials.ssl_context, ssl.SSLContext)
    assert credentials.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert credentials.ssl_context.check_hostname
    issuers = {
        dict(x[0] for x in c["issuer"])["commonName"]
        for c in credentials.ssl_context.get_ca_certs()
    }
    assert "test-ca" in issuers  # the CA file of STREAMREC_KAFKA_SECURITY__SSL_CAFILE

    # what Faust hands aiokafka's consumer and producer
    auth = credentials_to_aiokafka_auth(credentials)
    assert auth == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "streamrec-svc",
        "sasl_plain_password": "s3cr3t",
        "ssl_context": credentials.ssl_context,
    }


def test_faust_app_takes_the_credentials(clean_env, tls_files):
    settings = sasl_ssl_env(clean_env, tls_files)
    app = faust.App(
        "security-test", broker="kafka://broker:9094", **faust_broker_settings(settings)
    )
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials)
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"


def test_compose_default_sasl_plaintext(clean_env):
    """What docker-compose.yml sets: SASL/PLAIN without TLS on the compose network."""
    clean_env.setenv("STREAMREC_KAFKA_SECURITY__PROTOCOL", "SASL_PLAINTEXT")
    clean_env.setenv("STREAMREC_KAFKA_SECURITY__SASL_MECHANISM", "PLAIN")
    clean_env.setenv("STREAMREC_KAFKA_SECURITY__SASL_USERNAME", "streamrec")
    clean_env.setenv("STREAMREC_KAFKA_SECURITY__SASL_PASSWORD", "pw")
    settings = Settings()
    credentials = faust_broker_settings(settings)["broker_credentials"]
    assert credentials.ssl_context is None
    auth = credentials_to_aiokafka_auth(credentials)
    assert (auth["security_protocol"], auth["sasl_mechanism"]) == ("SASL_PLAINTEXT", "PLAIN")
    assert client_config(settings, "kafka:19092")["security.protocol"] == "SASL_PLAINTEXT"


def test_ssl_with_client_certificate_gives_ssl_credentials(clean_env, tls_files):
    clean_env.setenv("STREAMREC_KAFKA_SECURITY__PROTOCOL", "SSL")
    clean_env.setenv("STREAMREC_KAFKA_SECURITY__SSL_CAFILE", str(tls_files["ca"]))
    clean_env.setenv("STREAMREC_KAFKA_SECURITY__SSL_CERTFILE", str(tls_files["cert"]))
    clean_env.setenv("STREAMREC_KAFKA_SECURITY__SSL_KEYFILE", str(tls_files["key"]))
    credentials = faust_broker_settings(Settings())["broker_credentials"]
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials_to_aiokafka_auth(credentials)["security_protocol"] == "SSL"


# --- Redis ----------------------------------------------------------------------------------------

TLS_URL = "rediss://:secret@host:6380/0"


def test_rediss_url_gives_password_and_tls_to_redis_py():
    pool = redis.Redis.from_url(TLS_URL).connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("host", 6380, 0)
    assert kwargs["password"] == "secret"


def test_app_redis_clients_parse_the_url(clean_env, monkeypatch):
    """state/store.py's client (the stage models' and the workers') and settings from env."""
    import state.store

    monkeypatch.setattr(state.store, "is_cluster", lambda url: False)  # asks the server
    clean_env.setenv("STREAMREC_REDIS_URL", TLS_URL + "?ssl_ca_certs=/etc/redis/ca.pem")
    settings = Settings()
    pool = RedisState(settings.redis_url, prefix="streamrec").client.connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    assert pool.connection_kwargs["password"] == "secret"
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/redis/ca.pem"


def test_rediss_url_reaches_feasts_connection_string():
    timeouts = ",socket_timeout=2.0,socket_connect_timeout=2.0"
    assert redis_connection_string(TLS_URL) == "host:6380,db=0,password=secret,ssl=true" + timeouts
    # percent-encoded characters are decoded for both clients
    url = "rediss://:p%40ss%3Aword@host:6380/2"
    assert redis_connection_string(url) == "host:6380,db=2,password=p@ss:word,ssl=true" + timeouts
    assert redis.Redis.from_url(url).connection_pool.connection_kwargs["password"] == "p@ss:word"
    with pytest.raises(ValueError, match="','"):
        redis_connection_string("rediss://:a%2Cb@host:6380/0")


def test_compose_has_no_literal_secrets():
    """Passwords in docker-compose.yml come from the environment, never from the file."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        for var, value in env.items():
            if "PASSWORD" in var or "JAAS" in var:
                assert "${" in str(value) and ":?" in str(value), f"{name}: {var} is literal"
            if var == "STREAMREC_REDIS_URL":
                assert "${REDIS_PASSWORD:?" in value, f"{name}: Redis without a password"
