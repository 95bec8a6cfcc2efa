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

``Location`` is where a set lives: local folders are written through a temporary name and
``os.replace``; fsspec URLs (``s3://``) are written by uploading each file whole, which on an
object store makes it appear under its final name complete or not at all. Credentials and
endpoints come from the filesystem's own configuration: for S3 the usual ``AWS_*`` variables and
``~/.aws`` files (``AWS_ENDPOINT_URL`` for an S3-compatible server) or fsspec's ``FSSPEC_S3_*``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from vsotools.core.errors import VsoError
from vsotools.core.files import atomic_open, atomic_write_bytes

MANIFEST_NAME = "manifest.json"
FORMAT = "vsotools-shards"
VERSION = 1

INSTALL_HINT = {"s3": "pip install 'vsotools[s3]'"}
"""How to install the fsspec implementation of a protocol that vsotools supports as an extra."""


class ShardSetError(VsoError):
    """A shard set or its manifest is missing or malformed, or its location cannot be used."""


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
        return cls(
            splits=splits,
            recipe=dict(data.get("recipe") or {}),
            build=dict(data.get("build") or {}),
            skipped=skipped,
        )


def join(location: str, name: str) -> str:
    """``location/name`` for a local folder or a URL."""
    return f"{location.rstrip('/')}/{name}"


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


def write_manifest(location: str | os.PathLike[str] | Location, manifest: ShardManifest) -> None:
    """Write ``location/manifest.json`` whole, atomically (local or fsspec URL)."""
    text = json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n"
    as_location(location).write_bytes(MANIFEST_NAME, text.encode("utf-8"))


def shard_urls(location: str, manifest: ShardManifest, split: str) -> list[str]:
    """Full paths or URLs of the shards of ``split``, in manifest order."""
    return [join(str(location), s.name) for s in manifest.shards(split)]


# --- where a shard set lives ------------------------------------------------------------------

_T = TypeVar("_T")


def _storage_errors(method: Callable[..., _T]) -> Callable[..., _T]:
    """Turn a remote filesystem's failures (no credentials, no bucket, no network) into one line."""

    @functools.wraps(method)
    def wrapper(self: Location, *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except (VsoError, FileNotFoundError):
            raise
        except Exception as exc:
            if self.fs is None:
                raise
            raise ShardSetError(f"{self.url}: {type(exc).__name__}: {exc}") from None

    return wrapper


class Location:
    """A shard set's folder, local or an fsspec URL; every name is relative to it.

    Writes are atomic: a file appears under its name complete or not at all (locally through a
    temporary name and ``os.replace``; remotely by uploading it whole, which object stores
    publish atomically). A ``Location`` pickles to its URL, so worker processes can use it.
    """

    def __init__(self, location: str | os.PathLike[str]) -> None:
        import fsspec.core

        text = os.fspath(location)
        protocol, path = fsspec.core.split_protocol(text)
        self.url = text.rstrip("/") or text
        self.fs: Any = None
        self.local: Path | None = None
        if protocol in (None, "file", "local"):
            self.local = Path(path).expanduser()
            return
        try:
            self.fs, self.root = fsspec.core.url_to_fs(text)
        except ImportError as exc:
            hint = INSTALL_HINT.get(protocol)
            how = f"; install it with {hint}" if hint else ""
            raise ShardSetError(f"{text}: no support for {protocol}:// URLs ({exc}){how}") from None
        except ValueError as exc:
            raise ShardSetError(f"{text}: {exc}") from None
        self.root = self.root.rstrip("/")

    def __reduce__(self) -> tuple[type[Location], tuple[str]]:
        return (Location, (self.url,))

    def __str__(self) -> str:
        return self.url

    def url_of(self, name: str) -> str:
        """Full path or URL of ``name``."""
        return str(self.local / name) if self.local is not None else join(self.url, name)

    def _remote(self, name: str) -> str:
        return f"{self.root}/{name}"

    def prepare(self) -> None:
        """Make sure a local folder exists (remote prefixes need no creating)."""
        if self.local is None:
            return
        if self.local.exists() and not self.local.is_dir():
            raise ShardSetError(f"{self.local}: exists and is not a folder")
        try:
            self.local.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ShardSetError(
                f"{self.local}: cannot create the output folder ({exc.strerror})"
            ) from None

    @_storage_errors
    def size(self, name: str) -> int | None:
        """Size of ``name`` in bytes, None when it does not exist."""
        try:
            if self.local is not None:
                return (self.local / name).stat().st_size
            return int(self.fs.size(self._remote(name)))
        except FileNotFoundError:
            return None

    @_storage_errors
    def read_bytes(self, name: str) -> bytes | None:
        """The content of ``name``, None when it does not exist."""
        try:
            if self.local is not None:
                return (self.local / name).read_bytes()
            return bytes(self.fs.cat_file(self._remote(name)))
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[IO[bytes]]:
        """``name`` opened for reading in binary mode; FileNotFoundError when missing."""
        if self.local is not None:
            with (self.local / name).open("rb") as fh:
                yield fh
            return
        with _as_storage_error(self):
            fh = self.fs.open(self._remote(name), "rb")
        with fh:
            yield fh

    @_storage_errors
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically."""
        if self.local is not None:
            atomic_write_bytes(self.local / name, data)
            return
        with _as_write_error(self, name):
            self.fs.pipe_file(self._remote(name), data)

    @contextlib.contextmanager
    def open_atomic(self, name: str) -> Iterator[IO[bytes]]:
        """A binary file to write; published as ``name`` when the block ends without an error.

        Locally the file is written beside its final name (``.NAME.*.tmp``) and renamed; for a
        URL it is written to a local temporary file and uploaded whole.
        """
        if self.local is not None:
            with atomic_open(self.local / name, "wb") as fh:
                yield fh
            return
        with tempfile.NamedTemporaryFile(prefix="vsotools-", suffix=f"-{name}") as fh:
            yield fh
            fh.flush()
            with _as_write_error(self, name):
                self.fs.put_file(fh.name, self._remote(name))

    @_storage_errors
    def list(self, folder: str = "") -> list[str]:
        """Names of the files directly in ``folder`` (relative to the location), sorted."""
        if self.local is not None:
            where = self.local / folder
            if not where.is_dir():
                return []
            return sorted(p.name for p in where.iterdir() if p.is_file())
        self.fs.invalidate_cache()
        where = self._remote(folder).rstrip("/") if folder else self.root
        try:
            entries = self.fs.ls(where, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file"
        )

    @_storage_errors
    def remove(self, name: str) -> None:
        """Delete ``name`` if it exists."""
        if self.local is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.local / name).unlink()
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._remote(name))


def as_location(location: str | os.PathLike[str] | Location) -> Location:
    return location if isinstance(location, Location) else Location(location)


@contextlib.contextmanager
def _as_storage_error(location: Location) -> Iterator[None]:
    try:
        yield
    except (VsoError, FileNotFoundError):
        raise
    except Exception as exc:
        raise ShardSetError(f"{location.url}: {type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def _as_write_error(location: Location, name: str) -> Iterator[None]:
    try:
        yield
    except VsoError:
        raise
    except Exception as exc:  # a missing bucket is a FileNotFoundError here, not a missing file
        raise ShardSetError(f"cannot write {location.url_of(name)}: {exc}") from None
