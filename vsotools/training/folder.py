"""The training folder ``RUN``: what ``vsotools train`` leaves there, and whether it is current.

One module owns the folder's layout; training, evaluation, ``vsotools run`` and the report go
through it::

    RUN/recipe.toml       the resolved recipe
    RUN/word2vec.bin      the text model's word vectors (word2vec binary; reusable)
    RUN/last.pt           the state after the last finished epoch (what a resume reads)
    RUN/checkpoint.pt     the selected model (the last epoch's, or the best on validation)
    RUN/metrics.jsonl     one line per finished epoch (``EpochRecord``): training and
                          validation figures, and whether that epoch's model is the one kept
    RUN/metrics.json      written last: the selected model scored once on the test split, what
                          the training was made from (``inputs``) and their fingerprint, and
                          the files above with their sizes (``files``)

The inputs are the training settings that shape the model (``config.output_settings``), the
shard set it read (its manifest's build fingerprint) and the bytes of any checkpoint a branch
started from, so that a finished training whose inputs changed since is told apart from a
current one; ``status`` answers with the protocol of ``core.status``.

A training that ``vsotools run`` must make again from new inputs trains beside the old one, in
``RUN.next``, and replaces it only once finished (``replace_with``): a rerun killed midway
loses nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsotools.core.config import Recipe, output_settings
from vsotools.core.errors import VsoError
from vsotools.core.files import (
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    folder_lock,
    json_sha256,
)
from vsotools.core.metrics import Metrics
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

RECIPE_FILE = "recipe.toml"
VECTORS_FILE = "word2vec.bin"
LAST_FILE = "last.pt"
SELECTED_FILE = "checkpoint.pt"
EPOCHS_FILE = "metrics.jsonl"
FINAL_FILE = "metrics.json"
FINGERPRINT = "fingerprint"
INPUTS = "inputs"
NEXT_SUFFIX = ".next"
"""``RUN.next``: where a training that replaces ``RUN`` is made."""
REPLACED_SUFFIX = ".replaced"


class TrainingFolderError(VsoError):
    """A training folder holds something unreadable."""


@dataclass
class EpochRecord:
    """One line of ``RUN/metrics.jsonl``: what one finished epoch did and scored.

    On file the validation metrics are flat keys ``val_loss``, ``val_accuracy``, ... (every
    field of ``Metrics``), present only when the training has a validation carve; a checkpoint's
    ``history`` holds the same dicts.
    """

    epoch: int
    """Epochs finished (1 for the first)."""
    step: int
    """Optimizer steps taken by then."""
    lr: float
    """The learning rate after the epoch's last step."""
    train_loss: float
    train_accuracy: float
    train_samples: int
    """Samples seen in the epoch, over all ranks."""
    seconds: float
    samples_per_s: float
    val: Metrics | None = None
    """The epoch's model on the validation carve."""
    eval_seconds: float = 0.0
    frozen_branches: list[str] = field(default_factory=list)
    selected: bool = False
    """Whether this epoch's model became the one ``checkpoint.pt`` keeps."""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "lr": self.lr,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "train_samples": self.train_samples,
            "seconds": self.seconds,
            "samples_per_s": self.samples_per_s,
        }
        if self.val is not None:
            metrics = self.val.to_json()
            data.update({f"val_{key}": metrics[key] for key in Metrics.__dataclass_fields__})
        data["eval_seconds"] = self.eval_seconds
        data["frozen_branches"] = list(self.frozen_branches)
        data["selected"] = self.selected
        return data

    @classmethod
    def from_json(cls, data: Any) -> EpochRecord:
        """Raises KeyError, TypeError or ValueError on a line that is not an epoch record."""
        val = None
        if "val_n" in data:
            val = Metrics(**{key: data[f"val_{key}"] for key in Metrics.__dataclass_fields__})
        return cls(
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            lr=float(data["lr"]),
            train_loss=float(data["train_loss"]),
            train_accuracy=float(data["train_accuracy"]),
            train_samples=int(data["train_samples"]),
            seconds=float(data["seconds"]),
            samples_per_s=float(data["samples_per_s"]),
            val=val,
            eval_seconds=float(data.get("eval_seconds", 0.0)),
            frozen_branches=list(data.get("frozen_branches", [])),
            selected=bool(data.get("selected", False)),
        )


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

    def read_epochs(self) -> list[EpochRecord]:
        """One record per finished epoch (empty before the first)."""
        try:
            lines = self.epochs_log.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        try:
            return [EpochRecord.from_json(json.loads(line)) for line in lines if line.strip()]
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainingFolderError(f"{self.epochs_log}: unreadable ({exc!r})") from None

    def write_epochs(self, history: list[EpochRecord]) -> None:
        text = "".join(json.dumps(record.to_json()) + "\n" for record in history)
        atomic_write_text(self.epochs_log, text)

    def read_final(self) -> dict[str, Any] | None:
        """The selected model's test figures, once the training has finished."""
        try:
            data = json.loads(self.final.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise TrainingFolderError(f"{self.final}: unreadable ({exc})") from None
        return data if isinstance(data, dict) else None

    def finish(self, final: dict[str, Any], inputs: dict[str, Any], vectors: bool) -> None:
        """Record that the training finished, last: ``final`` with the ``inputs`` it was made
        from, their fingerprint, and the files it vouches for (``word2vec.bin`` when
        ``vectors``: when the model's word vectors are those it started with)."""
        names = [RECIPE_FILE, LAST_FILE, SELECTED_FILE, EPOCHS_FILE]
        if vectors and self.vectors.exists():
            names.append(VECTORS_FILE)
        files = listed_files(self.root, names)
        atomic_write_json(
            self.final, {**final, FINGERPRINT: json_sha256(inputs), INPUTS: inputs, FILES: files}
        )

    def status(self, inputs: dict[str, Any]) -> Status:
        """Whether this folder holds the training of ``inputs`` (``training_inputs``): missing,
        unfinished (started and not finished, or a file its final record lists is gone or of
        another size: ``damaged`` names them), stale (finished from other settings, shards or
        starting branches: ``why`` says which) or current."""
        try:
            final = self.read_final()
        except TrainingFolderError as exc:
            return Status(UNFINISHED, f"its final record is damaged ({exc})")
        if final is None:
            if self.holds_training():
                return Status(UNFINISHED, "a training was started here and has not finished")
            return Status(MISSING, f"no training in {self}")
        if final.get(FINGERPRINT) != json_sha256(inputs):
            what = changes(final.get(INPUTS), inputs)
            what = what or ["recorded otherwise by an earlier vsotools"]
            return Status(STALE, f"made from other inputs ({'; '.join(what[:4])})", final)
        problems = damaged_files(self.root, final.get(FILES))
        if problems:
            return Status(UNFINISHED, "; ".join(problems), final, damaged_names(problems))
        return Status(CURRENT, "finished and current", final)

    def damage(self) -> tuple[str, ...]:
        """The files the final record lists that are gone or not as recorded (none before the
        training has finished)."""
        try:
            final = self.read_final()
        except TrainingFolderError:
            return ()
        return () if final is None else damaged_names(damaged_files(self.root, final.get(FILES)))

    # --- a training made again beside the one it replaces -------------------------------------

    def replacement(self) -> TrainingFolder:
        """``RUN.next``: where the training that is to replace this one is made."""
        return TrainingFolder(self.root.with_name(self.root.name + NEXT_SUFFIX))

    def replace_with(self, new: TrainingFolder) -> None:
        """Put the finished training ``new`` in this folder's place and delete the one it
        replaces; a kill at any point leaves one of the two whole (``settle`` finishes it)."""
        old = self.root.with_name(self.root.name + REPLACED_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        if self.root.exists():
            os.replace(self.root, old)
        os.replace(new.root, self.root)
        shutil.rmtree(old, ignore_errors=True)

    def settle(self) -> None:
        """Finish a ``replace_with`` that a kill interrupted: the new training goes in place
        when it is there, else the one it was to replace comes back."""
        old = self.root.with_name(self.root.name + REPLACED_SUFFIX)
        if not old.exists():
            return
        if not self.root.exists():
            new = self.replacement()
            os.replace(new.root if new.root.exists() else old, self.root)
        shutil.rmtree(old, ignore_errors=True)

    def lock(self):
        """Hold the folder for one training process (see ``files.folder_lock``)."""
        return folder_lock(self.root, "this training folder")


def training_inputs(recipe: Recipe, shards_fingerprint: str) -> dict[str, Any]:
    """What a training is made from: its shaping settings, the shard set it reads, and the
    bytes of the checkpoints its branches start from."""
    config = recipe.train
    starts = {
        name: file_sha256(path) if path and Path(path).is_file() else path
        for name, path in (("init_text", config.init_text), ("init_image", config.init_image))
    }
    # The starting checkpoints count by their bytes (``starts``), not by where they lie: a work
    # folder moved elsewhere holds the same training.
    settings = {
        name: value
        for name, value in output_settings(config).items()
        if name not in ("init_text", "init_image")
    }
    return {"train": settings, "shards": shards_fingerprint, "starts": starts}
