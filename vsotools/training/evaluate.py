"""``vsotools evaluate``: score what ``train`` saved on any split of any shard set.

``evaluate`` runs a checkpoint over one split of any shard set and returns the same metrics the
training saved (the same evaluation code, ``training.inference``, fed by the same data builders,
``training.data``). Prediction is ``training.predict``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vsotools.core.metrics import Metrics, ScoreError
from vsotools.core.schema import TEST
from vsotools.training import checkpoint as ckpt
from vsotools.training import distributed
from vsotools.training.data import ModelInput, ShardSet, split_stream
from vsotools.training.inference import autocast_dtype, evaluate_batches
from vsotools.training.loader import make_loader

log = logging.getLogger(__name__)


@dataclass
class EvaluationReport:
    checkpoint: Path
    model: str
    shards: str
    split: str
    metrics: Metrics

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "model": self.model,
            "shards": self.shards,
            "split": self.split,
            **self.metrics.to_json(),
        }


def evaluate(
    checkpoint: str | Path,
    shards: str | Path,
    *,
    split: str = TEST,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    progress: bool = True,
    check: bool = True,
) -> EvaluationReport:
    """Metrics of the checkpoint's model on ``split`` of the shard set at ``shards``.

    ``batch_size`` and ``workers`` default to the training's recipe; ``check`` compares what
    every shard gives with its manifest entry.
    """
    model, recipe, vocab = ckpt.load_model(checkpoint)
    config = recipe.train
    target = distributed.resolve_device(device)
    model.to(target)
    channels_last = config.channels_last and target.type == "cuda"
    if channels_last and model.image is not None:
        model.image.to(memory_format=torch.channels_last)

    shard_set = ShardSet.open(str(shards))
    model_input = ModelInput.of(config, vocab)
    stream = split_stream(
        shard_set,
        split,
        model_input,
        config,
        distributed.Context(rank=0, world_size=1, local_rank=0, device=target),
        batch_size=batch_size,
        gpu_decode=config.gpu_decode and target.type == "cuda",
        check=check,
    )
    n_workers = config.workers if workers is None else workers
    loader = make_loader(stream, n_workers, pin_memory=target.type == "cuda")
    mover = model_input.mover(target, channels_last=channels_last)
    dtype = autocast_dtype(config.precision, target)
    outputs = evaluate_batches(model, loader, mover, dtype, progress=progress, desc=split)
    try:
        metrics = outputs.metrics()
    except ScoreError as exc:
        raise ScoreError(f"{checkpoint} on {split} of {shards}: {exc}") from None
    return EvaluationReport(
        checkpoint=Path(checkpoint),
        model=config.model,
        shards=str(shards),
        split=split,
        metrics=metrics,
    )
