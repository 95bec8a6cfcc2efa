"""A shard set's manifest: which tar shards make up each split, and what each holds.

``vsotools shard`` writes ``SHARDS/manifest.json`` last, so its presence means the set is
complete; ``vsotools verify`` checks the shards against it; the training loader reads it to list
the shards of a split and to size fixed-length epochs. The location of a shard set is a local
folder or an fsspec URL (``s3://bucket/prefix``).

The file looks like::

    {
      "format": "vsotools-shards",
      "version": 1,
      "recipe": {...the resolved recipe, as nested tables...},
      "splits": {
        "train": [{"name": "train-000000.tar", "samples": 2000, "bytes": 51234816,
                   "sha256": "...", "labels": {"negative": 980, "positive": 1020}}, ...],
        "test": [...]
      },
      "build": {"fingerprint": "...", "settings": {...}, "input": {...}},
      "skipped": [{"photo_id": "...", "split": "train", "image_path": "...", "reason": "..."}]
    }

``build`` identifies what the set was written from (the shard settings that shape its bytes and
the input's checksum), so that a rerun can tell "finish or skip this set" from "this set was
written with another configuration". ``skipped`` lists the photos left out because their image
was missing or undecodable. Both are optional for readers.

``status`` answers for a location with the protocol of ``core.status``: a set is *current*
when its manifest holds the build fingerprint asked about and every shard it lists is there
with its recorded size (and the recipe beside it); a run that has not written its manifest yet
leaves ``_parts/job.json``, which makes the set *unfinished* rather than *missing*.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsotools.core.config import Recipe, recipe_from_dict
from vsotools.core.errors import ConfigError
from vsotools.core.files import json_bytes, json_sha256
from vsotools.core.status import CURRENT, MISSING, STALE, UNFINISHED, Status, changes
from vsotools.core.storage import Location, as_location, join
from vsotools.shards.errors import ShardError, ShardSetError

MANIFEST_NAME = "manifest.json"
RECIPE_NAME = "recipe.toml"
"""The resolved recipe the set was written with, beside the manifest."""
PARTS_DIR = "_parts"
"""Where a run keeps what it is writing (``job.json``) and one completion marker per shard."""
JOB_NAME = f"{PARTS_DIR}/job.json"
FORMAT = "vsotools-shards"
VERSION = 1


def shard_name(split: str, index: int) -> str:
    """File name of the ``index``-th shard of ``split``: ``{split}-{index:06d}.tar``."""
    return f"{split}-{index:06d}.tar"


_SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")


def is_shard_name(name: str) -> bool:
    """Whether a file name is one that ``shard_name`` gives."""
    return bool(_SHARD_NAME.match(name))


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name relative to the shard set's location."""
    samples: int
    bytes: int
    sha256: str
    labels: dict[str, int]
    """Label name -> number of samples."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "labels": self.labels,
        }

    @classmethod
    def from_json(cls, data: Any) -> ShardInfo:
        """Raises KeyError, TypeError, ValueError or AttributeError on a malformed entry."""
        return cls(
            name=str(data["name"]),
            samples=int(data["samples"]),
            bytes=int(data["bytes"]),
            sha256=str(data["sha256"]),
            labels={str(k): int(v) for k, v in data["labels"].items()},
        )


@dataclass
class ShardManifest:
    splits: dict[str, list[ShardInfo]]
    recipe: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    """What the set was written from: ``fingerprint``, ``settings``, ``input``."""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """Photos left out: ``photo_id``, ``split``, ``image_path``, ``reason``."""

    @property
    def fingerprint(self) -> str:
        """What the set was written from (its build fingerprint) or, for a set written by other
        tools, a checksum of its shard list: two sets with one fingerprint hold the same data."""
        built = self.build.get("fingerprint")
        if isinstance(built, str) and built:
            return built
        splits = {split: [s.to_json() for s in shards] for split, shards in self.splits.items()}
        return json_sha256(splits)

    def shards(self, split: str) -> list[ShardInfo]:
        try:
            return self.splits[split]
        except KeyError:
            raise ShardSetError(
                f"the shard set has no {split!r} split (it has: {', '.join(self.splits) or 'none'})"
            ) from None

    def samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))

    def labels(self, split: str) -> dict[str, int]:
        total: Counter[str] = Counter()
        for shard in self.shards(split):
            total.update(shard.labels)
        return dict(total)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "recipe": self.recipe,
            "splits": {
                split: [s.to_json() for s in shards] for split, shards in self.splits.items()
            },
            "build": self.build,
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_NAME) -> ShardManifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ShardSetError(f"{where}: not a vsotools shard manifest")
        if data.get("version") != VERSION:
            raise ShardSetError(
                f"{where}: manifest version {data.get('version')!r}; this vsotools reads {VERSION}"
            )
        try:
            splits = {
                split: [ShardInfo.from_json(s) for s in shards]
                for split, shards in data["splits"].items()
            }
            skipped = [dict(s) for s in data.get("skipped") or []]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ShardSetError(f"{where}: malformed shard entry ({exc!r})") from None
        for shard in (s for shards in splits.values() for s in shards):
            # A shard is a file of the set's own folder: a name must not reach files elsewhere.
            if shard.name in ("", ".", "..") or "/" in shard.name or "\\" in shard.name:
                raise ShardSetError(
                    f"{where}: shard name {shard.name!r} is not a file name in the set's folder"
                )
        return cls(
            splits=splits,
            recipe=dict(data.get("recipe") or {}),
            build=dict(data.get("build") or {}),
            skipped=skipped,
        )


def read_manifest(location: str | os.PathLike[str] | Location) -> ShardManifest:
    """Read ``location/manifest.json`` (a local folder or an fsspec URL)."""
    where = as_location(location)
    data = where.read_bytes(MANIFEST_NAME)
    if data is None:
        raise ShardSetError(
            f"{where.url_of(MANIFEST_NAME)} not found: not a complete shard set"
            " (run `vsotools shard` to finish it)"
        )
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardSetError(f"{where.url_of(MANIFEST_NAME)}: not valid JSON ({exc})") from None
    return ShardManifest.from_json(parsed, where.url_of(MANIFEST_NAME))


def written_with(location: str | os.PathLike[str] | Location) -> Recipe | None:
    """The recipe the shard set at ``location`` was written with, as its manifest holds it;
    None when there is no manifest, or it holds no recipe."""
    where = as_location(location)
    if where.size(MANIFEST_NAME) is None:
        return None
    manifest = read_manifest(where)
    if not manifest.recipe:
        return None
    try:
        return recipe_from_dict(manifest.recipe, base_dir=Path("/"), validate=False)
    except ConfigError as exc:
        raise ConfigError(f"{where.url_of(MANIFEST_NAME)}: the recipe it holds: {exc}") from None


def write_manifest(location: str | os.PathLike[str] | Location, manifest: ShardManifest) -> None:
    """Write ``location/manifest.json`` whole, atomically (local or fsspec URL)."""
    as_location(location).write_bytes(MANIFEST_NAME, json_bytes(manifest.to_json()))


def shard_urls(location: str, manifest: ShardManifest, split: str) -> list[str]:
    """Full paths or URLs of the shards of ``split``, in manifest order."""
    return [join(str(location), s.name) for s in manifest.shards(split)]


def status(location: Location, build: dict[str, Any]) -> Status:
    """Whether ``location`` holds the shard set of ``build`` (``{"fingerprint", "settings",
    "input"}``): missing, unfinished (a run of it not finished, or a shard or the recipe its
    manifest lists gone or of another size: ``damaged`` names them), stale (a set, finished or
    not, of another build: ``why`` says what differs) or current. The record is the manifest of
    a finished set, else the job of an unfinished one."""
    manifest, unreadable = _manifest_at(location)
    job = read_json(location, JOB_NAME)
    if manifest is not None:
        if manifest.build.get("fingerprint") != build["fingerprint"]:
            return Status(
                STALE, _other_build("a complete shard set", manifest.build, build), manifest
            )
        sizes = location.sizes()
        problems = [
            f"{shard.name} is missing"
            if sizes.get(shard.name) is None
            else f"{shard.name} has {sizes[shard.name]:,} bytes, {shard.bytes:,} recorded"
            for shards in manifest.splits.values()
            for shard in shards
            if sizes.get(shard.name) != shard.bytes
        ]
        if RECIPE_NAME not in sizes:
            problems.append(f"{RECIPE_NAME} is missing")
        if problems:
            more = f" and {len(problems) - 3:,} more" if len(problems) > 3 else ""
            names = tuple(problem.split(" ", 1)[0] for problem in problems)
            return Status(UNFINISHED, f"{'; '.join(problems[:3])}{more}", manifest, names)
        return Status(CURRENT, "complete and current", manifest)
    damaged = (MANIFEST_NAME,) if unreadable else ()
    if isinstance(job, dict):
        if job.get("fingerprint") != build["fingerprint"]:
            return Status(STALE, _other_build("an unfinished shard set", job, build), job)
        why = unreadable or "a run of this set has not finished"
        return Status(UNFINISHED, why, job, damaged)
    if unreadable:
        # Our own last file, damaged, and nothing left to say what it was written from: the
        # set is written again (its shards, where their markers are this build's, are kept).
        return Status(UNFINISHED, unreadable, None, damaged)
    return Status(MISSING, f"no shard set at {location}")


def _manifest_at(location: Location) -> tuple[ShardManifest | None, str | None]:
    """The manifest at ``location`` (None when there is none), or why it cannot be read."""
    data = location.read_bytes(MANIFEST_NAME)
    if data is None:
        return None, None
    try:
        return ShardManifest.from_json(json.loads(data), location.url_of(MANIFEST_NAME)), None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"{MANIFEST_NAME} is not valid JSON ({exc})"
    except ShardSetError as exc:
        return None, str(exc)


def _other_build(what: str, old: Any, new: dict[str, Any]) -> str:
    old = old if isinstance(old, dict) else {}
    found = changes(
        {"shard": old.get("settings") or {}, "input": old.get("input") or {}},
        {"shard": new["settings"], "input": new["input"]},
    )
    found = [
        "filtered.parquet differs from the one it was written from"
        if item.startswith("input.filtered_sha256")
        else item
        for item in found
        if not item.startswith("input.records")
    ]
    return (
        f"holds {what} written with another configuration ({'; '.join(found) or 'unknown build'})"
    )


def read_json(location: Location, name: str) -> Any:
    """The JSON file ``name`` at ``location``, None when there is none."""
    data = location.read_bytes(name)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{location.url_of(name)}: not valid JSON ({exc})") from None
