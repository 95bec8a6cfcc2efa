"""The record schema: one definition that the typed records and the Arrow schemas agree on."""

from __future__ import annotations

import typing

import pyarrow as pa
import pyarrow.parquet
import pytest

from vsotools.core import schema


def test_photo_record_and_arrow_schema_agree():
    assert list(typing.get_type_hints(schema.PhotoRecord)) == schema.PHOTO_SCHEMA.names


def test_filtered_record_and_arrow_schema_agree():
    assert list(typing.get_type_hints(schema.FilteredRecord)) == schema.FILTERED_SCHEMA.names


def test_filter_reads_photo_fields_and_every_one_it_carries_into_the_filtered_records():
    read = schema.PHOTO_FILTER_FIELDS
    assert set(read) <= set(schema.PHOTO_SCHEMA.names)
    carried = set(schema.PHOTO_SCHEMA.names) & set(schema.FILTERED_SCHEMA.names)
    assert carried <= set(read)


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


def test_every_photo_field_is_either_given_by_the_source_or_filled_by_the_fetch():
    given = {"photo_id", "anps", *schema.PHOTO_SOURCE_FIELDS}
    filled = set(schema.PHOTO_OUTCOME_FIELDS)
    assert not given & filled
    assert given | filled == set(schema.PHOTO_SCHEMA.names)


def test_a_record_the_store_keeps_round_trips_its_source_fields(tmp_path):
    """The fetch store keeps exactly the source fields of a record (nothing else leaks in)."""
    from vsotools.fetch.store import Store

    record = {name: f"v-{name}" for name in schema.PHOTO_SOURCE_FIELDS}
    record.update(source="pairs", date_upload=1, label="positive", extra="not a field")
    with Store(tmp_path, part_size=10) as store:
        store.add_pairs([("p1", record, None)])
        (photo,) = list(store.pending())
        from vsotools.fetch.download import Outcome

        store.save_outcome(photo, Outcome.failed("missing_file"))
        store.write_parts()
    table = pa.parquet.read_table(tmp_path / "metadata" / "part-00000.parquet")
    (row,) = table.to_pylist()
    assert {k: row[k] for k in schema.PHOTO_SOURCE_FIELDS} == {
        k: v for k, v in record.items() if k != "extra"
    }


@pytest.mark.parametrize(
    ("data", "label"),
    [(b"0", "negative"), (b"1", "positive"), (b"1\n", "positive"), (b"01", None), (b"00", None),
     (b"2", None), (b"", None), (b"\xb2", None), (None, None)],
)  # fmt: skip
def test_a_class_member_holds_a_label_only_as_the_writer_writes_it(data, label):
    """verify and the loader read .cls through this one function; verify used to accept "01",
    which the loader refused, so a set that verify passed could fail in training."""
    assert schema.read_class(data)[1] == label
