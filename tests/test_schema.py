"""The record schema: one definition that the typed records and the Arrow schemas agree on."""

from __future__ import annotations

import typing

import pyarrow as pa
import pytest

from vsotools.core import schema


def test_photo_record_and_arrow_schema_agree():
    assert list(typing.get_type_hints(schema.PhotoRecord)) == schema.PHOTO_SCHEMA.names


def test_filtered_record_and_arrow_schema_agree():
    assert list(typing.get_type_hints(schema.FilteredRecord)) == schema.FILTERED_SCHEMA.names


def test_photo_schema_holds_the_fetch_contract():
    required = {
        "photo_id", "anps", "label", "title", "description", "tags", "owner", "license",
        "image_url", "status", "error", "sha256", "width", "height",
    }  # fmt: skip
    assert required <= set(schema.PHOTO_SCHEMA.names)
    assert schema.PHOTO_SCHEMA.field("anps").type == pa.list_(pa.string())
    for field in schema.PHOTO_SCHEMA:
        assert field.metadata[b"meaning"], f"{field.name} has no documented meaning"


def test_a_record_round_trips_through_arrow():
    record = {name: None for name in schema.PHOTO_SCHEMA.names}
    record.update(photo_id="123", source="flickr", anps=["happy_dog"], status="ok", width=640)
    table = pa.Table.from_pylist([record], schema=schema.PHOTO_SCHEMA)
    assert table.to_pylist() == [record]


@pytest.mark.parametrize(
    ("photo_id", "key"),
    [("52712345678", "52712345678"), ("a.b/c d", "a_b_c_d"), ("id-7_x", "id-7_x")],
)
def test_sample_keys_are_safe(photo_id, key):
    assert schema.sample_key(photo_id) == key


def test_labels():
    assert schema.LABEL_NAMES[schema.NEGATIVE] == "negative"
    assert schema.LABEL_NAMES[schema.POSITIVE] == "positive"
