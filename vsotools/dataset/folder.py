"""The dataset folder ``DATA``: what fetch and filter leave there, and whether it is current.

One module owns the folder's layout; every stage, ``vsotools run`` and the report go through it::

    DATA/fetch-state.sqlite           fetch's working state (vsotools.fetch.store)
    DATA/images/NNNNN/ID.EXT          the stored images (vsotools.fetch.store)
    DATA/metadata/part-NNNNN.parquet  one photo record per photo (schema.PHOTO_SCHEMA)
    DATA/fetch-recipe.toml            the recipe fetch ran with
    DATA/fetch-report.json            written last by fetch: its counts and its fingerprint
    DATA/filtered.parquet             labelled, split records (schema.FILTERED_SCHEMA)
    DATA/filter-recipe.toml           the recipe filter ran with
    DATA/filter-report.json           written last by filter: what each rule dropped, fingerprint

A stage's report is written last, so its presence means the stage finished. Its
``fingerprint`` is a checksum of everything the output was made from: the settings that shape
it (``config.output_settings``) and the bytes of its input files (the pairs file and the ANP
manifest for fetch; the photo records and the manifest for filter). An output is *current* for
a set of inputs when its report holds their fingerprint, the way a shard set's manifest holds
the fingerprint of ``filtered.parquet`` and the shard settings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from vsotools.core.config import Recipe, output_settings, write_recipe
from vsotools.core.errors import VsoError
from vsotools.core.files import (
    UnsafeFile,
    atomic_write_json,
    file_sha256,
    folder_lock,
    json_sha256,
)

Stage = Literal["fetch", "filter"]

STATE_FILE = "fetch-state.sqlite"
IMAGES_DIR = "images"
METADATA_DIR = "metadata"
INCOMING_DIR = ".incoming"
FILTERED_FILE = "filtered.parquet"
FINGERPRINT = "fingerprint"
"""The key of a report that holds the fingerprint of what the output was made from."""


class StageReport:
    """A stage's report as its file holds it: every field but ``already_complete``, which says
    whether this call found the output current and did nothing (``from_saved``)."""

    already_complete: bool

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        del data["already_complete"]
        return data

    def to_output(self) -> dict[str, Any]:
        """The report as the command prints it (``--json``): the file's fields and ``already_complete``."""
        return {**self.to_json(), "already_complete": self.already_complete}

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> Any:
        """The report a finished stage left, for a call that found its output current."""
        known = {f for f in cls.__dataclass_fields__ if f != "already_complete"}  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in data.items() if k in known}, already_complete=True)


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

    def metadata_files(self) -> list[Path]:
        """The photo record files, in part order."""
        if not self.metadata_dir.is_dir():
            return []
        return sorted(self.metadata_dir.glob("part-*.parquet"))

    # --- reports and fingerprints ---------------------------------------------------------------

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
        self, stage: Stage, recipe: Recipe, report: dict[str, Any], fingerprint: str
    ) -> None:
        """Record that ``stage`` finished: its recipe, then its report (last) with ``fingerprint``."""
        write_recipe(recipe, self.recipe_file(stage))
        atomic_write_json(self.report_file(stage), {**report, FINGERPRINT: fingerprint})

    def current_report(self, stage: Stage, fingerprint: str) -> dict[str, Any] | None:
        """``stage``'s report when it finished here from the inputs and settings ``fingerprint``
        stands for; None when it has not, or from others."""
        report = self.read_report(stage)
        return report if report is not None and report.get(FINGERPRINT) == fingerprint else None

    def fetch_fingerprint(self, recipe: Recipe, pairs_sha256: str | None) -> str:
        """What a fetch output is made from: the settings that shape it, and the bytes of the
        pairs file (their sha256, which the fetch reads anyway) or of the ANP manifest whose
        ANPs it searched."""
        return json_sha256(
            {
                "anps": output_settings(recipe.anps),
                "fetch": output_settings(recipe.fetch),
                "pairs": pairs_sha256,
                "manifest": None if recipe.fetch.pairs else _optional_sha256(recipe.anps.manifest),
            }
        )

    def filter_fingerprint(self, recipe: Recipe) -> str:
        """What ``filtered.parquet`` is made from: the filter and labelling settings, the bytes
        of every photo record file and of the ANP manifest."""
        return json_sha256(
            {
                "anps": output_settings(recipe.anps),
                "filter": output_settings(recipe.filter),
                "metadata": {p.name: file_sha256(p) for p in self.metadata_files()},
                "manifest": _optional_sha256(recipe.anps.manifest),
            }
        )

    # --- one writer at a time -------------------------------------------------------------------

    def lock(self):
        """Hold the folder for one writing process (see ``files.folder_lock``)."""
        return folder_lock(self.root, "this dataset folder")


def _optional_sha256(path: str) -> str | None:
    """The sha256 of an input file named by a setting; None for an empty setting or a missing
    file (the stage itself then reports it)."""
    if not path:
        return None
    try:
        return file_sha256(path)
    except (OSError, UnsafeFile):
        return None
