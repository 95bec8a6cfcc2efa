"""What a model reads, built in one place for training, evaluation and prediction.

``ShardSet`` opens a shard set: its manifest, each split's shards with the counts each must
give, and its fingerprint. ``ModelInput`` says what a model reads of a sample and how: the text
encoder (a vocabulary or a tokenizer) and the most tokens it keeps, the image crop and its
normalisation. From these two come everything the loops need: the sample decoder that runs in
the loader workers, the stream over a split, and the batch mover that finishes a batch on the
device. Training, ``vsotools evaluate`` and ``vsotools predict`` all build their data here, so a
checkpoint is always fed what it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vsotools.core.config import TrainConfig
from vsotools.shards.manifest import ShardManifest, read_manifest, shard_urls
from vsotools.training import encoders
from vsotools.training.distributed import Context
from vsotools.training.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchMover,
    KeepValidation,
    SampleDecoder,
    Shard,
    ShardStream,
    TextEncoder,
)


@dataclass(frozen=True)
class ShardSet:
    """A shard set as the loops read it."""

    location: str
    manifest: ShardManifest

    @classmethod
    def open(cls, location: str) -> ShardSet:
        return cls(str(location), read_manifest(str(location)))

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def shards(self, split: str) -> list[Shard]:
        """The shards of ``split`` in manifest order, each with what it must hold."""
        infos = self.manifest.shards(split)
        urls = shard_urls(self.location, self.manifest, split)
        return [
            Shard(url, info.samples, info.labels) for url, info in zip(urls, infos, strict=True)
        ]

    def samples(self, split: str) -> int:
        return self.manifest.samples(split)

    def labels(self, split: str) -> dict[str, int]:
        return self.manifest.labels(split)


@dataclass(frozen=True)
class ModelInput:
    """What a model reads of a sample, and how it is prepared."""

    text: TextEncoder | None
    """Turns a text into token ids; None: the model reads no text."""
    max_tokens: int
    crop_size: int | None
    """Side of the square image crop; None: the model reads no image."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel normalisation of the crop, on the 0..1 scale."""

    @classmethod
    def of(cls, config: TrainConfig, text: TextEncoder | None) -> ModelInput:
        """What a model of ``config`` reads, with ``text`` turning its texts into token ids (a
        vocabulary or a tokenizer; None for an image model), each branch's input prepared the
        way its encoder expects (``training.encoders``)."""
        mean, std = encoders.image_normalisation(config)
        return cls(
            text=text if encoders.has_branch(config, "text") else None,
            max_tokens=encoders.max_tokens(config),
            crop_size=config.crop_size if encoders.has_branch(config, "image") else None,
            mean=mean,
            std=std,
        )

    def decoder(
        self, config: TrainConfig, *, train: bool, gpu_decode: bool = False
    ) -> SampleDecoder:
        return SampleDecoder(
            text=self.text,
            max_tokens=self.max_tokens,
            crop_size=self.crop_size,
            train=train,
            hflip=config.hflip,
            scale_jitter=config.scale_jitter,
            gpu_decode=gpu_decode,
        )

    def mover(
        self,
        device: torch.device,
        *,
        channels_last: bool = False,
        color_jitter: float = 0.0,
        seed: int = 0,
        rank: int = 0,
    ) -> BatchMover:
        return BatchMover(
            device,
            crop_size=self.crop_size,
            channels_last=channels_last,
            color_jitter=color_jitter,
            seed=seed,
            rank=rank,
            mean=self.mean,
            std=self.std,
        )


def split_stream(
    shard_set: ShardSet,
    split: str,
    model_input: ModelInput,
    config: TrainConfig,
    context: Context,
    *,
    train: bool = False,
    steps: int | None = None,
    validation: bool = False,
    batch_size: int | None = None,
    gpu_decode: bool = False,
    check: bool = True,
) -> ShardStream:
    """The stream of batches of ``split`` for this rank.

    ``train``: augmented, shuffled, ``steps`` batches per epoch, without the validation carve;
    ``validation``: the carve alone, read once; otherwise every sample of the split once.
    """
    shards = shard_set.shards(split)
    keep = None
    if config.val_fraction > 0 and (train or validation):
        keep = KeepValidation(config.seed, config.val_fraction, wanted=validation)
    return ShardStream(
        shards,
        model_input.decoder(config, train=train, gpu_decode=gpu_decode),
        batch_size=batch_size or config.batch_size,
        rank=context.rank,
        world_size=context.world_size,
        steps=steps if train else None,
        seed=config.seed,
        shuffle_buffer=config.shuffle_buffer if train else 0,
        keep=keep,
        check=check,
    )
