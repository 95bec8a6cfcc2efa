"""Small, real shard sets for the training tests: WebDataset tars plus a ``manifest.json``.

Samples carry a learnable signal: positive images are warm and bright, negative ones cool and
dark (with noise); positive texts hold words from one list, negative texts from another, among
shared filler words. Images vary in shape; their shorter side is the shard image size, as
``vsotools shard`` writes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from vsotools.core import schema
from vsotools.shards.manifest import MANIFEST_NAME, ShardInfo, ShardManifest, shard_name

POSITIVE_WORDS = ["happy", "sunny", "lovely", "great", "smile", "beautiful", "joy", "bright"]
NEGATIVE_WORDS = ["sad", "gloomy", "awful", "broken", "cry", "ugly", "grief", "dark"]
FILLER = ["the", "a", "photo", "of", "my", "street", "today", "with", "friends", "and", "cat"]


def sample_text(rng: random.Random, label: int, words: int | None = None) -> str:
    """Filler words and cue words of the label's polarity (cues of one polarity share contexts,
    so word2vec trained on these texts tells the polarities apart)."""
    words = words or rng.randint(5, 14)
    cue = POSITIVE_WORDS if label == schema.POSITIVE else NEGATIVE_WORDS
    return " ".join(rng.choice(cue if rng.random() < 0.4 else FILLER) for _ in range(words))


def sample_image(rng: random.Random, label: int, image_size: int) -> bytes:
    """A JPEG whose shorter side is ``image_size`` and whose colour says the label."""
    longer = rng.randint(image_size, image_size * 3 // 2)
    width, height = (longer, image_size) if rng.random() < 0.5 else (image_size, longer)
    base = np.array([200, 140, 60] if label == schema.POSITIVE else [40, 70, 150], dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 40, size=(height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_shard_set(
    root: Path,
    *,
    train: int = 240,
    test: int = 80,
    per_shard: int = 60,
    image_size: int = 72,
    positive_rate: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write ``root/{split}-NNNNNN.tar`` and ``root/manifest.json``; return ``root``."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[ShardInfo]] = {}
    photo = 0
    for split, count in ((schema.TRAIN, train), (schema.TEST, test)):
        infos = []
        for index, start in enumerate(range(0, count, per_shard)):
            name = shard_name(split, index)
            labels: Counter[str] = Counter()
            with wds.TarWriter(str(root / name)) as sink:
                for _ in range(min(per_shard, count - start)):
                    photo += 1
                    label = int(rng.random() < positive_rate)
                    labels[schema.LABEL_NAMES[label]] += 1
                    sink.write(_sample(rng, str(1000 + photo), label, image_size))
            data = (root / name).read_bytes()
            infos.append(
                ShardInfo(
                    name=name,
                    samples=min(per_shard, count - start),
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    labels=dict(labels),
                )
            )
        splits[split] = infos
    manifest = ShardManifest(splits=splits, recipe={"shard": {"image_size": image_size}})
    (root / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2))
    return root


def _sample(rng: random.Random, photo_id: str, label: int, image_size: int) -> dict:
    text = sample_text(rng, label)
    meta = {
        "photo_id": photo_id,
        "anps": [],
        "anp_scores": [],
        "label": schema.LABEL_NAMES[label],
        "owner": None,
        "license": None,
        "image_url": None,
        "words": len(text.split()),
    }
    assert tuple(meta) == schema.SAMPLE_META_FIELDS
    return {
        schema.SAMPLE_KEY: schema.sample_key(photo_id),
        schema.SAMPLE_IMAGE: sample_image(rng, label, image_size),
        schema.SAMPLE_TEXT: text.encode("utf-8"),
        schema.SAMPLE_META: json.dumps(meta).encode("utf-8"),
        schema.SAMPLE_CLASS: str(label).encode("ascii"),
    }


def tiny_recipe_overrides(**changes) -> dict:
    """Train settings that make a run take seconds on a CPU (a 64-pixel crop, narrow layers)."""
    settings = {
        "train.batch_size": 20,
        "train.lr": 3e-3,
        "train.dropout": 0.1,
        "train.epochs": 2,
        "train.word_dim": 16,
        "train.max_words": 20,
        "train.num_filters": 8,
        "train.crop_size": 64,
        "train.conv_channels": [8, 16, 16, 16, 16],
        "train.fc_sizes": [32, 32],
        "train.workers": 2,
        "train.shuffle_buffer": 50,
        "train.w2v_epochs": 20,
        "train.device": "cpu",
        "shard.image_size": 72,
    }
    settings.update({f"train.{k}" if "." not in k else k: v for k, v in changes.items()})
    return settings


def tiny_set_arguments(**changes) -> list[str]:
    """The same settings as ``--set`` arguments for the command line."""
    arguments = []
    for key, value in tiny_recipe_overrides(**changes).items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        arguments += ["--set", f"{key}={text}"]
    return arguments
