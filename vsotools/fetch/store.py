"""Where fetched records and images live, and how a fetch survives being killed.

A dataset folder ``DATA`` holds:

- ``fetch-state.sqlite``: the working state (SQLite, one transaction per step): every photo a search
  returned, the search calls already made, which ANP found which photo, each photo's download
  outcome. It is the single source of truth while a fetch runs; a killed fetch resumes from it.
- ``images/{part:05d}/{photo_id}.{ext}``: the stored images. A photo's *part* is its discovery
  number divided by ``part_size`` (1,000 by default), so a million photos make a thousand folders
  of a thousand files each: small enough for any filesystem and ``ls``, few enough to list.
- ``metadata/part-{part:05d}.parquet``: the photo records (``schema.PHOTO_SCHEMA``), one file per
  part, written from the state once the fetch is complete (a crawled photo's list of ANPs is only
  final when every ANP has been searched). Parts whose records did not change are not rewritten.
- ``.incoming/``: images on their way into ``images/``.

An image is saved in three steps: its bytes are written to ``.incoming/{seq}.partial`` and renamed
to ``.incoming/{seq}.{sha256}.{bytes}.{w}x{h}.{ext}``; the outcome is committed to the state; the
file is renamed into ``images/``. Whatever step a kill interrupts, the next run finishes it from the
file name alone (``recover``), so no image that reached the disk is downloaded again.

With ``fetch.image_store`` set, the images live in that store (``ImageStore``: an ``s3://`` URL
or a folder every node mounts) under the same relative names, and the last step uploads the
file instead of renaming it. Parts downloaded elsewhere (``fetch.parts``, on a cluster) write
each image straight into the store and hand their outcomes back; ``commit_saved`` records a
part's outcomes in one transaction, and a part whose outcomes never came back is downloaded
again by the next run, to the same names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vsotools.core.errors import VsoError
from vsotools.core.files import atomic_open, naming_errors
from vsotools.core.schema import (
    PHOTO_SCHEMA,
    PHOTO_SOURCE_FIELDS,
    STATUS_FAILED,
    STATUS_OK,
)
from vsotools.dataset.folder import IMAGES_DIR, INCOMING_DIR, DatasetFolder, ImageStore, image_name
from vsotools.fetch.download import STORED_EXTENSIONS, Outcome
from vsotools.fetch.search import PageSummary

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS photos (
    photo_id TEXT PRIMARY KEY,
    seq INTEGER UNIQUE,            -- discovery number once a search counts it (NULL: only seen)
    record TEXT NOT NULL,          -- JSON: the record's metadata fields
    local_path TEXT,               -- pairs: the image file to copy
    status TEXT, error TEXT, sha256 TEXT, image_bytes INTEGER, width INTEGER, height INTEGER,
    image_path TEXT, stored_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS photos_by_image_path ON photos (image_path);
CREATE TABLE IF NOT EXISTS photo_anps (
    id INTEGER PRIMARY KEY,
    photo_id TEXT NOT NULL,
    anp TEXT NOT NULL,
    UNIQUE (photo_id, anp)
);
CREATE TABLE IF NOT EXISTS calls (params TEXT PRIMARY KEY, total INTEGER, ids TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS anps_done (anp TEXT PRIMARY KEY, found INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS parts (part INTEGER PRIMARY KEY, dirty INTEGER NOT NULL);
"""
_INCOMING_NAME = re.compile(
    r"^(?P<seq>\d+)\.(?P<sha>[0-9a-f]{64})\.(?P<bytes>\d+)\.(?P<w>\d+)x(?P<h>\d+)\.(?P<ext>\w+)$"
)


class StateError(VsoError):
    """A dataset folder's state does not fit the command (other settings, another source)."""


@dataclass(frozen=True)
class PendingPhoto:
    """A photo whose image is still to be fetched."""

    seq: int
    photo_id: str
    image_url: str | None
    local_path: str | None


@dataclass(frozen=True)
class SavedImage:
    """A photo's outcome once its image (if kept) is in the store: what the state records."""

    seq: int
    error: str | None
    """None when the image was kept; else the failure reason."""
    image_path: str | None = None
    facts: Facts | None = None
    """sha256, bytes, width and height of the image as served; the bytes of the stored file."""


def save_image(
    images: ImageStore, photo: PendingPhoto, outcome: Outcome, part_size: int
) -> SavedImage:
    """Store a fetched image in ``images`` (when kept); its outcome as the state records it."""
    if not outcome.ok:
        # An earlier attempt at this part may have stored the image and been lost before the
        # driver recorded it (a killed driver, a retried task): no record would name that copy.
        for ext in STORED_EXTENSIONS:
            images.remove(image_name(photo.seq, photo.photo_id, ext, part_size))
        return SavedImage(photo.seq, outcome.error)
    assert outcome.data is not None and outcome.ext is not None
    assert outcome.sha256 is not None and outcome.image_bytes is not None
    assert outcome.width is not None and outcome.height is not None
    name = image_name(photo.seq, photo.photo_id, outcome.ext, part_size)
    images.write(photo.seq, name, outcome.data)
    facts = (outcome.sha256, outcome.image_bytes, outcome.width, outcome.height, len(outcome.data))
    return SavedImage(photo.seq, None, name, facts)


@dataclass(frozen=True)
class Counts:
    photos: int
    downloaded: int
    failed: int
    pending: int
    failed_by_reason: dict[str, int]
    calls: int
    anps_done: int


class Store:
    """The state and outputs of one dataset folder; its methods are thread-safe."""

    def __init__(self, root: str | Path, part_size: int, image_store: str = "") -> None:
        self.root = Path(root)
        self.folder = DatasetFolder(root)
        self.part_size = part_size
        self.images = self.folder.image_store(image_store)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / INCOMING_DIR).mkdir(exist_ok=True)
        self._lock = threading.RLock()
        with self._state_errors():
            self._db = sqlite3.connect(
                self.folder.state_file, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL with synchronous=NORMAL survives a killed process (not a power cut) at a
            # fraction of the cost of an fsync per commit; a fetch commits once per image.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(photos)")}
            if "stored_bytes" not in columns:  # a state written before the column was kept
                self._db.execute("ALTER TABLE photos ADD COLUMN stored_bytes INTEGER")
        self._made_dirs: set[Path] = set()
        self._next_seq = self._scalar("SELECT COALESCE(MAX(seq) + 1, 0) FROM photos")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _state_errors(self) -> Iterator[None]:
        """SQLite's failures (a read-only folder, a full disk, a damaged file) as one line."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StateError(f"{self.folder.state_file}: {exc}") from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._state_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _scalar(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        with self._lock:
            return self._db.execute(sql, args).fetchone()[0]

    # --- settings that must not change between runs -----------------------------------------

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def pin(self, settings: Mapping[str, Any]) -> None:
        """Record the settings a dataset was started with; refuse a rerun that changes them.

        Until a search call or a photo is recorded, new settings simply replace the old ones.
        """
        stored = self.meta("pinned")
        if stored is None or self._is_empty():
            self.set_meta("pinned", json.dumps(dict(settings), sort_keys=True))
            return
        refused = pin_refusal(self.root, json.loads(stored), settings)
        if refused is not None:
            raise refused

    def _is_empty(self) -> bool:
        with self._lock:
            return not self._db.execute(_STARTED).fetchone()[0]

    # --- searches -----------------------------------------------------------------------------

    def cached_call(self, params: Mapping[str, str]) -> PageSummary | None:
        with self._lock:
            row = self._db.execute(
                "SELECT total, ids FROM calls WHERE params = ?", (_params_key(params),)
            ).fetchone()
        return None if row is None else PageSummary(total=row[0], ids=json.loads(row[1]))

    def save_call(
        self, params: Mapping[str, str], total: int, photos: Iterable[tuple[str, Mapping[str, Any]]]
    ) -> PageSummary:
        """Record one search call and the metadata of every photo it returned."""
        photos = list(photos)
        ids = [photo_id for photo_id, _ in photos]
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO photos (photo_id, record) VALUES (?, ?)",
                [(pid, json.dumps(_record(r), ensure_ascii=False)) for pid, r in photos],
            )
            db.execute(
                "INSERT OR REPLACE INTO calls VALUES (?, ?, ?)",
                (_params_key(params), total, json.dumps(ids)),
            )
        return PageSummary(total=total, ids=ids)

    def accept(self, anp: str, photo_ids: Iterable[str]) -> list[PendingPhoto]:
        """Link photos to the ANP that found them; returns those counted for the first time."""
        new: list[PendingPhoto] = []
        with self._transaction() as db:
            for photo_id in photo_ids:
                row = db.execute(
                    "SELECT seq, record FROM photos WHERE photo_id = ?", (photo_id,)
                ).fetchone()
                if row is None:
                    raise KeyError(f"photo {photo_id} was never seen by a search")
                seq, record = row
                if seq is None:
                    seq = self._next_seq
                    self._next_seq += 1
                    db.execute("UPDATE photos SET seq = ? WHERE photo_id = ?", (seq, photo_id))
                    url = json.loads(record).get("image_url")
                    new.append(PendingPhoto(seq, photo_id, url, None))
                linked = db.execute(
                    "INSERT OR IGNORE INTO photo_anps (photo_id, anp) VALUES (?, ?)",
                    (photo_id, anp),
                ).rowcount
                if linked:
                    self._mark_dirty(db, seq)
        return new

    def anp_done(self, anp: str) -> bool:
        return self._scalar("SELECT COUNT(*) FROM anps_done WHERE anp = ?", (anp,)) > 0

    def finish_anp(self, anp: str, found: int) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO anps_done VALUES (?, ?)", (anp, found))

    # --- pairs --------------------------------------------------------------------------------

    def add_pairs(
        self,
        rows: Iterable[tuple[str, Mapping[str, Any], str | None]],
        meta: Mapping[str, str] | None = None,
    ) -> int:
        """Add (photo_id, record, local image path) rows in order, and the ``meta`` entries, in one
        transaction; returns how many rows were added."""
        added = 0
        with self._transaction() as db:
            for key, value in (meta or {}).items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            for photo_id, record, local_path in rows:
                seq = self._next_seq
                db.execute(
                    "INSERT INTO photos (photo_id, seq, record, local_path) VALUES (?, ?, ?, ?)",
                    (photo_id, seq, json.dumps(_record(record), ensure_ascii=False), local_path),
                )
                self._next_seq += 1
                self._mark_dirty(db, seq)
                added += 1
        return added

    def has_photo(self, photo_id: str) -> bool:
        return self._scalar("SELECT COUNT(*) FROM photos WHERE photo_id = ?", (photo_id,)) > 0

    # --- downloads ----------------------------------------------------------------------------

    def pending(self, batch: int = 1000) -> Iterator[PendingPhoto]:
        """Counted photos without an outcome yet, in discovery order, read ``batch`` at a time
        (a million pending photos never sit in memory at once)."""
        after = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT seq, photo_id, record, local_path FROM photos"
                    " WHERE seq > ? AND status IS NULL ORDER BY seq LIMIT ?",
                    (after, batch),
                ).fetchall()
            if not rows:
                return
            for seq, photo_id, record, local in rows:
                yield PendingPhoto(seq, photo_id, json.loads(record).get("image_url"), local)
            after = rows[-1][0]

    def reset_failed(self) -> int:
        """Forget every failed outcome so that those photos are fetched again."""
        with self._transaction() as db:
            seqs = [
                row[0]
                for row in db.execute("SELECT seq FROM photos WHERE status = ?", (STATUS_FAILED,))
            ]
            db.execute(
                "UPDATE photos SET status = NULL, error = NULL WHERE status = ?", (STATUS_FAILED,)
            )
            for seq in seqs:
                self._mark_dirty(db, seq)
        return len(seqs)

    def save_outcome(self, photo: PendingPhoto, outcome: Outcome) -> None:
        """Store the image (when kept) and commit the photo's outcome; see the module doc."""
        if not outcome.ok:
            self._commit_outcome(photo.seq, STATUS_FAILED, outcome.error, None, None)
            return
        assert outcome.data is not None and outcome.ext is not None
        incoming = self.root / INCOMING_DIR
        partial = incoming / f"{photo.seq}.partial"
        with naming_errors(partial), partial.open("wb") as fh:
            fh.write(outcome.data)
        named = incoming / (
            f"{photo.seq}.{outcome.sha256}.{outcome.image_bytes}"
            f".{outcome.width}x{outcome.height}.{outcome.ext}"
        )
        os.replace(partial, named)
        self._settle(named, photo.seq, photo.photo_id)

    def _settle(self, named: Path, seq: int, photo_id: str) -> None:
        """Commit the outcome that ``named`` (an ``.incoming`` file name) describes, then move it."""
        match = _INCOMING_NAME.match(named.name)
        assert match is not None, named
        image_path = self.image_path(seq, photo_id, match["ext"])
        served = (match["sha"], int(match["bytes"]), int(match["w"]), int(match["h"]))
        self._commit_outcome(seq, STATUS_OK, None, image_path, (*served, named.stat().st_size))
        self._store(named, image_path)

    def _store(self, named: Path, image_path: str) -> None:
        if self.images.location is not None:
            self.images.put_file(named, image_path)
            return
        final = self.root / image_path
        if final.parent not in self._made_dirs:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(final.parent)
        os.replace(named, final)

    def commit_saved(self, saved: Iterable[SavedImage]) -> None:
        """Record the outcomes of a part whose images are already in the store (one
        transaction)."""
        with self._transaction() as db:
            for image in saved:
                status = STATUS_OK if image.error is None else STATUS_FAILED
                _set_outcome(db, image.seq, status, image.error, image.image_path, image.facts)
                self._mark_dirty(db, image.seq)

    def _commit_outcome(
        self,
        seq: int,
        status: str,
        error: str | None,
        image_path: str | None,
        facts: Facts | None,
    ) -> None:
        with self._transaction() as db:
            _set_outcome(db, seq, status, error, image_path, facts)
            self._mark_dirty(db, seq)

    def recover(self) -> int:
        """Finish the image saves a killed run left half done; returns how many were kept."""
        kept = 0
        for path in sorted((self.root / INCOMING_DIR).iterdir()):
            match = _INCOMING_NAME.match(path.name)
            if match is None:  # a ``.partial`` file: its download never finished
                path.unlink()
                continue
            seq = int(match["seq"])
            with self._lock:
                row = self._db.execute(
                    "SELECT photo_id, status, image_path FROM photos WHERE seq = ?", (seq,)
                ).fetchone()
            if row is None or row[1] == STATUS_FAILED:
                path.unlink()
            elif row[1] is None:
                self._settle(path, seq, row[0])
                kept += 1
            elif not self.images.exists(row[2]):
                self._store(path, row[2])
                kept += 1
            else:
                path.unlink()
        return kept

    def image_path(self, seq: int, photo_id: str, ext: str) -> str:
        """Where a photo's image is stored, relative to the image store."""
        return image_name(seq, photo_id, ext, self.part_size)

    def forget_damaged(self, names: Iterable[str]) -> None:
        """Make the damaged files of a finished fetch be written again: a stored image that is
        missing or not as recorded is fetched again (its photo is pending once more), a photo
        record file is rewritten; other names are left to the caller."""
        names = list(names)
        parts = {name: self.folder.part_of(name) for name in names}
        images = [name for name in names if name.startswith(f"{IMAGES_DIR}/")]
        with self._transaction() as db:
            for start in range(0, len(images), 500):
                chunk = images[start : start + 500]
                rows = db.execute(
                    f"SELECT seq, image_path FROM photos WHERE status = ?"
                    f" AND image_path IN ({', '.join('?' * len(chunk))})",
                    (STATUS_OK, *chunk),
                ).fetchall()
                for seq, image_path in rows:
                    db.execute(
                        "UPDATE photos SET status = NULL, error = NULL, sha256 = NULL,"
                        " image_bytes = NULL, width = NULL, height = NULL, image_path = NULL,"
                        " stored_bytes = NULL"
                        " WHERE seq = ?",
                        (seq,),
                    )
                    self._mark_dirty(db, seq)
                    self.images.remove(image_path)  # a damaged copy, fetched again
            for part in parts.values():
                if part is not None:
                    db.execute("UPDATE parts SET dirty = 1 WHERE part = ?", (part,))

    # --- outputs ------------------------------------------------------------------------------

    def _mark_dirty(self, db: sqlite3.Connection, seq: int) -> None:
        db.execute(
            "INSERT INTO parts VALUES (?, 1) ON CONFLICT (part) DO UPDATE SET dirty = 1",
            (seq // self.part_size,),
        )

    def write_parts(self) -> int:
        """Write the metadata file of every part that changed (or is missing); returns how many."""
        with self._lock:
            parts = self._db.execute("SELECT part, dirty FROM parts ORDER BY part").fetchall()
        written = 0
        for part, dirty in parts:
            path = self.folder.metadata_part(part)
            if not dirty and path.exists():
                continue
            table = pa.Table.from_pylist(self._part_records(part), schema=PHOTO_SCHEMA)
            with atomic_open(path, "wb") as fh:
                pq.write_table(table, fh, compression="zstd")
            with self._transaction() as db:
                db.execute("UPDATE parts SET dirty = 0 WHERE part = ?", (part,))
            written += 1
        return written

    def _part_records(self, part: int) -> list[dict[str, Any]]:
        low, high = part * self.part_size, (part + 1) * self.part_size
        with self._lock:
            rows = self._db.execute(
                "SELECT photo_id, record, status, error, sha256, image_bytes, width, height,"
                " image_path, stored_bytes FROM photos WHERE seq >= ? AND seq < ? ORDER BY seq",
                (low, high),
            ).fetchall()
            links = self._db.execute(
                "SELECT a.photo_id, a.anp FROM photo_anps a JOIN photos p USING (photo_id)"
                " WHERE p.seq >= ? AND p.seq < ? ORDER BY a.id",
                (low, high),
            ).fetchall()
        anps: dict[str, list[str]] = {}
        for photo_id, anp in links:
            anps.setdefault(photo_id, []).append(anp)
        records = []
        for photo_id, record, status, error, sha, size, width, height, image_path, stored in rows:
            if status is None:
                raise StateError(f"{self.root}: photo {photo_id} has no outcome yet")
            records.append(
                {
                    "photo_id": photo_id,
                    "anps": anps.get(photo_id, []),
                    **json.loads(record),
                    "status": status,
                    "error": error,
                    "sha256": sha,
                    "image_bytes": size,
                    "width": width,
                    "height": height,
                    "image_path": image_path,
                    "stored_bytes": stored,
                }
            )
        return records

    def counts(self) -> Counts:
        with self._lock:
            by_status = dict(
                self._db.execute(
                    "SELECT COALESCE(status, ''), COUNT(*) FROM photos WHERE seq IS NOT NULL"
                    " GROUP BY 1"
                ).fetchall()
            )
            reasons = dict(
                self._db.execute(
                    "SELECT error, COUNT(*) FROM photos WHERE status = ? GROUP BY 1 ORDER BY 2 DESC",
                    (STATUS_FAILED,),
                ).fetchall()
            )
            calls = self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
            anps_done = self._db.execute("SELECT COUNT(*) FROM anps_done").fetchone()[0]
        return Counts(
            photos=sum(by_status.values()),
            downloaded=by_status.get(STATUS_OK, 0),
            failed=by_status.get(STATUS_FAILED, 0),
            pending=by_status.get("", 0),
            failed_by_reason=reasons,
            calls=calls,
            anps_done=anps_done,
        )


_STARTED = "SELECT EXISTS (SELECT 1 FROM photos) OR EXISTS (SELECT 1 FROM calls)"
"""Whether a state holds a photo or a search call: from then on its settings are pinned."""

Facts = tuple[str, int, int, int, int]
"""What the state records of a kept image: its sha256, bytes, width and height as served, and
the bytes of the stored file (fewer where ``fetch.max_side`` downscaled it)."""


def _set_outcome(
    db: sqlite3.Connection,
    seq: int,
    status: str,
    error: str | None,
    image_path: str | None,
    facts: Facts | None,
) -> None:
    sha, size, width, height, stored = facts or (None, None, None, None, None)
    db.execute(
        "UPDATE photos SET status = ?, error = ?, sha256 = ?, image_bytes = ?, width = ?,"
        " height = ?, image_path = ?, stored_bytes = ? WHERE seq = ?",
        (status, error, sha, size, width, height, image_path, stored, seq),
    )


def _record(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {key: fields.get(key) for key in PHOTO_SOURCE_FIELDS}


def _params_key(params: Mapping[str, str]) -> str:
    return json.dumps(dict(params), sort_keys=True)


def pin_refusal(
    root: Path, pinned: Mapping[str, Any], settings: Mapping[str, Any]
) -> StateError | None:
    """What ``Store.pin`` refuses: a setting of ``settings`` other than the one ``pinned``."""
    for key, value in settings.items():
        if key in pinned and pinned[key] != json.loads(json.dumps(value)):
            return StateError(
                f"{root} was started with {key} = {_short(pinned[key])}, now"
                f" {_short(value)}; rerun with the same settings to continue, or use another"
                " dataset folder"
            )
    return None


def read_meta(state_file: Path) -> dict[str, str] | None:
    """The state's settings and marks, read without changing the file (nor waiting for its
    writer); None when there is no readable state, or it holds no photo or search yet."""
    try:
        with contextlib.closing(
            sqlite3.connect(f"{state_file.resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            started = db.execute(_STARTED).fetchone()[0]
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except (sqlite3.Error, OSError, ValueError):
        return None
    return meta if started else None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
