"""The streaming shard loader: tar shards in, batches of uint8 images and token ids out.

Each training process (rank) reads its own part of a split's shards, and each of its loader
workers a part of that, so every shard is read by exactly one worker per epoch::

    shards of the split (manifest order)
      -> shuffled by (seed, epoch)                    shard shuffle, the same on every rank
      -> shard i goes to rank/worker slot i mod (ranks x workers)
      -> samples of the worker's shards               (pass after pass for training)
      -> validation samples kept or dropped           by a hash of the key
      -> shuffle buffer, flushed after each pass      (training)
      -> decode: crop + flip to uint8, text to ids    in the worker
      -> batches of ``batch_size``

Training epochs have a fixed number of steps, the same on every rank (computed from the
manifest's sample counts), so DistributedDataParallel never waits on a rank that ran out of
data; the steps of a rank are shared among its workers in proportion to their samples.
Evaluation streams read every sample exactly once and keep the last, partial batch.

Normalisation and float conversion happen on the device (``BatchMover``), after a pinned,
non-blocking copy of the uint8 batch; with ``gpu_decode`` the workers pass the JPEG bytes and a
crop box, and torchvision decodes them on the GPU.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.nn.functional import interpolate
from torch.utils.data import default_collate

from vsotools.core import images as image_rules
from vsotools.core import schema
from vsotools.core.errors import VsoError
from vsotools.core.extras import GPU_DECODE_INSTALL, require
from vsotools.shards.tar_reader import read_shard
from vsotools.training.vocab import PAD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SHARD_IMAGE_MAX_PIXELS = 40_000_000
"""Most pixels of a shard image decoded: ``shard`` writes each image downscaled to its
``image_size`` (256 pixels on the shorter side by default), so a larger one is a damaged or
foreign shard, refused from its header before it is decoded (a decompression bomb)."""
"""torchvision's ImageNet normalisation (on the 0..1 scale): the paper's image branch's input."""


class LoaderError(VsoError):
    """The shards cannot feed the requested training (too few shards, unreadable shard...)."""


@dataclass(frozen=True)
class Shard:
    url: str
    """Local path or fsspec URL of the tar file."""
    samples: int
    """Samples in the shard, from the manifest."""
    labels: dict[str, int] | None = None
    """Label name -> samples, from the manifest; None: not checked."""


# --- which worker reads which shard ---------------------------------------------------------


def split_shards(
    shards: list[Shard],
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    epoch: int,
    seed: int,
    shuffle: bool,
) -> list[Shard]:
    """The shards that ``worker`` of ``rank`` reads in ``epoch``: a partition over all slots."""
    order = list(shards)
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    slots = world_size * num_workers
    return order[rank * num_workers + worker :: slots]


def check_shard_count(n_shards: int, world_size: int, num_workers: int, split: str) -> None:
    """Refuse a training split with fewer shards than reader slots (a rank or worker would idle,
    and with DDP, hang)."""
    slots = world_size * max(1, num_workers)
    if n_shards < slots:
        raise LoaderError(
            f"the {split} split has {n_shards} shard(s) but training reads it with"
            f" {world_size} process(es) x {max(1, num_workers)} loader worker(s) = {slots} readers;"
            f" lower train.workers, or write more shards (vsotools shard with a smaller"
            f" shard.maxcount)"
        )


def steps_per_epoch(n_samples: int, batch_size: int, world_size: int) -> int:
    """Steps every rank runs per training epoch: whole global batches that fit in the split."""
    return max(1, n_samples // (batch_size * world_size))


def share(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders), summing to ``total``."""
    weight_sum = sum(weights)
    if weight_sum == 0:
        base = [total // len(weights)] * len(weights)
        for i in range(total - sum(base)):
            base[i] += 1
        return base
    exact = [total * w / weight_sum for w in weights]
    parts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (parts[i] - exact[i], i))
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def is_validation(key: str, seed: int, fraction: float) -> bool:
    """Whether the sample ``key`` belongs to the validation part of the training split."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"val:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# --- reading samples -----------------------------------------------------------------------


def read_samples(
    shards: Iterable[Shard], skip_images: bool = False, check: bool = True
) -> Iterator[dict[str, Any]]:
    """The raw samples of several shards, in order.

    With ``check``, each shard read to its end must have given the samples and labels its
    manifest entry promises: a shard cut short (even at a sample boundary) or with a changed
    class is refused with its name instead of being trained or scored on.
    """
    for shard in shards:
        samples = read_shard(shard.url, skip_images)
        yield from _checked(samples, shard) if check else samples


def _checked(samples: Iterable[dict[str, Any]], shard: Shard) -> Iterator[dict[str, Any]]:
    found = 0
    labels: dict[str, int] = {}
    for sample in samples:
        found += 1
        name = _label_name(sample)
        labels[name] = labels.get(name, 0) + 1
        yield sample
    if found != shard.samples:
        raise LoaderError(
            f"{shard.url}: {found:,} samples, the manifest says {shard.samples:,}"
            " (a damaged or replaced shard; vsotools verify tells more)"
        )
    if shard.labels is not None and labels != {k: v for k, v in shard.labels.items() if v}:
        raise LoaderError(
            f"{shard.url}: labels {dict(sorted(labels.items()))}, the manifest says"
            f" {dict(sorted(shard.labels.items()))}"
        )


def _label_name(sample: dict[str, Any]) -> str:
    text, label = schema.read_class(sample.get(schema.SAMPLE_CLASS))
    if label is None:
        raise LoaderError(
            f"{sample.get('__url__')}: sample {sample.get(schema.SAMPLE_KEY)} has"
            f" .{schema.SAMPLE_CLASS} {text!r}, not a class index"
        )
    return label


def repeated_passes(
    shards: list[Shard],
    skip_images: bool,
    keep: Callable[[str], bool],
    buffer: int,
    rng: random.Random,
    check: bool = True,
) -> Iterator[dict[str, Any]]:
    """The kept samples of ``shards``, pass after pass, each pass shuffled through the buffer.

    Each pass is flushed before the next begins, so the first pass's samples all come out before
    any sample repeats: a worker whose quota fits its shards sees each sample once.
    """
    while True:
        found = False
        samples = read_samples(shards, skip_images, check)
        kept = (s for s in samples if keep(s[schema.SAMPLE_KEY]))
        for sample in shuffle_buffer(kept, buffer, rng):
            found = True
            yield sample
        if not found:
            names = ", ".join(s.url for s in shards)
            raise LoaderError(f"no training samples in {names}")


def shuffle_buffer(samples: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Samples in a random order, holding at most ``size`` at a time (``size`` < 2: as read)."""
    if size < 2:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def batches(items: Iterable[Any], size: int, keep_partial: bool) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch and keep_partial:
        yield batch


# --- decoding one sample in a worker --------------------------------------------------------


def decode_side(crop_size: int) -> int:
    """Shorter side the crop is taken from: 256 for 224, as AlexNet's 256 -> 224 crops."""
    return math.ceil(crop_size * 8 / 7)


class TextEncoder(Protocol):
    """What turns a text into the token ids a text branch reads (``vocab.Vocabulary`` for the
    paper's CNN, a subword tokenizer for a pretrained encoder); picklable for loader workers."""

    def encode(self, text: str, max_tokens: int) -> list[int]: ...


@dataclass
class SampleDecoder:
    """Turns a raw shard sample into arrays; runs in the loader workers."""

    text: TextEncoder | None
    """None: the model reads no text."""
    max_tokens: int
    crop_size: int | None
    """None: the model reads no image (and no image is decoded)."""
    train: bool
    hflip: bool = True
    scale_jitter: float = 0.0
    gpu_decode: bool = False
    """Pass the JPEG bytes and the crop box instead of pixels."""

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        key = sample[schema.SAMPLE_KEY]
        try:
            decoded: dict[str, Any] = {"key": key, "label": int(sample[schema.SAMPLE_CLASS])}
            if self.text is not None:
                ids = self.text.encode(sample[schema.SAMPLE_TEXT].decode("utf-8"), self.max_tokens)
                decoded["length"] = len(ids)
                decoded["tokens"] = ids
            if self.crop_size is not None:
                decoded.update(self._image(sample[schema.SAMPLE_IMAGE], rng))
        except KeyError as exc:
            raise LoaderError(
                f"{sample.get('__url__')}: sample {key} has no {exc} member"
            ) from None
        except (ValueError, UnicodeDecodeError, image_rules.ImageRejected) as exc:
            raise LoaderError(f"{sample.get('__url__')}: sample {key}: {exc}") from None
        return decoded

    def _image(self, data: bytes, rng: random.Random) -> dict[str, Any]:
        assert self.crop_size is not None
        crop = self.crop_size
        if self.gpu_decode:
            # The GPU decoder has no pixel bound of its own: the CPU path's header check applies.
            with image_rules.open_checked(data, SHARD_IMAGE_MAX_PIXELS) as header:
                width, height = header.size
            box = self._box(width, height, rng, scale=min(width, height) / decode_side(crop))
            return {"jpeg": np.frombuffer(data, dtype=np.uint8), "box": box}
        image = image_rules.load_rgb(
            data, shorter_side_at_least=decode_side(crop), max_pixels=SHARD_IMAGE_MAX_PIXELS
        )
        # Shards written for this crop size decode to its decode side exactly (scale 1); from
        # larger images (shards of another image_size, JPEG's DCT scales being powers of two)
        # the crop covers the same share of the image and is resized.
        scale = min(image.size) / decode_side(crop)
        x0, y0, side, flip = self._box(*image.size, rng, scale=scale)
        box = (x0, y0, x0 + side, y0 + side)
        if side == crop:
            region = image.crop(box)
        else:
            region = image.resize((crop, crop), Image.Resampling.BILINEAR, box=box)
        if flip:
            region = region.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"image": np.asarray(region)}

    def _box(
        self, width: int, height: int, rng: random.Random, scale: float
    ) -> tuple[int, int, int, bool]:
        """``(x0, y0, side, flip)`` of the square crop, for an image ``scale`` times larger than
        the one the crop size refers to (the GPU decodes at full size)."""
        crop = self.crop_size
        assert crop is not None
        side = crop
        if self.train and self.scale_jitter:
            side = round(crop * rng.uniform(1 - self.scale_jitter, 1 + self.scale_jitter))
        side = max(1, min(round(side * max(scale, 1.0)), width, height))
        if self.train:
            x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
        else:
            x0, y0 = (width - side) // 2, (height - side) // 2
        flip = self.train and self.hflip and rng.random() < 0.5
        return x0, y0, side, flip


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch: ``labels`` (N,), ``tokens`` (N, longest) int32 padded, ``lengths`` (N,),
    ``images`` (N, H, W, 3) uint8, or ``jpegs`` and ``boxes`` for GPU decoding; ``keys``."""
    batch: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
    }
    first = samples[0]
    if "tokens" in first:
        # Padding to the batch's longest text, not to max_words: pooling ignores padding, and
        # short texts (tweets) would otherwise spend most of the text branch on it.
        width = max(1, *(s["length"] for s in samples))
        tokens = np.full((len(samples), width), PAD, dtype=np.int32)
        for row, sample in enumerate(samples):
            tokens[row, : sample["length"]] = sample["tokens"]
        batch["tokens"] = torch.from_numpy(tokens)
        batch["lengths"] = torch.tensor([s["length"] for s in samples], dtype=torch.int64)
    if "image" in first:
        batch["images"] = _stack_images([s["image"] for s in samples])
    if "jpeg" in first:
        batch["jpegs"] = [torch.from_numpy(s["jpeg"].copy()) for s in samples]
        batch["boxes"] = torch.tensor([s["box"] for s in samples], dtype=torch.int64)
    return batch


def _stack_images(arrays: list[np.ndarray]) -> torch.Tensor:
    if torch.utils.data.get_worker_info() is None:
        # In the training process: numpy's single-threaded copy (torch.stack's threads contend
        # with the training step's).
        return torch.from_numpy(np.stack(arrays))
    with warnings.catch_warnings():
        # The arrays are read-only views of Pillow's bytes; only default_collate reads them.
        warnings.simplefilter("ignore", UserWarning)
        # In a loader worker, default_collate stacks straight into shared memory, so the batch
        # crosses to the training process without another copy.
        return default_collate([torch.from_numpy(a) for a in arrays])


# --- the stream a DataLoader iterates --------------------------------------------------------


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of one split for one rank; each DataLoader worker reads its own shards.

    Training (``steps`` given): an endless, shuffled stream cut at the rank's ``steps`` batches,
    shared among the workers in proportion to their samples. Evaluation (``steps`` None): every
    kept sample once, in shard order, the last batch possibly partial. Which worker it is and
    how many there are is asked of the DataLoader running it, when it iterates (as
    webdataset's ``split_by_worker`` does): a count kept here could disagree with the loader
    actually used and silently leave shards unread.
    """

    def __init__(
        self,
        shards: list[Shard],
        decoder: SampleDecoder,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        steps: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 0,
        keep: Callable[[str], bool] | None = None,
        check: bool = True,
    ):
        super().__init__()
        self.shards = shards
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.steps = steps
        self.seed = seed
        self.buffer = shuffle_buffer
        self.keep = keep or _keep_all
        self.check = check
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``; call before iterating the DataLoader (workers are re-forked)."""
        self.epoch = epoch

    def worker_shards(self, worker: int, num_workers: int) -> list[Shard]:
        return split_shards(
            self.shards,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            epoch=self.epoch,
            seed=self.seed,
            shuffle=self.steps is not None,
        )

    def worker_steps(self, worker: int, num_workers: int) -> int:
        assert self.steps is not None
        samples = [
            sum(s.samples for s in self.worker_shards(w, num_workers)) for w in range(num_workers)
        ]
        return share(self.steps, samples)[worker]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._batches()
        except VsoError as exc:
            # A loader worker's exception reaches the training process wrapped in a
            # multi-line traceback; a marker batch carries its one-line message instead.
            yield {ERROR: str(exc)}

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.worker_shards(worker, num_workers)
        rng = random.Random(f"samples:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        skip_images = self.decoder.crop_size is None
        # this generates a stream of raw samples {"__key__", "jpg", "txt", "json", "cls"}
        if self.steps is None:
            samples: Iterable[dict[str, Any]] = (
                s
                for s in read_samples(shards, skip_images, self.check)
                if self.keep(s[schema.SAMPLE_KEY])
            )
        else:
            quota = self.worker_steps(worker, num_workers)
            if quota == 0:
                return
            samples = repeated_passes(shards, skip_images, self.keep, self.buffer, rng, self.check)
        # this generates a stream of decoded samples {"key", "label", "tokens", "image"}
        decoded = (self.decoder(s, rng) for s in samples)
        grouped = batches(decoded, self.batch_size, keep_partial=self.steps is None)
        if self.steps is not None:
            grouped = itertools.islice(grouped, quota)
        for batch in grouped:
            yield collate(batch)


ERROR = "__error__"
"""The key of the marker batch a stream yields in place of raising (see ``raise_errors``)."""


def raise_errors(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The batches of a loader; a marker batch from a worker becomes its one-line error."""
    for batch in batches:
        if ERROR in batch:
            raise LoaderError(batch[ERROR])
        yield batch


def _keep_all(key: str) -> bool:
    return True


@dataclass(frozen=True)
class KeepValidation:
    """Picklable key filter: keep the validation part (``wanted`` True) or the rest."""

    seed: int
    fraction: float
    wanted: bool

    def __call__(self, key: str) -> bool:
        return is_validation(key, self.seed, self.fraction) == self.wanted


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool):
    """A DataLoader over ``stream`` (which batches itself); workers only where they have shards."""
    workers = num_workers
    if stream.steps is None:
        # Evaluation: no more reader slots than shards, so no worker is started without one.
        workers = min(num_workers, max(1, len(stream.shards) // stream.world_size))
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


# --- from a uint8 batch to the model's inputs, on the device --------------------------------


class BatchMover:
    """Moves a batch to the device and finishes it there: float conversion, normalisation,
    optional colour jitter, channels-last, and (``gpu_decode``) JPEG decoding with torchvision."""

    def __init__(
        self,
        device: torch.device,
        *,
        crop_size: int | None = None,
        channels_last: bool = False,
        color_jitter: float = 0.0,
        seed: int = 0,
        rank: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        self.device = device
        self.seed = seed
        self.rank = rank
        self.crop_size = crop_size
        self.channels_last = channels_last
        self.color_jitter = color_jitter
        self.non_blocking = device.type == "cuda"
        # Per-channel mean and deviation on the 0..1 scale, applied to 0..255 pixels.
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.generator = torch.Generator(device=device)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentation generator from (seed, epoch, rank)."""
        self.generator.manual_seed(hash((self.seed, epoch, self.rank)) % 2**63)

    def inputs(self, batch: dict[str, Any], train: bool) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``SentimentNet.forward``."""
        inputs: dict[str, torch.Tensor] = {}
        if "tokens" in batch:
            inputs["tokens"] = self._move(batch["tokens"]).long()
            inputs["lengths"] = self._move(batch["lengths"])
        if "images" in batch:
            # (N, H, W, 3) uint8 -> (N, 3, H, W): a view whose memory is already channels-last.
            pixels = self._move(batch["images"]).permute(0, 3, 1, 2)
            inputs["images"] = self._finish(pixels, train)
        elif "jpegs" in batch:
            inputs["images"] = self._finish(self._decode_on_gpu(batch), train)
        return inputs

    def labels(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._move(batch["labels"])

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=self.non_blocking)

    def _finish(self, pixels: torch.Tensor, train: bool) -> torch.Tensor:
        images = pixels.float()
        if train and self.color_jitter:
            images = color_jitter(images, self.color_jitter, self.generator)
        images = (images - self.mean) / self.std
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.contiguous(memory_format=layout)

    def _decode_on_gpu(self, batch: dict[str, Any]) -> torch.Tensor:
        decode_jpeg = gpu_jpeg_decoder()
        assert self.crop_size is not None
        decoded = decode_jpeg(batch["jpegs"], device=self.device)
        return crop_boxes(decoded, batch["boxes"].tolist(), self.crop_size)


def crop_boxes(images: list[torch.Tensor], boxes: list[list[int]], crop: int) -> torch.Tensor:
    """``(N, 3, crop, crop)`` float pixels: each ``(3, H, W)`` image cut to its box
    ``(x0, y0, side, flip)``, resized to ``crop`` when the side differs, flipped when asked."""
    crops = []
    for image, (x0, y0, side, flip) in zip(images, boxes, strict=True):
        region = image[:, y0 : y0 + side, x0 : x0 + side].float()
        if side != crop:
            region = interpolate(region[None], size=(crop, crop), mode="bilinear", antialias=True)
            region = region[0].clamp(0, 255)
        if flip:
            region = region.flip(-1)
        crops.append(region)
    return torch.stack(crops)


def gpu_jpeg_decoder():
    """torchvision's batched JPEG decoder (RGB); a clear error where torchvision is missing."""
    io = require("torchvision.io", "train.gpu_decode", GPU_DECODE_INSTALL)

    def decode_jpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return io.decode_jpeg(data, mode=io.ImageReadMode.RGB, device=device)

    return decode_jpeg


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation of each image (0..255 floats) scaled by a factor drawn
    from U(1 - strength, 1 + strength)."""
    n = images.shape[0]

    def factors() -> torch.Tensor:
        u = torch.rand(n, 1, 1, 1, generator=generator, device=images.device)
        return 1 - strength + 2 * strength * u

    images = images * factors()
    grey = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])[:, None]
    mean = grey.mean(dim=(2, 3), keepdim=True)
    images = mean + (images - mean) * factors()
    grey = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])[:, None]
    images = grey + (images - grey) * factors()
    return images.clamp(0, 255)
