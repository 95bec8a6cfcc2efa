"""Image+text pairs files: the second source of ``vsotools fetch`` (``--pairs FILE``).

A pairs file is JSONL (``.jsonl``/``.json``), CSV (``.csv``) or Parquet (``.parquet``), with the
columns ``id``, ``text``, ``label`` (``positive``, ``negative`` or ``neutral``) and ``image``: a path
relative to the file's folder, or an ``http(s)`` URL. Other columns are ignored.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsotools.core.errors import VsoError
from vsotools.core.schema import GIVEN_LABELS

PAIRS_COLUMNS = ("id", "text", "label", "image")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class PairsError(VsoError):
    """A pairs file cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Pair:
    id: str
    text: str
    label: str
    image: str
    """A URL, or a path relative to the pairs file's folder."""
    line: int
    """Line (JSONL, CSV) or row (Parquet, from 1) it came from."""

    @property
    def is_url(self) -> bool:
        return self.image.lower().startswith(("http://", "https://"))


def read_pairs(path: str | Path) -> Iterator[Pair]:
    """The pairs of a file, in file order; refuses a bad row, a repeated id, or a file without
    pairs (once its end is reached, so that a caller storing the pairs as they come can undo
    them all)."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise PairsError(
            f"{path}: unknown pairs format {path.suffix!r} (use .jsonl, .csv or .parquet)"
        )
    if not path.is_file():
        raise PairsError(f"{path}: no such file")
    rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[kind](path)
    seen: dict[str, int] = {}
    for line, row in _utf8(rows, path):
        pair = _pair(path, line, row)
        if pair.id in seen:
            raise PairsError(f"{path}:{line}: id {pair.id!r} already used at line {seen[pair.id]}")
        seen[pair.id] = line
        yield pair
    if not seen:
        raise PairsError(f"{path}: holds no pairs")


def _utf8(rows: Iterator[tuple[int, Mapping[str, Any]]], path: Path):
    """``rows``, with a file that is not UTF-8 text refused in one line."""
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise PairsError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a line)"
        ) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    with path.open(encoding="utf-8-sig") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PairsError(f"{path}:{line}: not JSON: {exc.msg}") from None
            except RecursionError:
                raise PairsError(f"{path}:{line}: not JSON: nested too deeply") from None
            if not isinstance(row, dict):
                raise PairsError(f"{path}:{line}: expected a JSON object")
            yield line, row


def _csv_rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            missing = [c for c in PAIRS_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise PairsError(f"{path}:1: missing column(s) {', '.join(missing)}")
            for row in reader:
                yield reader.line_num, row
        except csv.Error as exc:  # a field over csv's size limit (128 KiB)
            # line_num counts the lines read whole: the record at fault starts on the next one.
            line = reader.line_num + 1
            raise PairsError(f"{path}:{line}: not CSV this reader takes ({exc})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and others for a damaged file
        raise PairsError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in PAIRS_COLUMNS if c not in parquet.schema_arrow.names]
    if missing:
        raise PairsError(f"{path}: missing column(s) {', '.join(missing)}")
    row = 0
    for batch in parquet.iter_batches(columns=list(PAIRS_COLUMNS), batch_size=10_000):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _pair(path: Path, line: int, row: Mapping[str, Any]) -> Pair:
    missing = [c for c in PAIRS_COLUMNS if c not in row]
    if missing:
        raise PairsError(f"{path}:{line}: missing field(s) {', '.join(missing)}")
    for column in PAIRS_COLUMNS:
        if isinstance(row[column], list | dict):
            kind = "list" if isinstance(row[column], list) else "object"
            raise PairsError(f"{path}:{line}: {column} is a JSON {kind}, not a single value")
    pair_id = _scalar_text(row["id"])
    if not pair_id:
        raise PairsError(f"{path}:{line}: empty id")
    label = _scalar_text(row["label"]).strip().lower()
    if label not in GIVEN_LABELS:
        raise PairsError(
            f"{path}:{line}: label {row['label']!r} of {pair_id!r} is not one of"
            f" {', '.join(GIVEN_LABELS)}"
        )
    image = _scalar_text(row["image"]).strip()
    if not image:
        raise PairsError(f"{path}:{line}: empty image of {pair_id!r}")
    return Pair(id=pair_id, text=_scalar_text(row["text"]), label=label, image=image, line=line)


def _scalar_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
