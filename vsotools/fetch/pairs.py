"""Image+text pairs files: the second source of ``vsotools fetch`` (``--pairs FILE``).

A pairs file is JSONL (``.jsonl``/``.json``), CSV (``.csv``) or Parquet (``.parquet``), with the
columns ``id``, ``text``, ``label`` (``positive``, ``negative`` or ``neutral``) and ``image``: a path
relative to the file's folder, or an ``http(s)`` URL. Other columns are ignored.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vsotools.core.errors import VsoError
from vsotools.core.files import UnsafeFile, file_sha256, open_regular_file
from vsotools.core.schema import GIVEN_LABELS

PAIRS_COLUMNS = ("id", "text", "label", "image")
UNLABELLED_COLUMNS = ("id", "text", "image")
"""The columns a pairs file needs to be labelled by a model (``vsotools predict --pairs``)."""
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


@dataclass(frozen=True)
class BadRow:
    """A row of a pairs file that cannot be used, and why (``read_pairs_leniently``)."""

    line: int
    id: str | None
    reason: str


def check_pairs(path: str | Path) -> int:
    """Read the whole pairs file as ``read_pairs`` does; return how many pairs it holds."""
    return sum(1 for _ in read_pairs(path))


def read_pairs(path: str | Path) -> Iterator[Pair]:
    """The pairs of a file, in file order; refuses a bad row, a repeated id, or a file without
    pairs (once its end is reached, so that a caller storing the pairs as they come can undo
    them all)."""
    found_any = False
    for found in _pairs(Path(path), PAIRS_COLUMNS):
        if isinstance(found, BadRow):
            raise PairsError(f"{path}:{found.line}: {found.reason}")
        found_any = True
        yield found
    if not found_any:
        raise PairsError(f"{path}: holds no pairs")


def read_pairs_leniently(path: str | Path) -> Iterator[Pair | BadRow]:
    """The pairs of a file to apply a model to: the label column may be absent, and a bad row
    is given as a ``BadRow`` with its reason instead of stopping the reading. A file that is
    not a readable pairs file at all still raises ``PairsError``."""
    yield from _pairs(Path(path), UNLABELLED_COLUMNS)


def _pairs(path: Path, columns: tuple[str, ...]) -> Iterator[Pair | BadRow]:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise PairsError(
            f"{path}: unknown pairs format {path.suffix!r} (use .jsonl, .csv or .parquet)"
        )
    with _reading(path):
        source = open_regular_file(path)
    with source:
        yield from _checked_pairs(path, kind, source, columns)


def pairs_digest(path: Path) -> str:
    """The sha256 of the pairs file at ``path`` (``PairsError`` where it cannot be read)."""
    with _reading(path):
        return file_sha256(path)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A pairs file that cannot be opened or read, as one ``PairsError`` line."""
    try:
        yield
    except FileNotFoundError:
        raise PairsError(f"{path}: no such file") from None
    except UnsafeFile as exc:
        raise PairsError(f"the pairs file {exc.detail}") from None
    except OSError as exc:
        raise PairsError(f"{path}: cannot read the pairs file ({exc.strerror})") from None


def _checked_pairs(
    path: Path, kind: str, source: BinaryIO, columns: tuple[str, ...]
) -> Iterator[Pair | BadRow]:
    readers = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}
    rows = readers[kind](path, source, columns)
    seen: dict[str, int] = {}
    for line, row in _utf8(rows, path):
        try:
            pair = _pair(line, row, columns)
        except PairsError as exc:
            yield BadRow(line, _id_of(row), str(exc))
            continue
        if pair.id in seen:
            yield BadRow(line, pair.id, f"id {pair.id!r} already used at line {seen[pair.id]}")
            continue
        seen[pair.id] = line
        yield pair


def _id_of(row: Any) -> str | None:
    value = row.get("id") if isinstance(row, Mapping) else None
    return None if value is None or isinstance(value, list | dict) else _scalar_text(value)


def _utf8(rows: Iterator[tuple[int, Mapping[str, Any]]], path: Path):
    """``rows``, with a file that is not UTF-8 text refused in one line."""
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise PairsError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a line)"
        ) from None


MAX_LINE = 1 << 22
"""The longest line of a JSONL pairs file read, in characters (4 Mi): a line is parsed whole."""


def _jsonl_rows(
    path: Path, source: BinaryIO, columns: tuple[str, ...]
) -> Iterator[tuple[int, Any]]:
    fh = io.TextIOWrapper(source, encoding="utf-8-sig")
    line = 0
    while text := fh.readline(MAX_LINE + 1):
        line += 1
        if len(text) > MAX_LINE:
            while len(text) > MAX_LINE and not text.endswith("\n"):  # the rest of that line
                text = fh.readline(MAX_LINE + 1)
            yield line, _NotJson(f"a line of more than {MAX_LINE:,} characters")
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
        except json.JSONDecodeError as exc:
            row = _NotJson(exc.msg)
        except ValueError as exc:  # NaN, Infinity, 1e400, an integer of thousands of digits
            row = _NotJson(str(exc))
        except RecursionError:
            row = _NotJson("nested too deeply")
        yield line, row


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a value JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is too large a number")
    return value


def _csv_rows(path: Path, source: BinaryIO, columns: tuple[str, ...]) -> Iterator[tuple[int, Any]]:
    with io.TextIOWrapper(source, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise PairsError(f"{path}:1: missing column(s) {', '.join(missing)}")
            for row in reader:
                yield reader.line_num, row
        except csv.Error as exc:  # a field over csv's size limit (128 KiB)
            # line_num counts the lines read whole: the record at fault starts on the next one.
            line = reader.line_num + 1
            raise PairsError(f"{path}:{line}: not CSV this reader takes ({exc})") from None


def _parquet_rows(
    path: Path, source: BinaryIO, columns: tuple[str, ...]
) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
    except Exception as exc:  # pyarrow raises ArrowInvalid and others for a damaged file
        raise PairsError(f"{path}: not a readable Parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise PairsError(f"{path}: missing column(s) {', '.join(missing)}")
    row = 0
    present = [c for c in PAIRS_COLUMNS if c in names]
    for batch in parquet.iter_batches(columns=present, batch_size=10_000):
        for record in batch.to_pylist():
            row += 1
            yield row, record


class _NotJson(str):
    """A JSONL line that does not parse: the parser's message."""


def _pair(line: int, row: Any, columns: tuple[str, ...]) -> Pair:
    """The pair of one row; raises ``PairsError`` with the reason (the caller adds the place)."""
    if isinstance(row, _NotJson):
        raise PairsError(f"not JSON: {row}")
    if not isinstance(row, Mapping):
        raise PairsError("expected a JSON object")
    missing = [c for c in columns if c not in row]
    if missing:
        raise PairsError(f"missing field(s) {', '.join(missing)}")
    for column in PAIRS_COLUMNS:
        if isinstance(row.get(column), list | dict):
            kind = "list" if isinstance(row[column], list) else "object"
            raise PairsError(f"{column} is a JSON {kind}, not a single value")
        if isinstance(row.get(column), float) and not math.isfinite(row[column]):
            raise PairsError(f"{column} is {row[column]}, not a value")
    pair_id = _scalar_text(row["id"])
    if not pair_id:
        raise PairsError("empty id")
    label = _scalar_text(row.get("label")).strip().lower()
    if "label" in columns and label not in GIVEN_LABELS:
        raise PairsError(
            f"label {row['label']!r} of {pair_id!r} is not one of {', '.join(GIVEN_LABELS)}"
        )
    image = _scalar_text(row["image"]).strip()
    if not image:
        raise PairsError(f"empty image of {pair_id!r}")
    return Pair(id=pair_id, text=_scalar_text(row["text"]), label=label, image=image, line=line)


def _scalar_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
