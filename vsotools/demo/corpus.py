"""A synthetic Flickr corpus for the offline demo: photos, descriptions, and the ANPs that find them.

``make_corpus`` writes ``DIR/photos.jsonl`` (one photo per line in Flickr's own field names, plus
``anps``, the ANP queries that find it, and ``image``, a path under DIR) and ``DIR/images/*.jpg``,
the format ``vsotools flickr-server --corpus DIR`` serves. The ANPs come from the manifest the
project ships, ``manifests/demo-anps.csv``.

As in Figure 1 of Chen, Wang and Liu (2017), the sentiment of a photo shows in its text, in its
image, or in both: a third of the photos have a sentiment-laden description and a neutral image,
a third a neutral description and a sentiment-laden image, a third both. A text-only or image-only
model can therefore be right on about two thirds of the photos for sure, and must guess on the
rest; only a model that reads both can be right on all of them. Images are drawn procedurally
(warm, bright scenes with a sun and flowers for positive; dark, cold scenes with rain and jagged
shapes for negative; mid-tone random shapes for neutral) with random layout and noise, so that the
models must learn the cue rather than memorise pictures.

A few photos exercise the filter: descriptions that are too short or too long, a bulk upload (one
owner, one description), a photo found by two ANPs of opposite sentiment, and photos whose image
file is corrupt or missing on the server.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from vsotools.core.anps import Anp, label_for_score, read_manifest
from vsotools.core.files import atomic_write_bytes, atomic_write_text
from vsotools.core.images import encode_jpeg
from vsotools.core.schema import NEGATIVE, POSITIVE

DEMO_MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "demo-anps.csv"
IMAGE_SIZE = (320, 240)

_POSITIVE_WORDS = (
    "wonderful", "happy", "beautiful", "lovely", "amazing", "joyful", "bright", "perfect",
    "delightful", "cheerful", "glorious", "sweet", "great", "fun", "peaceful", "gorgeous",
)  # fmt: skip
_NEGATIVE_WORDS = (
    "gloomy", "sad", "lonely", "terrible", "awful", "miserable", "dreary", "bleak",
    "depressing", "horrible", "cold", "broken", "grim", "painful", "dismal", "hopeless",
)  # fmt: skip
_FEELINGS_POSITIVE = (
    "feeling so grateful", "what a great time", "loved every minute", "made my day",
    "could not be happier", "best day ever", "smiling all the way home",
)  # fmt: skip
_FEELINGS_NEGATIVE = (
    "feeling down again", "what a waste of a day", "hated every minute", "ruined my day",
    "could not be sadder", "worst day ever", "crying all the way home",
)  # fmt: skip
_PLACES = (
    "the harbour", "the old town", "the park", "the station", "the market", "the hills",
    "the river bank", "the bridge", "the square", "the lake shore", "the museum", "the pier",
)  # fmt: skip
_NEUTRAL = (
    "taken on", "from", "near", "shot with my", "camera", "lens", "at", "around", "noon",
    "during", "the", "walk", "with", "a", "tripod", "settings", "iso", "exposure", "edited",
    "in", "lightroom", "uploaded", "later", "photo", "number", "series", "part", "of",
)  # fmt: skip
_CAMERAS = ("nikon d750", "canon eos", "fuji xt2", "sony a7", "olympus em5", "iphone")
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


@dataclass(frozen=True)
class CorpusReport:
    photos: int
    per_anp: dict[str, int]
    per_cue: dict[str, int]
    """Photos whose sentiment shows in: text, image, both; plus the filter exercises."""


def make_corpus(
    out_dir: str | Path,
    *,
    photos: int = 800,
    seed: int = 2017,
    manifest: str | Path = DEMO_MANIFEST,
) -> CorpusReport:
    """Write a corpus of ``photos`` labelled photos (plus a few filter exercises) to ``out_dir``."""
    out = Path(out_dir)
    rng = random.Random(seed)
    anps = read_manifest(manifest)
    by_label = {
        label: [a for a in anps if label_for_score(a.sentiment, 0.0, 0.0) == label]
        for label in (NEGATIVE, POSITIVE)
    }
    if not by_label[POSITIVE] or not by_label[NEGATIVE]:
        raise ValueError(f"{manifest}: the demo needs positive and negative ANPs")

    records: list[dict] = []
    cues = ("text", "image", "both")
    per_cue = dict.fromkeys((*cues, "exercise"), 0)
    for i in range(photos):
        label = POSITIVE if i % 2 == 0 else NEGATIVE
        cue = cues[(i // 2) % 3]
        anp = rng.choice(by_label[label])
        found_by = [anp]
        if rng.random() < 0.15:
            found_by.append(rng.choice(by_label[label]))  # found by two ANPs that agree
        text_label = label if cue in ("text", "both") else None
        image_label = label if cue in ("image", "both") else None
        records.append(
            _photo(rng, i, found_by, anp, _description(rng, anp, text_label), image_label, out)
        )
        per_cue[cue] += 1

    # Filter exercises: each of these is dropped, for a reason the filter report names.
    n = photos
    pos, neg = by_label[POSITIVE][0], by_label[NEGATIVE][0]
    exercises = [
        ([pos], "so happy", POSITIVE, {}),  # too few words
        ([neg], " ".join(["sad"] * 160), NEGATIVE, {}),  # too many words
        ([pos, neg], _description(rng, pos, POSITIVE), POSITIVE, {}),  # conflicting ANPs
        ([pos], _description(rng, pos, POSITIVE), POSITIVE, {"corrupt": True}),
        ([neg], _description(rng, neg, NEGATIVE), NEGATIVE, {"missing": True}),
    ]
    bulk = _description(rng, pos, POSITIVE)
    exercises += [([pos], bulk, POSITIVE, {"owner": "bulkuploader@N00"}) for _ in range(4)]
    for k, (found_by, text, label, extra) in enumerate(exercises):
        anp = found_by[0]
        record = _photo(rng, n + k, found_by, anp, text, label, out, **extra)
        records.append(record)
        per_cue["exercise"] += 1

    rng.shuffle(records)
    atomic_write_text(
        out / "photos.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )
    per_anp: dict[str, int] = {}
    for r in records:
        for a in r["anps"]:
            per_anp[a] = per_anp.get(a, 0) + 1
    return CorpusReport(photos=len(records), per_anp=per_anp, per_cue=per_cue)


def _photo(
    rng: random.Random,
    index: int,
    found_by: Sequence[str | Anp],
    anp: Anp,
    description: str,
    image_label: int | None,
    out: Path,
    *,
    owner: str | None = None,
    corrupt: bool = False,
    missing: bool = False,
) -> dict:
    photo_id = str(51_000_000_000 + index * 7919)
    image = f"images/{photo_id}.jpg"
    if corrupt:
        atomic_write_bytes(out / image, b"<html><body>Not an image</body></html>")
    elif not missing:
        atomic_write_bytes(out / image, encode_jpeg(draw_image(rng, image_label), quality=88))
    owner_id = owner or f"{rng.randrange(10_000_000, 99_999_999)}@N0{rng.randrange(1, 9)}"
    upload = 1_300_000_000 + index * 86_400 + rng.randrange(86_400)
    return {
        "id": photo_id,
        "owner": owner_id,
        "ownername": f"user{owner_id.split('@')[0][-4:]}",
        "title": f"{anp.adjective.title()} {anp.noun}",
        "description": description,
        "tags": " ".join(sorted({anp.adjective, anp.noun, rng.choice(_PLACES).split()[-1]})),
        "license": str(rng.choice((0, 1, 2, 4, 5, 9, 10))),
        "dateupload": str(upload),
        "datetaken": f"{2011 + index % 10}-0{1 + index % 9}-1{index % 10} 12:00:00",
        "anps": [a.anp if isinstance(a, Anp) else a for a in found_by],
        "image": image,
    }


def _description(rng: random.Random, anp: Anp, label: int | None) -> str:
    """A description of 6 to 40 words: sentiment-laden for a label, neutral for None."""
    place, day, camera = rng.choice(_PLACES), rng.choice(_DAYS), rng.choice(_CAMERAS)
    if label is None:
        # Not the ANP's noun: nouns belong to one label each, and would give the label away.
        noun = rng.choice(("street", "tree", "car", "house", "boat", "wall", "sign", "door"))
        words = [f"{noun} at {place} on {day}"]
        words += rng.sample(_NEUTRAL, rng.randint(3, 14))
        words.append(f"with the {camera}")
        return " ".join(words)
    adjectives = _POSITIVE_WORDS if label == POSITIVE else _NEGATIVE_WORDS
    feelings = _FEELINGS_POSITIVE if label == POSITIVE else _FEELINGS_NEGATIVE
    parts = [
        f"{rng.choice(adjectives)} {anp.noun} at {place} on {day}",
        rng.choice(feelings),
        f"such a {rng.choice(adjectives)} {rng.choice(('view', 'moment', 'scene', 'light'))}",
    ]
    rng.shuffle(parts)
    if rng.random() < 0.5:
        parts.append(" ".join(rng.sample(_NEUTRAL, rng.randint(2, 8))))
    html = rng.random() < 0.2
    text = ", ".join(parts)
    return (
        f"<b>{text}</b> &amp; more at https://example.org/{rng.randrange(1000)}" if html else text
    )


def draw_image(rng: random.Random, label: int | None) -> Image.Image:
    """A scene whose colours and shapes carry ``label``'s sentiment, or nothing for None."""
    width, height = IMAGE_SIZE
    if label == POSITIVE:
        top, bottom = _jitter(rng, (255, 170, 60)), _jitter(rng, (255, 230, 140))
    elif label == NEGATIVE:
        top, bottom = _jitter(rng, (25, 30, 60)), _jitter(rng, (70, 75, 90))
    else:
        grey = rng.randint(90, 170)
        top = _jitter(rng, (grey, grey + rng.randint(-20, 20), grey), 30)
        bottom = _jitter(rng, (grey, grey, grey + rng.randint(-20, 20)), 30)
    image = Image.new("RGB", IMAGE_SIZE)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / (height - 1)
        draw.line(
            [(0, y), (width, y)],
            fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)),
        )
    if label == POSITIVE:
        x, y, r = rng.randint(30, width - 30), rng.randint(20, height // 2), rng.randint(18, 40)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_jitter(rng, (255, 240, 80)))
        for _ in range(rng.randint(3, 9)):  # flowers
            fx, fy, fr = rng.randint(0, width), rng.randint(height // 2, height), rng.randint(5, 14)
            color = rng.choice(((255, 90, 150), (255, 255, 255), (250, 120, 40), (200, 80, 255)))
            draw.ellipse([fx - fr, fy - fr, fx + fr, fy + fr], fill=_jitter(rng, color))
    elif label == NEGATIVE:
        for _ in range(rng.randint(40, 90)):  # rain
            x, y = rng.randint(0, width), rng.randint(0, height)
            draw.line([(x, y), (x - 4, y + 14)], fill=_jitter(rng, (140, 150, 170)), width=1)
        for _ in range(rng.randint(2, 5)):  # jagged dark shapes
            x, y = rng.randint(0, width), rng.randint(height // 3, height)
            points = [(x + rng.randint(-60, 60), y + rng.randint(-50, 50)) for _ in range(5)]
            draw.polygon(points, fill=_jitter(rng, (15, 15, 25)))
    else:
        for _ in range(rng.randint(3, 8)):  # neutral mid-tone shapes
            x, y, s = rng.randint(0, width), rng.randint(0, height), rng.randint(10, 50)
            shade = rng.randint(80, 180)
            box = [x - s, y - s, x + s, y + s]
            if rng.random() < 0.5:
                draw.rectangle(box, fill=_jitter(rng, (shade, shade, shade), 25))
            else:
                draw.ellipse(box, fill=_jitter(rng, (shade, shade, shade), 25))
    noise = Image.effect_noise(IMAGE_SIZE, rng.randint(10, 30)).convert("RGB")
    image = Image.blend(image, noise, 0.12)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def _jitter(rng: random.Random, color: tuple[int, int, int], spread: int = 20) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-spread, spread))) for c in color)
