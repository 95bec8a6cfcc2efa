"""Image validation and re-encoding, on images written by the tests and real MVSA JPEGs."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
from PIL import Image

from vsotools.core import images
from vsotools.core.config import FetchConfig
from vsotools.core.images import ImageLimits, ImageRejected

LIMITS = ImageLimits.from_config(FetchConfig())
"""The recipe's default bounds."""
MAX_PIXELS = LIMITS.max_pixels


def _jpeg(size=(500, 375), color=(200, 80, 40), quality=90) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_valid_jpeg_reports_its_size():
    info = images.validate_image(_jpeg(), LIMITS)
    assert (info.format, info.width, info.height) == ("JPEG", 500, 375)


@pytest.mark.parametrize(
    ("data", "limits", "reason"),
    [
        (b"", LIMITS, images.EMPTY),
        (b"<html><body>429 Too Many Requests</body></html>", LIMITS, images.NOT_AN_IMAGE),
        (_jpeg()[:2000], LIMITS, images.TRUNCATED),
        (_jpeg((20, 300)), dataclasses.replace(LIMITS, min_side=32), images.TOO_SMALL),
        (_jpeg(), dataclasses.replace(LIMITS, max_pixels=100_000), images.TOO_MANY_PIXELS),
        (_jpeg(), dataclasses.replace(LIMITS, max_bytes=100), images.TOO_LARGE),
    ],
)
def test_bad_images_are_rejected_with_a_reason(data, limits, reason):
    with pytest.raises(ImageRejected) as info:
        images.validate_image(data, limits)
    assert info.value.reason == reason


def test_real_truncated_jpegs_are_rejected(shared_data: Path):
    data = (shared_data / "mvsa-dev" / "images" / "10.jpg").read_bytes()
    images.validate_image(data, LIMITS)
    for fraction in (0.25, 0.5, 0.95):
        with pytest.raises(ImageRejected) as info:
            images.validate_image(data[: int(len(data) * fraction)], LIMITS)
        assert info.value.reason == images.TRUNCATED


def test_resize_and_reencode_keep_the_shorter_side():
    image = images.load_rgb(_jpeg((640, 480)), shorter_side_at_least=256, max_pixels=MAX_PIXELS)
    assert min(image.size) >= 256
    resized = images.resize_shorter_side(image, 256)
    assert resized.size == (341, 256)
    again = Image.open(io.BytesIO(images.encode_jpeg(resized, quality=85)))
    assert again.size == (341, 256) and again.format == "JPEG"
    assert images.resize_shorter_side(Image.new("RGB", (100, 50)), 256).size == (512, 256)
    assert images.fit_longest_side(Image.new("RGB", (1000, 500)), 640).size == (640, 320)
    assert images.fit_longest_side(Image.new("RGB", (100, 50)), 640).size == (100, 50)


def test_transparent_and_grey_images_become_rgb():
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert images.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert images.to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt):
    """A camera photo stored sideways with orientation 6 (rotate 90 clockwise) comes out upright."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, fmt, exif=exif.tobytes())
    upright = images.load_rgb(buffer.getvalue(), max_pixels=MAX_PIXELS)
    assert upright.size == (20, 40)
    red, _, blue = upright.getpixel((10, 5))  # the stored left half is now on top
    assert red > 200 and blue < 60


def test_a_jpeg_without_exif_is_kept_as_stored():
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (0, 128, 0)).save(buffer, "JPEG")
    assert images.load_rgb(buffer.getvalue(), max_pixels=MAX_PIXELS).size == (40, 20)
