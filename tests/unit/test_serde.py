import copy
import json

import fastavro
import pytest

from schemas.examples import example_records
from schemas.serde import (
    DecodeError,
    EncodeError,
    RegistrySerde,
    SingleObjectSerde,
    load_schema,
    schema_fingerprint,
    schema_names,
    schema_text,
)

NOW = 1_700_000_000_000
EXAMPLES = example_records(NOW)


def test_every_schema_has_an_example():
    assert set(schema_names()) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_single_object_round_trip(name):
    serde = SingleObjectSerde("t", load_schema(name))
    data = serde.encode(EXAMPLES[name])
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == schema_fingerprint(load_schema(name))
    assert serde.decode(data) == EXAMPLES[name]


def test_fingerprint_matches_the_avro_spec_example():
    # The Avro spec: the CRC-64-AVRO fingerprint of the schema "int" is 0x7275d51a3f395c8f,
    # written in single-object encoding as its little-endian bytes.
    assert schema_fingerprint(fastavro.parse_schema("int")) == bytes.fromhex("8f5c393f1ad57572")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_registry_wire_format_round_trip(name):
    serde = RegistrySerde("topic-a", schema_text(name), "mock://streamrec-test")
    data = serde.encode(EXAMPLES[name])
    assert data[0] == 0 and len(data) > 5  # magic byte + 4-byte schema id
    assert serde.decode(data) == EXAMPLES[name]


def test_registry_serde_rejects_single_object_bytes():
    single = SingleObjectSerde("interactions", load_schema("interaction")).encode(
        EXAMPLES["interaction"]
    )
    with pytest.raises(DecodeError, match="interactions.*magic byte"):
        RegistrySerde("interactions", schema_text("interaction"), "mock://x").decode(single)


def _older_request_schema() -> dict:
    """The request schema as it was before `seed` existed."""
    raw = json.loads(schema_text("recommendation_request"))
    raw["fields"] = [f for f in raw["fields"] if f["name"] != "seed"]
    return fastavro.parse_schema(raw)


def test_newer_reader_reads_events_of_an_older_writer():
    old = _older_request_schema()
    record = {k: v for k, v in EXAMPLES["recommendation_request"].items() if k != "seed"}
    data = SingleObjectSerde("requests", old).encode(record)

    reader = SingleObjectSerde("requests", load_schema("recommendation_request"), writers=[old])
    decoded = reader.decode(data)
    assert decoded["seed"] is None  # the added field's default
    assert {k: v for k, v in decoded.items() if k != "seed"} == record


def test_reader_without_the_writer_schema_names_the_fingerprint():
    old = _older_request_schema()
    record = {k: v for k, v in EXAMPLES["recommendation_request"].items() if k != "seed"}
    data = SingleObjectSerde("requests", old).encode(record)
    with pytest.raises(DecodeError, match="requests.*unknown writer schema fingerprint"):
        SingleObjectSerde("requests", load_schema("recommendation_request")).decode(data)


@pytest.fixture()
def serde():
    return SingleObjectSerde("interactions", load_schema("interaction"))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b"", "bad or missing header"),
        (lambda b: b"hello world, not avro", "bad or missing header"),
        (lambda b: b[:12], "malformed Avro body"),
        (lambda b: b + b"\x00\x01", "trailing bytes"),
        (lambda b: b[:10] + b"\xff" * 40, "malformed Avro body"),
    ],
    ids=["empty", "text", "truncated", "trailing", "garbage-body"],
)
def test_malformed_bytes_name_topic_and_reason(serde, mutate, reason):
    good = serde.encode(EXAMPLES["interaction"])
    with pytest.raises(DecodeError) as info:
        serde.decode(mutate(good))
    assert info.value.topic == "interactions"
    assert reason in info.value.reason
    assert "interactions" in str(info.value)


def test_encode_rejects_a_record_missing_a_required_field(serde):
    record = copy.deepcopy(EXAMPLES["interaction"])
    del record["user_id"]
    with pytest.raises(EncodeError, match="interactions"):
        serde.encode(record)


def test_encode_fills_defaults_of_optional_fields(serde):
    record = {
        k: EXAMPLES["interaction"][k]
        for k in ("event_id", "user_id", "item_id", "event_type", "timestamp_ms")
    }
    decoded = serde.decode(serde.encode(record))
    assert decoded["value"] is None and decoded["context"] == {} and decoded["session_id"] is None


def _older_response_schema() -> dict:
    """The response schema as it was before `backfilled` and `note` existed."""
    raw = json.loads(schema_text("recommendation_response"))
    raw["fields"] = [f for f in raw["fields"] if f["name"] not in ("backfilled", "note")]
    return fastavro.parse_schema(raw)


def test_responses_with_and_without_backfill_fields_read_both_ways():
    old, new = _older_response_schema(), load_schema("recommendation_response")
    example = EXAMPLES["recommendation_response"]
    before = {k: v for k, v in example.items() if k not in ("backfilled", "note")}
    after = example | {"backfilled": 2, "note": "2 of 2 items backfilled from popularity"}

    newer_reader = SingleObjectSerde("responses", new, writers=[old])
    assert newer_reader.decode(SingleObjectSerde("responses", old).encode(before)) == (
        before | {"backfilled": 0, "note": None}
    )
    older_reader = SingleObjectSerde("responses", old, writers=[new])
    assert older_reader.decode(SingleObjectSerde("responses", new).encode(after)) == before


@pytest.mark.parametrize(
    ("name", "added"),
    [("recommendation_request", ("explain",)), ("recommendation_response", ("explanations",))],
)
def test_a_record_without_the_new_field_is_written_so_that_older_readers_read_it(name, added):
    """Records that leave the fields added in v2 at their defaults go out in v1, which a reader
    deployed before v2 knows; records that use one go out in v2; a v2 reader reads both."""
    from schemas.serde import make_serde, previous_versions

    (v1,) = previous_versions(name)
    writer = make_serde("t", name)
    old_reader = SingleObjectSerde("t", v1)
    example = EXAMPLES[name]
    defaults = {f["name"]: f["default"] for f in load_schema(name)["fields"] if "default" in f}
    plain = writer.encode(example | {f: defaults[f] for f in (*added, "arm") if f in defaults})
    assert plain[2:10] == schema_fingerprint(v1)
    assert old_reader.decode(plain) == {
        k: v for k, v in example.items() if k not in (*added, "arm")
    }
    rich = writer.encode(example)
    assert rich[2:10] == schema_fingerprint(load_schema(name))
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint"):
        old_reader.decode(rich)
    assert writer.decode(plain)[added[0]] in (False, [])
    assert writer.decode(rich) == example
