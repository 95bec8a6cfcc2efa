"""The training folder ``RUN``: what ``vsotools train`` leaves there, and whether it is current.

One module owns the folder's layout; training, evaluation, ``vsotools run`` and the report go
through it::

    RUN/recipe.toml       the resolved recipe
    RUN/word2vec.bin      the text model's word vectors (word2vec binary; reusable)
    RUN/last.pt           the state after the last finished epoch (what a resume reads)
    RUN/checkpoint.pt     the selected model (the last epoch's, or the best on validation)
    RUN/metrics.jsonl     one line per finished epoch: training and validation figures
    RUN/metrics.json      written last: the selected model scored once on the test split, and
                          the fingerprint of what the training was made from

The fingerprint covers the training settings that shape the model (``config.output_settings``),
the shard set it read (its manifest's build fingerprint) and the bytes of any checkpoint a
branch started from, so that a finished training whose inputs changed since is told apart from
a current one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from vsotools.core.config import Recipe, load_recipe, output_settings
from vsotools.core.errors import ConfigError, VsoError
from vsotools.core.files import (
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    folder_lock,
    json_sha256,
)

RECIPE_FILE = "recipe.toml"
VECTORS_FILE = "word2vec.bin"
LAST_FILE = "last.pt"
SELECTED_FILE = "checkpoint.pt"
EPOCHS_FILE = "metrics.jsonl"
FINAL_FILE = "metrics.json"
FINGERPRINT = "fingerprint"

Status = Literal["empty", "unfinished", "finished", "stale"]


class TrainingFolderError(VsoError):
    """A training folder holds something unreadable."""


class TrainingFolder:
    """The files of one training folder, and the questions training and ``run`` ask about it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE_FILE

    @property
    def vectors(self) -> Path:
        return self.root / VECTORS_FILE

    @property
    def last(self) -> Path:
        return self.root / LAST_FILE

    @property
    def selected(self) -> Path:
        return self.root / SELECTED_FILE

    @property
    def epochs_log(self) -> Path:
        return self.root / EPOCHS_FILE

    @property
    def final(self) -> Path:
        return self.root / FINAL_FILE

    def holds_training(self) -> bool:
        """Whether a training has started here (at least one epoch saved)."""
        return self.last.exists() or self.selected.exists()

    def read_epochs(self) -> list[dict[str, Any]]:
        """One record per finished epoch (empty before the first)."""
        try:
            lines = self.epochs_log.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except ValueError as exc:
            raise TrainingFolderError(f"{self.epochs_log}: unreadable ({exc})") from None

    def write_epochs(self, history: list[dict[str, Any]]) -> None:
        atomic_write_text(self.epochs_log, "".join(json.dumps(r) + "\n" for r in history))

    def read_final(self) -> dict[str, Any] | None:
        """The selected model's test figures, once the training has finished."""
        try:
            data = json.loads(self.final.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise TrainingFolderError(f"{self.final}: unreadable ({exc})") from None
        return data if isinstance(data, dict) else None

    def finish(self, final: dict[str, Any], fingerprint: str) -> None:
        """Record that the training finished, last: ``final`` with its ``fingerprint``."""
        atomic_write_json(self.final, {**final, FINGERPRINT: fingerprint})

    def status(self, recipe: Recipe, fingerprint: str) -> Status:
        """``empty``, ``unfinished`` (resumable), ``finished`` from these inputs, or ``stale``:
        finished from other settings, another shard set or other starting branches."""
        final = self.read_final()
        if final is None:
            return "unfinished" if self.holds_training() else "empty"
        saved = final.get(FINGERPRINT)
        if saved is not None:
            return "finished" if saved == fingerprint else "stale"
        # Trainings finished before fingerprints were recorded: compare their saved settings.
        try:
            previous = load_recipe(self.recipe)
        except ConfigError:
            return "stale"
        same = output_settings(previous.train) == output_settings(recipe.train)
        return "finished" if same else "stale"

    def lock(self):
        """Hold the folder for one training process (see ``files.folder_lock``)."""
        return folder_lock(self.root, "this training folder")


def training_fingerprint(recipe: Recipe, shards_fingerprint: str) -> str:
    """What a training is made from: its shaping settings, the shard set it reads, and the
    bytes of the checkpoints its branches start from."""
    config = recipe.train
    starts = {
        name: file_sha256(path) if path and Path(path).is_file() else path
        for name, path in (("init_text", config.init_text), ("init_image", config.init_image))
    }
    return json_sha256(
        {"train": output_settings(config), "shards": shards_fingerprint, "starts": starts}
    )
