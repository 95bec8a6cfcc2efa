"""The dataset folder ``DATA``: what fetch and filter leave there, and whether it is current.

One module owns the folder's layout; every stage, ``vsotools run`` and the report go through it::

    DATA/fetch-state.sqlite           fetch's working state (vsotools.fetch.store)
    DATA/images/NNNNN/ID.EXT          the stored images (vsotools.fetch.store), or the same names
                                      under ``fetch.image_store`` (``ImageStore``)
    DATA/metadata/part-NNNNN.parquet  one photo record per photo (schema.PHOTO_SCHEMA)
    DATA/fetch-recipe.toml            the recipe fetch ran with
    DATA/fetch-report.json            written last by fetch: its counts and its fingerprint
    DATA/filtered.parquet             labelled, split records (schema.FILTERED_SCHEMA)
    DATA/filter-recipe.toml           the recipe filter ran with
    DATA/filter-report.json           written last by filter: what each rule dropped, fingerprint

A stage's report is written last, so its presence means the stage finished. It keeps what the
output was made from (``inputs``: the settings that shape it, ``config.output_settings``, and
the checksums of its input files: the pairs file and the ANP manifest for fetch; the photo
records and the manifest for filter), their ``fingerprint``, and the files it vouches for
(``files``: each one's size, and for ``filtered.parquet`` its sha256). ``status`` answers with
the protocol of ``core.status``: the output is *current* when its report holds today's
fingerprint and every file it lists is there as recorded; fetch's images, which its photo
records list with their sizes, are checked the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from vsotools.core.config import Recipe, output_settings, write_recipe
from vsotools.core.errors import VsoError
from vsotools.core.files import (
    UnsafeFile,
    atomic_write_json,
    file_sha256,
    folder_lock,
    json_sha256,
    naming_errors,
)
from vsotools.core.schema import STATUS_OK, sample_key
from vsotools.core.status import (
    CURRENT,
    FILES,
    MISSING,
    STALE,
    UNFINISHED,
    Status,
    changes,
    damaged_files,
    damaged_names,
    listed_files,
)
from vsotools.core.storage import Location

Stage = Literal["fetch", "filter"]

STATE_FILE = "fetch-state.sqlite"
IMAGES_DIR = "images"
METADATA_DIR = "metadata"
INCOMING_DIR = ".incoming"
FILTERED_FILE = "filtered.parquet"
FINGERPRINT = "fingerprint"
"""The key of a report that holds the fingerprint of what the output was made from."""
INPUTS = "inputs"
"""The key of a report that holds what the fingerprint is a checksum of (to say what changed)."""


class StageReport:
    """A stage's report as its file holds it, and what this call did that the file does not
    keep: ``already_complete`` (it found the output current and did nothing, ``from_saved``)
    and ``repaired`` (what it found missing or damaged and wrote again)."""

    already_complete: bool
    repaired: list[str]

    _CALL_FIELDS = ("already_complete", "repaired")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        for name in self._CALL_FIELDS:
            del data[name]
        return data

    def to_output(self) -> dict[str, Any]:
        """The report as the command prints it (``--json``): the file's fields and the call's."""
        return {**self.to_json(), **{name: getattr(self, name) for name in self._CALL_FIELDS}}

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> Any:
        """The report a finished stage left, for a call that found its output current."""
        known = set(cls.__dataclass_fields__) - set(cls._CALL_FIELDS)  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in data.items() if k in known}, already_complete=True)


def image_name(seq: int, photo_id: str, ext: str, part_size: int) -> str:
    """Where a photo's image is stored, relative to the image store: ``images/{part:05d}/ID.EXT``
    with its discovery number's part."""
    name = sample_key(photo_id)
    if name != photo_id or len(name) > 100:
        name = f"{name[:80]}-{seq}"  # two ids may read alike once made safe
    return f"{IMAGES_DIR}/{seq // part_size:05d}/{name}.{ext}"


class ImageStore:
    """Where a dataset's images are: its folder, or ``url`` (``fetch.image_store``: an fsspec
    URL or a folder every node of a cluster mounts) under the same names; picklable, so that
    parts downloaded on other machines write to the same place."""

    def __init__(self, data_dir: str | Path, url: str = "") -> None:
        self.data_dir = Path(data_dir)
        self.url = url
        self.location = Location(url) if url else None

    def __str__(self) -> str:
        return self.url or str(self.data_dir)

    def url_of(self, name: str) -> str:
        return self.location.url_of(name) if self.location else str(self.data_dir / name)

    def exists(self, name: str) -> bool:
        if self.location is None:
            return (self.data_dir / name).exists()
        return self.location.size(name) is not None

    def sizes(self, folder: str) -> dict[str, int]:
        """Name -> bytes of the images in ``folder`` (``images/NNNNN``): one listing."""
        if self.location is not None:
            return {f"{folder}/{name}": size for name, size in self.location.sizes(folder).items()}
        try:
            entries = list(os.scandir(self.data_dir / folder))
        except OSError:
            return {}
        return {f"{folder}/{e.name}": e.stat().st_size for e in entries if e.is_file()}

    def put_file(self, path: Path, name: str) -> None:
        """Move the finished file ``path`` (in this folder's ``.incoming``) to ``name``."""
        if self.location is None:
            final = self.data_dir / name
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, final)
            return
        self.location.write_bytes(name, path.read_bytes())
        path.unlink()

    def write(self, seq: int, name: str, data: bytes) -> None:
        """Store ``data`` as ``name``, complete or not at all: locally through
        ``.incoming/{seq}.partial`` (which the next run removes if this one is killed)."""
        if self.location is not None:
            self.location.write_bytes(name, data)
            return
        partial = self.data_dir / INCOMING_DIR / f"{seq}.partial"
        with naming_errors(partial), partial.open("wb") as fh:
            fh.write(data)
        final = self.data_dir / name
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)

    def remove(self, name: str) -> None:
        """Delete ``name`` if it is there."""
        if self.location is not None:
            self.location.remove(name)
        else:
            (self.data_dir / name).unlink(missing_ok=True)


class DatasetError(VsoError):
    """A dataset folder is missing what a stage needs, or holds something unreadable."""


class DatasetFolder:
    """The files of one dataset folder, and the questions stages ask about them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    # --- where things are ---------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def metadata_dir(self) -> Path:
        return self.root / METADATA_DIR

    @property
    def filtered(self) -> Path:
        return self.root / FILTERED_FILE

    def report_file(self, stage: Stage) -> Path:
        return self.root / f"{stage}-report.json"

    def recipe_file(self, stage: Stage) -> Path:
        return self.root / f"{stage}-recipe.toml"

    def metadata_part(self, part: int) -> Path:
        return self.metadata_dir / f"part-{part:05d}.parquet"

    def image_store(self, url: str = "") -> ImageStore:
        """Where this dataset's images are: this folder, or ``url`` (``fetch.image_store``)."""
        return ImageStore(self.root.absolute(), url)

    def part_of(self, name: str) -> int | None:
        """The part number of the photo record file ``name`` (relative to the folder), or None
        when ``name`` is not one."""
        folder, _, file = name.rpartition("/")
        if folder != METADATA_DIR or not file.startswith("part-") or not file.endswith(".parquet"):
            return None
        number = file[len("part-") : -len(".parquet")]
        return int(number) if number.isascii() and number.isdigit() else None

    def metadata_files(self) -> list[Path]:
        """The photo record files, in part order."""
        if not self.metadata_dir.is_dir():
            return []
        return sorted(self.metadata_dir.glob("part-*.parquet"))

    # --- reports, and whether an output is current ---------------------------------------------

    def read_report(self, stage: Stage) -> dict[str, Any] | None:
        """A stage's report, or None when the stage has not finished here."""
        path = self.report_file(stage)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: unreadable ({exc})") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{path}: not a report (a JSON object)")
        return data

    def finish(
        self,
        stage: Stage,
        recipe: Recipe,
        report: dict[str, Any],
        inputs: dict[str, Any],
        outputs: Iterable[str],
    ) -> None:
        """Record that ``stage`` finished: its recipe, then its report (last), which keeps the
        ``inputs`` it was made from, their fingerprint, and the files it vouches for: its recipe
        and ``outputs`` (names relative to the folder; ``filtered.parquet`` with its sha256)."""
        write_recipe(recipe, self.recipe_file(stage))
        names = [self.recipe_file(stage).name, *outputs]
        files = listed_files(self.root, names, checksummed=[FILTERED_FILE])
        atomic_write_json(
            self.report_file(stage),
            {**report, FINGERPRINT: json_sha256(inputs), INPUTS: inputs, FILES: files},
        )

    def status(self, stage: Stage, inputs: dict[str, Any]) -> Status:
        """Whether ``stage``'s output here is missing, unfinished (or damaged: a file its report
        lists is gone or not as recorded; for fetch, an image its photo records list too),
        stale (made from other ``inputs``: why names them) or current."""
        try:
            report = self.read_report(stage)
        except DatasetError as exc:
            return Status(UNFINISHED, f"its report is damaged ({exc})")
        if report is None:
            started = self.state_file.exists() if stage == "fetch" else False
            if started:
                return Status(UNFINISHED, "a fetch was started here and has not finished")
            return Status(MISSING, f"no {stage} has finished in {self}")
        if report.get(FINGERPRINT) != json_sha256(inputs):
            what = changes(report.get(INPUTS), inputs)
            what = what or ["recorded otherwise by an earlier vsotools"]
            return Status(STALE, f"made from other inputs ({'; '.join(what[:4])})", report)
        problems = damaged_files(self.root, report.get(FILES))
        if stage == "filter" and FILES not in report and not self.filtered.is_file():
            problems.append(f"{FILTERED_FILE} is missing")
        if stage == "fetch":
            problems += self.damaged_images(self.image_store(_image_store_of(inputs)))
        if problems:
            more = f" and {len(problems) - 3:,} more" if len(problems) > 3 else ""
            why = f"{'; '.join(problems[:3])}{more}"
            return Status(UNFINISHED, why, report, damaged_names(problems))
        return Status(CURRENT, "complete and current", report)

    def damage(self, stage: Stage) -> list[str]:
        """What is wrong with the files ``stage``'s report lists (empty when it has none, or
        none is wrong): one phrase per file, naming it."""
        try:
            report = self.read_report(stage)
        except DatasetError:
            return []
        return [] if report is None else damaged_files(self.root, report.get(FILES))

    def damaged_images(self, images: ImageStore) -> list[str]:
        """The stored images that the photo records list and that are missing or not of their
        recorded size in ``images``: one phrase each, naming the image by its path in the
        store. Each image folder is listed once (one call per folder on an object store)."""
        problems = []
        for part in self.metadata_files():
            try:
                table = pq.read_table(part)
            except (OSError, ValueError) as exc:
                problems.append(f"{part.relative_to(self.root)} is unreadable ({exc})")
                continue
            # The stored file's size; records written before it was kept hold the served size,
            # which is the stored one unless fetch.max_side downscaled the image.
            sizes = "stored_bytes" if "stored_bytes" in table.column_names else "image_bytes"
            columns = table.select(["status", "image_path", sizes]).to_pydict()
            recorded: dict[str, dict[str, int]] = defaultdict(dict)
            for status, path, size in zip(
                columns["status"], columns["image_path"], columns[sizes], strict=True
            ):
                if status == STATUS_OK and path:
                    recorded[path.rpartition("/")[0]][path] = size
            for folder, images_there in recorded.items():
                found = images.sizes(folder)
                for path, size in images_there.items():
                    if path not in found:
                        problems.append(f"{path} is missing")
                    elif size is not None and found[path] != size:
                        problems.append(f"{path} has {found[path]:,} bytes, {size:,} recorded")
        return problems

    def fetch_inputs(self, recipe: Recipe, pairs_sha256: str | None) -> dict[str, Any]:
        """What a fetch output is made from: the settings that shape it, and the bytes of the
        pairs file (their sha256, which the fetch reads anyway) or of the ANP manifest whose
        ANPs it searched."""
        return {
            "anps": output_settings(recipe.anps),
            "fetch": output_settings(recipe.fetch),
            "pairs": pairs_sha256,
            "manifest": None if recipe.fetch.pairs else _optional_sha256(recipe.anps.manifest),
        }

    def filter_inputs(self, recipe: Recipe) -> dict[str, Any]:
        """What ``filtered.parquet`` is made from: the filter and labelling settings, the bytes
        of every photo record file and of the ANP manifest."""
        return {
            "anps": output_settings(recipe.anps),
            "filter": output_settings(recipe.filter),
            "metadata": {p.name: file_sha256(p) for p in self.metadata_files()},
            "manifest": _optional_sha256(recipe.anps.manifest),
        }

    # --- one writer at a time -------------------------------------------------------------------

    def lock(self):
        """Hold the folder for one writing process (see ``files.folder_lock``)."""
        return folder_lock(self.root, "this dataset folder")


def _image_store_of(inputs: dict[str, Any]) -> str:
    """The ``fetch.image_store`` a fetch's inputs name (empty: the dataset folder)."""
    fetch = inputs.get("fetch")
    return str(fetch.get("image_store") or "") if isinstance(fetch, dict) else ""


def _optional_sha256(path: str) -> str | None:
    """The sha256 of an input file named by a setting; None for an empty setting or a missing
    file (the stage itself then reports it)."""
    if not path:
        return None
    try:
        return file_sha256(path)
    except (OSError, UnsafeFile):
        return None
