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
      }
    }
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vsotools.errors import VsoError

MANIFEST_NAME = "manifest.json"
FORMAT = "vsotools-shards"
VERSION = 1


class ShardSetError(VsoError):
    """A shard set or its manifest is missing or malformed."""


def shard_name(split: str, index: int) -> str:
    """File name of the ``index``-th shard of ``split``: ``{split}-{index:06d}.tar``."""
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name relative to the shard set's location."""
    samples: int
    bytes: int
    sha256: str
    labels: dict[str, int]
    """Label name -> number of samples."""


@dataclass
class ShardManifest:
    splits: dict[str, list[ShardInfo]]
    recipe: dict[str, Any] = field(default_factory=dict)

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
                split: [
                    {
                        "name": s.name,
                        "samples": s.samples,
                        "bytes": s.bytes,
                        "sha256": s.sha256,
                        "labels": s.labels,
                    }
                    for s in shards
                ]
                for split, shards in self.splits.items()
            },
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
                split: [
                    ShardInfo(
                        name=str(s["name"]),
                        samples=int(s["samples"]),
                        bytes=int(s["bytes"]),
                        sha256=str(s["sha256"]),
                        labels={str(k): int(v) for k, v in s["labels"].items()},
                    )
                    for s in shards
                ]
                for split, shards in data["splits"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ShardSetError(f"{where}: malformed shard entry ({exc!r})") from None
        return cls(splits=splits, recipe=dict(data.get("recipe") or {}))


def join(location: str, name: str) -> str:
    """``location/name`` for a local folder or a URL."""
    return f"{location.rstrip('/')}/{name}"


def read_manifest(location: str) -> ShardManifest:
    """Read ``location/manifest.json`` (a local folder or an fsspec URL)."""
    import fsspec

    where = join(str(location), MANIFEST_NAME)
    try:
        with fsspec.open(where, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ShardSetError(
            f"{where} not found: not a complete shard set (run `vsotools shard` to finish it)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ShardSetError(f"{where}: not valid JSON ({exc})") from None
    return ShardManifest.from_json(data, where)


def shard_urls(location: str, manifest: ShardManifest, split: str) -> list[str]:
    """Full paths or URLs of the shards of ``split``, in manifest order."""
    return [join(str(location), s.name) for s in manifest.shards(split)]
