"""Files: crash-safe writes, checksums, and one writer per output folder.

A file written through ``atomic_open`` appears under its final name complete, or not at all;
``file_sha256`` and ``HashingStream`` are the one way vsotools checksums files and streams;
``folder_lock`` keeps a second process from writing an output folder that one is writing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from vsotools.core.errors import ExistingOutput, VsoError


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit fsync it and rename it to ``path``.

    ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text).

    On an exception the temporary file is removed and ``path`` is left as it was. A system error
    that names no file (a write or fsync failing with "No space left on device") is raised
    naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with naming_errors(path):
            # mkstemp creates files readable by their owner alone; give them the usual mode.
            os.fchmod(fd, 0o666 & ~_umask())
            encoding = None if "b" in mode else "utf-8"
            with os.fdopen(fd, mode, encoding=encoding) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def naming_errors(path: str | Path) -> Iterator[None]:
    """Raise a system error that names no file, such as a write failing with "No space left
    on device" (Python's, or pyarrow's "Error writing bytes to file"), naming ``path``: the
    file being written. Errors without a system error number pass unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or exc.filename is not None:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from None


def check_output_file(path: str | Path, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, an output file that ``atomic_open`` must not replace: a path
    holding something other than a regular file (a FIFO, a device such as ``/dev/null``, a
    folder, a socket; symbolic links followed), or the same file as one of the command's
    ``inputs`` under any name. Raises ``ExistingOutput`` ("elsewhere")."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise ExistingOutput(
            f"{path} is {_file_kind(info.st_mode)}, not a file this command may replace",
            "elsewhere",
        )
    for source in inputs:
        with contextlib.suppress(OSError):
            if os.path.samestat(info, os.stat(source)):
                raise ExistingOutput(
                    f"{path} is {source}, an input of this command; it would be overwritten",
                    "elsewhere",
                )


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented UTF-8 JSON ending in a newline: the form of every JSON file written."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    atomic_write_bytes(path, json_bytes(obj))


# --- checksums ------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (a file of any size in flat memory); a
    FIFO or a device is refused, never read (``open_regular_file``)."""
    digest = hashlib.sha256()
    with open_regular_file(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(obj: Any) -> str:
    """Hex sha256 of ``obj`` as canonical JSON (sorted keys): the fingerprint of settings."""
    canonical = json.dumps(obj, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class HashingStream:
    """A file-like view of ``raw`` that hashes and counts every byte read from or written to it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        self.raw.write(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def read_to_end(self) -> None:
        while self.read(1 << 20):
            pass

    def tell(self) -> int:
        return self.bytes

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


# --- one writer per output folder -------------------------------------------------------------

LOCK_NAME = ".vsotools.lock"


class FolderBusy(VsoError):
    """Another process is writing the same output folder."""


class LockFileError(VsoError):
    """An output folder's lock file is something else: a symbolic link, a folder, a device."""


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold ``FOLDER/.vsotools.lock`` while writing ``folder``; refuse a second writer at once.

    The lock is the operating system's advisory record lock (POSIX ``lockf``) on that file: it
    belongs to the process that took it and goes with it, so a killed writer never leaves it
    stuck (the file itself may stay), even while processes it forked (loader workers, a pool)
    linger; an ``flock`` would be shared with them. It does not keep out a second writer in the
    same process. The holder's process id is written into the file, for the message a second
    writer gets.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _open_lock_file(path)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, by system
            holder = _lock_holder(fd)
            by = f"process {holder}" if holder else "another process"
            raise FolderBusy(
                f"{folder}: {what} is being written by {by}; wait for it to finish"
                " (or stop it), then run again"
            ) from None
        # One fixed-width write: a second writer never reads half of an old and a new id.
        os.pwrite(fd, f"{os.getpid():<{_PID_WIDTH - 1}}\n".encode(), 0)
        os.ftruncate(fd, _PID_WIDTH)
        yield
    finally:
        os.close(fd)


_PID_WIDTH = 20


def _open_lock_file(path: Path) -> int:
    """The lock file, opened for writing, or ``UnsafeFile``: a symbolic link is not followed
    (a folder copied from someone else could point it at any file of the user's, which the
    writer would then cut to its process id), and a FIFO or a device is not used (opened
    without blocking, so a FIFO cannot hang the command)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o666 & ~_umask())
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockFileError(f"{path} is a symbolic link, not a lock file; remove it") from None
        if exc.errno == errno.EISDIR:
            raise LockFileError(f"{path} is a folder, not a lock file; remove it") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise LockFileError(f"{path} is {_file_kind(mode)}, not a lock file; remove it")
    return fd


def _lock_holder(fd: int, patience: float = 1.0) -> int | None:
    """The lock holder's process id, or None. A writer takes the lock a moment before it writes
    its id (over that of a writer that died, if any), so a second writer that arrives in between
    waits up to ``patience`` seconds for a live one."""
    deadline = time.monotonic() + patience
    while True:
        pid = whole_number(os.pread(fd, _PID_WIDTH, 0).decode("ascii", "replace"))
        if pid is not None and _alive(pid):
            return pid
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# --- reading input files that may be anything -------------------------------------------------


def whole_number(text: str, max_digits: int = 18) -> int | None:
    """``text`` as a whole number of at most ``max_digits`` ASCII digits (white space around it
    allowed), or None. Not ``str.isdigit``: it also accepts digits such as "²" that ``int``
    refuses, and ``int`` of thousands of digits is refused or slow; what a server or a file
    says is checked with this."""
    text = text.strip()
    if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None


class UnsafeFile(VsoError):
    """A file an input names cannot be read safely; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


NOT_A_FILE = "not_a_file"
TOO_LARGE = "too_large"
OUTSIDE_ROOT = "outside_root"


def contained_path(root: str | Path, name: str) -> Path:
    """``root / name``, refused when the name leads out of ``root``: an input file must not reach
    files elsewhere on the disk through an absolute path or ``..``. (A symbolic link inside
    ``root`` is followed: whoever put it there chose where it leads.) A name holding a NUL
    character is refused as ``not_a_file``."""
    if "\0" in name:  # no file has such a name, and the system calls refuse it
        raise UnsafeFile(NOT_A_FILE, f"{name!r} holds a NUL character")
    base = Path(os.path.abspath(root))
    path = Path(os.path.normpath(base / name))
    if not path.is_relative_to(base):
        raise UnsafeFile(OUTSIDE_ROOT, f"{name} is outside {base}")
    return path


def open_regular_file(path: str | Path) -> IO[bytes]:
    """``path`` opened for reading (binary), refused unless it is a regular file.

    A FIFO, a device (``/dev/zero``), a folder or a socket is refused as ``not_a_file`` without
    being read (opened non-blocking, so a FIFO without a writer cannot hang the caller). Raises
    FileNotFoundError, OSError or UnsafeFile.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFile(NOT_A_FILE, f"{path} is {_file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, never reading more than that.

    What ``open_regular_file`` refuses is refused; so is a file that is, or grows, larger than
    ``max_bytes``. Raises FileNotFoundError, OSError or UnsafeFile.
    """
    with open_regular_file(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise UnsafeFile(TOO_LARGE, f"{path} has {size:,} bytes > {max_bytes:,}")
        data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise UnsafeFile(TOO_LARGE, f"{path} has more than {max_bytes:,} bytes")
        return data
