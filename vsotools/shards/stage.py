"""``vsotools shard``: the filtered dataset as WebDataset tar shards, one set per split.

Reads the dataset's ``filtered.parquet`` (``schema.FILTERED_SCHEMA``) and the images it names;
writes, to a local folder or an fsspec URL, the shard set ``vsotools.shards.manifest`` describes.
``write_shards`` plans the parts (``shards.plan``), skips those whose completion marker says
they are done, writes the rest (``shards.pool`` mapping ``shards.write.write_shard``), and
writes the manifest last. A location holding the complete set of this very input and
configuration is left as it is; one holding an unfinished run of it is finished; one holding
another set is refused unless the caller asks to replace it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import statistics
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from vsotools.core.config import (
    FetchConfig,
    Recipe,
    ShardConfig,
    output_settings,
    recipe_to_toml,
)
from vsotools.core.engine import PROBE_PREFIX, Engine, open_engine
from vsotools.core.errors import ExistingOutput
from vsotools.core.files import file_sha256, folder_lock, json_bytes, json_sha256
from vsotools.core.schema import TRAIN
from vsotools.core.status import CURRENT, STALE, UNFINISHED
from vsotools.core.storage import Location
from vsotools.dataset.folder import DatasetFolder
from vsotools.shards.errors import ShardError
from vsotools.shards.manifest import (
    JOB_NAME,
    MANIFEST_NAME,
    PARTS_DIR,
    RECIPE_NAME,
    ShardInfo,
    ShardManifest,
    is_shard_name,
    read_json,
    write_manifest,
)
from vsotools.shards.manifest import status as set_status
from vsotools.shards.plan import (
    Part,
    cut_parts,
    order_splits,
    read_filtered,
    samples_per_shard,
    shard_count,
)
from vsotools.shards.pool import run_parts
from vsotools.shards.write import (
    PartResult,
    ShardJob,
    Skipped,
    encode_sample,
    read_image,
    tar_bytes,
)

log = logging.getLogger(__name__)


SIZE_SAMPLE = 48
"""Images re-encoded up front to measure the bytes of a sample (for ``shard.maxsize``)."""


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


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
    """The location already held this very set, complete; nothing was written."""
    repaired: list[str] = field(default_factory=list)
    """Files of a finished set that were missing or damaged and were written again."""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """Photos left out (missing or undecodable image), with ``photo_id`` and ``reason``."""
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_shards(
    recipe: Recipe,
    data_dir: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    replace_other: bool = False,
    progress: bool = False,
) -> ShardReport:
    """Write the dataset's ``filtered.parquet`` and its images as a shard set at ``out``.

    ``out`` is a local folder or an fsspec URL (``s3://bucket/prefix``). A location that holds
    the complete set of this very input and configuration is left as it is; one holding an
    unfinished run of it is finished; one holding a set written from other input or settings is
    refused (``ExistingOutput``) unless ``replace_other``, which deletes that set first (with a
    warning). ``overwrite`` deletes the shard set the location holds (vsotools' files, nothing
    else) and writes it afresh. A local folder is held by one writing process at a time.
    """
    folder = DatasetFolder(data_dir)
    table = read_filtered(folder)
    if table.num_rows == 0:
        raise ShardError(f"{folder.filtered}: no records to shard")
    build = _build(recipe, folder, table.num_rows)
    location = Location(out)
    location.prepare()
    with _lock(location):
        previous = _previous_set(location, build, overwrite, replace_other)
        return _write_shards(recipe, folder, table, build, location, previous, progress)


def _write_shards(
    recipe: Recipe,
    folder: DatasetFolder,
    table: pa.Table,
    build: dict[str, Any],
    location: Location,
    previous: PreviousSet,
    progress: bool,
) -> ShardReport:
    config = recipe.shard
    if previous.state == "complete":
        assert previous.manifest is not None
        log.debug("%s already holds this shard set; nothing to do", location)
        _remove_temporaries(location)
        return _report(location, previous.manifest, already_complete=True)
    if previous.clear:
        clear_shard_set(location)
    if previous.repair:
        log.warning("%s: %s; writing them again", location, previous.why)
    _remove_temporaries(location)

    splits = table.column("split").to_pylist()
    labels = table.column("label").to_pylist()
    ordered = order_splits(splits, labels, config.seed)
    images = image_store(recipe, folder)
    job_state = previous.job or _new_job_state(
        build, config, ordered, table, images, location, recipe.fetch
    )
    parts = cut_parts(ordered, job_state["shards"], config.seed)

    job = ShardJob(
        images=images,
        location=location.absolute(),  # as every worker must find it, wherever it started
        image_size=config.image_size,
        quality=config.quality,
        fingerprint=build["fingerprint"],
        max_bytes=recipe.fetch.max_bytes,
        max_pixels=recipe.fetch.max_pixels,
    )
    done = _completed_parts(location, parts, build["fingerprint"])
    todo = [part for part in parts if part.name not in done]
    if done:
        log.info("resuming: %d of %d shards already written", len(done), len(parts))
    written = []
    if todo:
        with open_engine(recipe.engine) as engine:
            _check_visible(engine, job, table, todo)
            written = run_parts(engine, job, table, todo, workers=config.workers, progress=progress)
    # A worker killed in a part leaves its temporary file; the part's retry wrote another.
    _remove_temporaries(location)
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
    report.repaired = list(previous.repair)
    for message in report.warnings:
        log.warning("%s", message)
    return report


def image_store(recipe: Recipe, folder: DatasetFolder) -> Path | Location:
    """Where the dataset's images are: the recipe's ``fetch.image_store``, else the folder."""
    store = recipe.fetch.image_store
    return Location(store) if store else folder.root.absolute()


def _check_visible(engine: Engine, job: ShardJob, table: pa.Table, parts: Sequence[Part]) -> None:
    """Before any work on a cluster: every node sees the images and the output location."""
    if not engine.distributed:
        return
    probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    job.location.write_bytes(probe, uuid.uuid4().bytes)
    try:
        written = job.location.url_of(probe)
        image = table.column("image_path")[parts[0].rows[0]].as_py()
        images = job.images
        first = images.url_of(image) if isinstance(images, Location) else str(images / image)
        engine.check_visible([written, first])
    finally:
        job.location.remove(probe)


def _lock(location: Location):
    """One writer per local shard folder; an object store offers no such lock."""
    if location.local is None:
        return contextlib.nullcontext()
    return folder_lock(location.local, "this shard set")


def set_build(recipe: Recipe, data_dir: str | Path) -> dict[str, Any]:
    """What the shard set of ``recipe`` over the dataset ``data_dir`` is written from (its
    ``build``), for a caller that asks whether a set is current before running the stage."""
    folder = DatasetFolder(data_dir)
    try:
        records = pq.ParquetFile(folder.filtered).metadata.num_rows
    except FileNotFoundError:
        raise ShardError(
            f"{folder.filtered} not found: filter the dataset {folder} first"
        ) from None
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{folder.filtered}: not a readable Parquet file ({exc})") from None
    return _build(recipe, folder, records)


def _build(recipe: Recipe, folder: DatasetFolder, records: int) -> dict[str, Any]:
    """What the set is written from; its fingerprint tells a resumable run from a foreign one.
    Besides the shard settings, the most bytes and pixels an image may have (``fetch.max_bytes``,
    ``fetch.max_pixels``) shape the set: a larger image is left out."""
    settings = output_settings(recipe.shard)
    source = {
        "filtered_sha256": file_sha256(folder.filtered),
        "records": records,
        "max_image_bytes": recipe.fetch.max_bytes,
        "max_image_pixels": recipe.fetch.max_pixels,
    }
    fingerprint = json_sha256({"settings": settings, "input": source})
    return {"fingerprint": fingerprint, "settings": settings, "input": source}


@dataclass(frozen=True)
class PreviousSet:
    """What a location holds before a run: nothing of ours, the complete set of this build (its
    manifest), or an unfinished run of it (its job: how the set is cut, when it is known);
    ``clear`` when what it holds is to be deleted first; ``repair``, the files of a finished set
    that are missing or damaged, and ``why``."""

    state: Literal["none", "complete", "unfinished"]
    manifest: ShardManifest | None = None
    job: dict[str, Any] | None = None
    clear: bool = False
    repair: tuple[str, ...] = ()
    why: str = ""


def _previous_set(
    location: Location, build: dict[str, Any], overwrite: bool, replace_other: bool
) -> PreviousSet:
    """What ``location`` holds of this build; a location holding a set or shard files of
    another build is refused, unless ``replace_other``."""
    if overwrite:
        return PreviousSet("none", clear=True)
    try:
        return _held_set(location, build)
    except ExistingOutput as exc:
        if not replace_other:
            raise
        log.warning("%s: writing it again", exc)
        return PreviousSet("none", clear=True)


def _held_set(location: Location, build: dict[str, Any]) -> PreviousSet:
    found = set_status(location, build)
    if found.state == CURRENT:
        return PreviousSet("complete", manifest=found.record)
    if found.state == STALE:
        raise ExistingOutput(f"{location} {found.why}", "replace", "elsewhere")
    if found.state == UNFINISHED:
        job = found.record if not isinstance(found.record, ShardManifest) else None
        if job is None:  # a finished set with files gone: its job, if still there, says the cut
            kept = read_json(location, JOB_NAME)
            job = (
                kept
                if isinstance(kept, dict) and kept.get("fingerprint") == build["fingerprint"]
                else None
            )
        if job is not None and not isinstance(job.get("shards"), dict):
            raise ExistingOutput(f"{location.url_of(JOB_NAME)}: malformed", "replace")
        return PreviousSet("unfinished", job=job, repair=found.damaged, why=found.why)
    strays = [name for name in location.list() if is_shard_name(name)]
    if strays:
        raise ExistingOutput(
            f"{location} holds shard files ({', '.join(strays[:3])}"
            f"{', ...' if len(strays) > 3 else ''}) that no vsotools run owns",
            "replace",
            "elsewhere",
        )
    return PreviousSet("none")


def _new_job_state(
    build: dict[str, Any],
    config: ShardConfig,
    ordered: Mapping[str, list[int]],
    table: pa.Table,
    images: Path | Location,
    location: Location,
    fetch: FetchConfig,
) -> dict[str, Any]:
    """Measure a sample's size, decide each split's shard count, and record it as the job."""
    first_rows = [row for rows in ordered.values() for row in rows][:SIZE_SAMPLE]
    records = table.take(first_rows).to_pylist()
    mean, std = measure_sample_bytes(records, images, config, fetch)
    per_shard = samples_per_shard(config, mean, std)
    counts = {
        split: shard_count(len(rows), per_shard, config.readers if split == TRAIN else 1)
        for split, rows in ordered.items()
    }
    state = {**build, "sample_bytes": {"mean": mean, "std": std}, "shards": counts}
    location.write_bytes(JOB_NAME, json_bytes(state))
    return state


def measure_sample_bytes(
    records: Iterable[Mapping[str, Any]],
    images: Path | Location,
    config: ShardConfig,
    fetch: FetchConfig,
) -> tuple[float, float]:
    """Mean and standard deviation of the tar bytes of ``records``' samples (readable ones;
    images within ``fetch``'s bounds)."""
    sizes = []
    for record in records:
        with contextlib.suppress(Skipped):
            image = read_image(images, record["image_path"], fetch.max_bytes)
            sample = encode_sample(
                record,
                image,
                image_size=config.image_size,
                quality=config.quality,
                max_pixels=fetch.max_pixels,
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
        data = read_json(location, part.marker)
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
            f" written so far are kept in {location}: fix the images and write the set again,"
            " or accept the loss by raising shard.max_skipped"
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
