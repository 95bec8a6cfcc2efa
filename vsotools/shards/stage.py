"""``vsotools shard``: the filtered dataset as WebDataset tar shards, one set per split.

Reads ``DATA/filtered.parquet`` (``schema.FILTERED_SCHEMA``) and the images it names under DATA;
writes, to a local folder or an fsspec URL (``vsotools.shardset.Location``)::

    SHARDS/train-000000.tar ...   per photo: KEY.jpg, KEY.txt, KEY.json, KEY.cls (schema.SAMPLE_*)
    SHARDS/test-000000.tar ...
    SHARDS/_parts/job.json        what the set is being written from, and how it is cut
    SHARDS/_parts/<shard>.json    one completion marker per shard, written after its shard
    SHARDS/recipe.toml            the resolved recipe
    SHARDS/manifest.json          written last: the set is complete (vsotools.shardset)

The work comes in numbered parts, one per shard. ``order_split`` orders each split (shuffled
within each label, the labels interleaved evenly, so that every stretch of it is a fair mix of
labels and a random draw of ANPs and owners); ``cut_parts`` cuts it into balanced parts;
``write_shard`` is the pure, idempotent function of one part that a process pool maps over them;
``write_shards`` plans, skips the parts whose marker says they are done, runs the rest and writes
the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import queue
import random
import re
import statistics
import tarfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from vsotools.core import images
from vsotools.core.config import Recipe, ShardConfig, recipe_to_toml
from vsotools.core.errors import VsoError
from vsotools.core.schema import (
    FILTERED_SCHEMA,
    LABEL_NAMES,
    SAMPLE_CLASS,
    SAMPLE_IMAGE,
    SAMPLE_META,
    SAMPLE_META_FIELDS,
    SAMPLE_TEXT,
    SPLITS,
    TRAIN,
    sample_key,
)
from vsotools.shards.format import (
    MANIFEST_NAME,
    Location,
    ShardInfo,
    ShardManifest,
    is_shard_name,
    shard_name,
    write_manifest,
)

log = logging.getLogger(__name__)

FILTERED_NAME = "filtered.parquet"
PARTS_DIR = "_parts"
JOB_NAME = f"{PARTS_DIR}/job.json"
RECIPE_NAME = "recipe.toml"

SETTINGS = ("image_size", "quality", "maxcount", "maxsize", "seed", "readers")
"""The ``[shard]`` keys that shape a set's bytes: a rerun resumes a set only when they match."""

SIZE_SAMPLE = 48
"""Images re-encoded up front to measure the bytes of a sample (for ``--maxsize``)."""
SIZE_SPREAD = 4.0
"""Standard deviations of a shard's bytes kept free below ``maxsize`` (see samples_per_shard)."""

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
"""Skip reasons beside ``images``' rejection reasons (not_an_image, truncated, ...)."""

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


class ShardError(VsoError):
    """The input cannot be sharded, or the output location holds another shard set."""


# --- reports ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSummary:
    shards: int
    samples: int
    labels: dict[str, int]


@dataclass
class ShardReport:
    """What ``write_shards`` did."""

    location: str
    splits: dict[str, SplitSummary]
    written: int = 0
    """Shards written by this run."""
    reused: int = 0
    """Shards an interrupted earlier run had completed."""
    already_complete: bool = False
    """The location already held this very set; nothing was written."""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """Photos left out (missing or undecodable image), with ``photo_id`` and ``reason``."""
    warnings: list[str] = field(default_factory=list)


# --- input ------------------------------------------------------------------------------------


def read_filtered(data_dir: Path) -> pa.Table:
    """``DATA/filtered.parquet`` with the columns of ``FILTERED_SCHEMA``, checked row by row."""
    path = data_dir / FILTERED_NAME
    if not path.is_file():
        raise ShardError(f"{path} not found: run `vsotools filter {data_dir}` first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [name for name in FILTERED_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ShardError(
            f"{path}: missing columns {', '.join(missing)} (not written by `vsotools filter`?)"
        )
    table = table.select(FILTERED_SCHEMA.names)
    check_records(table, str(path))
    return table


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- planning: pure functions on lists ---------------------------------------------------------


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
    return max(1, min(config.maxcount, math.floor(root * root)))


# --- one sample ---------------------------------------------------------------------------------


class Skipped(Exception):
    """A photo that cannot become a sample; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_image(data_dir: Path, image_path: str) -> bytes:
    """The stored image bytes; raises ``Skipped`` when missing or unreadable."""
    path = data_dir / image_path
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise Skipped(MISSING_IMAGE, f"{path} not found") from None
    except OSError as exc:
        raise Skipped(UNREADABLE_IMAGE, f"{path}: {exc.strerror or exc}") from None


def encode_sample(
    record: Mapping[str, Any], image: bytes, *, image_size: int, quality: int
) -> dict[str, bytes]:
    """The shard sample of one filtered record: extension -> bytes (``schema.SAMPLE_*``).

    The image is decoded (JPEG at the smallest DCT scale that keeps ``image_size``), resized so
    that its shorter side is ``image_size`` and re-encoded; raises ``Skipped`` if it cannot be.
    """
    try:
        picture = images.load_rgb(image, shorter_side_at_least=image_size)
        jpeg = images.encode_jpeg(images.resize_shorter_side(picture, image_size), quality)
    except images.ImageRejected as exc:
        raise Skipped(exc.reason, str(exc)) from None
    except Exception as exc:  # Pillow raises many types on odd files; one must not stop a run
        raise Skipped(images.NOT_AN_IMAGE, f"{type(exc).__name__}: {exc}") from None
    meta = {name: record[name] for name in SAMPLE_META_FIELDS if name != "label"}
    meta["label"] = LABEL_NAMES[record["label"]]
    return {
        SAMPLE_IMAGE: jpeg,
        SAMPLE_TEXT: record["text"].encode("utf-8"),
        SAMPLE_META: json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
        SAMPLE_CLASS: str(record["label"]).encode("ascii"),
    }


def tar_bytes(sample: Mapping[str, bytes]) -> int:
    """Bytes a sample takes in a tar: a header block per member plus its padded data."""
    block = tarfile.BLOCKSIZE
    return sum(block + -(-len(data) // block) * block for data in sample.values())


# --- one shard: the pure, idempotent function of a part ------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    """What every part of one run shares; pickled to the worker processes."""

    data_dir: Path
    location: Location
    image_size: int
    quality: int
    fingerprint: str


@dataclass(frozen=True)
class PartResult:
    """A written part, as its completion marker records it."""

    split: str
    name: str
    fingerprint: str
    info: ShardInfo | None
    """None when not one of the part's images could be read (no shard is written then)."""
    skipped: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "shard": self.info.to_json() if self.info else None,
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, data: Any) -> PartResult:
        return cls(
            split=str(data["split"]),
            name=str(data["name"]),
            fingerprint=str(data["fingerprint"]),
            info=ShardInfo.from_json(data["shard"]) if data["shard"] else None,
            skipped=list(data["skipped"]),
        )


class _Empty(Exception):
    """No sample of a part could be written: its shard is dropped."""


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        self.raw.write(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes


def write_shard(
    job: ShardJob,
    part: Part,
    records: Sequence[Mapping[str, Any]],
    on_record: Callable[[int], object] | None = None,
) -> PartResult:
    """Write ``part``'s records as one tar shard, then its completion marker; return the marker.

    The shard appears under its final name only once complete; writing the same part again
    gives the same bytes (fixed member metadata, deterministic encoding), so a rerun after a
    crash at any point is safe. Photos whose image is missing or undecodable are left out and
    listed; ``on_record(1)`` is called after each record, written or not.
    """
    skipped: list[dict[str, Any]] = []
    labels: Counter[str] = Counter()
    samples = 0
    info = None
    with contextlib.suppress(_Empty), job.location.open_atomic(part.name) as fh:
        out = _HashingWriter(fh)
        # GNU headers: plain for names of up to 100 characters, a long-name entry beyond.
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for record in records:
                try:
                    image = read_image(job.data_dir, record["image_path"])
                    sample = encode_sample(
                        record, image, image_size=job.image_size, quality=job.quality
                    )
                except Skipped as exc:
                    skipped.append(_skip_entry(part.split, record, exc))
                else:
                    _add_sample(tar, sample_key(record["photo_id"]), sample)
                    samples += 1
                    labels[LABEL_NAMES[record["label"]]] += 1
                if on_record:
                    on_record(1)
        if samples == 0:
            raise _Empty
        info = ShardInfo(part.name, samples, out.bytes, out.sha256.hexdigest(), dict(labels))
    result = PartResult(part.split, part.name, job.fingerprint, info, skipped)
    job.location.write_bytes(part.marker, _json_bytes(result.to_json()))
    return result


def _add_sample(tar: tarfile.TarFile, key: str, sample: Mapping[str, bytes]) -> None:
    # TarInfo's defaults (mtime 0, mode 0o644, uid/gid 0, no user names) keep shards reproducible.
    for extension, data in sample.items():
        member = tarfile.TarInfo(f"{key}.{extension}")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))


def _skip_entry(split: str, record: Mapping[str, Any], exc: Skipped) -> dict[str, Any]:
    return {
        "photo_id": record["photo_id"],
        "split": split,
        "image_path": record["image_path"],
        "reason": exc.reason,
        "detail": exc.detail,
    }


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# --- running the parts ----------------------------------------------------------------------------

_progress_queue: Any = None


def _init_worker(progress_queue: Any, parent: int) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    # ``parent`` comes from the parent itself: had it died while this process was starting,
    # os.getppid() would already name whichever process adopted this one.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """End this worker when the process that started it is gone (killed, out of memory).

    A pool worker otherwise waits for work forever; an unfinished shard is only a temporary
    file, which the next run removes.
    """
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


class _QueueCounter:
    """``on_record`` for a worker process: reports to the parent's progress bar in batches."""

    def __init__(self, progress_queue: Any, part: str, every: int = 16) -> None:
        self.queue, self.part, self.every, self.pending = progress_queue, part, every, 0

    def __call__(self, n: int) -> None:
        self.pending += n
        if self.pending >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.queue is not None:
            self.queue.put((self.part, self.pending))
        self.pending = 0


def _write_shard_in_worker(job: ShardJob, part: Part, table: pa.Table) -> PartResult:
    counter = _QueueCounter(_progress_queue, part.name)
    try:
        return write_shard(job, part, table.to_pylist(), counter)
    finally:
        counter.flush()


class _Progress:
    """The progress bar: records processed, shards done; exact in whatever order reports come."""

    def __init__(self, bar: tqdm, parts: Sequence[Part]) -> None:
        self.bar = bar
        self.sizes = {part.name: len(part.rows) for part in parts}
        self.reported: Counter[str] = Counter()
        self.done: set[str] = set()

    def records(self, part: str, n: int) -> None:
        if part not in self.done:  # a late report of a finished part is already counted
            self.reported[part] += n
            self.bar.update(n)

    def shard_done(self, part: str) -> None:
        self.done.add(part)
        self.bar.update(self.sizes[part] - self.reported[part])
        self.bar.set_postfix_str(f"shards {len(self.done)}/{len(self.sizes)}")


def run_parts(
    job: ShardJob, table: pa.Table, parts: Sequence[Part], *, workers: int, progress: bool
) -> list[PartResult]:
    """Write ``parts`` with ``workers`` processes (in this one when 1); results in part order."""
    total = sum(len(part.rows) for part in parts)
    results: dict[str, PartResult] = {}
    with tqdm(total=total, unit="img", desc="shard", disable=not progress) as bar:
        tracker = _Progress(bar, parts)
        if workers == 1 or len(parts) <= 1:
            for part in parts:
                records = table.take(list(part.rows)).to_pylist()
                on_record = functools.partial(tracker.records, part.name)
                results[part.name] = write_shard(job, part, records, on_record)
                tracker.shard_done(part.name)
        else:
            for result in _run_in_pool(job, table, parts, workers, tracker):
                results[result.name] = result
                tracker.shard_done(result.name)
    return [results[part.name] for part in parts]


def _run_in_pool(
    job: ShardJob, table: pa.Table, parts: Sequence[Part], workers: int, tracker: _Progress
) -> Iterator[PartResult]:
    """Results of ``parts`` as the worker processes finish them."""
    # spawn, not fork: the parent may hold threads (Arrow's pool, s3fs's event loop).
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    # Largest parts first, so that the processes run out of work at about the same time.
    todo = iter(sorted(parts, key=lambda part: -len(part.rows)))
    pending: set[Future[PartResult]] = set()
    pool = ProcessPoolExecutor(
        min(workers, len(parts)),
        mp_context=context,
        initializer=_init_worker,
        initargs=(progress_queue, os.getpid()),
    )

    def submit_next() -> None:
        # A few parts in flight at a time: each carries its slice of the table.
        part = next(todo, None)
        if part is not None:
            rows = table.take(list(part.rows))
            pending.add(pool.submit(_write_shard_in_worker, job, part, rows))

    try:
        for _ in range(2 * workers):
            submit_next()
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(progress_queue, tracker)
            for future in done:
                yield future.result()
                submit_next()
    except BrokenProcessPool:
        pool.shutdown(wait=False, cancel_futures=True)
        raise ShardError(
            "a shard writer process died (out of memory? killed?); rerun the same command to"
            " finish the set"
        ) from None
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def _drain(progress_queue: Any, tracker: _Progress) -> None:
    while True:
        try:
            part, n = progress_queue.get_nowait()
        except queue.Empty:
            return
        tracker.records(part, n)


# --- the set: planning, resuming, the manifest ----------------------------------------------------


def write_shards(
    recipe: Recipe,
    data_dir: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> ShardReport:
    """Write ``DATA/filtered.parquet`` and its images as a WebDataset shard set at ``out``.

    ``out`` is a local folder or an fsspec URL (``s3://bucket/prefix``). A location that holds
    the complete set of this very input and configuration is left as it is; one holding an
    unfinished run of it is finished; one holding a set written from other input or settings is
    refused unless ``overwrite``, which deletes that set first.
    """
    config = recipe.shard
    data_dir = Path(data_dir)
    table = read_filtered(data_dir)
    if table.num_rows == 0:
        raise ShardError(f"{data_dir / FILTERED_NAME}: no records to shard")
    build = _build(config, data_dir, table.num_rows)
    location = Location(out)
    location.prepare()

    previous = _previous_state(location, build, overwrite)
    if isinstance(previous, ShardManifest):
        log.debug("%s already holds this shard set; nothing to do", location)
        return _report(location, previous, already_complete=True)
    if overwrite:
        clear_shard_set(location)
    _remove_temporaries(location)

    splits = table.column("split").to_pylist()
    labels = table.column("label").to_pylist()
    ordered = order_splits(splits, labels, config.seed)
    job_state = previous or _new_job_state(build, config, ordered, table, data_dir, location)
    parts = cut_parts(ordered, job_state["shards"], config.seed)

    job = ShardJob(
        data_dir=data_dir,
        location=location,
        image_size=config.image_size,
        quality=config.quality,
        fingerprint=build["fingerprint"],
    )
    done = _completed_parts(location, parts, build["fingerprint"])
    todo = [part for part in parts if part.name not in done]
    if done:
        log.info("resuming: %d of %d shards already written", len(done), len(parts))
    written = run_parts(job, table, todo, workers=config.workers, progress=progress)
    results = {result.name: result for result in [*done.values(), *written]}
    ordered_results = [results[part.name] for part in parts]

    skipped = [entry for result in ordered_results for entry in result.skipped]
    _check_skipped(skipped, table.num_rows, config, location)
    manifest = ShardManifest(
        splits=_manifest_splits(ordered_results),
        recipe=dataclasses.asdict(recipe),
        build=build,
        skipped=skipped,
    )
    location.write_bytes(RECIPE_NAME, recipe_to_toml(recipe).encode("utf-8"))
    write_manifest(location, manifest)
    report = _report(location, manifest, written=len(written), reused=len(done))
    for message in report.warnings:
        log.warning("%s", message)
    return report


def _build(config: ShardConfig, data_dir: Path, records: int) -> dict[str, Any]:
    """What the set is written from; its fingerprint tells a resumable run from a foreign one."""
    settings = {key: getattr(config, key) for key in SETTINGS}
    source = {"filtered_sha256": file_sha256(data_dir / FILTERED_NAME), "records": records}
    canonical = json.dumps({"settings": settings, "input": source}, sort_keys=True)
    fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return {"fingerprint": fingerprint, "settings": settings, "input": source}


def _previous_state(
    location: Location, build: dict[str, Any], overwrite: bool
) -> ShardManifest | dict[str, Any] | None:
    """The complete set of this build (a manifest), an unfinished run of it (its job), or None.

    Refuses, unless ``overwrite``, a location holding a set or shard files of another build.
    """
    if overwrite:
        return None
    manifest = _read_json(location, MANIFEST_NAME)
    job = _read_json(location, JOB_NAME)
    if manifest is not None:
        previous = ShardManifest.from_json(manifest, location.url_of(MANIFEST_NAME))
        if previous.build.get("fingerprint") == build["fingerprint"]:
            return previous
        raise ShardError(_refusal(location, "a complete shard set", previous.build, build))
    if job is not None:
        if job.get("fingerprint") == build["fingerprint"]:
            if not isinstance(job.get("shards"), dict):
                raise ShardError(f"{location.url_of(JOB_NAME)}: malformed; pass --overwrite")
            return job
        raise ShardError(_refusal(location, "an unfinished shard set", job, build))
    strays = [name for name in location.list() if is_shard_name(name)]
    if strays:
        raise ShardError(
            f"{location} holds shard files ({', '.join(strays[:3])}"
            f"{', ...' if len(strays) > 3 else ''}) that no vsotools run owns; pass --overwrite"
            " to replace them, or write to another --out"
        )
    return None


def _refusal(location: Location, what: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    old_settings = old.get("settings") or {}
    changes = [
        f"shard.{key} {old_settings.get(key)!r} there, {value!r} now"
        for key, value in new["settings"].items()
        if old_settings.get(key) != value
    ]
    if (old.get("input") or {}).get("filtered_sha256") != new["input"]["filtered_sha256"]:
        changes.append(f"{FILTERED_NAME} differs from the one it was written from")
    return (
        f"{location} holds {what} written with another configuration"
        f" ({'; '.join(changes) or 'unknown build'}); pass --overwrite to replace it,"
        " or write to another --out"
    )


def _new_job_state(
    build: dict[str, Any],
    config: ShardConfig,
    ordered: Mapping[str, list[int]],
    table: pa.Table,
    data_dir: Path,
    location: Location,
) -> dict[str, Any]:
    """Measure a sample's size, decide each split's shard count, and record it as the job."""
    first_rows = [row for rows in ordered.values() for row in rows][:SIZE_SAMPLE]
    mean, std = measure_sample_bytes(table.take(first_rows).to_pylist(), data_dir, config)
    per_shard = samples_per_shard(config, mean, std)
    counts = {
        split: shard_count(len(rows), per_shard, config.readers if split == TRAIN else 1)
        for split, rows in ordered.items()
    }
    state = {**build, "sample_bytes": {"mean": mean, "std": std}, "shards": counts}
    location.write_bytes(JOB_NAME, _json_bytes(state))
    return state


def measure_sample_bytes(
    records: Iterable[Mapping[str, Any]], data_dir: Path, config: ShardConfig
) -> tuple[float, float]:
    """Mean and standard deviation of the tar bytes of ``records``' samples (readable ones)."""
    sizes = []
    for record in records:
        with contextlib.suppress(Skipped):
            image = read_image(data_dir, record["image_path"])
            sample = encode_sample(
                record, image, image_size=config.image_size, quality=config.quality
            )
            sizes.append(tar_bytes(sample))
    if not sizes:
        # No readable image among them: the run will report that; plan for large samples.
        return float(config.image_size * config.image_size), 0.0
    return statistics.fmean(sizes), statistics.pstdev(sizes)


def _completed_parts(
    location: Location, parts: Sequence[Part], fingerprint: str
) -> dict[str, PartResult]:
    """Parts whose marker belongs to this build and whose shard is in place."""
    markers = set(location.list(PARTS_DIR))
    done = {}
    for part in parts:
        if part.marker.rsplit("/", 1)[-1] not in markers:
            continue
        data = _read_json(location, part.marker)
        try:
            result = PartResult.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if result.fingerprint != fingerprint:
            continue
        if result.info is None or location.size(part.name) == result.info.bytes:
            done[part.name] = result
    return done


def _check_skipped(
    skipped: list[dict[str, Any]], records: int, config: ShardConfig, location: Location
) -> None:
    if not skipped:
        return
    share = len(skipped) / records
    first = skipped[0]
    example = f"first: photo {first['photo_id']!r}, {first['reason']}: {first['detail']}"
    if len(skipped) == records:
        raise ShardError(f"no image could be read ({example}); is DATA the folder fetch wrote?")
    if share > config.max_skipped:
        raise ShardError(
            f"{len(skipped):,} of {records:,} images ({share:.1%}) are missing or undecodable,"
            f" more than shard.max_skipped={config.max_skipped:g} ({example}); the shards"
            f" written so far are kept in {location}: fix the images and rerun with --overwrite,"
            " or accept the loss with --set shard.max_skipped=..."
        )
    log.warning(
        "left out %d photos whose image is missing or undecodable (%s); listed in %s",
        len(skipped),
        example,
        location.url_of(MANIFEST_NAME),
    )


def _manifest_splits(results: Sequence[PartResult]) -> dict[str, list[ShardInfo]]:
    splits: dict[str, list[ShardInfo]] = {}
    for result in results:
        shards = splits.setdefault(result.split, [])
        if result.info is not None:
            shards.append(result.info)
    return {split: shards for split, shards in splits.items() if shards}


def _report(
    location: Location,
    manifest: ShardManifest,
    *,
    written: int = 0,
    reused: int = 0,
    already_complete: bool = False,
) -> ShardReport:
    splits = {
        split: SplitSummary(len(shards), manifest.samples(split), manifest.labels(split))
        for split, shards in manifest.splits.items()
    }
    warnings = []
    readers = (manifest.build.get("settings") or {}).get("readers", 1)
    train_shards = splits[TRAIN].shards if TRAIN in splits else 0
    if 0 < train_shards < readers:  # none at all: a set made only to evaluate on
        warnings.append(
            f"only {train_shards} train shards for shard.readers={readers} loader processes:"
            " some readers would get no shard; train with fewer readers or on more data"
        )
    maxsize = (manifest.build.get("settings") or {}).get("maxsize")
    for shards in manifest.splits.values():
        for shard in shards:
            if maxsize and shard.bytes > maxsize:
                warnings.append(f"{shard.name} has {shard.bytes:,} bytes, over maxsize {maxsize:,}")
    return ShardReport(
        location=location.url,
        splits=splits,
        written=written,
        reused=reused,
        already_complete=already_complete,
        skipped=list(manifest.skipped),
        warnings=warnings,
    )


def clear_shard_set(location: Location) -> None:
    """Delete what a vsotools shard run leaves at ``location`` (manifest first), nothing else."""
    location.remove(MANIFEST_NAME)
    for name in location.list(PARTS_DIR):
        location.remove(f"{PARTS_DIR}/{name}")
    for name in location.list():
        if is_shard_name(name) or name == RECIPE_NAME:
            location.remove(name)


def _remove_temporaries(location: Location) -> None:
    """Remove the temporary files a killed run left beside the shards (local folders only)."""
    if location.local is None:
        return
    for folder in ("", PARTS_DIR):
        for name in location.list(folder):
            match = _TEMPORARY.match(name)
            if match and _is_ours(folder, match["name"]):
                location.remove(f"{folder}/{name}" if folder else name)


def _is_ours(folder: str, name: str) -> bool:
    if folder == PARTS_DIR:
        return name.endswith(".json")
    return is_shard_name(name) or name in (MANIFEST_NAME, RECIPE_NAME)


def _read_json(location: Location, name: str) -> Any:
    data = location.read_bytes(name)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{location.url_of(name)}: not valid JSON ({exc})") from None
