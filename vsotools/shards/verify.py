"""``vsotools verify``: read a shard set back and check it against its manifest.

Every shard is read whole, locally or through fsspec, and checked for its bytes and sha256, its
samples (each one complete with the ``schema.SAMPLE_EXTENSIONS``, its key once and equal to the
key of its photo id, its class and label name agreeing), its label counts, and every image,
decoded to check that it is a JPEG with the set's shorter side. Across the set: every key once,
so train and test are disjoint, and no shard file that the manifest does not list.
"""

from __future__ import annotations

import io
import json
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from vsotools.core.errors import VsoError
from vsotools.core.files import HashingStream
from vsotools.core.schema import (
    SAMPLE_CLASS,
    SAMPLE_EXTENSIONS,
    SAMPLE_IMAGE,
    SAMPLE_KEY,
    SAMPLE_META,
    SAMPLE_META_FIELDS,
    SAMPLE_TEXT,
    read_class,
    sample_key,
)
from vsotools.core.storage import Location
from vsotools.shards.manifest import ShardInfo, is_shard_name, read_manifest
from vsotools.shards.tar_reader import group_members, tar_members


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a shard set, where it was found."""

    shard: str
    message: str
    key: str | None = None

    def __str__(self) -> str:
        where = f"{self.shard}: {self.key}" if self.key else self.shard
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class ShardCheck:
    """What reading one shard found: its keys in order, and its problems."""

    name: str
    split: str
    keys: list[str]
    problems: list[Problem]


@dataclass
class VerifyReport:
    location: str
    shards: int
    samples: int
    """Samples the manifest lists."""
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "ok": self.ok,
            "shards": self.shards,
            "samples": self.samples,
            "problems": [
                {"shard": p.shard, "key": p.key, "message": p.message} for p in self.problems
            ],
        }


def verify_shards(
    location: str | Path, *, workers: int = 1, progress: bool = False
) -> VerifyReport:
    """Check every shard of the set at ``location`` against its manifest; never raises for a
    damaged shard (that is a ``Problem``), only for a missing or unreadable manifest."""
    where = Location(location)
    manifest = read_manifest(where)
    image_size = (manifest.recipe.get("shard") or {}).get("image_size")
    tasks = [(split, info) for split, shards in manifest.splits.items() for info in shards]
    checks: list[ShardCheck] = []
    with tqdm(total=len(tasks), unit="shard", desc="verify", disable=not progress) as bar:
        for check in _check_all(where, tasks, image_size, workers):
            checks.append(check)
            bar.update(1)
    problems = [problem for check in checks for problem in check.problems]
    problems += _duplicate_keys(checks)
    listed = {info.name for _, info in tasks}
    problems += [
        Problem(name, "shard file not listed in the manifest")
        for name in where.list()
        if is_shard_name(name) and name not in listed
    ]
    samples = sum(info.samples for _, info in tasks)
    return VerifyReport(where.url, len(tasks), samples, problems)


def _check_all(
    where: Location,
    tasks: list[tuple[str, ShardInfo]],
    image_size: int | None,
    workers: int,
) -> Iterator[ShardCheck]:
    if workers <= 1 or len(tasks) <= 1:
        for split, info in tasks:
            yield check_shard(where, split, info, image_size)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
        futures = [
            pool.submit(check_shard, where, split, info, image_size) for split, info in tasks
        ]
        for future in futures:
            yield future.result()


def check_shard(
    location: Location, split: str, info: ShardInfo, image_size: int | None
) -> ShardCheck:
    """Read one shard whole and compare it with its manifest entry."""
    problems: list[Problem] = []

    def problem(message: str, key: str | None = None) -> None:
        problems.append(Problem(info.name, message, key))

    keys: list[str] = []
    labels: Counter[str] = Counter()
    readable = True
    try:
        with location.open_read(info.name) as raw:
            reader = HashingStream(raw)
            try:
                members = tar_members(reader, on_problem=problem)
                for sample in group_members(members, info.name, on_problem=problem):
                    key = sample[SAMPLE_KEY]
                    if key in keys:
                        problem("key appears twice in this shard", key)
                    keys.append(key)
                    found = {k: v for k, v in sample.items() if not k.startswith("__")}
                    label = check_sample(key, found, image_size, problem)
                    if label is not None:
                        labels[label] += 1
            except (ValueError, EOFError) as exc:
                problem(f"not a readable tar file ({exc})")
                readable = False
            reader.read_to_end()
    except FileNotFoundError:
        problem("listed in the manifest but not found")
        return ShardCheck(info.name, split, keys, problems)
    except (OSError, VsoError) as exc:
        problem(f"cannot be read ({exc})")
        return ShardCheck(info.name, split, keys, problems)
    if reader.bytes != info.bytes:
        problem(f"{reader.bytes:,} bytes, the manifest says {info.bytes:,}")
    if reader.hexdigest() != info.sha256:
        problem(f"sha256 {reader.hexdigest()} differs from the manifest's {info.sha256}")
    if not readable:
        return ShardCheck(info.name, split, keys, problems)
    if len(keys) != info.samples:
        problem(f"{len(keys):,} samples, the manifest says {info.samples:,}")
    if dict(labels) != {k: v for k, v in info.labels.items() if v}:
        problem(
            f"labels {dict(sorted(labels.items()))}, the manifest says {dict(sorted(info.labels.items()))}"
        )
    return ShardCheck(info.name, split, keys, problems)


def check_sample(
    key: str,
    members: Mapping[str, bytes],
    image_size: int | None,
    problem: Callable[[str, str | None], None],
) -> str | None:
    """Check one sample's members; report each problem; return its label name when readable."""
    for extension in SAMPLE_EXTENSIONS:
        if extension not in members:
            problem(f"no .{extension} member", key)
    for extension in members:
        if extension not in SAMPLE_EXTENSIONS:
            problem(f"unexpected member .{extension}", key)
    label = None
    if SAMPLE_CLASS in members:
        text, label = read_class(members[SAMPLE_CLASS])
        if label is None:
            problem(f".{SAMPLE_CLASS} is {text!r}, not a class index", key)
    if SAMPLE_META in members:
        _check_meta(key, members[SAMPLE_META], label, problem)
    if SAMPLE_TEXT in members:
        try:
            members[SAMPLE_TEXT].decode("utf-8")
        except UnicodeDecodeError as exc:
            problem(f".{SAMPLE_TEXT} is not UTF-8 ({exc})", key)
    if SAMPLE_IMAGE in members:
        _check_image(key, members[SAMPLE_IMAGE], image_size, problem)
    return label


def _check_meta(
    key: str, data: bytes, label: str | None, problem: Callable[[str, str | None], None]
) -> None:
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problem(f".{SAMPLE_META} is not valid JSON ({exc})", key)
        return
    if not isinstance(meta, dict):
        problem(f".{SAMPLE_META} is not a JSON object", key)
        return
    missing = [name for name in SAMPLE_META_FIELDS if name not in meta]
    if missing:
        problem(f".{SAMPLE_META} lacks {', '.join(missing)}", key)
    photo_id = meta.get("photo_id")
    if isinstance(photo_id, str) and photo_id and sample_key(photo_id) != key:
        problem(f"key does not match photo id {photo_id!r}", key)
    if label is not None and "label" in meta and meta["label"] != label:
        problem(f".{SAMPLE_META} says {meta['label']!r}, .{SAMPLE_CLASS} says {label!r}", key)


def _check_image(
    key: str, data: bytes, image_size: int | None, problem: Callable[[str, str | None], None]
) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            kind, size = image.format, image.size
    except Exception as exc:  # Pillow raises many types on damaged data
        problem(f"image does not decode ({type(exc).__name__}: {exc})", key)
        return
    if kind != "JPEG":
        problem(f"image is {kind}, not JPEG", key)
    if image_size and min(size) != image_size:
        problem(f"image is {size[0]}x{size[1]}, shorter side not {image_size}", key)


def _duplicate_keys(checks: list[ShardCheck]) -> list[Problem]:
    first_seen: dict[str, ShardCheck] = {}
    problems = []
    for check in checks:
        for key in dict.fromkeys(check.keys):
            other = first_seen.setdefault(key, check)
            if other is check:
                continue
            if other.split != check.split:
                message = f"in both {other.split} ({other.name}) and {check.split} ({check.name})"
            else:
                message = f"also in {other.name}"
            problems.append(Problem(check.name, message, key))
    return problems
