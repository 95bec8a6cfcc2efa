"""The state a training carries from step to step and from epoch to epoch, as one typed object.

``TrainState`` holds what changes while a model trains (in the shape of open_clip's
``TrainState``): the model, the optimizer and its learning-rate schedule, how far it has come
(epochs, steps), which epoch's model is kept (``Selection``) and one ``EpochRecord`` per
finished epoch. A checkpoint is built from it (``to_checkpoint``) and a resumed training is
restored to it (``restore``), so that the two cannot disagree about what a training is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from vsotools.core.config import Recipe, TrainConfig
from vsotools.core.metrics import Metrics
from vsotools.training import checkpoint as ckpt
from vsotools.training.folder import EpochRecord
from vsotools.training.models import SentimentNet

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """Which epoch's model is kept, and early stopping: the best validation score so far, its
    epoch, and the epochs since it (``metric`` ``last`` keeps every latest epoch)."""

    metric: str
    patience: int
    best: float | None = None
    epoch: int = 0
    since: int = 0
    stopped: bool = False

    def update(self, epoch: int, val: Metrics | None) -> bool:
        """Whether the model after ``epoch`` is the one to keep; counts towards stopping."""
        if self.metric == "last" or val is None:
            self.epoch = epoch
            return True
        score = {
            "val_loss": -(val.loss if val.loss is not None else float("inf")),
            "val_accuracy": val.accuracy,
            "val_macro_f1": val.macro_f1,
        }[self.metric]
        if self.best is None or score > self.best:
            self.best, self.epoch, self.since = score, epoch, 0
            return True
        self.since += 1
        if self.patience and self.since >= self.patience:
            self.stopped = True
            log.info("early stop: %s has not improved for %d epochs", self.metric, self.patience)
        return False

    def to_json(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "epoch": self.epoch,
            "since": self.since,
            "stopped": self.stopped,
        }

    @classmethod
    def of(cls, config: TrainConfig, saved: dict[str, Any] | None = None) -> Selection:
        """The selection ``config`` asks for, where a checkpoint's ``saved`` state left it."""
        selection = cls(config.select, config.patience)
        if saved:
            selection.best, selection.epoch = saved["best"], int(saved["epoch"])
            selection.since, selection.stopped = int(saved["since"]), bool(saved["stopped"])
        return selection


@dataclass
class TrainState:
    """A model in training: its weights, its optimizer and schedule, how far it has come."""

    model: SentimentNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    selection: Selection
    epoch: int = 0
    """Epochs finished."""
    step: int = 0
    """Optimizer steps taken."""
    history: list[EpochRecord] = field(default_factory=list)
    resumed_after: int | None = None
    """The epoch a resumed training went on after (None: it started here)."""

    @classmethod
    def start(
        cls, model: SentimentNet, config: TrainConfig, pretrained: frozenset[str]
    ) -> TrainState:
        """Epoch 0 of ``model``: Adam over its trainable parameters (the pretrained encoders'
        at ``train.encoder_lr`` when set), the staircase decay stepped every batch."""
        optimizer = torch.optim.Adam(
            _parameter_groups(model, config, pretrained),
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.lr_decay_steps, gamma=config.lr_decay
        )
        return cls(model, optimizer, scheduler, Selection.of(config))

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def record(self, epoch: EpochRecord) -> None:
        """Count a finished epoch: ``epoch`` holds its figures; the selection decides whether
        its model is the one to keep (``epoch.selected``)."""
        self.epoch, self.step = epoch.epoch, epoch.step
        epoch.selected = self.selection.update(epoch.epoch, epoch.val)
        self.history.append(epoch)

    def selected_record(self) -> EpochRecord:
        """The record of the epoch whose model is kept."""
        return next(r for r in self.history if r.epoch == self.selection.epoch)

    def to_checkpoint(
        self,
        recipe: Recipe,
        reader: Any,
        *,
        steps_per_epoch: int,
        world_size: int,
        shards: str,
        starts: dict[str, Any],
    ) -> dict[str, Any]:
        """The checkpoint of this state (``training.checkpoint`` describes every key):
        ``reader`` is what turns the model's text into token ids, ``shards`` the fingerprint of
        the shard set it trains on, ``starts`` the checkpoints its branches started from."""
        return {
            **ckpt.model_entries(recipe, self.model, reader),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "steps_per_epoch": steps_per_epoch,
            "world_size": world_size,
            "rng": ckpt.rng_state(),
            "history": [record.to_json() for record in self.history],
            "selection": self.selection.to_json(),
            "shards": shards,
            "starts": starts,
        }

    def restore(self, checkpoint: dict[str, Any], config: TrainConfig) -> None:
        """Carry on where ``checkpoint`` (``to_checkpoint``'s dict) left off: its weights,
        optimizer, schedule, random generators, progress, history and selection."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        ckpt.restore_rng(checkpoint["rng"])
        self.epoch, self.step = int(checkpoint["epoch"]), int(checkpoint["step"])
        self.resumed_after = self.epoch
        self.history = [EpochRecord.from_json(r) for r in checkpoint["history"]]
        self.selection = Selection.of(config, checkpoint["selection"])


def _parameter_groups(
    model: SentimentNet, config: TrainConfig, pretrained: frozenset[str]
) -> list[dict[str, Any]]:
    """The trainable parameters: the pretrained encoders' at ``train.encoder_lr`` (when set),
    the rest at ``train.lr``."""
    encoder_ids = {id(p) for name in pretrained for p in getattr(model, name).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    rest = [p for p in trainable if id(p) not in encoder_ids]
    groups: list[dict[str, Any]] = [{"params": rest}]
    ours = [p for p in trainable if id(p) in encoder_ids]
    if ours:
        groups.append({"params": ours, "lr": config.encoder_lr or config.lr})
    return groups
