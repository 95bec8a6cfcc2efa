"""The one definition of every record vsotools writes: photo records, filtered records, shard samples.

A record flows through the stages as a plain ``dict`` whose keys are the field names below:

- ``fetch`` writes **photo records** (``PHOTO_SCHEMA``) to ``DATA/metadata/*.parquet``;
- ``filter`` writes **filtered records** (``FILTERED_SCHEMA``) to ``DATA/filtered.parquet``;
- ``shard`` writes **shard samples** (``SAMPLE_*`` keys) into WebDataset tar files;
- ``train`` reads the samples back.

Every stage imports its field names and Arrow schemas from here; nothing else defines them.
"""

from __future__ import annotations

import re
from typing import Final, TypedDict

import pyarrow as pa

# --- labels ---------------------------------------------------------------------------------

NEGATIVE: Final = 0
POSITIVE: Final = 1
LABEL_NAMES: Final = ("negative", "positive")
"""Class index -> label name, for the 2-way task."""
NEUTRAL: Final = "neutral"
"""The third label a pairs dataset may carry; dropped by the 2-way filter."""
GIVEN_LABELS: Final = (*LABEL_NAMES, NEUTRAL)
"""Labels that a pairs input file may give."""

# --- fetch status ---------------------------------------------------------------------------

STATUS_OK: Final = "ok"
STATUS_FAILED: Final = "failed"
STATUSES: Final = (STATUS_OK, STATUS_FAILED)

# --- where a record came from ---------------------------------------------------------------

SOURCE_FLICKR: Final = "flickr"
"""Found by an ANP search; labelled later through the ANP manifest."""
SOURCE_PAIRS: Final = "pairs"
"""Ingested from an image+text pairs file; the label is given."""

# --- splits ---------------------------------------------------------------------------------

TRAIN: Final = "train"
TEST: Final = "test"
SPLITS: Final = (TRAIN, TEST)


def _field(name: str, type_: pa.DataType, meaning: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"meaning": meaning})


# --- photo records: the output of fetch -----------------------------------------------------

PHOTO_SCHEMA: Final = pa.schema(
    [
        _field("photo_id", pa.string(), "Flickr photo id, or the id given in a pairs file", False),
        _field("source", pa.string(), "'flickr' (found by ANP search) or 'pairs'", False),
        _field("anps", pa.list_(pa.string()), "every ANP whose search found the photo", False),
        _field("label", pa.string(), "label given by a pairs file; null for crawled photos"),
        _field("title", pa.string(), "photo title as Flickr serves it"),
        _field("description", pa.string(), "photo description as Flickr serves it (may hold HTML)"),
        _field("tags", pa.string(), "space-separated normalised Flickr tags"),
        _field("owner", pa.string(), "owner NSID (e.g. 7478087@N06)"),
        _field("owner_name", pa.string(), "owner display name"),
        _field("license", pa.string(), "Flickr licence id, '0' to '16'"),
        _field("date_upload", pa.int64(), "upload time, Unix seconds"),
        _field("date_taken", pa.string(), "'YYYY-MM-DD HH:MM:SS' as Flickr serves it"),
        _field("image_url", pa.string(), "URL the image was (or would be) downloaded from"),
        _field("image_path", pa.string(), "stored image, relative to the dataset folder"),
        _field(
            "status", pa.string(), "'ok' when the image was fetched and validated, else 'failed'"
        ),
        _field(
            "error", pa.string(), "why the fetch failed (http_404, not_an_image, ...); null if ok"
        ),
        _field("sha256", pa.string(), "hex sha256 of the image bytes as served"),
        _field("image_bytes", pa.int64(), "size of the image as served, in bytes"),
        _field("width", pa.int32(), "width of the image as served, in pixels"),
        _field("height", pa.int32(), "height of the image as served, in pixels"),
        _field(
            "stored_bytes",
            pa.int64(),
            "size of the stored image file, in bytes: image_bytes, unless fetch.max_side"
            " downscaled it",
        ),
    ]
)


PHOTO_OUTCOME_FIELDS: Final = tuple(PHOTO_SCHEMA.names[PHOTO_SCHEMA.names.index("image_path") :])
"""The fields that fetching the image fills in: ``image_path`` to ``stored_bytes``."""
PHOTO_SOURCE_FIELDS: Final = tuple(
    name
    for name in PHOTO_SCHEMA.names
    if name not in ("photo_id", "anps") and name not in PHOTO_OUTCOME_FIELDS
)
"""The fields that the photo's source gives (a search result or a pairs row): ``source`` to
``image_url`` but ``anps``, which fetch gathers from every search that found the photo."""
PHOTO_FILTER_FIELDS: Final = (
    "photo_id",
    "source",
    "anps",
    "label",
    "title",
    "description",
    "tags",
    "owner",
    "license",
    "image_url",
    "image_path",
    "status",
    "sha256",
)
"""The fields ``filter`` reads: what it labels, counts and deduplicates by, and what it carries
into the filtered records. The others (owner name, dates, the served image's size) it does not
read, nor need."""


class PhotoRecord(TypedDict):
    """One photo as ``fetch`` records it; see ``PHOTO_SCHEMA`` for each field's meaning."""

    photo_id: str
    source: str
    anps: list[str]
    label: str | None
    title: str | None
    description: str | None
    tags: str | None
    owner: str | None
    owner_name: str | None
    license: str | None
    date_upload: int | None
    date_taken: str | None
    image_url: str | None
    image_path: str | None
    status: str
    error: str | None
    sha256: str | None
    image_bytes: int | None
    width: int | None
    height: int | None
    stored_bytes: int | None


# --- filtered records: the output of filter -------------------------------------------------

FILTERED_SCHEMA: Final = pa.schema(
    [
        _field("photo_id", pa.string(), "as in the photo record", False),
        _field("text", pa.string(), "cleaned text the models read", False),
        _field("words", pa.int32(), "number of words in text", False),
        _field("label", pa.int8(), "0 negative, 1 positive", False),
        _field("label_name", pa.string(), "'negative' or 'positive'", False),
        _field("split", pa.string(), "'train' or 'test'", False),
        _field("anps", pa.list_(pa.string()), "ANPs that found the photo (empty for pairs)", False),
        _field(
            "anp_scores", pa.list_(pa.float64()), "sentiment score of each ANP, same order", False
        ),
        _field("owner", pa.string(), "owner NSID"),
        _field("license", pa.string(), "Flickr licence id"),
        _field("image_url", pa.string(), "source URL of the image"),
        _field("image_path", pa.string(), "stored image, relative to the dataset folder", False),
        _field("sha256", pa.string(), "hex sha256 of the image bytes as served"),
    ]
)


class FilteredRecord(TypedDict):
    """One labelled, split photo as ``filter`` writes it; see ``FILTERED_SCHEMA``."""

    photo_id: str
    text: str
    words: int
    label: int
    label_name: str
    split: str
    anps: list[str]
    anp_scores: list[float]
    owner: str | None
    license: str | None
    image_url: str | None
    image_path: str
    sha256: str | None


# --- shard samples: what a WebDataset tar holds per photo -----------------------------------

SAMPLE_KEY: Final = "__key__"
SAMPLE_IMAGE: Final = "jpg"
"""JPEG bytes, shorter side resized to the shard's image size."""
SAMPLE_TEXT: Final = "txt"
"""The cleaned text, UTF-8."""
SAMPLE_META: Final = "json"
"""JSON object with the ``SAMPLE_META_FIELDS``."""
SAMPLE_CLASS: Final = "cls"
"""The class index as ASCII digits ("0" negative, "1" positive)."""
SAMPLE_EXTENSIONS: Final = (SAMPLE_IMAGE, SAMPLE_TEXT, SAMPLE_META, SAMPLE_CLASS)


def read_class(data: object) -> tuple[str, str | None]:
    """A ``.cls`` member's text, and the label name it holds: None unless it is a class index
    as the shard writer writes it ("0" or "1"; not "01"). verify and the loader both read it so."""
    text = data.decode("ascii", "replace").strip() if isinstance(data, bytes) else ""
    indices = {str(index): name for index, name in enumerate(LABEL_NAMES)}
    return text, indices.get(text)


SAMPLE_META_FIELDS: Final = (
    "photo_id",
    "anps",
    "anp_scores",
    "label",  # the label name
    "owner",
    "license",
    "image_url",
    "words",
)

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(photo_id: str) -> str:
    """The ``__key__`` of a photo's shard sample: its id with every unsafe character replaced.

    WebDataset splits a tar member name at its first dot into key and extension, and paths
    with ``/`` would nest, so only ``[A-Za-z0-9_-]`` are kept; anything else becomes ``_``.
    Flickr ids are digits and pass through unchanged.
    """
    key = _UNSAFE_KEY_CHARS.sub("_", photo_id)
    if not key:
        raise ValueError("a photo id must not be empty")
    return key
