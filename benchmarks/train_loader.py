"""Loader throughput: samples/s of the training pipeline per worker, against a Pillow decode floor.

The floor (the reference, measured in the same run): one process that only decodes the same
JPEG bytes, already in memory, with Pillow (``Image.open(...).convert("RGB")``). The pipeline:
``ShardStream`` in training mode through a DataLoader with N workers (tar reading, shard and
sample shuffle, decode with draft mode, random crop + flip, text to ids for the fusion model,
batching, and the transfer of each batch to the main process). Goal: per worker, at least 0.7
of the floor. ``--workers 0`` runs the pipeline in the measuring process (no transfer).

The shards are written here, at the shard stage's size (shorter side 256, quality 90), from the
MVSA photos beside the project when present, else from generated pictures.

    .venv/bin/python benchmarks/train_loader.py [--samples 2000] [--workers 0,1,2] [--crop 224]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from vsotools.core import images, schema, text
from vsotools.core.config import FetchConfig
from vsotools.shards.manifest import MANIFEST_NAME, ShardInfo, ShardManifest, shard_name
from vsotools.training.loader import SampleDecoder, Shard, ShardStream, make_loader, steps_per_epoch
from vsotools.training.vocab import Vocabulary, model_tokens

LIMITS = images.ImageLimits.from_config(FetchConfig())

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VSOTOOLS_SHARED_DATA", REPO.parent / "shared" / "data"))


def source_pairs(count: int, seed: int = 0) -> tuple[str, list[tuple[bytes, str, int]]]:
    """``count`` (image bytes, text, label) pairs: real MVSA pairs when present, else generated."""
    pairs_file = SHARED / "mvsa-dev" / "pairs.jsonl"
    rng = random.Random(seed)
    if pairs_file.is_file():
        rows = [json.loads(line) for line in pairs_file.open(encoding="utf-8")]
        rows = [r for r in rows if r["label"] in schema.LABEL_NAMES]
        rng.shuffle(rows)
        pairs = []
        for row in rows:
            data = (pairs_file.parent / row["image"]).read_bytes()
            try:
                images.validate_image(data, LIMITS)
            except images.ImageRejected:
                continue
            pairs.append((data, row["text"], schema.LABEL_NAMES.index(row["label"])))
        repeats = (pairs * (count // max(1, len(pairs)) + 1))[:count]
        return f"MVSA photos ({len(pairs)} distinct)", repeats
    pairs = []
    for i in range(count):
        x = np.linspace(0, 255, 480)[None, :, None]
        y = np.linspace(0, 255, 360)[:, None, None]
        pixels = (x * rng.random() + y * rng.random() + rng.normal(0, 20, (360, 480, 3))) % 256
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        pairs.append((buffer.getvalue(), f"generated picture number {i}", i % 2))
    return "generated pictures", pairs


def write_shards(root: Path, pairs, per_shard: int, size: int = 256) -> list[Shard]:
    """The pairs as a train split of pre-resized shards; returns the shards."""
    shards = []
    infos = []
    for index, start in enumerate(range(0, len(pairs), per_shard)):
        name = shard_name(schema.TRAIN, index)
        labels: Counter[str] = Counter()
        chunk = pairs[start : start + per_shard]
        with wds.TarWriter(str(root / name)) as sink:
            for offset, (data, raw_text, label) in enumerate(chunk):
                image = images.load_rgb(
                    data, shorter_side_at_least=size, max_pixels=LIMITS.max_pixels
                )
                jpeg = images.encode_jpeg(images.resize_shorter_side(image, size), 90)
                labels[schema.LABEL_NAMES[label]] += 1
                sink.write(
                    {
                        "__key__": f"{start + offset:08d}",
                        "jpg": jpeg,
                        "txt": text.clean_text(raw_text).encode("utf-8"),
                        "cls": str(label).encode(),
                    }
                )
        data = (root / name).read_bytes()
        infos.append(
            ShardInfo(name, len(chunk), len(data), hashlib.sha256(data).hexdigest(), dict(labels))
        )
        shards.append(Shard(str(root / name), len(chunk)))
    manifest = ShardManifest(splits={schema.TRAIN: infos, schema.TEST: []})
    (root / MANIFEST_NAME).write_text(json.dumps(manifest.to_json()))
    return shards


def shard_jpegs(shards: list[Shard]) -> list[bytes]:
    from vsotools.training.loader import read_samples

    return [s["jpg"] for s in read_samples(shards)]


def pillow_floor(jpegs: list[bytes], seconds: float) -> float:
    """Samples/s of a tight single-process loop that decodes the JPEGs to RGB with Pillow."""
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for data in jpegs:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB").load()
            done += 1
    return done / (time.perf_counter() - started)


def pipeline_rate(
    shards: list[Shard],
    vocab: Vocabulary | None,
    workers: int,
    crop: int,
    batch: int,
    epochs: int,
) -> float:
    """Samples/s of the training pipeline with ``workers`` loader processes (0: in-process);
    ``vocab`` None is the image-only (SV) pipeline, else the fusion pipeline."""
    total = sum(s.samples for s in shards)
    decoder = SampleDecoder(text=vocab, max_tokens=150, crop_size=crop, train=True)
    stream = ShardStream(
        shards,
        decoder,
        batch_size=batch,
        steps=steps_per_epoch(total, batch, 1),
        seed=0,
        shuffle_buffer=500,
    )
    samples = 0
    started = time.perf_counter()
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for batch_dict in make_loader(stream, workers, pin_memory=False):
            samples += len(batch_dict["keys"])
    return samples / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument(
        "--workers", default="0,1,2", help="comma-separated worker counts (0: in-process)"
    )
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2, help="passes per measurement")
    parser.add_argument("--floor-seconds", type=float, default=5.0)
    parser.add_argument(
        "--repeat", type=int, default=3, help="best of this many runs (a shared machine is noisy)"
    )
    args = parser.parse_args()

    source, pairs = source_pairs(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp), pairs, args.per_shard)
        jpegs = shard_jpegs(shards)
        vocab = Vocabulary.build(
            (model_tokens(text.clean_text(t), True) for _, t, _ in pairs), 1, True
        )
        print(f"{len(jpegs)} samples from {source}, {len(shards)} shards, crop {args.crop}")
        print(f"cpu cores: {os.cpu_count()}  python {sys.version.split()[0]}")
        floor = max(pillow_floor(jpegs, args.floor_seconds) for _ in range(args.repeat))
        print(f"floor  Pillow decode loop, 1 process: {floor:8.1f} samples/s")
        for workers in [int(w) for w in args.workers.split(",")]:
            for name, model_vocab in (("image", None), ("fusion", vocab)):
                rate = max(
                    pipeline_rate(shards, model_vocab, workers, args.crop, args.batch, args.epochs)
                    for _ in range(args.repeat)
                )
                per_worker = rate / max(1, workers)
                where = f"{workers} worker(s)" if workers else "in-process"
                print(
                    f"{name:<6} pipeline, {where:<12}: {rate:8.1f} samples/s,"
                    f" {per_worker:8.1f} per process = {per_worker / floor:.2f} of the floor"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
