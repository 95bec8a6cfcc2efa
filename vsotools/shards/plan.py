"""Planning a shard set: checking the filtered records, ordering each split, cutting it into parts.

Pure functions on lists and tables: ``read_filtered`` loads and checks the input,
``order_splits`` orders each split (shuffled within each label, the labels interleaved evenly,
so that every stretch of it is a fair mix of labels and a random draw of ANPs and owners),
``cut_parts`` cuts it into balanced ``Part``s, one per shard, and ``samples_per_shard`` sizes
them from the measured bytes of a sample.
"""

from __future__ import annotations

import math
import random
import tarfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vsotools.core.config import ShardConfig
from vsotools.core.schema import FILTERED_SCHEMA, LABEL_NAMES, SPLITS, sample_key
from vsotools.dataset.folder import DatasetFolder
from vsotools.shards.errors import ShardError
from vsotools.shards.manifest import PARTS_DIR, shard_name

SIZE_SPREAD = 4.0
"""Standard deviations of a shard's bytes kept free below ``maxsize`` (see samples_per_shard)."""


def read_filtered(folder: DatasetFolder) -> pa.Table:
    """The dataset's ``filtered.parquet`` with the columns of ``FILTERED_SCHEMA`` and their
    types, checked row by row."""
    path = folder.filtered
    if not path.is_file():
        raise ShardError(f"{path} not found: filter the dataset {folder} first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [name for name in FILTERED_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ShardError(
            f"{path}: missing columns {', '.join(missing)} (not written by vsotools' filter?)"
        )
    table = _with_schema_types(table.select(FILTERED_SCHEMA.names), str(path))
    check_records(table, str(path))
    return table


def _with_schema_types(table: pa.Table, where: str) -> pa.Table:
    """``table`` with each column of the type ``FILTERED_SCHEMA`` gives it. Integers of another
    width and other string encodings are converted when no value changes; anything else (a
    float or boolean label, a numeric photo id or text) is refused."""
    columns = []
    for expected in FILTERED_SCHEMA:
        column = table.column(expected.name)
        if column.type != expected.type:
            if _kind(column.type) != _kind(expected.type) or _kind(column.type) == "other":
                raise ShardError(
                    f"{where}: column {expected.name} holds {column.type} values, expected"
                    f" {expected.type}"
                )
            try:
                column = column.cast(expected.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ShardError(f"{where}: column {expected.name}: {exc}") from None
        columns.append(column)
    return pa.table(columns, names=FILTERED_SCHEMA.names)


def _kind(type_: pa.DataType) -> str:
    if pa.types.is_integer(type_):
        return "integer"
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return "string"
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return f"list of {_kind(type_.value_type)}"
    return "other"


def check_records(table: pa.Table, where: str) -> None:
    """Refuse rows that cannot become samples, and two photos that would share a sample key."""
    names = ("photo_id", "split", "label", "label_name", "image_path", "text")
    columns = [table.column(name).to_pylist() for name in names]
    row_of_key: dict[str, int] = {}
    for row, values in enumerate(zip(*columns, strict=True)):
        record = dict(zip(names, values, strict=True))
        problem = _record_problem(record)
        if problem is None:
            first = row_of_key.setdefault(sample_key(record["photo_id"]), row)
            problem = _key_problem(record["photo_id"], first, columns[0][first], row)
        if problem:
            raise ShardError(f"{where}: row {row} (photo {record['photo_id']!r}): {problem}")


def _record_problem(record: Mapping[str, Any]) -> str | None:
    label = record["label"]
    if not record["photo_id"]:
        return "empty photo_id"
    if record["split"] not in SPLITS:
        return f"split {record['split']!r} is not one of {', '.join(SPLITS)}"
    if label not in range(len(LABEL_NAMES)):
        return f"label {label!r} is not 0 or 1"
    if record["label_name"] != LABEL_NAMES[label]:
        return f"label_name {record['label_name']!r} does not match label {label}"
    if not record["image_path"]:
        return "no image_path"
    if record["text"] is None:
        return "no text"
    return None


def _key_problem(photo_id: str, first_row: int, first_id: str, row: int) -> str | None:
    if first_row == row:
        return None
    if first_id == photo_id:
        return f"the same photo id as row {first_row}"
    return (
        f"its sample key {sample_key(photo_id)!r} is also that of photo {first_id!r}"
        f" (row {first_row}); every sample needs its own key"
    )


def order_split(labels: Sequence[int], rng: random.Random) -> list[int]:
    """Indices into ``labels`` in writing order: shuffled within each label, labels interleaved.

    Item j of a label with n items sits at position (j + u) / n, u drawn once per label; sorting
    by position spreads every label evenly, so any stretch of the order holds each label in
    proportion to the whole (within two samples) and a random draw of everything else.
    """
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_label[label].append(index)
    positioned: list[tuple[float, int, int]] = []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        offset = rng.random()
        positioned += [((j + offset) / len(members), label, i) for j, i in enumerate(members)]
    positioned.sort()
    return [index for _, _, index in positioned]


def shard_count(samples: int, per_shard: int, at_least: int = 1) -> int:
    """Shards for ``samples``: enough to hold ``per_shard`` each, and ``at_least`` when possible."""
    if samples == 0:
        return 0
    return max(math.ceil(samples / per_shard), min(at_least, samples))


def cut_balanced(items: Sequence[int], parts: int) -> list[list[int]]:
    """``items`` cut into ``parts`` consecutive runs whose lengths differ by at most one."""
    if parts == 0:
        return []
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        runs.append(list(items[start:end]))
        start = end
    return runs


@dataclass(frozen=True)
class Part:
    """One shard to write: the rows of the filtered table it holds, in writing order."""

    split: str
    index: int
    rows: tuple[int, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def marker(self) -> str:
        return f"{PARTS_DIR}/{self.name.removesuffix('.tar')}.json"


def order_splits(splits: Sequence[str], labels: Sequence[int], seed: int) -> dict[str, list[int]]:
    """Row indices of each split in writing order (``order_split``), deterministic given seed."""
    rows_of: dict[str, list[int]] = defaultdict(list)
    for row, split in enumerate(splits):
        rows_of[split].append(row)
    ordered = {}
    for split in SPLITS:
        rows = rows_of.get(split, [])
        order = order_split([labels[r] for r in rows], random.Random(f"{seed}:{split}"))
        ordered[split] = [rows[i] for i in order]
    return ordered


def cut_parts(ordered: Mapping[str, list[int]], counts: Mapping[str, int], seed: int) -> list[Part]:
    """Each split's ordered rows cut into ``counts[split]`` parts, each part shuffled inside."""
    parts = []
    for split, rows in ordered.items():
        for index, run in enumerate(cut_balanced(rows, counts.get(split, 0))):
            random.Random(f"{seed}:{split}:{index}").shuffle(run)
            parts.append(Part(split, index, tuple(run)))
    return parts


def samples_per_shard(config: ShardConfig, mean: float, std: float) -> int:
    """Most samples a shard takes under ``maxcount`` and, from sample sizes, under ``maxsize``.

    n samples of mean size m and deviation s make a shard of about n*m +- sqrt(n)*s bytes; n is
    the largest with n*m + SIZE_SPREAD*sqrt(n)*s within maxsize, so that a shard overshoots only
    when its images encode far larger than the measured ones.
    """
    room = config.maxsize - tarfile.RECORDSIZE
    spread = SIZE_SPREAD * std
    root = (-spread + math.sqrt(spread * spread + 4 * mean * max(room, 0))) / (2 * mean)
    n = math.floor(root * root)
    # The square of a square root can fall short of a whole number: take a count that fits.
    while (n + 1) * mean + spread * math.sqrt(n + 1) <= room:
        n += 1
    return max(1, min(config.maxcount, n))
