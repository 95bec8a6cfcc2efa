"""Images: validating downloaded bytes, decoding, resizing and re-encoding with Pillow.

``validate_image`` is the gate every downloaded image passes before it is kept, and ``fit_jpeg``
downscales it when asked (fetch); both decode within a ``PixelBudget`` shared by the fetch's
threads. ``load_rgb``, ``resize_shorter_side`` and ``encode_jpeg`` re-encode images for shards
(shard); the loader decodes shard JPEGs with ``load_rgb`` too (train).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import io
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from PIL import Image, ImageOps

from vsotools.core.config import FetchConfig
from vsotools.core.errors import VsoError

# Rejection reasons, recorded in a photo record's ``error`` field.
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
TOO_MANY_PIXELS = "too_many_pixels"
EMPTY = "empty"


class ImageRejected(VsoError):
    """The bytes are not an image vsotools keeps; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """Bounds an image must meet to be kept: the recipe's ``fetch.min_side``, ``max_pixels``
    and ``max_bytes`` (``from_config``)."""

    min_side: int
    """Both width and height at least this many pixels."""
    max_pixels: int
    """Most width x height, checked from the header before any decoding (decompression bombs)."""
    max_bytes: int
    """Most bytes of the encoded file."""

    @classmethod
    def from_config(cls, config: FetchConfig) -> ImageLimits:
        return cls(
            min_side=config.min_side, max_pixels=config.max_pixels, max_bytes=config.max_bytes
        )


@dataclass(frozen=True)
class ImageInfo:
    format: str
    """Pillow's format name, e.g. JPEG or PNG."""
    width: int
    height: int


class PixelBudget:
    """How many pixels threads may hold decoded at once, given out first come, first served.

    ``hold(n)`` waits until ``n`` more pixels fit, or until nothing else is held: an image larger
    than the whole budget is still decoded, alone. A decoded pixel takes about 4 bytes (Pillow
    keeps RGB in 32 bits), so the budget bounds the memory of decodes however many threads run.
    """

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise ValueError(f"a pixel budget must be positive, got {pixels}")
        self.pixels = pixels
        self._held = 0
        self._queue: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        turn = object()
        with self._changed:
            self._queue.append(turn)
            # In arrival order: a large image is never passed over for ever by a stream of small
            # ones that would each fit beside the others.
            try:
                self._changed.wait_for(lambda: self._queue[0] is turn and self._fits(pixels))
            finally:  # also when interrupted: a turn left in the queue would stop every other
                self._queue.remove(turn)
                self._changed.notify_all()  # the next in line may fit as well
            self._held += pixels
        try:
            yield
        finally:
            with self._changed:
                self._held -= pixels
                self._changed.notify_all()

    def _fits(self, pixels: int) -> bool:
        return self._held == 0 or self._held + pixels <= self.pixels


def validate_image(
    data: bytes, limits: ImageLimits, budget: PixelBudget | None = None
) -> ImageInfo:
    """Check that ``data`` is a whole, decodable image within ``limits``; return its size.

    The pixel bound is checked from the header, before decoding. The image is then decoded
    completely (JPEGs at reduced scale through draft mode, which still reads every byte of the
    entropy-coded data), so a truncated file is rejected; the decoded pixels are taken from
    ``budget`` while they exist. Raises ``ImageRejected``.
    """
    if not data:
        raise ImageRejected(EMPTY)
    if len(data) > limits.max_bytes:
        raise ImageRejected(TOO_LARGE, f"{len(data)} bytes > {limits.max_bytes}")
    image = open_checked(data, limits.max_pixels)
    width, height = image.size
    if min(width, height) < limits.min_side:
        raise ImageRejected(TOO_SMALL, f"{width}x{height} < {limits.min_side} px")
    if image.format == "JPEG":
        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
    with _decoding(budget, image):
        _load(image)
        image.close()  # the pixels are freed before the budget is given back
    return ImageInfo(format=image.format or "", width=width, height=height)


# Where Pillow finds a JPEG's orientation tag.
_JPEG_ORIENTATION_SOURCES = ("exif", "xmp", "XML:com.adobe.xmp")


def load_rgb(
    data: bytes, *, max_pixels: int, shorter_side_at_least: int | None = None
) -> Image.Image:
    """Decode ``data`` to an RGB image with EXIF orientation applied; one of more than
    ``max_pixels`` is refused from its header (``ImageRejected``).

    With ``shorter_side_at_least``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    whose shorter side is still at least that many pixels: much cheaper, and no loss for a later
    downscale to that size.
    """
    image = open_checked(data, max_pixels)
    _draft(image, shorter_side_at_least)
    return _upright_rgb(image)


def fit_jpeg(
    data: bytes,
    size: int,
    *,
    quality: int,
    max_pixels: int,
    budget: PixelBudget | None = None,
) -> bytes:
    """``data`` as a JPEG whose longer side is at most ``size`` pixels (see ``load_rgb`` and
    ``fit_longest_side``); the decoded pixels are taken from ``budget`` until it is encoded."""
    image = open_checked(data, max_pixels)
    width, height = image.size
    _draft(image, math.ceil(size * min(width, height) / max(width, height)))
    with _decoding(budget, image):
        try:
            return encode_jpeg(fit_longest_side(_upright_rgb(image), size), quality)
        finally:
            image.close()


def _draft(image: Image.Image, shorter_side_at_least: int | None) -> None:
    if shorter_side_at_least and image.format == "JPEG":
        scale = min(image.size) / shorter_side_at_least
        if scale >= 2:
            image.draft("RGB", (image.size[0] / scale, image.size[1] / scale))


def _upright_rgb(image: Image.Image) -> Image.Image:
    _load(image)
    if image.format != "JPEG" or any(key in image.info for key in _JPEG_ORIENTATION_SOURCES):
        # In place: without an orientation to apply, exif_transpose would return a whole copy,
        # twice the memory of a large decode.
        ImageOps.exif_transpose(image, in_place=True)
    # else: a JPEG with no EXIF or XMP (every image a shard holds) has no orientation to read.
    return to_rgb(image)


@contextlib.contextmanager
def _decoding(budget: PixelBudget | None, image: Image.Image) -> Iterator[None]:
    """Take the pixels ``image`` decodes to (its size after any draft) from ``budget``, if any;
    after a large decode, hand its freed memory back to the system."""
    if budget is None:
        yield
        return
    pixels = image.size[0] * image.size[1]
    with budget.hold(pixels):
        yield
    if pixels >= _TRIM_AFTER_PIXELS:
        _release_freed_memory()


# 16 MB decoded; a Flickr crawl's images (1024 px on the longer side) stay far below.
_TRIM_AFTER_PIXELS = 4_000_000


def _release_freed_memory() -> None:
    # glibc keeps what a thread frees in that thread's arena for its next allocation, and once
    # a first large image has been freed it takes Pillow's 16 MB blocks from those arenas
    # rather than from fresh mappings. With 32 threads each keeping a large image's worth, the
    # budget would bound the decodes but not the process: 40 images of 40 Mpx downscaled by
    # `fetch --max-side` peaked at 1.8 GB without this, 0.3 GB with it.
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of ``image``; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size`` pixels, keeping the aspect ratio.

    Images whose shorter side is already ``size`` are returned unchanged; smaller ones are
    upscaled, so every shard image has the same shorter side.
    """
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new = (size, max(1, round(height * size / width)))
    else:
        new = (max(1, round(width * size / height)), size)
    return image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


def fit_longest_side(image: Image.Image, size: int) -> Image.Image:
    """Downscale so that the longer side is at most ``size`` pixels; smaller images are kept."""
    width, height = image.size
    if max(width, height) <= size:
        return image
    scale = size / max(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """Encode an RGB image as baseline JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header read (not its pixels), refused (``ImageRejected``) when it is not an
    image or has more than ``max_pixels`` pixels."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) before its own hard limit; ours is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(TOO_MANY_PIXELS, str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise ImageRejected(NOT_AN_IMAGE, str(exc)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(TOO_MANY_PIXELS, f"{width}x{height} > {max_pixels} pixels")
    return image


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected(TOO_MANY_PIXELS, str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc)
        reason = TRUNCATED if "truncated" in message or "broken data" in message else NOT_AN_IMAGE
        raise ImageRejected(reason, message) from None
