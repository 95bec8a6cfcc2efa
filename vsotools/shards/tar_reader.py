"""Reading a shard: tar members, grouped into samples.

One reader for every consumer (the training loader, evaluation, ``vsotools verify``), so that
all of them read a shard the same way and agree on what a sample's key is.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Set
from typing import Any

from vsotools.core.schema import SAMPLE_IMAGE, SAMPLE_KEY
from vsotools.shards.errors import ShardError

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
    names. It parses each header with a few slices instead of ``tarfile``'s general machinery:
    about 75 µs a sample against ``tarfile``'s 250, where decoding the sample's 256-pixel JPEG
    takes about 600 (docs/performance.md, the tar reader). Members whose extension is
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
