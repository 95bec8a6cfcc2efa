"""``vsotools evaluate`` and ``vsotools predict``: use what ``train`` saved.

``evaluate`` runs a checkpoint over one split of any shard set and returns the same metrics the
run saved (the same evaluation code, ``vsotools.inference``); ``predict`` classifies one image
and/or text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vsotools.core.errors import VsoError
from vsotools.core.metrics import Metrics
from vsotools.core.schema import TEST
from vsotools.shards.format import read_manifest, shard_urls
from vsotools.training import checkpoint as ckpt
from vsotools.training import distributed
from vsotools.training.inference import Prediction, autocast_dtype, evaluate_batches, predict_one
from vsotools.training.loader import BatchMover, SampleDecoder, Shard, ShardStream, make_loader

log = logging.getLogger(__name__)


@dataclass
class EvaluationReport:
    checkpoint: Path
    model: str
    shards: str
    split: str
    metrics: Metrics


def evaluate(
    checkpoint: str | Path,
    shards: str | Path,
    *,
    split: str = TEST,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> EvaluationReport:
    """Metrics of the checkpoint's model on ``split`` of the shard set at ``shards``.

    ``batch_size`` and ``workers`` default to the run's recipe.
    """
    state = ckpt.load_checkpoint(checkpoint)
    model, recipe, vocab = ckpt.model_of(state)
    config = recipe.train
    target = distributed.resolve_device(device)
    model.to(target)
    channels_last = config.channels_last and target.type == "cuda"
    if channels_last and model.image is not None:
        model.image.to(memory_format=torch.channels_last)

    manifest = read_manifest(str(shards))
    urls = shard_urls(str(shards), manifest, split)
    stream = ShardStream(
        [Shard(url, info.samples) for url, info in zip(urls, manifest.shards(split), strict=True)],
        SampleDecoder(
            vocab=vocab if model.uses_text else None,
            max_words=config.max_words,
            crop_size=config.crop_size if model.uses_image else None,
            train=False,
            gpu_decode=config.gpu_decode and target.type == "cuda",
        ),
        batch_size=batch_size or config.batch_size,
    )
    n_workers = config.workers if workers is None else workers
    loader = make_loader(stream, n_workers, pin_memory=target.type == "cuda")
    mover = BatchMover(target, crop_size=config.crop_size, channels_last=channels_last)
    dtype = autocast_dtype(config.precision, target)
    outputs = evaluate_batches(model, loader, mover, dtype, progress=progress, desc=split)
    return EvaluationReport(
        checkpoint=Path(checkpoint),
        model=config.model,
        shards=str(shards),
        split=split,
        metrics=outputs.metrics(),
    )


def predict(
    checkpoint: str | Path,
    *,
    image: str | Path | None = None,
    text: str | None = None,
    device: str = "auto",
) -> Prediction:
    """The label and its probability for one image and/or text (what the model reads)."""
    state = ckpt.load_checkpoint(checkpoint)
    model, recipe, vocab = ckpt.model_of(state)
    model.to(distributed.resolve_device(device))
    data = None
    if image is not None:
        path = Path(image)
        if not path.is_file():
            raise VsoError(f"{path}: image not found")
        data = path.read_bytes()
    return predict_one(model, recipe, vocab, image=data, text=text)
