"""Dataset folders for the shard tests: a real ``filtered.parquet`` and real image files.

The images come in the formats and shapes fetch may leave behind: RGB, greyscale and CMYK
JPEGs, a JPEG with an EXIF rotation, PNG with transparency, GIF, WebP, tiny images that must be
upscaled and panoramas.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vsotools.core.schema import FILTERED_SCHEMA, LABEL_NAMES

KINDS = ("jpeg", "jpeg", "jpeg", "grey", "cmyk", "rotated", "png", "gif", "webp", "tiny", "wide")


def picture(rng: random.Random, width: int, height: int) -> Image.Image:
    """An RGB picture with gradients and noise, so that it compresses like a photo."""
    gradient = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), rng.uniform(10, 60))
    radial = Image.radial_gradient("L").resize((width, height))
    return Image.merge("RGB", (gradient, noise, radial))


def image_bytes(kind: str, rng: random.Random) -> tuple[str, bytes]:
    """(file extension, encoded bytes) of one image of ``kind``."""
    width, height = rng.randint(180, 520), rng.randint(150, 420)
    if kind == "tiny":
        width, height = rng.randint(30, 60), rng.randint(30, 60)
    elif kind == "wide":
        width, height = rng.randint(900, 1100), rng.randint(120, 180)
    image = picture(rng, width, height)
    buffer = io.BytesIO()
    if kind == "grey":
        image.convert("L").save(buffer, "JPEG", quality=85)
    elif kind == "cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=85)
    elif kind == "rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
        image.save(buffer, "JPEG", quality=85, exif=exif.tobytes())
    elif kind == "png":
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize((width, height)))
        rgba.save(buffer, "PNG")
        return "png", buffer.getvalue()
    elif kind == "gif":
        image.convert("P", palette=Image.Palette.ADAPTIVE).save(buffer, "GIF")
        return "gif", buffer.getvalue()
    elif kind == "webp":
        image.save(buffer, "WEBP", quality=80)
        return "webp", buffer.getvalue()
    else:
        image.save(buffer, "JPEG", quality=rng.choice([75, 85, 95]))
    return "jpg", buffer.getvalue()


def make_dataset(
    root: Path,
    n: int,
    *,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
    positive_share: float = 0.65,
    test_every: int = 5,
) -> list[dict[str, Any]]:
    """Write ``n`` photos under ``root/images`` and ``root/filtered.parquet``; return the records.

    Records are sorted by ANP then owner, as a crawl would group them, so that the shard stage
    has something to shuffle. Every seventh id carries characters a sample key must replace, and
    one is longer than a plain tar header holds.
    """
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        label = int(rng.random() < positive_share)
        anp = f"{'happy' if label else 'sad'}_{rng.choice(['dog', 'sky', 'face', 'car'])}"
        photo_id = f"pairs/{i}.x" if i % 7 == 3 else str(5_000_000 + i)
        if i == 10:
            photo_id = f"{'long-id-' * 15}{i}"  # a member name past the 100 bytes of a tar header
        extension, data = image_bytes(kinds[i % len(kinds)], rng)
        image_path = f"images/{i:05d}.{extension}"
        (root / image_path).write_bytes(data)
        text = f"photo {i} of a {anp.replace('_', ' ')} with ünïcödé"
        records.append(
            {
                "photo_id": photo_id,
                "text": text,
                "words": len(text.split()),
                "label": label,
                "label_name": LABEL_NAMES[label],
                "split": "test" if i % test_every == 0 else "train",
                "anps": [anp],
                "anp_scores": [1.2 if label else -1.1],
                "owner": f"{rng.randint(1, 12)}@N0{label}",
                "license": "4",
                "image_url": f"https://live.staticflickr.com/{i}.jpg",
                "image_path": image_path,
                "sha256": None,
            }
        )
    records.sort(key=lambda r: (r["anps"][0], r["owner"]))
    write_filtered(root, records)
    return records


def write_filtered(root: Path, records: list[dict[str, Any]]) -> None:
    pq.write_table(pa.Table.from_pylist(records, schema=FILTERED_SCHEMA), root / "filtered.parquet")
