"""Avro serialization of every topic's events, with fastavro.

Two wire formats:
- Avro single-object encoding (the default): `C3 01` + the writer schema's 8-byte CRC-64-AVRO
  fingerprint (little-endian) + the Avro body. A reader resolves the writer schema by its
  fingerprint among the schema versions it knows, so readers and writers can evolve apart.
- The Confluent Schema Registry wire format (`00` + 4-byte schema id + body) when a registry URL
  is configured; confluent-kafka's own serializers do the registry work.

Every decoding failure raises `DecodeError` naming the topic and the reason.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).parent
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
_HEADER = len(SINGLE_OBJECT_MAGIC) + 8

Record = dict[str, Any]


class DecodeError(ValueError):
    """Bytes that cannot be read as the topic's events."""

    def __init__(self, topic: str, reason: str):
        super().__init__(f"cannot decode event on topic '{topic}': {reason}")
        self.topic = topic
        self.reason = reason


class EncodeError(ValueError):
    """A record that does not match the topic's schema."""

    def __init__(self, topic: str, reason: str):
        super().__init__(f"cannot encode event for topic '{topic}': {reason}")
        self.topic = topic
        self.reason = reason


@cache
def schema_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc")))


@cache
def schema_text(name: str) -> str:
    """The JSON text of `schemas/<name>.avsc`."""
    path = SCHEMA_DIR / f"{name}.avsc"
    if not path.exists():
        raise KeyError(f"no schema '{name}' (known: {', '.join(schema_names())})")
    return path.read_text()


@cache
def load_schema(name: str) -> dict:
    """The parsed schema of `schemas/<name>.avsc`."""
    return fastavro.parse_schema(json.loads(schema_text(name)))


@cache
def previous_versions(name: str) -> tuple[dict, ...]:
    """The earlier versions of a schema, oldest first (`schemas/history/<name>.v<N>.avsc`)."""
    paths = sorted(
        (SCHEMA_DIR / "history").glob(f"{name}.v*.avsc"),
        key=lambda p: int(p.name.removesuffix(".avsc").rsplit(".v", 1)[1]),
    )
    return tuple(fastavro.parse_schema(json.loads(p.read_text())) for p in paths)


def schema_fingerprint(schema: dict) -> bytes:
    """CRC-64-AVRO of the parsing canonical form, as the spec's 8 little-endian bytes."""
    # fastavro's hex digest already lists the bytes in little-endian order.
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


class Serde(Protocol):
    topic: str

    def encode(self, record: Record) -> bytes: ...
    def decode(self, data: bytes) -> Record: ...


class SingleObjectSerde:
    """Avro single-object encoding for one topic.

    `writers` are other schema versions whose events this reader must also read; fastavro
    resolves them into the reader schema (added fields take their defaults). `older` are the
    previous versions of `schema`, oldest first: read too, and used to *write* every record
    they can hold (whose fields added since are at their defaults). So a reader deployed before
    a field was added keeps reading everything that does not use the field.
    """

    def __init__(
        self, topic: str, schema: dict, writers: Iterable[dict] = (), older: Iterable[dict] = ()
    ):
        self.topic = topic
        self.schema = schema
        older = list(older)
        self._writers = {schema_fingerprint(s): s for s in (schema, *writers, *older)}
        self._encoders = [
            (version, schema_fingerprint(version), added)
            for version in (*older, schema)
            if (added := _added_fields(version, schema)) is not None
        ]

    def encode(self, record: Record) -> bytes:
        version, fingerprint_, added = next(
            e for e in self._encoders if all(record.get(n, d) == d for n, d in e[2])
        )
        if added:
            record = {k: v for k, v in record.items() if k not in dict(added)}
        buf = io.BytesIO()
        buf.write(SINGLE_OBJECT_MAGIC)
        buf.write(fingerprint_)
        try:
            fastavro.schemaless_writer(buf, version, record, strict_allow_default=True)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise EncodeError(self.topic, str(e)) from e
        return buf.getvalue()

    def decode(self, data: bytes) -> Record:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(self.topic, f"expected bytes, got {type(data).__name__}")
        if len(data) < _HEADER or data[:2] != SINGLE_OBJECT_MAGIC:
            raise DecodeError(self.topic, "not Avro single-object encoded (bad or missing header)")
        writer = self._writers.get(bytes(data[2:_HEADER]))
        if writer is None:
            raise DecodeError(
                self.topic, f"unknown writer schema fingerprint {bytes(data[2:_HEADER]).hex()}"
            )
        return _read_body(self.topic, data, _HEADER, writer, self.schema)


def _added_fields(version: dict, schema: dict) -> list[tuple[str, Any]] | None:
    """(name, default) of the fields `schema` has and `version` lacks; None when one of them
    has no default (`version` cannot stand for any record of `schema`)."""
    names = {f["name"] for f in version["fields"]}
    added = [f for f in schema["fields"] if f["name"] not in names]
    if any("default" not in f for f in added):
        return None
    return [(f["name"], f["default"]) for f in added]


def _read_body(topic: str, data: bytes, start: int, writer: dict, reader: dict) -> Record:
    buf = io.BytesIO(data)
    buf.seek(start)
    try:
        record = fastavro.schemaless_reader(buf, writer, reader)
    except Exception as e:  # fastavro raises many types on garbage: EOF, Unicode, index errors
        raise DecodeError(topic, f"malformed Avro body ({type(e).__name__}: {e})") from e
    if buf.tell() != len(data):
        raise DecodeError(topic, f"{len(data) - buf.tell()} trailing bytes after the record")
    return record


class RegistrySerde:
    """Confluent Schema Registry wire format, through confluent-kafka's Avro serializers."""

    def __init__(self, topic: str, schema_json: str, registry_url: str):
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        self.topic = topic
        client = SchemaRegistryClient.new_client({"url": registry_url})  # mock:// in tests
        self._ser = AvroSerializer(client, schema_json, conf={"auto.register.schemas": True})
        self._de = AvroDeserializer(client, schema_json)
        self._ctx = SerializationContext(topic, MessageField.VALUE)

    def encode(self, record: Record) -> bytes:
        try:
            return self._ser(record, self._ctx)
        except Exception as e:
            raise EncodeError(self.topic, str(e)) from e

    def decode(self, data: bytes) -> Record:
        if len(data) < 5 or data[0] != 0:
            raise DecodeError(self.topic, "not in Schema Registry wire format (bad magic byte)")
        try:
            return self._de(data, self._ctx)
        except Exception as e:
            raise DecodeError(self.topic, f"{type(e).__name__}: {e}") from e


def make_serde(topic: str, schema_name: str, registry_url: str | None = None) -> Serde:
    if registry_url:
        return RegistrySerde(topic, schema_text(schema_name), registry_url)
    return SingleObjectSerde(topic, load_schema(schema_name), older=previous_versions(schema_name))
