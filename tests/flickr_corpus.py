"""Small corpora for ``vsotools flickr-server``, written by the tests that need one."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

# ANP -> sentiment score. old_house (0.0) has no label under VSO's 0 / 0 rule.
SCORES = {
    "beautiful_flower": 1.5,
    "dark_night": -1.2,
    "happy_dog": 1.1,
    "sad_face": -0.9,
    "old_house": 0.0,
    "bad_weather": -1.0,
}
# (width, height): m only, m+z, m+z+l.
IMAGE_SIZES = [(500, 375), (700, 520), (1100, 800)]


def write_manifest(path: Path, scores: dict[str, float] = SCORES) -> Path:
    lines = ["anp,adjective,noun,sentiment"]
    for anp, score in scores.items():
        adjective, noun = anp.split("_", 1)
        lines.append(f"{anp},{adjective},{noun},{score}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_corpus(
    folder: Path,
    photos: int = 120,
    *,
    anps: list[str] | None = None,
    seed: int = 7,
    broken: bool = True,
) -> list[dict]:
    """Write ``photos`` photos, each found by one or two ANPs, with JPEG images of three sizes.

    With ``broken``, three more photos test the image checks: one too small, one whose file is
    not an image, and one whose file is missing.
    """
    rng = random.Random(seed)
    anps = anps or list(SCORES)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(photos):
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        name = f"img/{i}.jpg"
        color = (i * 37 % 256, i * 91 % 256, i * 53 % 256)
        Image.new("RGB", (width, height), color).save(folder / name, quality=60)
        rows.append(_photo(i, rng, anps, name))
    if broken:
        Image.new("RGB", (20, 20), (1, 2, 3)).save(folder / "img/tiny.jpg")
        (folder / "img/text.jpg").write_bytes(b"this is not an image\n")
        for i, name in enumerate(["img/tiny.jpg", "img/text.jpg", "img/missing.jpg"]):
            rows.append(_photo(photos + i, rng, anps, name))
    with (folder / "photos.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def _photo(i: int, rng: random.Random, anps: list[str], image: str) -> dict:
    return {
        "id": str(50_000_000_000 + i * 7919),
        "owner": f"{1000 + i % 13}@N0{i % 3}",
        "ownername": f"user {i % 13}",
        "title": f"Photo {i} – été",
        "description": f'A <a href="https://example.com/{i}" rel="nofollow">nice</a> day &amp; {i}',
        "tags": f"tag{i % 5} summer",
        "license": str(i % 11),
        "dateupload": 1_400_000_000 + i * 3_600,
        "datetaken": f"2014-05-{1 + i % 28:02d} 12:00:00",
        "anps": rng.sample(anps, 1 if i % 4 else 2),
        "image": image,
    }
