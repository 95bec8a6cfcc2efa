"""The demo corpus: Flickr-shaped records, real images, and sentiment only where it should be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vsotools.core.anps import read_manifest
from vsotools.demo import corpus

FLICKR_FIELDS = {
    "id", "owner", "ownername", "title", "description", "tags", "license", "dateupload",
    "datetaken", "anps", "image",
}  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, corpus.CorpusReport, list[dict]]:
    out = tmp_path_factory.mktemp("corpus")
    report = corpus.make_corpus(out, photos=60, seed=3)
    records = [json.loads(line) for line in (out / "photos.jsonl").read_text().splitlines()]
    return out, report, records


def test_records_have_flickr_fields_and_known_anps(made):
    _, report, records = made
    anps = {a.anp for a in read_manifest(corpus.DEMO_MANIFEST)}
    assert len(records) == report.photos == 60 + report.per_cue["exercise"]
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        assert set(record) == FLICKR_FIELDS
        assert record["anps"] and set(record["anps"]) <= anps
        assert record["dateupload"].isdigit()
    assert report.per_cue == {"text": 20, "image": 20, "both": 20, "exercise": 9}


def test_images_are_real_jpegs_except_the_broken_ones(made):
    out, _, records = made
    present = [r for r in records if (out / r["image"]).is_file()]
    assert len(present) == len(records) - 1, "one image is missing on purpose"
    broken = 0
    for record in present:
        try:
            with Image.open(out / record["image"]) as image:
                assert image.size == corpus.IMAGE_SIZE
        except OSError:
            broken += 1
    assert broken == 1, "one image is not an image on purpose"


def test_neutral_descriptions_carry_no_sentiment_words(made):
    _, _, records = made
    sentiment = set(corpus._POSITIVE_WORDS) | set(corpus._NEGATIVE_WORDS)
    nouns = {a.noun for a in read_manifest(corpus.DEMO_MANIFEST)}
    neutral = [r for r in records if not set(r["description"].split()) & sentiment]
    assert len(neutral) == 20, "exactly the image-cue photos have neutral text"
    for record in neutral:
        assert not set(record["description"].split()) & nouns, "an ANP's noun gives its label away"


def test_the_same_seed_makes_the_same_corpus(tmp_path, made):
    _, _, records = made
    corpus.make_corpus(tmp_path, photos=60, seed=3)
    again = [json.loads(line) for line in (tmp_path / "photos.jsonl").read_text().splitlines()]
    assert again == records
