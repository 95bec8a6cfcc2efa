"""Small real dataset folders for tests: photo records written as fetch writes them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vsotools.core import schema


def photo(photo_id: str, **fields: Any) -> dict[str, Any]:
    """A fetched photo record (status ok, a distinct image) with ``fields`` overriding."""
    record: dict[str, Any] = dict.fromkeys(schema.PHOTO_SCHEMA.names)
    record.update(
        photo_id=photo_id,
        source=schema.SOURCE_FLICKR,
        anps=[],
        owner=f"owner-{photo_id}@N01",
        license="4",
        image_url=f"http://127.0.0.1/{photo_id}.jpg",
        image_path=f"images/{photo_id}.jpg",
        status=schema.STATUS_OK,
        sha256=hashlib.sha256(photo_id.encode()).hexdigest(),
        width=500,
        height=375,
    )
    record.update(fields)
    return record


_WORDS = ("sunny", "beach", "walk", "with", "friends", "under", "a", "blue", "sky", "today")


def text_of(n: int, salt: str = "") -> str:
    """A description of exactly ``n`` words (``salt`` makes otherwise equal texts differ)."""
    words = [_WORDS[i % len(_WORDS)] for i in range(n)]
    if salt and words:
        words[0] = salt
    return " ".join(words)


def write_metadata(data_dir: Path, records: list[dict[str, Any]], part: int = 0) -> Path:
    """Write ``records`` as ``DATA/metadata/part-NNNNN.parquet``."""
    path = data_dir / "metadata" / f"part-{part:05d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=schema.PHOTO_SCHEMA), path)
    return path


def write_pairs(path: Path, images: dict[str, str], text: str = "a sunny day {id}") -> Path:
    """A JSONL pairs file: one positive pair per ``id -> image``, its text ``text`` with ``{id}``
    replaced by the pair's id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {"id": pair_id, "text": text.format(id=pair_id), "label": "positive", "image": image}
        )
        for pair_id, image in images.items()
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def outcomes(
    data_dir: Path, *, failed_errors_only: bool = False
) -> dict[str, tuple[str, str | None]]:
    """photo id -> (status, error) of the photo records a fetch wrote in ``data_dir``; with
    ``failed_errors_only``, the error of a record whose status is not failed reads None."""
    found = {}
    for row in pq.read_table(data_dir / "metadata").to_pylist():
        error = row["error"]
        if failed_errors_only and row["status"] != schema.STATUS_FAILED:
            error = None
        found[row["photo_id"]] = (row["status"], error)
    return found


def write_manifest(path: Path, scores: dict[str, float]) -> Path:
    lines = ["anp,adjective,noun,sentiment"]
    lines += [f"{anp},{anp.split('_')[0]},{anp.split('_')[1]},{s}" for anp, s in scores.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
