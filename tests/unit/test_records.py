"""The typed records against the `.avsc` files: the same fields in the same order with the same
defaults, and every record round-trips through its topic's serde."""

from __future__ import annotations

import dataclasses
import json

import pytest

from schemas.examples import example_records
from schemas.records import RECORDS, Interaction, RecommendationResponse
from schemas.serde import SingleObjectSerde, load_schema, schema_names, schema_text

EXAMPLES = example_records(1_700_000_000_000)


def _avsc_fields(name: str) -> list[dict]:
    return json.loads(schema_text(name))["fields"]


def test_every_schema_has_a_record_class():
    assert sorted(r.SCHEMA for r in RECORDS) == sorted(schema_names())


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_the_fields_and_defaults_are_the_schemas(cls):
    avsc = {f["name"]: f for f in _avsc_fields(cls.SCHEMA)}
    ours = {f.name: f for f in dataclasses.fields(cls)}
    assert set(ours) == set(avsc)
    for name, spec in avsc.items():
        field = ours[name]
        if field.default is not dataclasses.MISSING:
            # an enum's own default (event_type "view", status "error") stands for the field's
            kind = spec["type"]
            enum_default = kind.get("default") if isinstance(kind, dict) else None
            assert field.default == spec.get("default", enum_default), name
        elif field.default_factory is not dataclasses.MISSING and "default" in spec:
            assert field.default_factory() == spec["default"], name


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_the_schemas_example_round_trips_through_the_record(cls):
    serde = SingleObjectSerde("t", load_schema(cls.SCHEMA))
    record = cls.from_record(serde.decode(serde.encode(EXAMPLES[cls.SCHEMA])))
    again = cls.from_record(serde.decode(serde.encode(record.to_record())))
    assert again == record
    assert again.to_record() == EXAMPLES[cls.SCHEMA]


def test_generated_ids_and_times():
    a, b = Interaction("u", "i"), Interaction("u", "i")
    assert a.event_id != b.event_id and len(a.event_id) == 32
    assert abs(a.timestamp_ms - b.timestamp_ms) < 1000


def test_a_response_reads_as_objects():
    response = RecommendationResponse.from_record(EXAMPLES["recommendation_response"])
    assert response.ok and response.item_ids == ["100", "181"]
    assert response.items[0].score == 0.91 and response.stages[0].name == "retrieval"
