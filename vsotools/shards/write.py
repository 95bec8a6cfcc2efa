"""Writing one shard: a photo's sample, and the pure, idempotent function of one part.

``encode_sample`` turns a filtered record and its stored image into the members of a shard
sample (``schema.SAMPLE_*``); ``write_shard(job, part, records)`` writes a ``Part`` as one tar
shard (a tar of ``KEY.EXT`` members, as webdataset reads them) and then its completion marker.
It depends on nothing but its arguments, so the engine (``core.engine``, through
``shards.pool``) maps it over the parts in this process, a local process pool or Ray tasks.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import tarfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsotools.core import images
from vsotools.core.files import (
    OUTSIDE_ROOT,
    TOO_LARGE,
    HashingStream,
    UnsafeFile,
    contained_path,
    json_bytes,
    read_regular_file,
)
from vsotools.core.schema import (
    LABEL_NAMES,
    SAMPLE_CLASS,
    SAMPLE_IMAGE,
    SAMPLE_META,
    SAMPLE_META_FIELDS,
    SAMPLE_TEXT,
    sample_key,
)
from vsotools.core.storage import Location
from vsotools.shards.manifest import ShardInfo
from vsotools.shards.plan import Part

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
"""Skip reasons beside ``images``' rejection reasons (not_an_image, truncated, ...) and the
unsafe-file reasons (not_a_file, too_large, outside_root)."""


class Skipped(Exception):
    """A photo that cannot become a sample; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_image(images: Path | Location, image_path: str, max_bytes: int) -> bytes:
    """The stored image bytes from the image store (the dataset folder, or a ``Location`` such
    as ``s3://bucket/prefix``); raises ``Skipped`` when missing, unreadable, not a regular file,
    larger than ``max_bytes``, or outside the store."""
    if isinstance(images, Location):
        return _read_stored_image(images, image_path, max_bytes)
    data_dir = images
    try:
        path = contained_path(data_dir, image_path)
        return read_regular_file(path, max_bytes)
    except UnsafeFile as exc:
        raise Skipped(exc.reason, exc.detail) from None
    except FileNotFoundError:
        raise Skipped(MISSING_IMAGE, f"{data_dir / image_path} not found") from None
    except OSError as exc:
        raise Skipped(UNREADABLE_IMAGE, f"{data_dir / image_path}: {exc.strerror or exc}") from None


def _read_stored_image(images: Location, image_path: str, max_bytes: int) -> bytes:
    name = posixpath.normpath(image_path)
    if "\0" in name or name.startswith(("/", "../")) or name in ("..", ".") or "://" in name:
        raise Skipped(OUTSIDE_ROOT, f"{image_path!r} is not a name inside {images}")
    size = images.size(name)
    if size is None:
        raise Skipped(MISSING_IMAGE, f"{images.url_of(name)} not found")
    if size > max_bytes:
        raise Skipped(TOO_LARGE, f"{images.url_of(name)} has {size:,} bytes > {max_bytes:,}")
    data = images.read_bytes(name)
    if data is None:
        raise Skipped(MISSING_IMAGE, f"{images.url_of(name)} not found")
    return data


def encode_sample(
    record: Mapping[str, Any], image: bytes, *, image_size: int, quality: int, max_pixels: int
) -> dict[str, bytes]:
    """The shard sample of one filtered record: extension -> bytes (``schema.SAMPLE_*``).

    The image is decoded (JPEG at the smallest DCT scale that keeps ``image_size``), resized so
    that its shorter side is ``image_size`` and re-encoded; raises ``Skipped`` if it cannot be.
    """
    try:
        picture = images.load_rgb(image, shorter_side_at_least=image_size, max_pixels=max_pixels)
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


@dataclass(frozen=True)
class ShardJob:
    """What every part of one run shares; pickled to the worker processes."""

    images: Path | Location
    """Where the images are: the dataset folder, or the recipe's ``fetch.image_store``."""
    location: Location
    image_size: int
    quality: int
    fingerprint: str
    max_bytes: int
    """Largest image file read (the recipe's ``fetch.max_bytes``)."""
    max_pixels: int
    """Most pixels of an image decoded (the recipe's ``fetch.max_pixels``)."""


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
        out = HashingStream(fh)
        # GNU headers: plain for names of up to 100 characters, a long-name entry beyond.
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for record in records:
                try:
                    image = read_image(job.images, record["image_path"], job.max_bytes)
                    sample = encode_sample(
                        record,
                        image,
                        image_size=job.image_size,
                        quality=job.quality,
                        max_pixels=job.max_pixels,
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
        info = ShardInfo(part.name, samples, out.bytes, out.hexdigest(), dict(labels))
    result = PartResult(part.split, part.name, job.fingerprint, info, skipped)
    job.location.write_bytes(part.marker, json_bytes(result.to_json()))
    return result


def _add_sample(tar: tarfile.TarFile, key: str, sample: Mapping[str, bytes]) -> None:
    # TarInfo's defaults (mtime 0, mode 0o644, uid/gid 0, no user names) keep shards
    # reproducible. Not webdataset's TarWriter: importing webdataset imports torch, which costs
    # every shard writer process 1.5 s of CPU (docs/performance.md, shard).
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
