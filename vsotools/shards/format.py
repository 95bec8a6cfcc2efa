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
import io
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from vsotools.core.errors import VsoError
from vsotools.core.files import atomic_open, atomic_write_bytes, json_bytes, json_sha256
from vsotools.core.schema import SAMPLE_IMAGE, SAMPLE_KEY

MANIFEST_NAME = "manifest.json"
RECIPE_NAME = "recipe.toml"
"""The resolved recipe the set was written with, beside the manifest."""
PARTS_DIR = "_parts"
"""Where a run keeps what it is writing (``job.json``) and one completion marker per shard."""
JOB_NAME = f"{PARTS_DIR}/job.json"
FORMAT = "vsotools-shards"
VERSION = 1

INSTALL_HINT = {"s3": "pip install 'vsotools[s3]'"}
"""How to install the fsspec implementation of a protocol that vsotools supports as an extra."""


class ShardSetError(VsoError):
    """A shard set or its manifest is missing or malformed, or its location cannot be used."""


class ShardError(VsoError):
    """The input cannot be sharded, or a shard cannot be read as the manifest says."""


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
    as_location(location).write_bytes(MANIFEST_NAME, json_bytes(manifest.to_json()))


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


# --- reading a shard: tar members, grouped into samples ------------------------------------------
#
# One reader for every consumer (the training loader, evaluation, ``vsotools verify``), so that
# all of them read a shard the same way and agree on what a sample's key is.

_BLOCK = 512

Problem = Callable[[str, "str | None"], object]
"""Called with a message and the sample key (or None) for what a reader finds odd in a shard."""


def read_shard(
    url: str, skip_images: bool = False, on_problem: Problem | None = None
) -> Iterator[dict[str, Any]]:
    """The raw samples of one tar shard (``{"__key__": ..., "__url__": url, "jpg": bytes, ...}``),
    in order; ``skip_images`` leaves the JPEG members unread. Raises ``ShardError`` naming the
    shard when it is missing or damaged."""
    import fsspec

    skip = {SAMPLE_IMAGE} if skip_images else set()
    try:
        with fsspec.open(url, "rb") as stream:
            yield from group_members(tar_members(stream, skip, on_problem), url, on_problem)
    except FileNotFoundError:
        raise ShardError(f"{url}: shard not found (is the shard set complete?)") from None
    except (OSError, ValueError, EOFError) as exc:
        raise ShardError(f"{url}: cannot read the shard ({exc})") from None


def tar_members(
    stream: Any, skip_extensions: Set[str] = frozenset(), on_problem: Problem | None = None
) -> Iterator[tuple[str, bytes | None]]:
    """``(name, bytes)`` of each regular file of a tar stream, in order.

    A small reader for the tars ``vsotools shard`` writes (Python's ``tarfile``) and other
    tools write: ustar headers with their checksum checked, pax ``path`` records and GNU long
    names. It parses each header with a few slices instead of ``tarfile``'s general machinery,
    which costs as much as decoding the JPEG (docs/performance.md). Members whose extension is
    in ``skip_extensions`` are skipped over and given as ``None``; other entries (folders,
    links) are skipped and reported. Raises ValueError or EOFError on a damaged stream.
    """
    long_name: str | None = None
    while True:
        header = stream.read(_BLOCK)
        if 0 < len(header) < _BLOCK:
            raise EOFError("truncated tar header")
        if not header or header == bytes(_BLOCK):
            return
        _check_header(header)
        size = _octal(header[124:136])
        kind = header[156:157]
        padded = size + (-size % _BLOCK)
        if kind in (b"x", b"L"):
            data = stream.read(padded)
            if len(data) < padded:
                raise EOFError("truncated tar header")
            data = data[:size]
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\0").decode("utf-8")
            continue
        name = long_name or _ustar_name(header)
        if kind not in (b"0", b"\0"):
            if kind != b"g" and on_problem is not None:  # g: a global pax header, harmless
                on_problem(f"unexpected tar member {name!r} (not a file)", None)
            _skip(stream, padded, name)
            long_name = None
            continue
        long_name = None
        if name.rpartition(".")[2] in skip_extensions:
            _skip(stream, padded, name)
            yield name, None
            continue
        data = stream.read(padded)
        if len(data) < padded:
            raise EOFError(f"truncated tar member {name}")
        yield name, data[:size]


def group_members(
    members: Iterable[tuple[str, bytes | None]], url: str, on_problem: Problem | None = None
) -> Iterator[dict[str, Any]]:
    """Consecutive members ``KEY.EXT`` gathered into samples ``{"__key__": KEY, EXT: bytes}``.

    The key rule, as webdataset's: ``KEY`` is the member's path up to the first dot of its file
    name, ``EXT`` the rest, lower-cased. A member with no extension, in a folder, or whose
    extension repeats within a sample is reported (vsotools never writes one).
    """
    sample: dict[str, Any] | None = None
    for name, data in members:
        folder, _, base = name.rpartition("/")
        stem, dot, extension = base.partition(".")
        if on_problem is not None and folder:
            on_problem(f"unexpected member path {name!r}", None)
        if not dot:
            if on_problem is not None:
                on_problem(f"member {name!r} has no extension", None)
            continue
        key = f"{folder}/{stem}" if folder else stem
        if sample is None or sample[SAMPLE_KEY] != key:
            if sample is not None:
                yield sample
            sample = {SAMPLE_KEY: key, "__url__": url}
        extension = extension.lower()
        if on_problem is not None and extension in sample:
            on_problem(f"member .{extension} appears twice", key)
        if data is not None:
            sample[extension] = data
    if sample is not None:
        yield sample


def _check_header(header: bytes) -> None:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        stored = -1
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored != computed:
        raise ValueError("not a tar file, or a damaged one: bad header checksum")


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # base-256, for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    return int(digits, 8) if digits else 0


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8")


def _pax_path(records: bytes) -> str | None:
    """The ``path`` of a pax extended header (records ``"LEN key=value\\n"``), if any."""
    position = 0
    while position < len(records):
        space = records.index(b" ", position)
        length = int(records[position:space])
        key, _, value = records[space + 1 : position + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        position += length
    return None


def _skip(stream, count: int, name: str) -> None:
    """Move past the ``count`` bytes of member ``name``; EOFError when the stream ends first."""
    if count == 0:
        return
    try:
        # A file can be sought past its end without complaint: seek to the member's last byte
        # and read it, to know the member is whole (the next header's block is read with it).
        stream.seek(count - 1, io.SEEK_CUR)
        count = 1
    except (OSError, io.UnsupportedOperation, AttributeError):
        pass
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise EOFError(f"truncated tar member {name}")
        count -= len(chunk)
