"""Where an output lives: a local folder or an fsspec URL (``s3://bucket/prefix``).

Shard sets and image stores (``fetch.image_store``) are kept at a ``Location``. Local folders are written through a temporary name and ``os.replace``; fsspec URLs are written
by uploading each file whole, which on an object store makes it appear under its final name
complete or not at all. Credentials and endpoints come from the filesystem's own
configuration: for S3 the usual ``AWS_*`` variables and ``~/.aws`` files (``AWS_ENDPOINT_URL``
for an S3-compatible server) or fsspec's ``FSSPEC_S3_*``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from vsotools.core.errors import VsoError
from vsotools.core.files import atomic_open, atomic_write_bytes


class StorageError(VsoError):
    """A location cannot be used: no support for its protocol, no credentials, no bucket, no
    network, or a local path that is not a folder."""


INSTALL_HINT = {"s3": "pip install 'vsotools[s3]'"}
"""How to install the fsspec implementation of a protocol that vsotools supports as an extra."""


def join(location: str, name: str) -> str:
    """``location/name`` for a local folder or a URL."""
    return f"{location.rstrip('/')}/{name}"


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
            raise StorageError(f"{self.url}: {type(exc).__name__}: {exc}") from None

    return wrapper


class Location:
    """A folder, local or an fsspec URL; every name is relative to it.

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
            raise StorageError(f"{text}: no support for {protocol}:// URLs ({exc}){how}") from None
        except ValueError as exc:
            raise StorageError(f"{text}: {exc}") from None
        self.root = self.root.rstrip("/")

    def __reduce__(self) -> tuple[type[Location], tuple[str]]:
        return (Location, (self.url,))

    def __str__(self) -> str:
        return self.url

    def absolute(self) -> Location:
        """This location with a local path made absolute (worker processes and other nodes may
        start in another folder); a URL as it is."""
        return Location(self.local.absolute()) if self.local is not None else self

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
            raise StorageError(f"{self.local}: exists and is not a folder")
        try:
            self.local.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
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
    def sizes(self, folder: str = "") -> dict[str, int]:
        """Name -> size in bytes of the files directly in ``folder``: one listing, however many
        files (a status check of a set of a thousand shards on an object store is one call)."""
        if self.local is not None:
            where = self.local / folder
            if not where.is_dir():
                return {}
            return {p.name: p.stat().st_size for p in where.iterdir() if p.is_file()}
        self.fs.invalidate_cache()
        where = self._remote(folder).rstrip("/") if folder else self.root
        try:
            entries = self.fs.ls(where, detail=True)
        except FileNotFoundError:
            return {}
        return {
            e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"])
            for e in entries
            if e["type"] == "file"
        }

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
        raise StorageError(f"{location.url}: {type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def _as_write_error(location: Location, name: str) -> Iterator[None]:
    try:
        yield
    except VsoError:
        raise
    except Exception as exc:  # a missing bucket is a FileNotFoundError here, not a missing file
        raise StorageError(f"cannot write {location.url_of(name)}: {exc}") from None
