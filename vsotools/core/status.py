"""One answer to "is this output current?", the same for every output vsotools writes.

Every output (a dataset folder's fetch and filter outputs, a shard set, a training folder, a run's
work folder) ends with one last record (a report, a manifest, the final metrics) that holds a
fingerprint of what the output was made from and lists the files it vouches for. Its contract
module answers with a ``Status``:

- ``missing``: nothing of the output is there;
- ``unfinished``: it was started and not finished, or it was finished but a file its last record
  lists is gone, of another size, or (where that record keeps the file's checksum in its list,
  as for ``filtered.parquet``) of other bytes: the stage finishes or repairs it. A shard's bytes
  are checked by ``vsotools verify``, not here: reading a whole set would cost what writing it
  does;
- ``stale``: it is complete, but made from other inputs or settings than today's (``why`` says
  which): the stage makes it again;
- ``current``: complete, and made from exactly today's inputs and settings: nothing to do.

``listed_files`` writes the file list a last record keeps; ``damaged_files`` checks it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vsotools.core.files import file_sha256

State = Literal["missing", "unfinished", "stale", "current"]
MISSING: State = "missing"
UNFINISHED: State = "unfinished"
STALE: State = "stale"
CURRENT: State = "current"

FILES = "files"
"""The key of a last record that lists its output's files: ``{name: {"bytes": n[, "sha256"]}}``."""


@dataclass(frozen=True)
class Status:
    """Where an output stands, and why, in one line."""

    state: State
    why: str
    record: Any = None
    """The output's last record (report, manifest, final metrics), when it could be read."""
    damaged: tuple[str, ...] = ()
    """Files the last record lists that are missing or not as recorded (relative names)."""

    @property
    def current(self) -> bool:
        return self.state == CURRENT

    def __str__(self) -> str:
        return f"{self.state}: {self.why}"


def listed_files(
    root: Path, names: Iterable[str], checksummed: Iterable[str] = ()
) -> dict[str, dict[str, Any]]:
    """The file list a last record keeps: each file's size, and the sha256 of ``checksummed``."""
    hashed = set(checksummed)
    listed: dict[str, dict[str, Any]] = {}
    for name in names:
        entry: dict[str, Any] = {"bytes": (root / name).stat().st_size}
        if name in hashed:
            entry["sha256"] = file_sha256(root / name)
        listed[name] = entry
    return listed


def damaged_files(root: Path, listed: Any, sizes: Mapping[str, int] | None = None) -> list[str]:
    """What is wrong with the files a last record lists (empty when every one is as recorded):
    one phrase per file, naming it. ``sizes`` gives the files' sizes when the caller has listed
    them already; otherwise each is looked up under ``root``."""
    if not isinstance(listed, Mapping):
        return []
    problems = []
    for name, entry in listed.items():
        if not isinstance(entry, Mapping):
            continue
        if sizes is not None:
            size = sizes.get(name)
        else:
            try:
                size = (root / name).stat().st_size
            except OSError:
                size = None
        if size is None:
            problems.append(f"{name} is missing")
        elif size != entry.get("bytes"):
            problems.append(f"{name} has {size:,} bytes, {entry.get('bytes'):,} recorded")
        elif "sha256" in entry and file_sha256(root / name) != entry["sha256"]:
            problems.append(f"{name} does not have the bytes recorded (sha256 differs)")
    return problems


def damaged_names(problems: Iterable[str]) -> tuple[str, ...]:
    """The file names of ``damaged_files``' phrases."""
    return tuple(problem.split(" ", 1)[0] for problem in problems)


def changes(old: Any, new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """What differs between the inputs an output was made from (``old``, as its last record
    keeps them) and today's (``new``): one phrase per setting or input, for ``why``."""
    if not isinstance(old, Mapping):
        return ["made before its inputs were recorded"]
    found = []
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if isinstance(value, Mapping) and isinstance(before, Mapping) and not prefix:
            found += changes(before, value, prefix=f"{key}.")
        elif isinstance(value, str | int | float | bool | list) or value is None:
            name = f"{prefix}{key}"
            if _looks_like_digest(value) or _looks_like_digest(before):
                found.append(f"{name} changed")
            else:
                found.append(f"{name} {_short(before)} there, {_short(value)} now")
        else:
            found.append(f"{prefix}{key} changed")
    return found


def _looks_like_digest(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
